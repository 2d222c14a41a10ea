"""The training loop: one small task (student + objectives) driven by AdamW, warm-up + cosine, clipping,
exact accumulation (`mmkd.train.accumulate`), mixed precision (bf16, or fp16 with a grad scaler) on the task's
device, JSONL metrics and atomic checkpoints; data parallel under torchrun (`mmkd.train.sync`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
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
from mmkd.errors import MmkdError, RunStopped
from mmkd.fileio import atomic_write_text
from mmkd.models.dual_encoder import DualEncoder
from mmkd.models.model_files import first_nonfinite
from mmkd.objectives.base import WeightedSum
from mmkd.objectives.shared import MAX_LOGIT_SCALE
from mmkd.teacher.ensemble import targets_to
from mmkd.teacher.targets import Targets
from mmkd.train.acceleration import compile_failure, compile_towers, enable_grad_checkpointing
from mmkd.train.accumulate import accumulated_backward
from mmkd.train.checkpoint import CheckpointError, CheckpointManager, read_checkpoint, rng_state, set_rng_state
from mmkd.train.runfolder import RunFolderError, RunIdentity
from mmkd.train.sync import average_gradients, broadcast_state
from mmkd.train.task import DistillTask, FrozenText, synthetic_captions, text_is_frozen, train_mode


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


@dataclass(frozen=True)
class Curve:
    """Evaluations during training: ``evaluate(student)`` every ``every`` steps and at the last, on rank 0, logged to
    metrics.jsonl with their time left out of the training clock (``time_s``, ``cpu_s``, the result's seconds)."""

    evaluate: Callable[[DualEncoder], dict[str, Any]]
    every: int

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"Curve.every must be ≥ 1 (steps between evaluations), got {self.every}")


@dataclass
class _Optim:
    """What one optimizer step updates: AdamW over the trainable parameters, its schedule, fp16's grad scaler."""

    opt: torch.optim.Optimizer
    sched: Any
    scaler: torch.amp.GradScaler | None
    trainable: list[nn.Parameter]

    @classmethod
    def of(cls, task: nn.Module, cfg: TrainConfig, device: torch.device) -> _Optim:
        opt = torch.optim.AdamW(param_groups(task, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
        return cls(opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)), grad_scaler(device, cfg.precision
                   or "fp32"), [p for p in task.parameters() if p.requires_grad])


class _Clock:
    """Training time (wall and CPU) since the start, with evaluation time left out."""

    def __init__(self) -> None:
        self.t0, self.cpu0 = time.perf_counter(), time.process_time()
        self.eval_s = self.eval_cpu_s = 0.0

    def wall(self) -> float:
        return time.perf_counter() - self.t0 - self.eval_s

    def cpu(self) -> float:
        return time.process_time() - self.cpu0 - self.eval_cpu_s


