"""``mmkd demo``: a real teacher distilled into a smaller student on the built-in world, end to end.

Every model is a run config in ``configs/demo/`` trained by ``run_distill``, the path ``mmkd distill`` takes:
the teacher (a ViT aligned to the real all-MiniLM-L6-v2 text encoder) is trained once on a large generated pool
and reused; the students get only a small captioned subset, and the distilled ones also learn from uncaptioned
images through the teacher's image embeddings, something only distillation can use. The cached-teacher student
runs as ``mmkd distill`` in a child process that is SIGKILLed after its first checkpoint and resumed with
``--resume`` in another one. A same-size student trained from scratch shows what distillation is worth. The
demo ends by printing where its time went, phase by phase.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from mmkd.config import RunConfig, load_config
from mmkd.config_io import to_dict
from mmkd.data import world
from mmkd.errors import MmkdError, UsageError
from mmkd.eval.efficiency import paired_speedup
from mmkd.eval.suite import world_metrics
from mmkd.fileio import atomic_write_json, atomic_write_text, read_jsonl
from mmkd.locking import FolderLock
from mmkd.models.dual_encoder import DualEncoder
from mmkd.models.hub import load_dual_encoder
from mmkd.teacher_spec import cache_value, is_cached, parse_teacher
from mmkd.train import runfolder
from mmkd.train.checkpoint import CheckpointManager

RUNS = ("teacher", "student", "student_cached", "scratch")  # the order they are trained in



# ------------------------------------------------------------------------------------------------ the demo


@dataclass
class DemoSettings:
    """What is not a run config: the teacher cache's views and the evaluation's size."""

    # the cache's K; None: the online student's data.views, so that the cache holds exactly the views (seed, crop
    # range) the online student's teacher is run on, and the two students differ only in where targets come from
    cache_views: int | None = None
    test: int = 2000  # held-out single-object test images
    retrieval_images: int = 1000  # test images whose captions form the retrieval gallery
    latency_budget_s: float = 3.0

    @classmethod
    def quick(cls) -> DemoSettings:
        return cls(test=256, retrieval_images=256, latency_budget_s=0.5)


class Phases:
    """Wall time per phase of the demo, in the order they ran (printed at the end, kept in metrics.json)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t0, 1)


