"""The training loop: one small task (student + objectives) driven by AdamW, warm-up + cosine, clipping,
exact accumulation (`mmkd.train.accumulate`), mixed precision (bf16, or fp16 with a grad scaler) on the task's
device, JSONL metrics and atomic checkpoints; data parallel under torchrun (`mmkd.train.sync`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from mmkd.config import ConfigError, TrainConfig
from mmkd.data.batches import TrainBatch, TrainData
from mmkd.data.loader import default_workers
from mmkd.devices import device_of, grad_scaler, resolve_device, to_device
from mmkd.dist import DistInfo, all_reduce_mean, any_rank, broadcast_int, gather_objects
from mmkd.errors import MmkdError
from mmkd.fileio import atomic_write_text
from mmkd.models.dual_encoder import DualEncoder
from mmkd.models.model_files import first_nonfinite
from mmkd.objectives.base import WeightedSum
from mmkd.objectives.feature import masked_image_features
from mmkd.objectives.shared import MAX_LOGIT_SCALE
from mmkd.teacher.ensemble import MEMBERS, targets_to
from mmkd.teacher.targets import Targets, bf16_supported
from mmkd.train.acceleration import compile_failure, compile_towers, enable_grad_checkpointing
from mmkd.train.accumulate import accumulated_backward
from mmkd.train.checkpoint import CheckpointError, CheckpointManager, read_checkpoint, rng_state, set_rng_state
from mmkd.train.runfolder import RunFolderError, RunIdentity
from mmkd.train.sync import average_gradients, broadcast_state


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


def _synthetic_captions(data: TrainData) -> list[str]:
    """Every synthetic caption training can draw (data.synthetic_captions), for a frozen text tower's table."""
    if data.synthetic is None:
        return []
    recs = list(data.paired.records)
    if getattr(data.synthetic, "unpaired", False) and data.unpaired is not None:
        recs += list(data.unpaired.records)
    return data.synthetic.all_captions([r.key for r in recs])  # type: ignore[attr-defined]


def _train_mode(task: DistillTask, text_frozen: bool) -> None:
    """Train mode, except a frozen text tower: it runs as its tabled features were computed (eval mode, no
    dropout), also where they are computed per step (streamed shards, whose captions are not tabled)."""
    task.train()
    if text_frozen:
        task.student.text_model.eval()


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

    def truncate_after(self, step: int) -> None:
        """Keep only records up to ``step`` (atomically): a resumed run redoes the later steps, so their old
        lines would be duplicates; a torn line left by a kill is dropped too."""
        if not self.enabled or not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                keep.append(line + "\n")
        atomic_write_text(self.path, "".join(keep))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


class NonFiniteLossError(MmkdError, ValueError):
    """Training produced a NaN/inf loss, gradient or weight; raised before anything is saved from it."""


