"""Real kills: a real ``mmkd`` process is SIGKILLed (no hook, no cleanup, no ``finally``) mid-training, inside a
checkpoint write, mid-cache-build and mid-sweep; rerunning the same command (``--resume`` for a run) ends with
exactly the bytes an uninterrupted process writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from tiny_runs import (
    assert_same_weights,
    kill_when,
    mmkd_ok,
    run_config,
    start,
    student,
    write_pairs,
)

from mmkd.cli import main

pytestmark = pytest.mark.slow  # each test starts several Python processes (a few seconds each)

STEPS = 30


pytestmark = pytest.mark.usefixtures("keep_threads")  # in-process runs set one torch thread


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path) -> dict[str, Path]:
    """A saved teacher, data, and the student of an uninterrupted run of the config every kill test uses (run in
    this process: a run is a function of its config, so the killed processes must match it bit for bit)."""
    root = tmp_path_factory.mktemp("kills")
    pairs = write_pairs(root)
    teacher = tiny_teacher_dir
    ref = root / "ref"
    threads = torch.get_num_threads()
    assert main(["distill", str(_config(root, teacher, pairs, ref))]) == 0
    torch.set_num_threads(threads)
    return {"root": root, "pairs": pairs, "teacher": teacher, "ref": ref / "student"}


def _config(folder: Path, teacher: Path, pairs: Path, out: Path, ckpt_every: int = 0) -> Path:
    return run_config(folder / f"{out.name}.yaml", str(teacher), pairs, out, student("new"), steps=STEPS,
                      ckpt_every=ckpt_every, keep_checkpoints=2)


def _logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            continue
    return [r["step"] for r in rows if "loss" in r]


def test_kill_mid_training_then_resume_gives_the_uninterrupted_weights(setup: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = _config(tmp_path, setup["teacher"], setup["pairs"], out, ckpt_every=10)
    proc = start("distill", str(cfg), log=tmp_path / "log.txt")
    # killed between checkpoints: steps 21..23+ are lost and must be redone from the step-20 checkpoint
    kill_when(proc, lambda: max(_logged_steps(out), default=0) >= 23, "step 23", poll_s=0.01)
    assert (out / "checkpoints").is_dir() and not (out / "student").exists()
    mmkd_ok("distill", str(cfg), "--resume")
    assert_same_weights(out / "student", setup["ref"])
    # it resumed (a restart from step 0 would log step 1 a second time)
    assert _logged_steps(out).count(1) == 1


def _writing_checkpoint(folder: Path) -> bool:
    try:
        return any(n.startswith(".step-") and ".tmp" in n for n in os.listdir(folder))
    except FileNotFoundError:
        return False


def test_kill_during_a_checkpoint_write_then_resume_gives_the_uninterrupted_weights(setup: dict[str, Path],
                                                                                   tmp_path: Path) -> None:
    """A checkpoint every step (each a few MB: the student, its Adam moments); the process is killed the moment a
    checkpoint's temp file appears, once step 3 is logged (so complete checkpoints exist to resume from). The write
    may finish between our look and the kill, so kills repeat (resuming each time) until one lands inside a
    write, leaving the temp file behind."""
    out = tmp_path / "run"
    cfg = _config(tmp_path, setup["teacher"], setup["pairs"], out, ckpt_every=1)
    ckpts = out / "checkpoints"
    landed = 0
    for attempt in range(10):
        args = ["distill", str(cfg)] + (["--resume"] if attempt else [])
        proc = start(*args, log=tmp_path / "log.txt")
        try:
            # a tight poll (no sleep): the cheap directory listing first
            kill_when(proc, lambda: _writing_checkpoint(ckpts) and max(_logged_steps(out), default=0) >= 3,
                      "a checkpoint write after step 3")
        except AssertionError:
            if proc.returncode == 0:  # finished before a write was caught: nothing left to kill
                break
            raise
        if _writing_checkpoint(ckpts):
            landed += 1
            break
    assert landed, "no kill landed inside a checkpoint write in 10 tries"
    assert not (out / "student").exists()
    mmkd_ok("distill", str(cfg), "--resume")
    assert_same_weights(out / "student", setup["ref"])


def _files(root: Path) -> dict[str, bytes]:
    """Every file of a cache but its lock (which names the PID of the last writer)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def test_kill_during_cache_build_then_rerun_gives_the_same_cache(setup: dict[str, Path], tmp_path: Path) -> None:
    args = ["cache", "--teacher", str(setup["teacher"]), "--data", f"jsonl:{setup['pairs']}", "--views", "2",
            "--features", "--chunk-rows", "2", "--threads", "1"]
    assert main([*args, "--out", str(tmp_path / "ref")]) == 0
    out = tmp_path / "killed"
    proc = start(*args, "--out", str(out), log=tmp_path / "log.txt")
    kill_when(proc, lambda: len(list((out / "segments").glob("*/*.done.json"))) >= 3, "3 committed chunks",
              poll_s=0.01)
    assert main(["cache", "--verify", str(out)]) != 0  # incomplete, and says so
    mmkd_ok(*args, "--out", str(out))
    assert _files(out) == _files(tmp_path / "ref")  # byte for byte
    assert main(["cache", "--verify", str(out)]) == 0


