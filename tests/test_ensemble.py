"""Teacher ensembles: ``teacher: [A, B]`` of models or of caches, objectives per teacher, the one-element list."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_dual_encoder, write_run_config
from tiny_runs import NEW_STUDENT_YAML, losses, mmkd, mmkd_ok

from mmkd.config import ConfigError, ObjectiveSpec, config_from_dict, load_config
from mmkd.models.hub import save_dual_encoder
from mmkd.objectives.base import ObjectiveContext, build_objectives
from mmkd.objectives.ensemble import PerTeacher
from mmkd.train.checkpoint import read_checkpoint

OBJECTIVES = "[{name: clip}, {name: fd_mse, towers: [image, text]}, {name: kl}]"


@pytest.fixture(scope="module")
def two_teachers(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> tuple[Path, Path]:
    """Two tiny teachers with different weights and embedding widths (24 and 20): two maps of different shapes."""
    root = tmp_path_factory.mktemp("ensemble")
    return (save_dual_encoder(tiny_dual_encoder(minilm_path, seed=0, layers=2), root / "a"),
            save_dual_encoder(tiny_dual_encoder(minilm_path, seed=1, dim=20, layers=2), root / "b"))


def _checkpoint(run: Path) -> dict[str, torch.Tensor]:
    newest = sorted((run / "checkpoints").glob("*.pt"))[-1]
    return read_checkpoint(newest)["task"]


@pytest.mark.slow
def test_two_model_ensemble_trains_from_the_cli_with_a_map_per_teacher(tmp_path: Path,
                                                                       two_teachers: tuple[Path, Path]) -> None:
    a, b = two_teachers
    cfg = write_run_config(tmp_path, f"[{a}, {b}]", objectives=OBJECTIVES, train="steps: 3, log_every: 1, "
                           "warmup_steps: 1, threads: 1, ckpt_every: 2", data_extra=", augment: true")
    mmkd_ok("distill", str(cfg))
    run = tmp_path / "run"
    state = _checkpoint(run)
    maps = {k: tuple(v.shape) for k, v in state.items() if ".proj." in k}
    # the student is built from teacher a (24-wide), so only teacher b (20-wide) needs maps: one per tower
    assert maps == {"objectives.objectives.1.members.1.proj.image.weight": (20, 24),
                    "objectives.objectives.1.members.1.proj.text.weight": (20, 24)}
    rows = losses(run)
    assert len(rows) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    for r in rows:  # the logged term is the mean of the per-teacher terms
        for term in ("fd_mse/mse_image", "kl/i2t"):
            name, _, rest = term.partition("/")
            per = [r[f"{name}/teacher{i}/{rest}"] for i in (0, 1)]
            assert r[term] == pytest.approx(sum(per) / 2, rel=1e-5)
    fp = json.loads((run / "metrics.json").read_text())["run"]["fingerprints"]["teacher"]
    assert isinstance(fp, list) and len(fp) == 2 and fp[0] != fp[1]

    # resume: the same config continues from step 2's checkpoint to step 4
    done = mmkd_ok("distill", str(cfg), "--resume", "train.steps=4")
    assert "resuming run" in done.stdout + done.stderr
    assert [r["step"] for r in losses(run)] == [1, 2, 3, 4]
    assert _checkpoint(run).keys() == state.keys()


NEW_STUDENT = NEW_STUDENT_YAML


def _cached_config(tmp_path: Path, caches: list[Path], objectives: str = OBJECTIVES) -> Path:
    """A run config training a new student from the caches (``write_run_config`` shrinks a loaded teacher)."""
    cfg = write_run_config(tmp_path, "[" + ", ".join(f"cache:{c}" for c in caches) + "]", objectives=objectives,
                           train="steps: 2, log_every: 1, warmup_steps: 1, threads: 1",
                           data_extra=", augment: true, workers: 1")
    text = cfg.read_text()
    start = text.index("student:")
    end = text.index("data:")
    cfg.write_text(text[:start] + NEW_STUDENT.strip() + "\n" + text[end:])
    return cfg


def _build_cache(teacher: Path, out: Path, tmp_path: Path, seed: int = 0, views: int = 2) -> None:
    from mmkd.cli import main

    assert main(["cache", "--teacher", str(teacher), "--data", "world:train", "--world-n", "32", "--data-cache",
                 str(tmp_path / "cache"), "--out", str(out), "--views", str(views), "--seed", str(seed),
                 "--threads", "1"]) == 0


@pytest.mark.slow
def test_two_cache_ensemble_trains_from_the_cli(tmp_path: Path, two_teachers: tuple[Path, Path],
                                                keep_threads: None) -> None:
    a, b = two_teachers
    _build_cache(a, tmp_path / "ca", tmp_path)
    _build_cache(b, tmp_path / "cb", tmp_path)
    cfg = _cached_config(tmp_path, [tmp_path / "ca", tmp_path / "cb"],
                         "[{name: dr_clip, params: {average_after_softmax: true}}, {name: fd_cosine, towers: [image]}]")
    done = mmkd_ok("distill", str(cfg))
    assert f"teacher targets from the caches {tmp_path / 'ca'}, {tmp_path / 'cb'}" in done.stdout + done.stderr
    rows = losses(tmp_path / "run")
    assert len(rows) == 2 and {"dr_clip/distill", "fd_cosine/teacher1/cosine_image"} <= set(rows[0])
    state = _checkpoint(tmp_path / "run")
    assert "objectives.objectives.1.members.1.proj.image.weight" in state

    # a third cache whose views were drawn with another seed cannot join: one line naming both folders and the field
    _build_cache(a, tmp_path / "cc", tmp_path, seed=7)
    bad = _cached_config(tmp_path, [tmp_path / "ca", tmp_path / "cc"])
    (tmp_path / "run").rename(tmp_path / "run-ok")
    done = mmkd("distill", str(bad))
    assert done.returncode != 0
    err = done.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert str(tmp_path / "ca") in err and str(tmp_path / "cc") in err and "transform.view_seed" in err
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any step


def test_one_element_list_is_the_string(tmp_path: Path, two_teachers: tuple[Path, Path], keep_threads: None) -> None:
    from mmkd.pipeline import run_distill

    tiny_teacher_dir = two_teachers[0]
    train = "steps: 2, log_every: 1, warmup_steps: 1, threads: 1"
    results = []
    for name, teacher in (("string", str(tiny_teacher_dir)), ("list", f"[{tiny_teacher_dir}]")):
        (tmp_path / name).mkdir()
        cfg = load_config(write_run_config(tmp_path / name, teacher, objectives=OBJECTIVES, train=train))
        assert cfg.teacher == str(tiny_teacher_dir)
        run_distill(cfg, log=lambda *_: None, progress=False)
        results.append(losses(tmp_path / name / "run"))
        assert "members" not in " ".join(_checkpoint(tmp_path / name / "run"))  # today's checkpoint keys
    assert results[0] == results[1]


def test_averaging_is_the_mean_of_per_teacher_losses() -> None:
    torch.manual_seed(0)
    ctxs = [ObjectiveContext(8, 8), ObjectiveContext(8, 6)]
    specs = [ObjectiveSpec("clip"), ObjectiveSpec("fd_mse", towers=["image"]), ObjectiveSpec("dr_clip")]
    objectives = build_objectives(specs, ctxs, seed=0)
    clip, fd, dr = objectives.objectives
    assert not isinstance(clip, PerTeacher) and not isinstance(dr, PerTeacher)  # task loss; native ensemble
    assert isinstance(fd, PerTeacher) and len(fd.members) == 2
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s), dim=-1)  # noqa: E731
    student = {"image_embeds": unit(4, 8), "text_embeds": unit(4, 8), "logit_scale": torch.tensor(10.0)}
    teachers = [{"image_embeds": unit(4, 8), "text_embeds": unit(4, 8), "logit_scale": torch.tensor(20.0)},
                {"image_embeds": unit(4, 6), "text_embeds": unit(4, 6), "logit_scale": torch.tensor(30.0)}]
    with torch.no_grad():  # (values only)
        terms = objectives(student, {"members": teachers})
        per = [fd.members[i](student, teachers[i])["mse_image"] for i in (0, 1)]
    assert float(terms["fd_mse/mse_image"]) == pytest.approx(float(per[0] + per[1]) / 2, rel=1e-6)
    assert float(terms["fd_mse/teacher1/mse_image"]) == pytest.approx(float(per[1]), rel=1e-6)
    with torch.no_grad():
        expected = (float(clip(student, teachers[0])["clip"]) + float(terms["fd_mse/mse_image"])
                    + sum(float(v) for v in dr(student, teachers).values()))
    assert float(terms["loss"]) == pytest.approx(expected, rel=1e-6)  # per-teacher terms logged, not added


@pytest.mark.parametrize("teacher, message", [
    ("[]", "teacher: an empty list names no teacher"),
    ("[a, 3]", "teacher[1]: expected a string"),
    ("[a, '']", "teacher[1]: empty"),
    ("[a, 'cache:']", "teacher[1]: 'cache:' needs the cache folder"),
    ("[a, a]", "teacher[1]: 'a' repeats teacher[0]"),
    ("[cache:x, b]", "teacher[0] (cache:x) is a teacher cache but teacher[1] (b) is a model"),
])
def test_bad_teacher_lists_name_the_key(teacher: str, message: str, tmp_path: Path) -> None:
    import yaml

    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        config_from_dict({"teacher": yaml.safe_load(teacher)})


def test_image_only_ensemble_and_only_cached_shards_are_refused() -> None:
    with pytest.raises(ConfigError, match="teacher_modality: image"):
        config_from_dict({"teacher": ["a", "b"], "teacher_modality": "image"})
    with pytest.raises(ConfigError, match="only_cached_shards"):
        config_from_dict({"teacher": ["cache:a", "cache:b"], "data": {"only_cached_shards": True}})


def test_sweep_grids_over_teacher_strings_and_lists(tmp_path: Path) -> None:
    from mmkd.sweep import load_sweep

    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(f"""
