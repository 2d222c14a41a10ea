"""Training the matchers: the teacher fine-tuned with BCE, the student with BCE or a KD loss.

The KD student never runs the teacher: the teacher's matching logits are computed once per training pair
(frozen, eval mode, inference mode) and looked up by pair index. Frozen features (the teacher's towers when
they do not train, the student's sentence encoder) are also computed once.

Why a loop of its own rather than ``mmkd.train.loop``: the core loop trains a dual encoder on image–caption
batches against a weighted sum of contrastive objectives, with AdamW, warmup-cosine steps, checkpoints and
DDP. Here a binary classifier trains for whole epochs over pair indices with plain Adam at a constant learning
rate (the original study's recipe, which ``param_groups``'s weight decay and ``lr_lambda``'s schedule would
change), its KD targets are cached logits looked up per pair, and a run takes seconds, so resuming buys
nothing. What it shares with the core: the KD losses' registry, the data records, model loading and saving.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmkd.devices import device_of, to_device
from mmkd.studies.matching.data import PairData, SplitIndex
from mmkd.studies.matching.losses import KDConfig, matching_loss
from mmkd.studies.matching.models import TRAINABLE, MatchingStudent, StudentConfig, TeacherMatcher

Log = Callable[[str], Any]


@dataclass
class TeacherTrainConfig:
    """Defaults of the original study: Adam, lr 5e-5, 5 epochs, end to end; ``trainable`` trades that for speed."""

    head: str = "cosine"
    trainable: str = "all"
    epochs: int = 5
    batch_size: int = 32
    lr: float = 5e-5
    head_lr: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        from mmkd.studies.matching.models import HEADS

        HEADS.get(self.head)
        if self.trainable not in TRAINABLE:
            raise ValueError(f"teacher trainable must be one of {', '.join(TRAINABLE)}, got {self.trainable!r}")
        _check_positive(self, ("batch_size", "lr", "head_lr"), "teacher")
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise ValueError(f"teacher epochs must be an integer >= 0 (0: only calibrate the head), "
                             f"got {self.epochs!r}")


@dataclass
class StudentTrainConfig:
    """Defaults of the original study: Adam, lr 1e-4, 10 epochs (its KD student used 1e-5; set ``lr``)."""

    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-4
    seed: int = 0
    transfer: int = 0  # KD students: teacher-labelled extra pairs per labelled pair (0: labelled pairs only)
    transfer_top: int = 32  # half the extra captions come from the teacher's top-scored ones for the image

    def __post_init__(self) -> None:
        _check_positive(self, ("epochs", "batch_size", "lr", "transfer_top"), "student")
        if not isinstance(self.transfer, int) or self.transfer < 0:
            raise ValueError(f"student transfer (extra teacher-labelled pairs per pair) must be an integer >= 0, "
                             f"got {self.transfer!r}")


def _check_positive(cfg: Any, names: tuple[str, ...], what: str) -> None:
    for n in names:
        v = getattr(cfg, n)
        if not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"{what} {n} must be > 0, got {v!r}")


def _batches(n: int, batch_size: int, seed: int, epoch: int) -> Iterator[torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g)
    for start in range(0, n, batch_size):
        yield perm[start:start + batch_size]


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients: how a teacher is held during distillation."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ------------------------------------------------------------------------------------------------ teacher


class TeacherInputs:
    """Feeds the teacher from a PairData: pixels and tokens, or features cached once for frozen towers."""

    def __init__(self, teacher: TeacherMatcher, data: PairData, trainable: str, batch_size: int = 128) -> None:
        enc = teacher.encoder
        meta = enc.meta
        self.teacher, self.data = teacher, data
        self.images = data.images(meta.image_size, meta.image_mean, meta.image_std)
        self.text_feats: torch.Tensor | None = None
        self.image_feats: torch.Tensor | None = None
        if trainable in ("vision", "head"):
            self.text_feats = self._cached_text(batch_size)
        if trainable == "head":
            self.image_feats = self._cached_images(batch_size)

    @torch.inference_mode()
    def _cached_text(self, batch_size: int) -> torch.Tensor:
        enc, caps = self.teacher.encoder, self.data.captions
        was = enc.text_model.training
        enc.text_model.eval()
        out = []
        for start in range(0, len(caps), batch_size):
            tok = self._tokens(caps[start:start + batch_size])
            out.append(enc.text_features(tok["input_ids"], tok["attention_mask"]).float())
        enc.text_model.train(was)
        return torch.cat(out).clone()

    @torch.inference_mode()
    def _cached_images(self, batch_size: int) -> torch.Tensor:
        enc = self.teacher.encoder
        was = enc.vision_model.training
        enc.vision_model.eval()
        n = len(self.data.records)
        out = [enc.image_features(self._pixels(torch.arange(s, min(n, s + batch_size)))).float()
               for s in range(0, n, batch_size)]
        enc.vision_model.train(was)
        return torch.cat(out).clone()

    def _pixels(self, img_idx: torch.Tensor) -> torch.Tensor:
        """A pixel batch on the teacher's device (pinned, non-blocking copy to a GPU)."""
        return to_device(self.images.batch(img_idx), device_of(self.teacher))

    def _tokens(self, texts: list[str]) -> dict[str, torch.Tensor]:
        device = device_of(self.teacher)
        return {k: v.to(device) for k, v in self.teacher.encoder.tokenize(texts).items()}

    def image_embeds(self, img_idx: torch.Tensor) -> torch.Tensor:
        t = self.teacher
        if self.image_feats is not None:
            return t.image_embeds(features=self.image_feats[img_idx.to(self.image_feats.device)])
        return t.image_embeds(self._pixels(img_idx))

    def text_embeds(self, cap_idx: torch.Tensor) -> torch.Tensor:
        t = self.teacher
        if self.text_feats is not None:
            return t.text_embeds(features=self.text_feats[cap_idx.to(self.text_feats.device)])
        tok = self._tokens([self.data.captions[int(i)] for i in cap_idx])
        return t.text_embeds(tok["input_ids"], tok["attention_mask"])

    def embeds(self, split: SplitIndex, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image_embeds(split.image_idx[rows]), self.text_embeds(split.caption_idx[rows])


def _sequential(n: int, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, n, batch_size):
        yield torch.arange(start, min(n, start + batch_size))


def teacher_logits(teacher: TeacherMatcher, inputs: TeacherInputs, split: SplitIndex,
                   batch_size: int = 256) -> torch.Tensor:
    """Matching logits of every pair of a split (on the CPU), with the teacher frozen (eval mode, inference mode)."""
    freeze(teacher)
    out = []
    with torch.inference_mode():
        for rows in _sequential(len(split), batch_size):
            out.append(teacher(*inputs.embeds(split, rows)).float().cpu())
    return torch.cat(out).clone() if out else torch.zeros(0)


def fit_teacher(teacher: TeacherMatcher, data: PairData, cfg: TeacherTrainConfig, log: Log = print
                ) -> tuple[dict[str, Any], TeacherInputs]:
    """Fine-tune the teacher's matcher on the train pairs with BCE-with-logits (Adam); frozen afterwards.

    The cosine head is first calibrated (a, b fitted on the untouched embeddings), so the small original learning
    rate fine-tunes a sensible matcher instead of spending its epochs finding the scale.
    """
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    teacher.set_trainable(cfg.trainable)
    inputs = TeacherInputs(teacher, data, cfg.trainable)
    train = data.splits["train"]
    if hasattr(teacher.head, "calibrate"):
        with torch.no_grad():
            teacher.eval()
            embs = [inputs.embeds(train, rows) for rows in _sequential(len(train), 256)]
            teacher.head.calibrate(torch.cat([e[0] for e in embs]), torch.cat([e[1] for e in embs]),
                                   train.labels.to(device_of(teacher)))
    head_params = list(teacher.head.parameters())
    head_ids = {id(p) for p in head_params}
    body = [p for p in teacher.parameters() if p.requires_grad and id(p) not in head_ids]
    opt = torch.optim.Adam([{"params": body, "lr": cfg.lr}, {"params": head_params, "lr": cfg.head_lr}])
    teacher.train()
    if cfg.trainable != "all":
        teacher.encoder.text_model.eval()
    if cfg.trainable == "head":
        teacher.encoder.vision_model.eval()
    history = []
    for epoch in range(cfg.epochs):
        total, n = 0.0, 0
        for rows in _batches(len(train), cfg.batch_size, cfg.seed, epoch):
            logits = teacher(*inputs.embeds(train, rows))
            loss = F.binary_cross_entropy_with_logits(logits, train.labels[rows].to(logits.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(rows)
            n += len(rows)
        history.append({"epoch": epoch + 1, "loss": total / max(1, n)})
        log(f"  teacher epoch {epoch + 1}/{cfg.epochs}: BCE {total / max(1, n):.4f}")
    freeze(teacher)
    return {"history": history, "seconds": time.perf_counter() - t0, "config": asdict(cfg)}, inputs


# ------------------------------------------------------------------------------------------------ transfer set


@dataclass
class TransferSet:
    """The frozen teacher's logits for every (training image, training caption) combination, computed once.

    Distillation's edge over the labels: the teacher also scores pairs nobody labelled, e.g. a caption of
    another image that describes this one too. ``logits[r, c]`` is the teacher's logit for image
    ``images[r]`` with caption ``captions[c]`` (indices into PairData.records / .captions).
    """

    images: torch.Tensor  # long [n_img]
    captions: torch.Tensor  # long [n_cap]
    logits: torch.Tensor  # float [n_img, n_cap]

    def __post_init__(self) -> None:
        self.row_of = torch.full((int(self.images.max()) + 1 if len(self.images) else 0,), -1, dtype=torch.long)
        self.row_of[self.images] = torch.arange(len(self.images))
        self._top: dict[int, torch.Tensor] = {}

    def sample(self, image_idx: torch.Tensor, k: int, top: int, g: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """k captions per image: half from the teacher's top-``top`` for it, half uniform. → (row, caption, logit)."""
        rows = self.row_of[image_idx].repeat_interleave(k)
        if (rows < 0).any():
            raise ValueError("an image of the batch is not in the transfer set (it is built from the train split)")
        if top not in self._top:
            self._top[top] = torch.topk(self.logits, min(top, self.logits.shape[1]), dim=1).indices
        top_cols = self._top[top][rows]
        pick_top = top_cols[torch.arange(len(rows)), torch.randint(top_cols.shape[1], (len(rows),), generator=g)]
        uniform = torch.randint(self.logits.shape[1], (len(rows),), generator=g)
        cols = torch.where(torch.rand(len(rows), generator=g) < 0.5, pick_top, uniform)
        return rows, self.captions[cols], self.logits[rows, cols]


def build_transfer_set(teacher: TeacherMatcher, inputs: TeacherInputs, split: SplitIndex,
                       max_entries: int = 20_000_000, seed: int = 0, batch_size: int = 256) -> TransferSet:
    """Teacher embeddings of the split's images and captions once, then its head over every combination.

    Above ``max_entries`` combinations a seeded subset of the captions is kept, so memory stays bounded.
    """
    freeze(teacher)
    images, captions = torch.unique(split.image_idx), torch.unique(split.caption_idx)
    if len(images) * len(captions) > max_entries:
        keep = max(1, max_entries // max(1, len(images)))
        g = torch.Generator().manual_seed(seed)
        captions = captions[torch.randperm(len(captions), generator=g)[:keep]].sort().values
    with torch.inference_mode():
        img = torch.cat([inputs.image_embeds(images[r]) for r in _sequential(len(images), batch_size)])
        txt = torch.cat([inputs.text_embeds(captions[r]) for r in _sequential(len(captions), batch_size)])
        chunk = max(1, 2_000_000 // max(1, len(captions) * img.shape[1]))
        rows = []
        for r in _sequential(len(images), chunk):
            a = img[r][:, None, :].expand(-1, len(captions), -1).reshape(-1, img.shape[1])
            b = txt.repeat(len(r), 1)
            rows.append(teacher(a, b).float().reshape(len(r), len(captions)).cpu())
        logits = torch.cat(rows).clone()
    return TransferSet(images, captions, logits)


# ------------------------------------------------------------------------------------------------ student


@dataclass
class StudentRun:
    model: MatchingStudent
    history: list[dict[str, float]]
    seconds: float


def student_logits(model: MatchingStudent, images: Any, text_feats: torch.Tensor, split: SplitIndex,
                   batch_size: int = 256) -> torch.Tensor:
    """The student's logits of every pair of a split, on the CPU; it runs where its parameters are."""
    model.eval()
    device = device_of(model)
    text_feats = text_feats.to(device)
    out = []
    with torch.inference_mode():
        for rows in _sequential(len(split), batch_size):
            pix = to_device(images.batch(split.image_idx[rows]), device)
            out.append(model(pix, text_feats[split.caption_idx[rows].to(device)]).float().cpu())
    return torch.cat(out).clone() if out else torch.zeros(0)


def train_student(data: PairData, text_feats: torch.Tensor, model_cfg: StudentConfig, cfg: StudentTrainConfig,
                  kd: KDConfig | None = None, teacher_train_logits: torch.Tensor | None = None,
                  log: Log = print, name: str = "student", transfer: TransferSet | None = None,
                  device: torch.device | str = "cpu") -> StudentRun:
    """The student on the train pairs: BCE alone (baseline) or α·KD + (1−α)·BCE against cached teacher logits.

    With ``cfg.transfer = k > 0`` and a ``transfer`` set, each labelled pair of a KD batch brings k unlabelled
    pairs (its image with other training captions) scored by the cached teacher logits; they share the
    image features already computed, so they cost little. The same seed gives the same initial weights and
    batch order for the baseline and every KD variant. device: where the student trains (inputs are copied there).
    """
    device = torch.device(device)
    use_transfer = kd is not None and cfg.transfer > 0
    if use_transfer and transfer is None:
        raise ValueError("student transfer > 0 needs the teacher's transfer set (build_transfer_set)")
    train = data.splits["train"]
    if kd is not None:
        if teacher_train_logits is None or teacher_train_logits.shape != (len(train),):
            raise ValueError(f"KD needs one cached teacher logit per train pair ({len(train)}), got "
                             f"{None if teacher_train_logits is None else tuple(teacher_train_logits.shape)}")
        teacher_train_logits = teacher_train_logits.detach().float().to(device)
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model = MatchingStudent(model_cfg, int(text_feats.shape[1])).to(device)  # drawn on the CPU: same on any device
    text_feats = text_feats.to(device)
    labels = train.labels.to(device)
    images = data.images(model_cfg.image_size, model_cfg.image_mean, model_cfg.image_std)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    history = []
    for epoch in range(cfg.epochs):
        model.train()
        sums: dict[str, float] = {}
        n = 0
        g = torch.Generator().manual_seed(cfg.seed * 7_919 + epoch)
        for rows in _batches(len(train), cfg.batch_size, cfg.seed, epoch):
            img = model.image_features(to_device(images.batch(train.image_idx[rows]), device))
            rows_d = rows.to(device)
            logits = model.fusion(img, text_feats[train.caption_idx[rows].to(device)])
            t_logits = teacher_train_logits[rows_d] if kd is not None else None
            extra_s = extra_t = None
            if use_transfer:
                _, caps, extra_t = transfer.sample(train.image_idx[rows], cfg.transfer, cfg.transfer_top, g)
                extra_s = model.fusion(img.repeat_interleave(cfg.transfer, 0), text_feats[caps.to(device)])
                extra_t = extra_t.to(device)
            parts = matching_loss(logits, labels[rows_d], t_logits, kd, extra_s, extra_t)
            opt.zero_grad(set_to_none=True)
            parts["loss"].backward()
            opt.step()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) * len(rows)
            n += len(rows)
        row = {"epoch": epoch + 1, **{k: v / max(1, n) for k, v in sums.items()}}
        history.append(row)
        log(f"  {name} epoch {epoch + 1}/{cfg.epochs}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()
                                                                     if k != "epoch"))
    model.eval()
    return StudentRun(model, history, time.perf_counter() - t0)


def as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float64)