def train(
    student: DualEncoder,
    objectives: WeightedSum,
    data: TrainData,
    targets: Targets | None,
    cfg: TrainConfig,
    out_dir: str | Path,
    dist_info: DistInfo | None = None,
    *,
    resume: bool = False,
    curve: Curve | None = None,
    desc: str = "train",
    progress: bool = True,
    identity: RunIdentity | None = None,
    on_start: Callable[[int], None] | None = None,
    device: torch.device | None = None,
    workers: int | None = None,
) -> TrainResult:
    """Train ``student`` for ``cfg.steps`` optimizer steps; returns timing and the last logged loss.

    targets: the teacher's answers per batch (online, tabled or cached; None: task objectives only). resume: continue
    from the newest usable checkpoint in ``out_dir/checkpoints`` (rank 0 chooses, every rank loads that file);
    identity: the run's id, config and fingerprints, saved in every checkpoint and checked on resume; on_start(step):
    called on every rank once the start step is settled, before anything is written; device: where the task and
    batches go (default: ``cfg.device``); workers: DataLoader processes (None: `default_workers`). Ctrl-C or SIGTERM
    during training raises `RunStopped`, carrying the steps finished.
    """
    out = Path(out_dir)
    dist_info = dist_info or DistInfo()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed + dist_info.rank)
    _check_objectives(objectives, targets, cfg)
    device = device or resolve_device(cfg.device, "train.device", dist_info.local_rank)
    task = _task(student, objectives, data, cfg, device)
    optim = _Optim.of(task, cfg, device)
    ckpts = CheckpointManager(out / "checkpoints", keep=cfg.keep_checkpoints,
                              run_id=identity.run_id if identity is not None else None)
    start = _restore(ckpts, resume, identity, dist_info, cfg, task, optim.opt, optim.sched, optim.scaler)
    broadcast_state(task)  # rank 0's weights everywhere (what DDP did when it wrapped the task)
    if on_start is not None:
        on_start(start)
    log = MetricsLog(out / "metrics.jsonl", dist_info.is_main)
    log.truncate_after(start)
    run_record = identity.to_plain() if identity is not None else {}
    text_frozen = text_is_frozen(student)
    train_mode(task, text_frozen)
    amp_device = device_of(task)  # autocast follows the parameters, not whether the machine has a GPU
    bar = tqdm(total=cfg.steps, initial=start, desc=desc, disable=None if progress and dist_info.is_main else True,
               dynamic_ncols=True, leave=False)
    clock = _Clock()
    last_loss = float("nan")
    means = _RunningMeans()
    done = start  # optimizer steps finished
    try:
        n_workers = workers if workers is not None else default_workers(data.streaming)
        batches = data.batches(start * cfg.accumulate, cfg.steps * cfg.accumulate, dist_info.rank, n_workers,
                               device=device)  # pixels arrive uint8, are normalised on the device
        for step in range(start, cfg.steps):
            micros = _micro_batches(batches, targets, cfg.accumulate, device)
            terms = _optimizer_step(task, micros, optim, cfg, amp_device, ckpts, step, first=step == start)
            means.add(terms)
            done = step + 1
            bar.update(1)
            if done % cfg.log_every == 0 or done == cfg.steps:
                last_loss = _log_means(log, means.take(), done, optim, clock, device)
                bar.set_postfix(loss=f"{last_loss:.4f}")
            if curve is not None and (done % curve.every == 0 or done == cfg.steps) and dist_info.is_main:
                _evaluate(curve, task, text_frozen, log, done, clock)
            if cfg.ckpt_every and done % cfg.ckpt_every == 0 and done != cfg.steps:
                _checkpoint(done, task, optim, ckpts, run_record, dist_info)
        bar.close()
        _checkpoint(cfg.steps, task, optim, ckpts, run_record, dist_info)
    except KeyboardInterrupt as e:
        raise RunStopped(done, e) from e
    task.eval()
    return TrainResult(cfg.steps, clock.wall(), last_loss, start)


def _check_objectives(objectives: WeightedSum, targets: Targets | None, cfg: TrainConfig) -> None:
    """Refuse a run that cannot train as configured, before the model moves or anything is written."""
    if objectives.needs_teacher and targets is None:
        raise ValueError("an objective needs a teacher, but none was given")
    inexact = objectives.inexact_under_accumulation()
    if cfg.accumulate > 1 and inexact:
        raise ConfigError(f"train.accumulate: {cfg.accumulate} cannot be exact with objective(s) {', '.join(inexact)} "
                          "(they run the student themselves); set train.accumulate: 1 and a larger data.batch_size")


def _task(student: DualEncoder, objectives: WeightedSum, data: TrainData, cfg: TrainConfig, device: torch.device
          ) -> DistillTask:
    """The student and objectives on ``device``, as one module (checkpointing, compilation, a frozen text table)."""
    student.to(device)
    objectives.to(device)
    if cfg.grad_checkpointing:
        enable_grad_checkpointing(student)
    # a frozen text tower's caption features are tabled once for captions held in memory; streamed shards'
    # captions are not all known up front (and would be O(samples)), so their features are computed per step
    frozen_text = (FrozenText(student, [c for r in data.paired.records for c in r.captions]
                              + synthetic_captions(data))
                   if text_is_frozen(student) and not data.streaming else None)
    if cfg.compile:
        compile_towers(student)
    return DistillTask(student, objectives, frozen_text, getattr(data.synthetic, "weight", 1.0))


def _micro_batches(batches: Iterator[TrainBatch], targets: Targets | None, accumulate: int, device: torch.device
                   ) -> list[tuple[TrainBatch, dict[str, Any]]]:
    """One step's micro-batches (batch step * accumulate + micro, decoded ahead by the loader's workers), each
    with its teacher targets (one teacher's, or each of an ensemble's) on ``device``."""
    micros = []
    for _ in range(accumulate):
        batch = next(batches)
        # a cached teacher's targets come with the batch, looked up in the loader's workers
        answer = (batch.targets if batch.targets is not None else targets(batch)) if targets is not None else {}
        batch = replace(batch, pixel_values=to_device(batch.pixel_values, device))
        micros.append((batch, targets_to(answer, device)))
    return micros


