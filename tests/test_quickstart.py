"""The README's quick start walked as written, on the real data beside the checkout: copy the shipped config, set
its two keys, distil, evaluate, report; then the same with a teacher cache. Only the sizes are overridden (a
tiny teacher, two steps), so it runs in well under a minute. (The API snippet is run by tests/test_api.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mmkd.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["train.steps=2", "train.warmup_steps=0", "data.batch_size=8", "data.limit=32"]


def _copy_config(name: str, dest: Path, **keys: object) -> Path:
    """Copy a shipped config and set ``keys`` (dotted) in it, as a user edits the copy."""
    data = yaml.safe_load((ROOT / "configs" / name).read_text())
    for dotted, value in keys.items():
        node = data
        *parents, last = dotted.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    dest.write_text(yaml.safe_dump(data, sort_keys=False))
    return dest


@pytest.mark.slow
def test_the_quick_start_works_as_written(shared_data: Path, tiny_teacher_dir: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    pairs = f"jsonl:{shared_data / 'coco-mini' / 'captions.jsonl'}"
    teacher = str(tiny_teacher_dir)
    my = _copy_config("clip_half_depth.yaml", tmp_path / "my.yaml", teacher=teacher, **{"data.train": pairs})
    assert main(["distill", str(my), *TINY]) == 0, capsys.readouterr().err
    student = Path("runs/clip_half_depth/student")
    assert (student / "model.safetensors").is_file()

    capsys.readouterr()
    assert main(["eval", "zeroshot", "--model", str(student), "--data", f"cifar10:{shared_data / 'cifar10'}",
                 "--split", "test", "--limit", "40"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 40
    coco = f"coco:{shared_data / 'coco-mini' / 'captions_coco_format.json'}"
    assert main(["eval", "retrieval", "--model", str(student), "--data", coco, "--limit", "20"]) == 0
    assert "i2t_r1" in capsys.readouterr().out
    assert main(["eval", "all", "--teacher", teacher, "--model", str(student), "--suite",
                 str(ROOT / "configs" / "suites" / "cifar10_coco.yaml"), "--out", "runs/eval", "--limit", "20"]) == 0
    assert main(["report", "runs/eval", "--out", "report.html"]) == 0, capsys.readouterr().err
    assert Path("report.html").is_file() and Path("report.md").is_file()

    # the cache variant: build the cache, copy the cached config, set its keys (the tiny teacher has one layer)
    assert main(["cache", "--teacher", teacher, "--data", pairs, "--out", "runs/teacher-cache"]) == 0, \
        capsys.readouterr().err
    tower = {"source": teacher, "keep_layers": [0]}
    cached = _copy_config("clip_half_depth_cached.yaml", tmp_path / "my_cached.yaml",
                          **{"student.vision": tower, "student.text": tower, "data.train": pairs})
    assert main(["distill", str(cached), *TINY]) == 0, capsys.readouterr().err
    assert (Path("runs/clip_half_depth_cached/student") / "model.safetensors").is_file()


def _placeholders(node: object, key: str) -> list[str]:
    """The dotted keys of ``node`` whose value is a ``path/to`` placeholder."""
    if isinstance(node, dict):
        return [k for name, v in node.items() for k in _placeholders(v, f"{key}.{name}" if key else str(name))]
    if isinstance(node, list):
        return [k for i, v in enumerate(node) for k in _placeholders(v, f"{key}[{i}]")]
    return [key] if isinstance(node, str) and "path/to" in node else []


def test_shipped_configs_hold_no_placeholder_outside_the_keys_a_user_sets() -> None:
    """The quick start says: set ``teacher`` and ``data.train`` (and, with a cache, the towers' source); every
    other path in a shipped config must work as it is (an ``eval:`` placeholder failed after training)."""
    for name, allowed in (("clip_half_depth.yaml", {"teacher", "data.train"}),
                          ("clip_half_depth_cached.yaml", {"data.train", "student.vision.source",
                                                           "student.text.source"})):
        data = yaml.safe_load((ROOT / "configs" / name).read_text())
        found = set(_placeholders(data, ""))
        assert found == allowed, name


def test_a_missing_path_fails_before_training_naming_the_key(tiny_teacher_dir: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    my = _copy_config("clip_half_depth.yaml", tmp_path / "my.yaml", teacher=str(tiny_teacher_dir),
                      **{"data.train": "world:train", "eval": [{"kind": "retrieval", "data": "coco:nope/caps.json"}]})
    base = [*TINY, "data.world_size_train=16"]
    cases = {
        "eval[0].data": [],
        "data.train": ["data.train=jsonl:nope/pairs.jsonl"],
        "data.unpaired": ["data.unpaired=wds:nope/shard-{0..3}.tar"],
        "teacher": ["teacher=runs/demo_teacher/student"],
        "student.text.source": ["student.text.source=./nope/tower"],
    }
    for key, extra in cases.items():
        capsys.readouterr()
        assert main(["distill", str(my), *base, *extra]) == 2, key
        err = capsys.readouterr().err
        assert err.startswith(f"mmkd: error: {key}: ") and "not found" in err and len(err.splitlines()) == 1, err
        assert not Path("runs/clip_half_depth").exists(), key  # refused before anything was written
    capsys.readouterr()
    assert main(["distill", str(my), *base, "teacher=cache:nope/cache"]) == 2
    assert "teacher: teacher cache nope/cache not found" in capsys.readouterr().err
    assert main(["distill", str(my), *base, f"teacher=open_clip:{tiny_teacher_dir}?tokenizer=./nope/tok"]) == 2
    assert "teacher (?tokenizer=): model folder nope/tok not found" in capsys.readouterr().err


def test_a_missing_local_model_folder_is_not_called_a_hub_download(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from mmkd.models.hub import ModelLoadError, load_dual_encoder

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for name in ("runs/demo_teacher/student", "runs/teacher", "./teacher", "/no/such/teacher"):
        with pytest.raises(ModelLoadError, match="model folder .* not found") as e:
            load_dual_encoder(name)
        assert "hub" not in str(e.value).replace("a hub id is ORG/NAME", ""), name


def test_suite_paths_are_relative_to_the_suite_file_and_checked_before_any_benchmark(
        tiny_teacher_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from mmkd.eval import runner

    folder = tmp_path / "suites"
    folder.mkdir()
    pairs = tmp_path / "data" / "pairs.jsonl"
    pairs.parent.mkdir()
    pairs.write_text("")
    suite = folder / "s.yaml"
    suite.write_text("tasks:\n  - {kind: efficiency}\n  - {kind: retrieval, data: 'jsonl:../data/pairs.jsonl'}\n")
    monkeypatch.chdir(tmp_path / "data")  # elsewhere: the path is the suite file's
    assert runner.load_suite(suite).tasks[1].data == f"jsonl:{pairs}"

    suite.write_text("tasks:\n  - {kind: efficiency}\n  - {kind: retrieval, data: 'coco:../nope/caps.json'}\n")
    benchmarked = []
    monkeypatch.setattr(runner, "run_suite", lambda *a, **k: benchmarked.append(1))
    capsys.readouterr()
    assert main(["eval", "all", "--model", str(tiny_teacher_dir), "--suite", str(suite), "--out",
                 str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert "tasks[1].data" in err and "nope/caps.json not found" in err and not benchmarked


def test_the_first_screen_says_how_to_get_mmkd_on_the_path() -> None:
    first_screen = "\n".join((ROOT / "README.md").read_text().splitlines()[:30])
    assert ".venv/bin/mmkd" in first_screen and "source .venv/bin/activate" in first_screen