teacher: /models/a
out: {tmp_path / 'sweep'}
objectives: [{{name: clip}}, {{name: fd_mse}}]
sweep:
  grid:
    teacher: [/models/a, [/models/a, cache:/caches/b], [/models/a]]
""")
    with pytest.raises(ConfigError, match="teacher.* is a model"):  # a mixed list is refused before any run
        load_sweep(sweep_file)
    sweep_file.write_text(sweep_file.read_text().replace("cache:/caches/b", "/models/b"))
    sweep = load_sweep(sweep_file)
    distilled = {r.name: r.cfg.teacher for r in sweep.runs if r.role == "distilled"}
    assert distilled == {"teacher-models_a": "/models/a", "teacher-a+b": ["/models/a", "/models/b"],
                         "teacher-a": "/models/a"}


def test_cache_from_an_ensemble_config_needs_a_teacher_and_an_out(tmp_path: Path) -> None:
    """An ensemble config names several caches: `mmkd cache --config` builds one member's, so it needs both
    --teacher and --out; without them it says so in one line and writes nothing."""
    cfg = tmp_path / "ens.yaml"
    cfg.write_text(f"teacher: ['cache:{tmp_path / 'a'}', 'cache:{tmp_path / 'b'}']\n"
                   f"cache_dir: {tmp_path / 'data'}\ndata: {{train: 'world:train', world_size_train: 8}}\n")
    done = mmkd("cache", "--config", str(cfg))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "teacher ensemble" in done.stderr and "--teacher MODEL --out DIR" in done.stderr, done.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
