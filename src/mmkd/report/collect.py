"""Read run folders (``mmkd demo``, ``mmkd eval all``, ``mmkd distill``) into one normalised comparison.

The three writers differ a little (the demo's ``retrieval`` is one flat block of the world's test split,
``eval all`` keys retrieval by data set, ``distill`` has an ``eval`` list and no model blocks); here they
become the same shape, so the page renderer never branches on who wrote a run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmkd import fileio
from mmkd.errors import UsageError
from mmkd.fileio import JsonLineError

# the demo's models and their labels (the demo's report and `mmkd report` on a demo folder say the same)
ROWS = (("teacher", "teacher"), ("student", "distilled student"),
        ("student_cached", "distilled (cache, killed + resumed)"), ("scratch", "scratch student"))

DEMO_LABELS = dict(ROWS)
FLAT_RETRIEVAL_NAME = "world"  # the demo's retrieval block is the built-in world's test split


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """A training log's records; none when it does not exist (yet)."""
    if not path.is_file():
        return []
    return [obj for _, obj in fileio.read_jsonl(path, "a metrics log")]


@dataclass
class Curve:
    """One training log: loss per step, and the periodic evaluations the loop logged (``eval`` records)."""

    label: str
    source: Path
    loss: list[tuple[int, float]] = field(default_factory=list)
    evals: list[tuple[int, dict[str, float]]] = field(default_factory=list)


@dataclass
class ModelEntry:
    label: str  # unique across the report
    run: str
    name: str  # the name inside its run's metrics.json
    metrics: dict[str, Any]
    source: Path | None = None  # the model folder, where the run records it (one model in two runs is shown once)


@dataclass
class RunData:
    name: str
    path: Path
    raw: dict[str, Any]
    models: list[ModelEntry]
    curves: list[Curve]
    bias: dict[str, Any] | None


@dataclass
class ReportData:
    runs: list[RunData]

    @property
    def models(self) -> list[ModelEntry]:
        return [m for r in self.runs for m in r.models]

    @property
    def curves(self) -> list[Curve]:
        return [c for r in self.runs for c in r.curves]

    def reference(self) -> ModelEntry | None:
        """The teacher (first model named ``teacher``), the 100 % of "kept of teacher"."""
        return next((m for m in self.models if m.name == "teacher"), None)

    def benchmarks(self, kind: str) -> list[str]:
        """Zero-shot or retrieval set names in first-seen order across models."""
        names: list[str] = []
        for m in self.models:
            for n in m.metrics.get(kind, {}):
                if n not in names:
                    names.append(n)
        return names


def _normalise_model(m: dict[str, Any]) -> dict[str, Any]:
    out = dict(m)
    ret = out.get("retrieval")
    if isinstance(ret, dict) and "i2t_r1" in ret:
        out["retrieval"] = {FLAT_RETRIEVAL_NAME: ret}
    zs = out.get("zeroshot")
    if isinstance(zs, dict):
        out["zeroshot"] = {k: v for k, v in zs.items() if isinstance(v, dict) and "top1" in v}
    return out


