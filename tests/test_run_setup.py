"""One way to build a run: the teacher spec parsed once (``mmkd.teacher_spec``) and ``prepare(cfg)``, whose
`RunSetup` is complete and immutable, with its `TrainData` built whole by the constructor."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
from conftest import tiny_dual_encoder, write_run_config
from tiny_runs import NEW_STUDENT_YAML

from mmkd.config import load_config
from mmkd.data.batches import TrainData
from mmkd.dist import DistInfo
from mmkd.models.hub import save_dual_encoder
from mmkd.run_setup import RunSetup, prepare
from mmkd.teacher.ensemble import EnsembleLookup, EnsembleTargets
from mmkd.teacher.targets import OnlineTeacher, TableTeacher
from mmkd.teacher_spec import (
    CacheTeacher,
    Ensemble,
    ModelTeacher,
    NoTeacher,
    cache_folder,
    cache_value,
    is_cached,
    parse_teacher,
    short_name,
)

SRC = Path(__file__).resolve().parents[1] / "src" / "mmkd"


def test_parse_teacher_gives_each_kind_and_its_config_value_back() -> None:
    cases = {"": NoTeacher(), "runs/t": ModelTeacher("runs/t"), "open_clip:f?tokenizer=x": ModelTeacher(
        "open_clip:f?tokenizer=x"), "cache:runs/c": CacheTeacher("runs/c"), "cache:": CacheTeacher("")}
    for value, spec in cases.items():
        assert parse_teacher(value) == spec and spec.value == value
    assert parse_teacher(["a"]) == ModelTeacher("a")  # a one-element list is its element
    pair = parse_teacher(["cache:x", "cache:y"])
    assert pair == Ensemble((CacheTeacher("x"), CacheTeacher("y"))) and pair.value == ["cache:x", "cache:y"]
    assert is_cached(pair) and not is_cached(parse_teacher(["m", "n"])) and not is_cached(NoTeacher())
    assert cache_folder(["cache:x", "cache:y"]) == "x" and cache_folder("m") is None and cache_folder("") is None
    assert cache_value(Path("a/b")) == "cache:a/b" and short_name("cache:a/b") == short_name("a/b") == "b"
    with pytest.raises(dataclasses.FrozenInstanceError):
        pair.members = ()  # type: ignore[misc]


def test_no_cache_prefix_is_parsed_or_written_outside_the_teacher_spec() -> None:
    """The string ``"cache:"`` (alone, or starting an f-string) is the spec module's; messages may name the syntax."""
    def prefix(node: ast.AST) -> bool:
        if isinstance(node, ast.JoinedStr):
            node = node.values[0] if node.values else node
        return isinstance(node, ast.Constant) and node.value == "cache:"

    found = [f"{p.relative_to(SRC)}:{node.lineno}" for p in sorted(SRC.rglob("*.py")) if p.name != "teacher_spec.py"
             for node in ast.walk(ast.parse(p.read_text())) if prefix(node)]
    assert found == []