def _fmt(v: float) -> str:
    return f"{v:.6g}"


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
    identity: RunIdentity | None = None,
    on_start: Callable[[int], None] | None = None,
    device: torch.device | None = None,
    workers: int | None = None,
) -> TrainResult:
    """Train ``student`` for ``cfg.steps`` optimizer steps; returns timing and the last logged loss.

    resume: continue from the newest usable checkpoint in ``out_dir/checkpoints`` when there is one (rank 0
    chooses it and every rank loads that same file); identity: the run's id, config and fingerprints, saved
    in every checkpoint and checked against the one resumed; on_start(step): called on every rank once the
    start step is settled, before anything is written (run_distill writes config.yaml there); device: where
    the student, the objectives' maps and the batches go (default: ``cfg.device`` resolved); workers: DataLoader
    processes decoding batches (``data.workers``; None: `default_workers`).
    """
    out = Path(out_dir)
    dist_info = dist_info or DistInfo()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed + dist_info.rank)
    if objectives.needs_teacher and teacher is None:
        raise ValueError("an objective needs a teacher, but none was given")
    inexact = objectives.inexact_under_accumulation()
    if cfg.accumulate > 1 and inexact:
        raise ConfigError(f"train.accumulate: {cfg.accumulate} cannot be exact with objective(s) {', '.join(inexact)} "
                          "(they run the student themselves); set train.accumulate: 1 and a larger data.batch_size")
    device = device or resolve_device(cfg.device, "train.device", dist_info.local_rank)
    student.to(device)
    objectives.to(device)
    if cfg.grad_checkpointing:
        enable_grad_checkpointing(student)
    # a frozen text tower's caption features are tabled once for captions held in memory; streamed shards'
    # captions are not all known up front (and would be O(samples)), so their features are computed per step
    frozen_text = (FrozenText(student, [c for r in data.paired.records for c in r.captions]
                              + _synthetic_captions(data))
                   if text_is_frozen(student) and not data.streaming else None)
    if cfg.compile:
        compile_towers(student)
    task = DistillTask(student, objectives, frozen_text, getattr(data.synthetic, "weight", 1.0))
    trainable = [p for p in task.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(param_groups(task, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    ckpts = CheckpointManager(out / "checkpoints", keep=cfg.keep_checkpoints,
                              run_id=identity.run_id if identity is not None else None)
    scaler = grad_scaler(device, cfg.precision or "fp32")
    start = _restore(ckpts, resume, identity, dist_info, cfg, task, opt, sched, scaler)
    broadcast_state(task)  # rank 0's weights everywhere (what DDP did when it wrapped the task)
    if on_start is not None:
        on_start(start)
    log = MetricsLog(out / "metrics.jsonl", dist_info.is_main)
    log.truncate_after(start)
    run_record = identity.to_plain() if identity is not None else {}
    text_frozen = text_is_frozen(student)
    _train_mode(task, text_frozen)
    amp_device = device_of(task)  # autocast follows the parameters, not whether the machine has a GPU
    bar = tqdm(total=cfg.steps, initial=start, desc=desc, disable=None if progress and dist_info.is_main else True,
               dynamic_ncols=True, leave=False)
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    eval_s = eval_cpu_s = 0.0  # time spent evaluating, left out of the training clock (time_s, cpu_s, seconds)
    last_loss = float("nan")
    sums: dict[str, float] = {}
    n_sum = 0
    step = start

    def checkpoint(done: int) -> None:
        rngs = gather_objects(rng_state())  # every rank's RNG, so each resumes its own (dropout, masks)
        if dist_info.is_main:
            bad = first_nonfinite(task)
            if bad is not None:
                raise NonFiniteLossError(f"step {done}: parameter {bad} is not finite (NaN/inf); nothing was saved "
                                         "from it. Lower train.lr or check the teacher targets, then --resume "
                                         "from the last checkpoint")
            state = {"task": task.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "rng": rngs[0], "rng_ranks": rngs, "run": run_record}
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            ckpts.save(done, state)

    n_workers = workers if workers is not None else default_workers(data.streaming)
    batches = data.batches(start * cfg.accumulate, cfg.steps * cfg.accumulate, dist_info.rank, n_workers,
                           device=device)  # pixels arrive uint8, are normalised on the device
    for step in range(start, cfg.steps):
        micros = []
        for _ in range(cfg.accumulate):
            batch = next(batches)  # batch step * accumulate + micro, decoded ahead by the loader's workers
            # a cached teacher's targets come with the batch, looked up in the loader's workers
            targets = (batch.targets if batch.targets is not None else teacher(batch)) if teacher is not None else {}
            batch = replace(batch, pixel_values=to_device(batch.pixel_values, device))
            micros.append((batch, targets_to(targets, device)))  # one teacher's, or each of an ensemble's
        with compile_failure(cfg.compile and step == start):
            terms = accumulated_backward(task, micros, cfg.precision or "fp32", amp_device,
                                         scaler.scale if scaler is not None else lambda x: x)
        del micros
        average_gradients(trainable)  # the mean over ranks, once per step (see mmkd.train.sync)
        step_terms = {k: float(v) for k, v in terms.items()}
        if scaler is not None:
            scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
        grad_norm = (float(torch.nn.utils.clip_grad_norm_(task.parameters(), cfg.grad_clip)) if cfg.grad_clip
                     else 0.0)
        # fp16: an inf gradient is the scaler's business (it skips the step and lowers the scale); a bad loss is ours
        _stop_if_nonfinite(step + 1, step_terms, grad_norm if scaler is None else 0.0, ckpts)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():  # CLIP's clamp: a temperature below 1/100 destabilises training
            student.logit_scale.clamp_(0, math.log(getattr(student, "max_logit_scale", MAX_LOGIT_SCALE)))
        for k, v in step_terms.items():
            sums[k] = sums.get(k, 0.0) + v
        n_sum += 1
        done = step + 1
        bar.update(1)
        if done % cfg.log_every == 0 or done == cfg.steps:
            means = {k: float(all_reduce_mean(torch.tensor(v / n_sum, device=device))) for k, v in sums.items()}
            last_loss = means["loss"]
            log.write({"step": done, "lr": sched.get_last_lr()[0],
                       "time_s": round(time.perf_counter() - t0 - eval_s, 3),
                       "cpu_s": round(time.process_time() - cpu0 - eval_cpu_s, 3),
                       **{k: round(v, 6) for k, v in means.items()}})
            bar.set_postfix(loss=f"{last_loss:.4f}")
            sums, n_sum = {}, 0
        if evaluate is not None and eval_every and (done % eval_every == 0 or done == cfg.steps):
            if dist_info.is_main:
                e0, c0 = time.perf_counter(), time.process_time()
                student.eval()
                result = evaluate(student)
                _train_mode(task, text_frozen)
                eval_s += time.perf_counter() - e0
                eval_cpu_s += time.process_time() - c0
                log.write({"step": done, "time_s": round(time.perf_counter() - t0 - eval_s, 3),
                           "cpu_s": round(time.process_time() - cpu0 - eval_cpu_s, 3),
                           "eval_s": round(time.perf_counter() - e0, 3), "eval": result})
        if cfg.ckpt_every and done % cfg.ckpt_every == 0 and done != cfg.steps:
            checkpoint(done)
    bar.close()
    checkpoint(cfg.steps)
    task.eval()
    return TrainResult(cfg.steps, time.perf_counter() - t0 - eval_s, last_loss, start)


def _stop_if_nonfinite(step: int, terms: dict[str, float], grad_norm: float, ckpts: CheckpointManager) -> None:
    """Stop before the optimizer applies a NaN/inf loss or gradient; every rank decides the same."""
    bad = not all(math.isfinite(v) for v in terms.values()) or not math.isfinite(grad_norm)
    if not any_rank(bad):
        return
    values = ", ".join(f"{k}={_fmt(v)}" for k, v in terms.items())
    last = ckpts.all()
    raise NonFiniteLossError(
        f"step {step}: the loss is not finite ({values}, gradient norm={_fmt(grad_norm)}); stopped before the "
        f"update, nothing was saved from it (last checkpoint: {last[-1] if last else 'none'}). Lower train.lr, "
        "check a teacher cache with `mmkd cache --verify DIR`, then --resume")


def _restore(ckpts: CheckpointManager, resume: bool, identity: RunIdentity | None, info: DistInfo,
             cfg: TrainConfig, task: DistillTask, opt: torch.optim.Optimizer, sched: Any,
             scaler: torch.amp.GradScaler | None = None) -> int:
    """Load the checkpoint rank 0 chooses into every rank; the step to start from (0: a fresh start)."""
    path: Path | None = None
    state: dict[str, Any] | None = None
    failure: Exception | None = None
    if info.is_main and resume:
        try:
            chosen = ckpts.choose()
            if chosen is not None:
                path, state = chosen
                if identity is not None:
                    identity.check_resume(state.get("run"), path)
                    ckpts.run_id = identity.run_id
        except (CheckpointError, RunFolderError) as e:
            failure = e
    step = int(state["step"]) if state is not None else 0
    step = broadcast_int(-1 if failure is not None else step)  # ranks can never resume at different steps
    if failure is not None:
        raise failure
    if step < 0:
        raise CheckpointError(f"rank 0 could not resume from {ckpts.folder}; see its message")
    if step == 0 and state is None:
        return 0
    if state is None:  # another rank: the very file rank 0 chose, no fallback of its own
        path = ckpts.path(step)
        state = read_checkpoint(path)
    try:
        task.load_state_dict(state["task"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
    except (KeyError, RuntimeError, ValueError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path}: does not fit this run's student/objectives ({type(e).__name__}: {first}); "
                              "resume with the config that wrote it, or --overwrite") from None
    rngs = state.get("rng_ranks") or [state["rng"]]
    if info.rank < len(rngs):
        set_rng_state(rngs[info.rank])
    else:  # more ranks than the run had: a new rank gets a seed of its own, not a copy of another's
        torch.manual_seed(cfg.seed + info.rank + 7919 * step)
    return step