def _from_distill(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``mmkd distill``'s metrics.json → one model block (its eval entries, keyed ``kind:DATA[:class_set]``)."""
    block: dict[str, Any] = {"zeroshot": {}, "retrieval": {}}
    for key, value in (raw.get("eval") or {}).items():
        kind, _, rest = key.partition(":")
        if kind in ("zeroshot", "retrieval") and isinstance(value, dict):
            block[kind][rest or key] = value
        elif isinstance(value, dict) and "top1" in value:
            block["zeroshot"][key] = value
        elif isinstance(value, dict) and "i2t_r1" in value:
            block["retrieval"][key] = value
    if "train" in raw:
        block["train_seconds"] = raw["train"].get("seconds")
    overlap = raw.get("eval_overlap")
    if isinstance(overlap, dict):  # eval entries whose data the run trained on (see mmkd.preflight.eval_overlaps)
        block["eval_overlap"] = {k.partition(":")[2] or k: v for k, v in overlap.items()}
    return {"student": block}


def _sources(raw: dict[str, Any], run_dir: Path, distill: bool) -> dict[str, Path]:
    """Model name → its folder, resolved: ``eval all`` records the folders it was given, a distill run's
    student is ``OUT/student``."""
    if distill:
        return {"student": (run_dir / "student").resolve()}
    given = (raw.get("eval") or {}).get("models") if isinstance(raw.get("eval"), dict) else None
    return {n: Path(p).expanduser().resolve() for n, p in (given or {}).items() if isinstance(p, str)}


def short_title(name: str) -> str:
    """A column title for a data spec: ``coco:/data/x/captions_val2017.json`` → ``coco captions_val2017``;
    names without a path (``world:test:shape``, a suite's ``cifar10``) stay as they are."""
    fmt, sep, rest = name.partition(":")
    if not sep or ("/" not in rest and "\\" not in rest):
        return name
    stem = Path(rest.rstrip("/")).name.split(".")[0] or rest
    return fmt if stem == fmt else f"{fmt} {stem}"


def _curve(label: str, path: Path) -> Curve | None:
    try:
        rows = read_jsonl(path)
    except JsonLineError as e:
        raise UsageError(str(e)) from None
    except OSError as e:
        raise UsageError(f"{path}: not a readable metrics.jsonl ({e})") from None
    curve = Curve(label, path)
    for r in rows:
        if "step" not in r:
            continue
        if isinstance(r.get("loss"), (int, float)):
            curve.loss.append((int(r["step"]), float(r["loss"])))
        if isinstance(r.get("eval"), dict):
            curve.evals.append((int(r["step"]), {k: float(v) for k, v in r["eval"].items()
                                                 if isinstance(v, (int, float))}))
    return curve if curve.loss or curve.evals else None


def find_curves(run_dir: Path, distill: bool) -> list[tuple[str, Path]]:
    """Training logs of a run: ``train/<name>/metrics.jsonl`` (demo), ``<name>/train_metrics.jsonl`` (the
    demo's cached teacher), ``metrics.jsonl`` (``mmkd distill``: the student)."""
    found: list[tuple[str, Path]] = []
    for sub in sorted(p for p in (run_dir / "train").glob("*/metrics.jsonl")):
        found.append((sub.parent.name, sub))
    for sub in sorted(run_dir.glob("*/train_metrics.jsonl")):
        found.append((sub.parent.name, sub))
    if (run_dir / "metrics.jsonl").is_file():
        found.append(("student" if distill else run_dir.name, run_dir / "metrics.jsonl"))
    return found


def load_run(path: str | Path) -> RunData:
    """One run folder (or its metrics.json); errors name the file and what was expected."""
    p = Path(path).expanduser()
    file = p if p.is_file() else p / "metrics.json"
    if not file.is_file():
        raise UsageError(f"{p}: no metrics.json; give a run folder written by mmkd demo, mmkd eval all "
                         "or mmkd distill")
    try:
        raw = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{file}: not readable JSON ({e})") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{file}: expected a JSON object with 'models' (or 'eval' from mmkd distill)")
    run_dir = file.parent
    distill = "models" not in raw
    if not distill:
        if not isinstance(raw["models"], dict):
            raise UsageError(f"{file}: 'models' must map model names to metric blocks")
        blocks = raw["models"]
    elif "eval" in raw or "train" in raw:
        blocks = _from_distill(raw)
    else:
        raise UsageError(f"{file}: neither 'models' (mmkd demo / eval all) nor 'eval'/'train' (mmkd distill)")
    name = run_dir.resolve().name
    labels = DEMO_LABELS if "demo" in raw else {}
    order = sorted(blocks, key=lambda n: n != "teacher")  # teacher first, the rest as written
    sources = _sources(raw, run_dir, distill)
    models = [ModelEntry(labels.get(n, n), name, n, _normalise_model(blocks[n]), sources.get(n)) for n in order
              if isinstance(blocks[n], dict)]
    curves = [c for label, f in find_curves(run_dir, distill) if (c := _curve(labels.get(label, label), f))]
    bias = raw.get("bias") if isinstance(raw.get("bias"), dict) else None
    return RunData(name, run_dir, raw, models, curves, bias)


def load_runs(paths: list[str | Path]) -> ReportData:
    """Several runs; a model or curve label that occurs in more than one run gets ``run/`` in front."""
    if not paths:
        raise UsageError("give at least one run folder")
    runs = [load_run(p) for p in paths]
    _merge_same_models(runs)
    _short_titles(runs)
    names = [r.name for r in runs]
    for i, r in enumerate(runs):  # same folder name twice (runs/a/x, runs/b/x): number them
        if names.count(r.name) > 1:
            r.name = f"{r.name}#{names[: i + 1].count(r.name)}"
    for attr in ("models", "curves"):
        items = [x for r in runs for x in getattr(r, attr)]
        counts: dict[str, int] = {}
        for x in items:
            counts[x.label] = counts.get(x.label, 0) + 1
        for r in runs:
            for x in getattr(r, attr):
                if counts[x.label] > 1:
                    x.label = f"{r.name}/{x.label}"
    return ReportData(runs)


def _merge_same_models(runs: list[RunData]) -> None:
    """A model folder that several runs scored (``mmkd eval all`` of a distill run's student) is one model: its
    first entry gets the others' benchmarks, and the others are dropped."""
    first: dict[Path, ModelEntry] = {}
    for r in runs:
        keep = []
        for m in r.models:
            if m.source is None or m.source not in first:
                if m.source is not None:
                    first[m.source] = m
                keep.append(m)
                continue
            into = first[m.source].metrics
            for key, value in m.metrics.items():
                if isinstance(value, dict) and isinstance(into.get(key), dict):
                    into[key] = {**value, **into[key]}
                else:
                    into.setdefault(key, value)
        r.models = keep


def _short_titles(runs: list[RunData]) -> None:
    """Benchmark names that are whole data specs become short titles, where no two sets would share one."""
    names = {n for r in runs for m in r.models for kind in ("zeroshot", "retrieval", "eval_overlap")
             for n in m.metrics.get(kind) or {}}
    short = {n: short_title(n) for n in names}
    clash = {t for t in short.values() if list(short.values()).count(t) > 1}
    rename = {n: t for n, t in short.items() if t not in clash or t == n}
    for r in runs:
        for m in r.models:
            for kind in ("zeroshot", "retrieval", "eval_overlap"):
                if isinstance(m.metrics.get(kind), dict):
                    m.metrics[kind] = {rename.get(n, n): v for n, v in m.metrics[kind].items()}
