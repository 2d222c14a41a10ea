"""The task a training step runs: the student and its objectives as one module, split so that accumulation can be
exact (`mmkd.train.accumulate`), with a frozen text tower's caption features tabled once."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmkd.data.batches import TrainBatch, TrainData
from mmkd.devices import device_of
from mmkd.models.dual_encoder import DualEncoder
from mmkd.objectives.base import WeightedSum
from mmkd.objectives.feature import masked_image_features
from mmkd.teacher.ensemble import MEMBERS
from mmkd.teacher.targets import bf16_supported


class FrozenText:
    """Pooled caption features of a frozen text tower, computed once instead of at every step; the text
    projection (trainable or not) is applied per step, so a locked tower with a learnt head costs nothing."""

    def __init__(self, student: DualEncoder, captions: list[str], batch_size: int = 256) -> None:
        uniq = sorted(set(captions))
        self.row = {c: i for i, c in enumerate(uniq)}
        feats = []
        was_training = student.training
        student.eval()
        device = device_of(student)
        # bf16 where the device computes it fast (bf16_supported); the embeddings agree with fp32 to ~1e-3 in cosine
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                    enabled=bf16_supported(device.type)):
            for i in range(0, len(uniq), batch_size):
                tok = {k: v.to(device) for k, v in student.tokenize(uniq[i:i + batch_size]).items()}
                feats.append(student.text_features(tok["input_ids"], tok["attention_mask"]).float())
        student.train(was_training)
        self.features = torch.cat(feats).clone()

    def lookup(self, captions: list[str]) -> torch.Tensor:
        return self.features[torch.tensor([self.row[c] for c in captions], device=self.features.device)]


def text_is_frozen(student: DualEncoder) -> bool:
    """Whether the caption features (everything before the text projection) are fixed during training."""
    if getattr(student, "shared", None) is not None:  # a shared final block always trains
        return False
    return not any(p.requires_grad for p in student.text_model.parameters())


class DistillTask(nn.Module):
    """Student plus objectives in one module, so the optimizer and checkpoints see all trainable parts.

    Split in two so accumulation can be exact (`mmkd.train.accumulate`): `outputs` is the student's per-sample
    forward (pooled features of images, captions and synthetic captions), `loss` everything after it (the
    projections, normalisation and objectives) on a whole batch of such outputs.
    """

    def __init__(self, student: DualEncoder, objectives: WeightedSum, frozen_text: FrozenText | None = None,
                 synthetic_weight: float = 1.0):
        super().__init__()
        self.student = student
        self.objectives = objectives
        self.frozen_text = frozen_text
        self.synthetic_weight = synthetic_weight  # data.synthetic_captions.weight
        # CLIP-KD's MFD: the one image forward every objective reads is masked (while training)
        self.image_mask_ratio = objectives.image_mask_ratio()

    def _text_features(self, captions: list[str]) -> torch.Tensor:
        if self.frozen_text is not None:
            return self.frozen_text.lookup(captions)
        s = self.student
        tok = {k: v.to(s.logit_scale.device, non_blocking=True) for k, v in s.tokenize(captions).items()}
        return s.text_features(tok["input_ids"], tok["attention_mask"])

    def outputs(self, batch: TrainBatch, replay: bool = False) -> dict[str, torch.Tensor]:
        """The student's per-sample outputs: pooled image, caption and synthetic-caption features.

        replay: only those a gradient flows back through (accumulation's second forward skips a frozen text tower)
        """
        s = self.student
        if self.image_mask_ratio is not None and self.training:
            feats = masked_image_features(s, batch.pixel_values, self.image_mask_ratio)
        else:
            feats = s.image_features(batch.pixel_values)
        out = {"image_features": feats}
        if replay and (self.frozen_text is not None or text_is_frozen(s)):
            return out
        out["text_features"] = self._text_features(batch.captions)
        if batch.synthetic is not None:
            out["synthetic_text_features"] = self._text_features(batch.synthetic)
        return out

    def loss(self, outputs: dict[str, torch.Tensor], teacher: dict[str, Any], n_paired: int
             ) -> dict[str, torch.Tensor]:
        """The weighted objectives on a batch of `outputs` (paired samples first); ``loss`` is the total."""
        s = self.student
        out: dict[str, Any] = {"logit_scale": s.logit_scale.exp(), "n_paired": n_paired}
        if getattr(s, "logit_bias", None) is not None:  # a SigLIP student's learnt bias
            out["logit_bias"] = s.logit_bias
        feats, tf = outputs["image_features"], outputs["text_features"]
        out["image_features"] = feats
        out["image_embeds"] = nn.functional.normalize(s.visual_projection(feats), dim=-1)
        out["text_features"] = tf
        out["text_embeds"] = nn.functional.normalize(s.text_projection(tf), dim=-1)
        terms = self.objectives(out, teacher)
        if "synthetic_text_features" not in outputs:
            return terms
        # MobileCLIP's DRClipLoss: again on (image, synthetic caption), with a weight; only the terms that read
        # captions (each objective declares them), so image-only terms count once
        tf = outputs["synthetic_text_features"]
        syn_out = dict(out, n_paired=tf.shape[0], text_features=tf,
                       text_embeds=nn.functional.normalize(s.text_projection(tf), dim=-1))
        syn = self.objectives(syn_out, _synthetic_targets(teacher), captions_only=True)
        merged = {**terms, **{f"synthetic/{k}": v.detach() for k, v in syn.items()}}
        merged["loss"] = terms["loss"] + self.synthetic_weight * syn["loss"]
        return merged

    def forward(self, batch: TrainBatch, teacher: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.loss(self.outputs(batch), teacher, batch.n_paired)


def _synthetic_targets(teacher: dict[str, Any]) -> dict[str, Any]:
    """The teacher's targets with its synthetic captions' text targets in place of the real captions' (for each
    member of an ensemble)."""
    if MEMBERS in teacher:
        return {**teacher, MEMBERS: [_synthetic_targets(m) for m in teacher[MEMBERS]]}
    out = {k: v for k, v in teacher.items() if k not in ("text_embeds", "text_features")
           and not k.startswith("synthetic_")}
    out.update({k[len("synthetic_"):]: v for k, v in teacher.items() if k.startswith("synthetic_")})
    return out


def synthetic_captions(data: TrainData) -> list[str]:
    """Every synthetic caption training can draw (data.synthetic_captions), for a frozen text tower's table."""
    if data.synthetic is None:
        return []
    recs = list(data.paired.records)
    if getattr(data.synthetic, "unpaired", False) and data.unpaired is not None:
        recs += list(data.unpaired.records)
    return data.synthetic.all_captions([r.key for r in recs])  # type: ignore[attr-defined]


def train_mode(task: DistillTask, text_frozen: bool) -> None:
    """Train mode, except a frozen text tower: it runs as its tabled features were computed (eval mode, no
    dropout), also where they are computed per step (streamed shards, whose captions are not tabled)."""
    task.train()
    if text_frozen:
        task.student.text_model.eval()