def config_key(cfg: RunConfig) -> str:
    """A finished run's identity: its config as checkpoints record it (``out`` and other resumable keys left out)
    and its length, ``train.steps``, which a resume may change but which a finished run must match."""
    blob = json.dumps([runfolder.config_sha256(runfolder.run_config(cfg)), cfg.train.steps])
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def reseeded(offset: int, cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``train.seed`` moved by ``offset`` (``mmkd demo --seeds N``: offsets 0 … N-1)."""
    return replace(cfg, train=replace(cfg.train, seed=cfg.train.seed + offset)) if offset else cfg


def demo_configs(config_dir: Path, out: Path, cache: Path, quick: bool, seed_offset: int = 0) -> dict[str, RunConfig]:
    """The four run configs, pointed at this demo's folders (``--quick``: plus the overrides of quick.yaml);
    ``seed_offset`` is added to every run's ``train.seed`` (``mmkd demo --seeds N``: offsets 0 … N-1)."""
    missing = [n for n in RUNS if not (config_dir / f"{n}.yaml").is_file()]
    if missing:
        raise FileNotFoundError(f"{config_dir}: no {', '.join(f'{n}.yaml' for n in missing)}; run mmkd demo from "
                                "the repository root or give --configs DIR (the folder holding configs/demo)")
    quick_overrides: dict[str, list[str]] = {}
    if quick:
        quick_overrides = yaml.safe_load((config_dir / "quick.yaml").read_text()) or {}
    base = [f"cache_dir={cache}"]
    teacher = reseeded(seed_offset, load_config(config_dir / "teacher.yaml", base + quick_overrides.get("teacher", [])))
    teacher = replace(teacher, out=str(cache / f"teacher-{config_key(teacher)}"))
    teacher_model = str(Path(teacher.out) / "student")
    cfgs = {"teacher": teacher}
    for name in RUNS[1:]:
        cfg = reseeded(seed_offset, load_config(config_dir / f"{name}.yaml", base + [f"out={out / 'train' / name}"]
                                   + quick_overrides.get(name, [])))
        cfgs[name] = replace(cfg, teacher=teacher_model) if not is_cached(parse_teacher(cfg.teacher)) else \
            inherit_from_folder(cfg, teacher_model)
    return cfgs


def inherit_from_folder(cfg: RunConfig, teacher_model: str) -> RunConfig:
    """A cached-teacher run's ``source: teacher`` towers read the teacher's saved folder instead: a cache holds
    embeddings, not weights, and the cached student must inherit what the online one does."""
    s = cfg.student
    towers = {k: replace(t, source=teacher_model) for k, t in (("vision", s.vision), ("text", s.text))
              if t.source == "teacher"}
    return replace(cfg, student=replace(s, **towers)) if towers else cfg


def teacher_gave(cfg: RunConfig, teacher_model: str) -> str:
    """What a run took from the demo's teacher, for the table: its targets (online or cached), its weights (towers
    whose source is the teacher, e.g. inherited ViT layers), or nothing. MiniLM's own weights are not the
    teacher's gift: the teacher never trained them, and the scratch student has them too."""
    from mmkd.objectives import OBJECTIVES

    if not cfg.teacher.strip():
        return "–"
    got = []
    if any(getattr(OBJECTIVES.get(o.name), "uses_teacher", True) for o in cfg.objectives):
        got.append("cached targets" if is_cached(parse_teacher(cfg.teacher)) else "targets")
    if cfg.student.vision.source in ("teacher", teacher_model):  # the demo's teacher trains its ViT, not MiniLM
        got.append("inherited ViT layers")
    return " + ".join(got) or "nothing (captions only)"


def cache_folder(cfgs: dict[str, RunConfig], cache: Path, settings: DemoSettings) -> Path:
    """The teacher cache's folder: named by its teacher, its data and its views (a change builds a new one)."""
    from mmkd.run_setup import view_augmentation

    online = cfgs["student"]
    d = online.data
    blob = json.dumps([config_key(cfgs["teacher"]), d.train, d.world_size_train, d.unpaired, d.world_size_unpaired,
                       d.limit, d.unpaired_limit, cache_views(cfgs, settings), view_augmentation(online),
                       online.train.seed], sort_keys=True)
    return cache / f"teacher-cache-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"


def finished(cfg: RunConfig) -> bool:
    """Whether ``cfg.out`` holds a finished run of exactly this config: its metrics.json records the same hash
    and as many steps (the hash leaves ``train.steps`` out, so a 600-step teacher is not an 800-step one)."""
    try:
        done = json.loads((Path(cfg.out) / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(done, dict):
        return False
    saved = done.get("run", {}).get("config_sha256")
    steps = done.get("train", {}).get("steps")
    return saved == runfolder.config_sha256(runfolder.run_config(cfg)) and steps == cfg.train.steps


def fresh_folder(cfg: RunConfig) -> None:
    """Clear a demo-owned run folder that holds another or an unfinished run, so the run starts fresh there.

    Under the folder's lock: a run another mmkd process is writing (a second ``mmkd demo`` on the same OUT or
    cache) is refused in one line naming its PID, never deleted under it."""
    out = Path(cfg.out)
    if not out.is_dir():
        return
    with FolderLock(out, "run folder"):
        for child in out.iterdir():
            if child.name == ".lock":
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()


class ChildRunFailed(MmkdError, RuntimeError):
    """The demo's killed-and-resumed run did not go as planned (its child process failed or finished early)."""


def _last_line(path: Path) -> str:
    lines = [ln for ln in _tail(path, 5).splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "(no output)"


def kill_record(cfg: RunConfig) -> Path:
    """Where the demo notes how it killed and resumed a run: beside the run folder, as its log is."""
    run = Path(cfg.out)
    return run.parent / f"{run.name}.kill.json"


def train_run(name: str, cfg: RunConfig, log: Any, cache: Any) -> None:
    """Train one run in this process through ``run_distill`` (the path of ``mmkd distill``), from a fresh folder."""
    from mmkd.pipeline import run_distill

    log(f"training {name}: {cfg.train.steps} steps → {cfg.out}")
    fresh_folder(cfg)
    run_distill(cfg, log=log, cache=cache)  # its weights are drawn from train.seed: same seed, same start


def last_logged_step(run: Path) -> int:
    log = run / "metrics.jsonl"
    return max((r["step"] for _, r in read_jsonl(log, "a metrics log")), default=0) if log.is_file() else 0


def _tail(path: Path, n: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.is_file() else ""


def kill_and_resume(cfg: RunConfig, config_file: Path, log: Any, poll_s: float = 0.05,
                    deadline_s: float = 3600.0) -> dict[str, Any]:
    """Run ``mmkd distill CONFIG`` in a child process, SIGKILL it as soon as its first checkpoint is on disk,
    then finish the run with ``mmkd distill CONFIG --resume`` in a new process. Returns what happened."""
    run = Path(cfg.out)
    fresh_folder(cfg)
    run.mkdir(parents=True, exist_ok=True)
    at = cfg.train.ckpt_every
    if not 0 < at < cfg.train.steps:
        raise ValueError(f"{config_file}: train.ckpt_every ({at}) must fall inside train.steps "
                         f"({cfg.train.steps}) for the demo to kill the run after a checkpoint")
    ckpt = CheckpointManager(run / "checkpoints").path(at)
    command = [sys.executable, "-m", "mmkd.cli", "distill", str(config_file)]
    logs = run.parent / f"{run.name}.log"  # beside the run folder: the run owns its own folder
    log(f"training {cfg.train.steps} steps in a child process ({' '.join(command[1:])}), to be killed after its "
        f"step-{at} checkpoint; its output: {logs}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(logs, "w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        t0 = time.monotonic()
        try:
            while not ckpt.is_file():
                if child.poll() is not None:
                    raise ChildRunFailed(f"{run}: the child run exited with {child.returncode} before writing "
                                         f"{ckpt}: {_last_line(logs)} (its output: {logs})")
                if time.monotonic() - t0 > deadline_s:
                    raise ChildRunFailed(f"{run}: no {ckpt} after {deadline_s:.0f} s; see {logs}")
                time.sleep(poll_s)
            child.send_signal(signal.SIGKILL)
        finally:
            if child.poll() is None:
                child.kill()
            child.wait()
    if child.returncode != -signal.SIGKILL:
        raise ChildRunFailed(f"{run}: the child run finished (exit {child.returncode}) before it could be killed; "
                             f"give it more steps after its step-{at} checkpoint")
    killed_at = last_logged_step(run)
    log(f"killed the child (pid {child.pid}) with SIGKILL at step ~{killed_at}; resuming in a new process")
    with open(logs, "a") as out:
        done = subprocess.run(command + ["--resume"], stdout=out, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        raise ChildRunFailed(f"{run}: the resumed run failed (exit {done.returncode}): {_last_line(logs)} "
                             f"(its output: {logs})")
    return {"killed_with": "SIGKILL", "killed_pid": child.pid, "checkpoint_step": at,
            "last_logged_step_before_kill": killed_at, "resumed_with": f"mmkd distill {config_file} --resume"}


def cache_views(cfgs: dict[str, RunConfig], settings: DemoSettings) -> int:
    """The teacher cache's K: the settings', else the views the online student draws (1 when it draws none)."""
    if settings.cache_views is not None:
        return settings.cache_views
    return cfgs["student"].data.views or 1


def build_teacher_cache(online: RunConfig, teacher: DualEncoder, teacher_dir: str, folder: Path, views: int,
                        log: Any) -> None:
    """The teacher's embeddings of the online student's views, as ``mmkd cache --config`` builds them: its data,
    its view seed (train.seed) and crop range, K = ``views``, computed in the precision the online teacher uses
    (bf16 where the hardware supports it) and stored as float16 (built once; a partial one resumes)."""
    from mmkd.run_setup import training_records, view_augmentation
    from mmkd.teacher.cache import BuildSpec, build_cache

    paired, unpaired = training_records(online)
    records = paired + (unpaired or [])
    build_cache(teacher, records, folder, BuildSpec(views=views, dtype="float16", seed=online.train.seed,
                                                    augmentation=view_augmentation(online) or None,
                                                    source=teacher_dir), log=log)


def link(name: Path, target: Path) -> None:
    if name.is_symlink() or name.is_file():
        name.unlink()
    elif name.exists():
        shutil.rmtree(name)
    name.symlink_to(target.resolve(), target_is_directory=True)


def evaluate_demo(cfgs: dict[str, RunConfig], teacher_dir: Path, out: Path, cache: Path, settings: DemoSettings,
                  runs: dict[str, dict[str, Any]], log: Any) -> dict[str, Any]:
    """Every model of the demo scored once on the world's test images (zero-shot, retrieval, efficiency, the
    speed-up at batch 1 against the teacher), with its training time and what it got from the teacher; the bias
    probe over all of them."""
    test = world.to_records(world.load_split("test", settings.test, cache / "world"))
    models: dict[str, Any] = {"teacher": load_dual_encoder(teacher_dir)}
    metrics: dict[str, Any] = {"models": {}}
    for name in RUNS:
        if name == "teacher" or name not in cfgs or (name == "student_cached" and not settings.cache_views):
            continue
        run = Path(cfgs[name].out)
        link(out / name, run / "student")
        models[name] = load_dual_encoder(run / "student")
    log(f"evaluating {', '.join(models)} on {len(test)} test images")
    for name, model in models.items():
        m = world_metrics(model, test, latency_budget_s=settings.latency_budget_s,
                          retrieval_images=settings.retrieval_images)
        run_metrics = json.loads((Path(cfgs[name].out) / "metrics.json").read_text())
        m["train_seconds"] = run_metrics["train"]["seconds"]
        m["from_teacher"] = "–" if name == "teacher" else teacher_gave(cfgs[name], str(teacher_dir))
        if name != "teacher":  # batch 1, timed in rounds against the teacher: the figure load drift moves least
            m["speedup_b1"] = paired_speedup(models["teacher"], model, budget_s=settings.latency_budget_s)
        if runs.get(name, {}).get("kill"):
            m["killed_and_resumed"] = runs[name]["kill"]
        metrics["models"][name] = m
    from mmkd.eval.bias import bias_probe  # the gender–profession probe: teacher vs students' text towers

    metrics["bias"] = bias_probe(models)
    return metrics


def run_demo(out: str | Path = "runs/demo", quick: bool = False, cache_dir: str | Path | None = None,
             config_dir: str | Path = "configs/demo", settings: DemoSettings | None = None,
             log: Any = print, seed_offset: int = 0) -> dict[str, Any]:
    """Teacher → students (configs through run_distill) → one evaluation per model → metrics.json, reports."""
    from mmkd.run_setup import TargetCache

    settings = settings or (DemoSettings.quick() if quick else DemoSettings())
    out = Path(out)
    cache = Path(cache_dir) if cache_dir else out / "cache"
    out.mkdir(parents=True, exist_ok=True)
    phases = Phases()
    t_start = time.perf_counter()
    cfgs = demo_configs(Path(config_dir), out, cache, quick, seed_offset)
    settings = replace(settings, cache_views=cache_views(cfgs, settings))  # resolved, as metrics.json records it
    shared = TargetCache()  # the teacher is loaded once for every in-process run
    runs: dict[str, dict[str, Any]] = {}

    with phases("teacher"):
        t = cfgs["teacher"]
        if finished(t):
            log(f"reusing the cached teacher {t.out}")
        else:
            train_run("teacher", t, log, None)
        teacher_dir = Path(t.out) / "student"
        link(out / "teacher", teacher_dir)
    for name in ("student", "scratch"):
        with phases(name):
            if finished(cfgs[name]):
                log(f"reusing {name}: {cfgs[name].out}")
            else:
                train_run(name, cfgs[name], log, shared)
    if settings.cache_views:
        c = cfgs["student_cached"]
        folder = cache_folder(cfgs, cache, settings)
        c = cfgs["student_cached"] = replace(c, teacher=cache_value(folder))
        with phases("teacher cache"):
            teacher = shared.teacher(cfgs["student"])
            build_teacher_cache(cfgs["student"], teacher, str(teacher_dir), folder, settings.cache_views, log)
        with phases("student_cached (killed + resumed)"):
            if finished(c):
                log(f"reusing student_cached: {c.out}")
            else:
                config_file = out / "configs" / "student_cached.yaml"
                config_file.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(config_file, yaml.safe_dump(to_dict(c), sort_keys=False))
                atomic_write_json(kill_record(c), kill_and_resume(c, config_file, log))
            runs["student_cached"] = {"kill": json.loads(kill_record(c).read_text())}

    with phases("evaluation"):
        metrics = evaluate_demo(cfgs, teacher_dir, out, cache, settings, runs, log)
    metrics["demo"] = {"quick": quick, "configs": {n: to_dict(c) for n, c in cfgs.items()},
                       "settings": asdict(settings), "teacher_dir": str(teacher_dir), "machine": machine(),
                       "phases_s": phases.seconds, "seconds": round(time.perf_counter() - t_start, 1)}
    atomic_write_json(out / "metrics.json", metrics)  # the report reads it
    with phases("report"):
        shutil.copy(Path(cfgs["teacher"].out) / "metrics.jsonl", teacher_dir / "train_metrics.jsonl")
        from mmkd.report.demo_report import write_demo_report
        from mmkd.report.page import write_report

        write_demo_report(out, metrics, teacher_dir)
        write_report([out], out / "report.html", title="mmkd demo report")  # the page to open in a browser
    metrics["demo"]["phases_s"] = phases.seconds
    metrics["demo"]["seconds"] = round(time.perf_counter() - t_start, 1)
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def run_demo_seeds(seeds: int, out: str | Path = "runs/demo-seeds", quick: bool = False,
                   cache_dir: str | Path | None = None, config_dir: str | Path = "configs/demo",
                   log: Any = print) -> dict[str, Any]:
    """The whole demo ``seeds`` times (every run's ``train.seed`` offset by 0 … seeds-1, teacher included; world
    data shared), then the headline figures as mean ± sample standard deviation over the seeds → OUT/seeds.json."""
    import statistics

    if seeds < 2:
        raise UsageError(f"--seeds {seeds}: give at least 2 seeds for a spread (one seed is `mmkd demo`)")
    out = Path(out)
    cache = Path(cache_dir) if cache_dir else out / "cache"
    per_seed = []
    for i in range(seeds):
        log(f"seed offset {i} of {seeds}")
        m = run_demo(out / f"seed-{i}", quick=quick, cache_dir=cache, config_dir=config_dir, log=log, seed_offset=i)
        top1 = {k: v["zeroshot"]["colour_shape"]["top1"] for k, v in m["models"].items()}
        fig = {f"{k}_top1": v for k, v in top1.items()}
        fig["kept"] = top1["student"] / top1["teacher"]
        fig["kd_minus_scratch"] = top1["student"] - top1["scratch"]
        if "student_cached" in top1:
            fig["cached_minus_online"] = top1["student_cached"] - top1["student"]
        fig["speedup_b1"] = m["models"]["student"]["speedup_b1"]["median"]
        per_seed.append(fig)
    summary = {k: {"mean": statistics.mean(f[k] for f in per_seed), "sd": statistics.stdev(f[k] for f in per_seed)}
               for k in per_seed[0]}
    command = (f"mmkd demo --seeds {seeds}" + (" --quick" if quick else "")
               + (f" --cache {cache_dir}" if cache_dir else ""))
    result = {"command": command, "seeds": seeds,
              "per_seed": per_seed, "summary": summary}
    atomic_write_json(out / "seeds.json", result)
    return result


def machine() -> dict[str, Any]:
    """What the demo's times depend on: cores, torch threads, and whether the CPU has fast bfloat16."""
    from mmkd.teacher.targets import bf16_supported

    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "bf16": bf16_supported()}
