"""The training loop: one small task (student + objectives) driven by AdamW, warm-up + cosine, clipping,
accumulation, optional bf16 autocast, JSONL metrics and atomic checkpoints; DDP when run under torchrun.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from mmkd.config import TrainConfig
from mmkd.models.dual_encoder import DualEncoder
from mmkd.objectives.base import WeightedSum
from mmkd.teacher.targets import Targets, bf16_supported
from mmkd.train.batches import TrainBatch, TrainData
from mmkd.train.checkpoint import CheckpointManager, set_rng_state
from mmkd.train.distributed import DistInfo, all_reduce_mean


class FrozenText:
    """Pooled caption features of a frozen text tower, computed once instead of at every step; the text
    projection (trainable or not) is applied per step, so a locked tower with a learnt head costs nothing."""

    def __init__(self, student: DualEncoder, captions: list[str], batch_size: int = 256) -> None:
        uniq = sorted(set(captions))
        self.row = {c: i for i, c in enumerate(uniq)}
        feats = []
        was_training = student.training
        student.eval()
        # bf16 where the CPU computes it fast (bf16_supported); the embeddings agree with fp32 to ~1e-3 in cosine
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_supported()):
            for i in range(0, len(uniq), batch_size):
                tok = student.tokenize(uniq[i:i + batch_size])
                feats.append(student.text_features(tok["input_ids"], tok["attention_mask"]).float())
        student.train(was_training)
        self.features = torch.cat(feats).clone()

    def lookup(self, captions: list[str]) -> torch.Tensor:
        return self.features[torch.tensor([self.row[c] for c in captions])]


def text_is_frozen(student: DualEncoder) -> bool:
    """Whether the caption features (everything before the text projection) are fixed during training."""
    if getattr(student, "shared", None) is not None:  # a shared final block always trains
        return False
    return not any(p.requires_grad for p in student.text_model.parameters())


class DistillTask(nn.Module):
    """Student plus objectives in one module, so DDP, the optimizer and checkpoints see all trainable parts."""

    def __init__(self, student: DualEncoder, objectives: WeightedSum, frozen_text: FrozenText | None = None):
        super().__init__()
        self.student = student
        self.objectives = objectives
        self.frozen_text = frozen_text

    def forward(self, batch: TrainBatch, teacher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        s = self.student
        out: dict[str, Any] = {"logit_scale": s.logit_scale.exp(), "n_paired": batch.n_paired,
                               "pixel_values": batch.pixel_values, "model": s}  # model: for masked forwards
        feats = s.image_features(batch.pixel_values)
        out["image_features"] = feats
        out["image_embeds"] = nn.functional.normalize(s.visual_projection(feats), dim=-1)
        if self.frozen_text is not None:
            tf = self.frozen_text.lookup(batch.captions)
        else:
            tok = s.tokenize(batch.captions)
            tf = s.text_features(tok["input_ids"], tok["attention_mask"])
        out["text_features"] = tf
        out["text_embeds"] = nn.functional.normalize(s.text_projection(tf), dim=-1)
        return self.objectives(out, teacher)


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: biases, norms, embeddings' scales and the logit scale are left alone."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "logit_scale" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / max(1, cfg.warmup_steps)
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine

    return f


@dataclass
class TrainResult:
    steps: int
    seconds: float
    final_loss: float
    resumed_from: int


class MetricsLog:
    """Append-only JSONL of training metrics (rank 0 only), one object per line."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def train(
    student: DualEncoder,
    objectives: WeightedSum,
    data: TrainData,
    teacher: Targets | None,
    cfg: TrainConfig,
    out_dir: str | Path,
    dist_info: DistInfo | None = None,
    resume: bool = False,
    evaluate: Callable[[DualEncoder], dict[str, Any]] | None = None,
    eval_every: int = 0,
    desc: str = "train",
    progress: bool = True,
    stop_after: int | None = None,
) -> TrainResult:
    """Train ``student`` for ``cfg.steps`` optimizer steps; returns timing and the last logged loss.

    stop_after: return (without final checkpoint) after this many steps; used to simulate interruptions.
    """
    out = Path(out_dir)
    dist_info = dist_info or DistInfo()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed + dist_info.rank)
    if objectives.needs_teacher and teacher is None:
        raise ValueError("an objective needs a teacher, but none was given")
    paired_captions = [c for r in data.paired.records for c in r.captions]
    frozen_text = FrozenText(student, paired_captions) if text_is_frozen(student) else None
    task = DistillTask(student, objectives, frozen_text)
    model: nn.Module = task
    if dist_info.world_size > 1:
        model = nn.parallel.DistributedDataParallel(task, find_unused_parameters=False)
    opt = torch.optim.AdamW(param_groups(task, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    ckpts = CheckpointManager(out / "checkpoints", keep=cfg.keep_checkpoints)
    log = MetricsLog(out / "metrics.jsonl", dist_info.is_main)
    start = 0
    if resume:
        state = ckpts.load_latest()
        if state is not None:
            task.load_state_dict(state["task"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            set_rng_state(state["rng"])
            start = int(state["step"])
    task.train()
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if cfg.bf16 and not torch.cuda.is_available()
                else torch.autocast("cuda", dtype=torch.bfloat16) if cfg.bf16 else nullcontext())
    bar = tqdm(total=cfg.steps, initial=start, desc=desc, disable=not (progress and dist_info.is_main),
               dynamic_ncols=True, leave=False)
    t0 = time.perf_counter()
    last_loss = float("nan")
    sums: dict[str, float] = {}
    n_sum = 0
    step = start
    for step in range(start, cfg.steps):
        for micro in range(cfg.accumulate):
            batch = data.batch(step * cfg.accumulate + micro, dist_info.rank)
            targets = teacher(batch) if teacher is not None else {}
            sync = micro == cfg.accumulate - 1 or not isinstance(model, nn.parallel.DistributedDataParallel)
            ctx = nullcontext() if sync else model.no_sync()  # type: ignore[operator]
            with ctx:
                with autocast:
                    terms = model(batch, targets)
                (terms["loss"] / cfg.accumulate).backward()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            n_sum += 1
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(task.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():  # CLIP's clamp: a temperature below 1/100 destabilises training
            student.logit_scale.clamp_(0, math.log(100))
        done = step + 1
        bar.update(1)
        if done % cfg.log_every == 0 or done == cfg.steps:
            means = {k: float(all_reduce_mean(torch.tensor(v / n_sum))) for k, v in sums.items()}
            last_loss = means["loss"]
            log.write({"step": done, "lr": sched.get_last_lr()[0], "time_s": round(time.perf_counter() - t0, 3),
                       **{k: round(v, 6) for k, v in means.items()}})
            bar.set_postfix(loss=f"{last_loss:.4f}")
            sums, n_sum = {}, 0
        if evaluate is not None and eval_every and (done % eval_every == 0 or done == cfg.steps):
            if dist_info.is_main:
                student.eval()
                log.write({"step": done, "eval": evaluate(student)})
                student.train()
        if cfg.ckpt_every and done % cfg.ckpt_every == 0 and done != cfg.steps and dist_info.is_main:
            _save(ckpts, done, task, opt, sched)
        if stop_after is not None and done - start >= stop_after:
            bar.close()
            return TrainResult(done, time.perf_counter() - t0, last_loss, start)
    bar.close()
    if dist_info.is_main:
        _save(ckpts, cfg.steps, task, opt, sched)
    task.eval()
    return TrainResult(cfg.steps, time.perf_counter() - t0, last_loss, start)


def _save(ckpts: CheckpointManager, step: int, task: DistillTask, opt: torch.optim.Optimizer,
          sched: Any) -> None:
    ckpts.save(step, {"task": task.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()})