def test_kill_between_shards_of_a_cache_build_then_rerun_leaves_the_folder_of_an_uninterrupted_build(
        setup: dict[str, Path], tmp_path: Path) -> None:
    """Issue 19 item 8: killed after its first shard's segment, the rerun publishes that segment at its start (a
    manifest and an index generation); once it ends, the folder holds exactly what an uninterrupted build writes
    (7b79a9b kept that extra generation: 8 more files)."""
    import numpy as np
    from test_cache_scale import _tar

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    for part in range(8):
        _tar(data / f"part-{part}.tar", {f"p{part}s{i}": (rng.integers(0, 256, (20, 24, 3), dtype=np.uint8),
                                                          f"thing {part} {i}") for i in range(6)})
    args = ["cache", "--teacher", str(setup["teacher"]), "--data", f"wds:{data}/part-{{0..7}}.tar", "--views", "2",
            "--features", "--chunk-rows", "2", "--threads", "1", "--data-cache", str(tmp_path / "dc")]
    assert main([*args, "--out", str(tmp_path / "ref")]) == 0
    out = tmp_path / "killed"
    proc = start(*args, "--out", str(out), log=tmp_path / "log.txt")
    kill_when(proc, lambda: any((out / "segments").glob("*/done.json")), "a finished segment", poll_s=0.005)
    assert len(list((out / "segments").glob("*/done.json"))) < 8 and not (out / "manifest.json").exists()
    mmkd_ok(*args, "--out", str(out))
    got, want = _files(out), _files(tmp_path / "ref")
    assert sorted(got) == sorted(want), (sorted(set(got) - set(want)), sorted(set(want) - set(got)))
    assert [k for k in want if got[k] != want[k]] == []  # byte for byte
    assert main(["cache", "--verify", str(out)]) == 0


def _sweep_config(setup: dict[str, Path], folder: Path) -> Path:
    base = yaml.safe_load(_config(folder, setup["teacher"], setup["pairs"], folder / "unused").read_text())
    base["objectives"] = [{"name": "clip"}]
    base["eval"] = [{"kind": "retrieval", "data": f"jsonl:{setup['pairs']}"}]
    base["sweep"] = {"out": str(folder / "sweep"),
                     "sets": {"clip": [{"name": "clip"}], "none": [], "mse": [{"name": "fd_mse"}],
                              "kl": [{"name": "kl"}]},
                     "grid": {"task": ["clip"], "kd": ["none", "mse", "kl"]}}
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    return path


def test_kill_mid_sweep_then_rerun_gives_the_same_results(setup: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "ref").mkdir()
    assert main(["sweep", str(_sweep_config(setup, tmp_path / "ref"))]) == 0
    (tmp_path / "killed").mkdir()
    cfg = _sweep_config(setup, tmp_path / "killed")
    runs = tmp_path / "killed" / "sweep" / "runs"
    proc = start("sweep", str(cfg), log=tmp_path / "log.txt")
    # the first run finished, the second half-way
    kill_when(proc, lambda: (runs / "task-clip__kd-none" / "metrics.json").is_file()
              and max(_logged_steps(runs / "task-clip__kd-mse"), default=0) >= STEPS // 2, "the second run half-way",
              poll_s=0.01)
    assert not (runs / "task-clip__kd-mse" / "metrics.json").exists()
    mmkd_ok("sweep", str(cfg))
    ref = tmp_path / "ref" / "sweep" / "runs"
    names = sorted(p.name for p in ref.iterdir())
    assert names == sorted(p.name for p in runs.iterdir()) and len(names) == 3
    for name in names:
        assert_same_weights(runs / name / "student", ref / name / "student")
        got, want = (json.loads((r / name / "metrics.json").read_text()) for r in (runs, ref))
        assert got["eval"] == want["eval"] and got["train"]["final_loss"] == want["train"]["final_loss"]
    board = (tmp_path / "killed" / "sweep" / "leaderboard.csv").read_text().splitlines()
    assert len(board) == 1 + 1 + 3  # header, the teacher, every run