def test_run_and_training_paths_have_no_function_over_80_lines() -> None:
    long = []
    paths = ["pipeline.py", "run_setup.py", "teacher_spec.py", "demo.py", "cache_command.py"]
    paths += [str(p.relative_to(SRC)) for d in ("train", "teacher/cache") for p in sorted((SRC / d).glob("*.py"))]
    for name in paths:
        for node in ast.walk(ast.parse((SRC / name).read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if lines > 80:
                    long.append(f"{name}:{node.name} ({lines} lines)")
    assert long == []


def test_no_module_over_500_lines() -> None:
    """Issue 22: a module a maintainer can hold in their head (the package and the repository's tools)."""
    roots = [SRC, SRC.parents[1] / "tools"]
    big = {str(p): n for root in roots for p in sorted(root.rglob("*.py"))
           if (n := len(p.read_text().splitlines())) > 500}
    assert big == {}


@pytest.fixture
def no_patching(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every attribute set on a TrainData after its constructor returned (a patched, half-built TrainData)."""
    patched: list[str] = []
    init, setattr_ = TrainData.__init__, TrainData.__setattr__

    def built(self: TrainData, *a: object, **k: object) -> None:
        init(self, *a, **k)
        object.__setattr__(self, "_built", True)

    def watch(self: TrainData, name: str, value: object) -> None:
        if getattr(self, "_built", False):
            patched.append(name)
        setattr_(self, name, value)

    monkeypatch.setattr(TrainData, "__init__", built)
    monkeypatch.setattr(TrainData, "__setattr__", watch)
    return patched


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> dict[str, Path]:
    """Two tiny two-layer teachers and a 2-view cache of each over world:train (16 samples)."""
    from mmkd.cli import main

    root = tmp_path_factory.mktemp("setup")
    out = {}
    for name, seed in (("a", 0), ("b", 1)):
        out[name] = save_dual_encoder(tiny_dual_encoder(minilm_path, seed=seed, layers=2), root / name)
        assert main(["cache", "--teacher", str(out[name]), "--data", "world:train", "--world-n", "16", "--data-cache",
                     str(root / "data"), "--out", str(root / f"cache-{name}"), "--views", "2", "--threads", "1"]) == 0
        out[f"cache-{name}"] = root / f"cache-{name}"
    return out


def _prepare(tmp_path: Path, teacher: str, augment: bool, new_student: bool = False) -> RunSetup:
    tmp_path.mkdir()
    cfg = write_run_config(tmp_path, teacher, world_size=16, objectives="[{name: clip}, {name: fd_mse}]",
                           data_extra=", augment: true" if augment else "",
                           train="steps: 2, log_every: 1, warmup_steps: 1, threads: 1")
    if new_student:
        text = cfg.read_text()
        cfg.write_text(text[:text.index("student:")] + NEW_STUDENT_YAML.strip() + "\n" + text[text.index("data:"):])
    return prepare(load_config(cfg), DistInfo(), lambda *a: None)


def test_prepare_builds_each_kind_of_run_whole(teachers: dict[str, Path], tmp_path: Path,
                                               no_patching: list[str]) -> None:
    a, b, ca, cb = (str(teachers[k]) for k in ("a", "b", "cache-a", "cache-b"))
    online = _prepare(tmp_path / "online", a, augment=True)
    assert online.teacher == ModelTeacher(a) and isinstance(online.targets, OnlineTeacher)
    assert online.data.teacher_banks is not None and online.data.lookup is None  # the teacher's pixels ride along
    table = _prepare(tmp_path / "table", a, augment=False)
    assert isinstance(table.targets, TableTeacher) and table.data.teacher_banks is None
    both = _prepare(tmp_path / "both", f"[{a}, {b}]", augment=True)
    assert isinstance(both.targets, EnsembleTargets) and both.data.teacher_banks is not None
    cached = _prepare(tmp_path / "cached", cache_value(ca), augment=True, new_student=True)
    assert cached.teacher == CacheTeacher(ca) and cached.targets is cached.data.lookup is not None
    assert cached.data.views == 2 and set(cached.fingerprints) == {"teacher", "cache", "data"}
    caches = _prepare(tmp_path / "caches", f"[{cache_value(ca)}, {cache_value(cb)}]", augment=True, new_student=True)
    assert isinstance(caches.targets, EnsembleLookup) and caches.targets is caches.data.lookup
    assert len(caches.fingerprints["cache"]) == 2
    assert no_patching == []  # every TrainData came whole from its constructor
    with pytest.raises(dataclasses.FrozenInstanceError):
        cached.targets = None  # type: ignore[misc]


def test_an_online_teachers_finite_views_are_tabled_once_with_its_per_step_targets(teachers: dict[str, Path],
                                                                                     tmp_path: Path) -> None:
    """``data.views: K`` with an online teacher: the targets of each image's K views are computed once when that
    costs no more teacher passes than the steps would (16 images × 2 views ≤ 4 steps × 8), and equal the ones the
    teacher computes on each batch's own views, as a run too short for a table gets them (2 steps × 8 < 32)."""
    import torch

    def setup(name: str, steps: int) -> RunSetup:
        (tmp_path / name).mkdir()
        cfg = write_run_config(tmp_path / name, str(teachers["a"]), world_size=16,
                               objectives="[{name: clip}, {name: fd_mse}]", data_extra=", augment: true, views: 2",
                               train=f"steps: {steps}, log_every: 1, warmup_steps: 1, threads: 1")
        return prepare(load_config(cfg), DistInfo(), lambda *a: None)

    tabled, per_step = setup("table", steps=4), setup("per-step", steps=2)
    assert isinstance(tabled.targets, TableTeacher) and tabled.data.teacher_banks is None
    assert isinstance(per_step.targets, OnlineTeacher) and per_step.data.teacher_banks is not None
    seen = set()
    for step in range(4):
        bt, bs = tabled.data.batch(step), per_step.data.batch(step)
        assert (bt.keys, bt.views) == (bs.keys, bs.views)
        seen.update(bt.views)
        got, want = tabled.targets(bt), per_step.targets(bs)
        for name in ("image_embeds", "text_embeds"):
            torch.testing.assert_close(got[name], want[name], atol=2e-2, rtol=2e-2)
    assert seen == {0, 1}  # both views were drawn, so both kinds of table row were read
    rows = tabled.targets.view_rows
    key = next(k for k, v in rows)
    view0, view1 = (tabled.targets.image["image_embeds"][i] for i in (tabled.targets.image_keys[key], rows[(key, 1)]))
    assert not torch.allclose(view0, view1)  # view 1 is a crop: another embedding than view 0's
