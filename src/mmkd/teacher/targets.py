"""What the distillation objectives see of a teacher: normalised embeddings and pooled features per batch.

Two providers share one interface: ``OnlineTeacher`` runs the frozen teacher on each batch (in bfloat16
where the CPU supports it, under inference_mode), ``TableTeacher`` looks up targets computed once. The
teacher keeps its own tokenizer and preprocessing: nothing assumes it shares them with the student.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F

from mmkd.data.batches import ImageBank, TrainBatch
from mmkd.data.records import DataError
from mmkd.devices import device_of, to_device
from mmkd.models.dual_encoder import DualEncoder
from mmkd.teacher.unimodal import ImageTeacher


class Targets(Protocol):
    def __call__(self, batch: TrainBatch) -> dict[str, torch.Tensor]: ...


def bf16_supported(device_type: str | None = None) -> bool:
    """bfloat16 matmuls are fast on CPUs with AVX512-BF16/AMX, and on CUDA; elsewhere fp32 is faster.

    device_type: where the model runs ("cpu", "cuda"); default: CUDA when available, else the CPU.
    """
    if device_type == "cuda" or (device_type is None and torch.cuda.is_available()):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


def freeze(model: DualEncoder | ImageTeacher) -> DualEncoder | ImageTeacher:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@torch.inference_mode()
def teacher_outputs(model: DualEncoder | ImageTeacher, pixel_values: torch.Tensor | None,
                    captions: Sequence[str] | None, bf16: bool = False, features: bool = False
                    ) -> dict[str, torch.Tensor]:
    """Normalised embeddings (and pooled pre-projection features) of a teacher, as float32 plain tensors.

    Shared by the online teacher and the cache builder, so a cached target is exactly what the online teacher
    would have returned for the same pixels. Inputs move to the model's device; outputs stay there. The model
    must be in eval mode (dropout off). An image-only (unimodal) teacher gives its pooled image features only.
    """
    out: dict[str, torch.Tensor] = {}
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        if pixel_values is not None:
            feats = model.image_features(to_device(pixel_values, device))
            if model.visual_projection is None:  # an image-only teacher: its pooled CLS is all it has
                out["image_features"] = feats.float()
            else:
                out["image_embeds"] = F.normalize(model.visual_projection(feats).float(), dim=-1)
                if features:
                    out["image_features"] = feats.float()
        if captions is not None and model.text_model is not None:
            tok = {k: v.to(device, non_blocking=True) for k, v in model.tokenize(captions).items()}
            feats = model.text_features(tok["input_ids"], tok["attention_mask"])
            out["text_embeds"] = F.normalize(model.text_projection(feats).float(), dim=-1)
            if features:
                out["text_features"] = feats.float()
    return {k: v.clone() for k, v in out.items()}  # plain tensors, usable in autograd


class OnlineTeacher:
    """Runs the frozen teacher on every batch: the expensive baseline the cache is measured against."""

    def __init__(self, model: DualEncoder | ImageTeacher, paired: ImageBank, unpaired: ImageBank | None = None,
                 bf16: bool | None = None, features: bool = False) -> None:
        self.model = freeze(model)
        self.paired, self.unpaired = paired, unpaired
        self.bf16 = bf16_supported(device_of(model).type) if bf16 is None else bf16
        self.features = features

    def encode(self, pixel_values: torch.Tensor | None, captions: Sequence[str] | None
               ) -> dict[str, torch.Tensor]:
        return teacher_outputs(self.model, pixel_values, captions, bf16=self.bf16, features=self.features)

    def extras(self) -> dict[str, torch.Tensor]:
        """Batch-independent targets: the teacher's logit scale (relational objectives use it)."""
        return teacher_extras(self.model)

    def __call__(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        if batch.teacher_pixels is not None:  # decoded beside the student's pixels (in the loader's workers)
            return {**self.encode(batch.teacher_pixels, batch.captions), **self.extras()}
        pix = [self.paired.pixels(batch.paired_idx, batch.views[: batch.n_paired])]
        if self.unpaired is not None and len(batch.unpaired_idx):
            pix.append(self.unpaired.pixels(batch.unpaired_idx, batch.views[batch.n_paired:]))
        return {**self.encode(torch.cat(pix), batch.captions), **self.extras()}


def teacher_extras(model: object) -> dict[str, torch.Tensor]:
    """The teacher's similarity scale, exp'd and clamped as in training (CLIP caps it at 100); a SigLIP teacher's
    learnt bias and uncapped scale besides (its sigmoid probabilities need both as trained)."""
    scale = getattr(model, "logit_scale", None)
    if not isinstance(scale, torch.Tensor):
        return {}  # an image-only teacher has no similarity scale
    out = {"logit_scale": scale.detach().float().exp().clamp(max=100.0).clone()}
    bias = getattr(model, "logit_bias", None)
    if isinstance(bias, torch.Tensor):
        out["logit_bias"] = bias.detach().float().clone()
        out["sigmoid_logit_scale"] = scale.detach().float().exp().clone()
    return out


class TableTeacher:
    """Targets looked up by sample key (and view) and caption text: the teacher never runs during training.

    ``image_keys`` maps a key to its view-0 row; ``view_rows`` maps (key, v) to the row of augmented view v ≥ 1,
    for data drawn as a finite set of views (``data.views``)."""

    def __init__(self, image: dict[str, torch.Tensor], image_keys: dict[str, int],
                 text: dict[str, torch.Tensor], text_keys: dict[str, int],
                 extras: dict[str, torch.Tensor] | None = None,
                 view_rows: dict[tuple[str, int], int] | None = None) -> None:
        self.image, self.image_keys = image, image_keys
        self.text, self.text_keys = text, text_keys
        self.extras = dict(extras or {})
        self.view_rows = dict(view_rows or {})

    def to(self, device: torch.device | str) -> TableTeacher:
        """The targets moved to ``device`` once (the training device), so no step copies them again."""
        self.image = {k: v.to(device) for k, v in self.image.items()}
        self.text = {k: v.to(device) for k, v in self.text.items()}
        self.extras = {k: v.to(device) for k, v in self.extras.items()}
        return self

    def __call__(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        device = next(iter(self.image.values())).device if self.image else None
        try:
            rows = torch.tensor([self.image_keys[k] if not v else self.view_rows[(k, v)]
                                 for k, v in zip(batch.keys, batch.views)], device=device)
        except KeyError as e:
            raise KeyError(f"no teacher target for sample {e.args[0]!r}") from None
        out = {name: t[rows].float() for name, t in self.image.items()}
        if self.text:
            trows = torch.tensor([self.text_keys[c] for c in batch.captions], device=device)
            out.update({name: t[trows].float() for name, t in self.text.items()})
        out.update(self.extras)
        return out


def _batched(seq: Sequence, size: int) -> Iterable[Sequence]:
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


def table_images(banks: Sequence[ImageBank], views: int = 1) -> int:
    """Images a table of ``banks`` holds: ``views`` per sample of an augmented bank, one per sample otherwise."""
    return sum(len(b) * (views if b.augment else 1) for b in banks)


def precompute(teacher: OnlineTeacher, banks: Sequence[ImageBank], captions: Iterable[str],
               batch_size: int = 256, progress: bool = False, views: int = 1) -> TableTeacher:
    """Run the teacher once over every image and every distinct caption: view 0 of each image, and views
    1 … ``views`` − 1 of an augmented bank's (the same replayable crops training draws)."""
    from tqdm import tqdm

    image: dict[str, list[torch.Tensor]] = {}
    keys: dict[str, int] = {}
    view_rows: dict[tuple[str, int], int] = {}
    rows = 0
    bar = tqdm(total=table_images(banks, views), desc="teacher targets (images)", disable=None if progress else True,
               leave=False)
    for bank in banks:
        for v in range(views if bank.augment else 1):
            for chunk in _batched(range(len(bank)), batch_size):
                out = teacher.encode(bank.pixels(list(chunk), [v] * len(chunk)), None)
                for name, t in out.items():
                    image.setdefault(name, []).append(t)
                for i in chunk:
                    key = bank.records[i].key
                    if v == 0 and key in keys:
                        raise DataError(f"sample key {key!r} appears twice across the training sets; keys must be "
                                        "unique")
                    if v == 0:
                        keys[key] = rows
                    else:
                        view_rows[(key, v)] = rows
                    rows += 1
                bar.update(len(chunk))
    bar.close()
    uniq = sorted(set(captions))
    text: dict[str, list[torch.Tensor]] = {}
    for chunk in _batched(uniq, batch_size):
        for name, t in teacher.encode(None, list(chunk)).items():
            text.setdefault(name, []).append(t)
    return TableTeacher({k: torch.cat(v) for k, v in image.items()}, keys,
                        {k: torch.cat(v) for k, v in text.items()}, {c: i for i, c in enumerate(uniq)},
                        teacher.extras(), view_rows)