def _optimizer_step(task: DistillTask, micros: list[tuple[TrainBatch, dict[str, Any]]], optim: _Optim,
                    cfg: TrainConfig, amp_device: torch.device, ckpts: CheckpointManager, step: int, first: bool
                    ) -> dict[str, float]:
    """Forward, backward (exact accumulation), mean over ranks, clipping and the update; the step's loss terms."""
    scaler = optim.scaler
    with compile_failure(cfg.compile and first):
        terms = accumulated_backward(task, micros, cfg.precision or "fp32", amp_device,
                                     scaler.scale if scaler is not None else lambda x: x)
    micros.clear()  # the micro-batches' memory, before the optimizer's
    average_gradients(optim.trainable)  # the mean over ranks, once per step (see mmkd.train.sync)
    step_terms = {k: float(v) for k, v in terms.items()}
    if scaler is not None:
        scaler.unscale_(optim.opt)  # clip the true gradients, not the scaled ones
    grad_norm = (float(torch.nn.utils.clip_grad_norm_(task.parameters(), cfg.grad_clip)) if cfg.grad_clip
                 else 0.0)
    # fp16: an inf gradient is the scaler's business (it skips the step and lowers the scale); a bad loss is ours
    _stop_if_nonfinite(step + 1, step_terms, grad_norm if scaler is None else 0.0, ckpts)
    if scaler is not None:
        scaler.step(optim.opt)
        scaler.update()
    else:
        optim.opt.step()
    optim.sched.step()
    optim.opt.zero_grad(set_to_none=True)
    student = task.student
    with torch.no_grad():  # CLIP's clamp: a temperature below 1/100 destabilises training
        student.logit_scale.clamp_(0, math.log(getattr(student, "max_logit_scale", MAX_LOGIT_SCALE)))
    return step_terms


class _RunningMeans:
    """Each loss term's mean over the steps since the last record."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.n = 0

    def add(self, terms: dict[str, float]) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.n += 1

    def take(self) -> dict[str, float]:
        means = {k: v / self.n for k, v in self.sums.items()}
        self.sums, self.n = {}, 0
        return means


def _log_means(log: MetricsLog, local: dict[str, float], done: int, optim: _Optim, clock: _Clock,
               device: torch.device) -> float:
    """Log the loss terms' means (``local``: this rank's, averaged over ranks here); the mean loss."""
    means = {k: float(all_reduce_mean(torch.tensor(v, device=device))) for k, v in local.items()}
    log.write({"step": done, "lr": optim.sched.get_last_lr()[0], "time_s": round(clock.wall(), 3),
               "cpu_s": round(clock.cpu(), 3), **{k: round(v, 6) for k, v in means.items()}})
    return means["loss"]


def _evaluate(curve: Curve, task: DistillTask, text_frozen: bool, log: MetricsLog, done: int, clock: _Clock) -> None:
    """One point of the curve, logged; its time is taken off the training clock."""
    e0, c0 = time.perf_counter(), time.process_time()
    task.student.eval()
    result = curve.evaluate(task.student)
    train_mode(task, text_frozen)
    clock.eval_s += time.perf_counter() - e0
    clock.eval_cpu_s += time.process_time() - c0
    log.write({"step": done, "time_s": round(clock.wall(), 3), "cpu_s": round(clock.cpu(), 3),
               "eval_s": round(time.perf_counter() - e0, 3), "eval": result})


def _checkpoint(done: int, task: DistillTask, optim: _Optim, ckpts: CheckpointManager, run_record: dict[str, Any],
                dist_info: DistInfo) -> None:
    """Save the state after ``done`` steps (rank 0), refusing to save a non-finite one."""
    rngs = gather_objects(rng_state())  # every rank's RNG, so each resumes its own (dropout, masks)
    if not dist_info.is_main:
        return
    bad = first_nonfinite(task)
    if bad is not None:
        raise NonFiniteLossError(f"step {done}: parameter {bad} is not finite (NaN/inf); nothing was saved "
                                 "from it. Lower train.lr or check the teacher targets, then --resume "
                                 "from the last checkpoint")
    state = {"task": task.state_dict(), "optimizer": optim.opt.state_dict(), "scheduler": optim.sched.state_dict(),
             "rng": rngs[0], "rng_ranks": rngs, "run": run_record}
    if optim.scaler is not None:
        state["scaler"] = optim.scaler.state_dict()
    ckpts.save(done, state)


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
