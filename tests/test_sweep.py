"""``mmkd sweep``: grid expansion, scratch references, teacher targets computed once, skipping finished runs,
one run per process under torchrun, and the leaderboard files."""

from __future__ import annotations

import csv
import json
import re
import statistics
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import tiny_dual_encoder

from mmkd import cli, pipeline, run_setup
from mmkd.config import ConfigError, load_config
from mmkd.eval.perimage import PerImageError, read_per_image, write_per_image
from mmkd.models.hub import save_dual_encoder
from mmkd.report.leaderboard import markdown
from mmkd.report.noise import beyond_noise, bootstrap_interval
from mmkd.sweep import load_sweep, run_sweep

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_every_shipped_config_loads_and_validates() -> None:
    for path in sorted(CONFIGS.glob("*.yaml")):
        if "sweep" in (yaml.safe_load(path.read_text()) or {}):
            assert load_sweep(path).runs, path
        else:
            load_config(path)


def test_s1_compare_grid_is_s1s_comparison() -> None:
    sweep = load_sweep(CONFIGS / "s1_compare.yaml")
    got = {r.name: ([o.name for o in r.cfg.objectives], r.role) for r in sweep.runs}
    expected = {}
    for task in ("triplet", "clip"):
        for kd, obj in (("scratch", None), ("mse", "fd_mse"), ("cosine", "fd_cosine"),
                        ("mse_cosine", "fd_mse_cosine"), ("kl", "kl")):
            expected[f"task-{task}__kd-{kd}"] = ([task] + ([obj] if obj else []), "distilled" if obj else "scratch")
    assert got == expected
    assert all(r.cfg.out == f"runs/s1_compare/runs/{r.name}" for r in sweep.runs)


def test_grid_arguments_references_and_errors(tmp_path: Path) -> None:
    sweep = load_sweep(CONFIGS / "s1_compare.yaml", ["kd=mse,kl", "train.lr=1e-3,2e-3"], ["train.steps=7"])
    names = [r.name for r in sweep.runs]
    # no scratch run in the grid: one reference per (task loss, config-axis values), placed first
    assert names[:4] == [f"reference-scratch__{t}__train.lr-{lr}" for t in ("triplet", "clip")
                         for lr in ("0.001", "0.002")]
    assert len(names) == 4 + 2 * 2 * 2
    assert sweep.command == f"mmkd sweep {CONFIGS / 's1_compare.yaml'} --grid=kd=mse,kl --grid=train.lr=1e-3,2e-3 " \
                            "train.steps=7"  # recorded with the leaderboard: what made it
    assert all(r.cfg.train.steps == 7 for r in sweep.runs)
    assert {r.cfg.train.lr for r in sweep.runs} == {1e-3, 2e-3}
    ref = next(r for r in sweep.runs if r.name == "reference-scratch__clip__train.lr-0.002")
    assert [o.name for o in ref.cfg.objectives] == ["clip"] and ref.added and ref.cfg.train.lr == 2e-3

    with pytest.raises(ConfigError, match=r"'hinton' names no objective set or variant; sets: clip, cosine, kl"):
        load_sweep(CONFIGS / "s1_compare.yaml", ["kd=hinton"])
    with pytest.raises(ConfigError, match="train.lr: expected a number"):
        load_sweep(CONFIGS / "s1_compare.yaml", ["train.lr=fast"])
    with pytest.raises(ConfigError, match="must look like key=v1,v2"):
        load_sweep(CONFIGS / "s1_compare.yaml", ["kd"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("sweep: {grids: {}}\n")
    with pytest.raises(ConfigError, match=r"sweep.grids'; valid keys here: out, grid, sets, variants"):
        load_sweep(bad)
    for text, key in (("sweep: {sets: {mse: [{name: fd_mse, wieght: 1}]}}", r"'sweep.sets.mse\[0\].wieght'"),
                      ("sweep: {sets: {mse: {name: fd_mse}}}", r"sweep.sets.mse: expected a list"),
                      ("sweep: {grid: {kd: []}}", r"sweep: grid.kd must be a non-empty list"),
                      ("sweep: {out: [a]}", r"sweep.out: expected a string")):
        bad.write_text(text + "\n")  # the sweep section is typed: its errors name the key, before any run expands
        with pytest.raises(ConfigError, match=key):
            load_sweep(bad)
    with pytest.raises(ConfigError, match=r"--grid 'kd=\[a': a value is not valid YAML"):
        load_sweep(CONFIGS / "s1_compare.yaml", ["kd=[a"])
    exp = tmp_path / "exp.yaml"  # read like a run config: YAML 1.1 would leave 1e-3 a string
    exp.write_text("train: {lr: 1e-3, steps: 2}\nsweep: {grid: {train.weight_decay: [1e-2, 2e-2]}}\n")
    runs = load_sweep(exp).runs
    assert {r.cfg.train.lr for r in runs} == {1e-3} and {r.cfg.train.weight_decay for r in runs} == {1e-2, 2e-2}


# ---------------------------------------------------------------------------------------------------------
# a real (tiny) sweep


def _teacher(folder: Path, tok_path: str) -> None:
    save_dual_encoder(tiny_dual_encoder(tok_path, layers=2, dropout=False), folder)


def _config(tmp_path: Path) -> Path:
    cfg = {
        "teacher": str(tmp_path / "teacher"), "out": str(tmp_path / "unused"), "cache_dir": str(tmp_path / "cache"),
        "student": {"vision": {"source": "teacher"}, "text": {"source": "teacher"}},
        "data": {"train": "world:train", "world_size_train": 32, "batch_size": 16},
        "train": {"steps": 2, "warmup_steps": 1, "log_every": 1, "ckpt_every": 0},
        "eval": [{"kind": "zeroshot", "data": "world:test", "class_set": "colour_shape", "limit": 48},
                 {"kind": "retrieval", "data": "world:test", "limit": 48}],
        "sweep": {"out": str(tmp_path / "sweep"),
                  "sets": {"clip": [{"name": "clip"}], "none": [], "mse": [{"name": "fd_mse"}],
                           "kl": [{"name": "kl"}]},
                  "grid": {"task": ["clip"], "kd": ["none", "mse", "kl"]}},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_sweep_runs_once_skips_finished_runs_and_writes_the_leaderboard(
        tmp_path: Path, minilm_path: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    _teacher(tmp_path / "teacher", minilm_path)
    config = _config(tmp_path)
    calls = {"precompute": 0}
    real_precompute = run_setup.precompute

    def counting_precompute(*args, **kwargs):
        calls["precompute"] += 1
        return real_precompute(*args, **kwargs)

    monkeypatch.setattr(run_setup, "precompute", counting_precompute)

    # under torchrun: process 1 of 2 runs every second run and leaves the leaderboard to process 0
    sweep = load_sweep(config)
    assert [r.name for r in sweep.runs] == ["task-clip__kd-none", "task-clip__kd-mse", "task-clip__kd-kl"]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    run_sweep(sweep, progress=False)
    done = {r.name for r in sweep.runs if (Path(r.cfg.out) / "metrics.json").is_file()}
    assert done == {"task-clip__kd-mse"}
    assert not (tmp_path / "sweep" / "leaderboard.md").exists()

    # process 0 (here: the plain CLI, alone) runs the rest, skipping the finished one, then writes the board
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert cli.main(["sweep", str(config)]) == 0
    out = capsys.readouterr().out
    assert "task-clip__kd-mse: finished before (metrics.json exists), skipped" in out
    assert calls["precompute"] == 2  # once in each process (kd-mse there, kd-kl here), never once per run

    board = tmp_path / "sweep" / "leaderboard.md"
    assert board.is_file() and (tmp_path / "sweep" / "leaderboard.png").stat().st_size > 1000
    text = board.read_text()
    assert "| teacher | teacher |" in text and text in out
    rows = list(csv.DictReader((tmp_path / "sweep" / "leaderboard.csv").open()))
    assert [r["role"] for r in rows][0] == "teacher"
    by_run = {r["run"]: r for r in rows}
    assert set(by_run) == {"teacher", "task-clip__kd-none", "task-clip__kd-mse", "task-clip__kd-kl"}
    scratch = by_run["task-clip__kd-none"]
    assert scratch["role"] == "scratch" and scratch["d_top1"] == ""
    for name in ("task-clip__kd-mse", "task-clip__kd-kl"):
        r = by_run[name]
        metrics = json.loads((tmp_path / "sweep" / "runs" / name / "metrics.json").read_text())
        top1 = metrics["eval"]["zeroshot:world:test:colour_shape"]["top1"]
        assert float(r["zs_top1"]) == pytest.approx(top1)
        assert float(r["d_top1"]) == pytest.approx(top1 - float(scratch["zs_top1"]))
        assert r["vs_scratch"] == "task-clip__kd-none"
        assert float(r["train_s"]) == metrics["train"]["seconds"]
    top1s = [float(r["zs_top1"]) for r in rows[1:]]
    assert top1s == sorted(top1s, reverse=True)
    # leaderboard.json (what `make readme` renders the docs' copy from): the same table, and its command
    from mmkd.report.leaderboard import markdown

    saved = json.loads((tmp_path / "sweep" / "leaderboard.json").read_text())
    assert saved["command"] == f"mmkd sweep {config}" and saved["notes"] in text
    assert markdown(saved["rows"]) in text

    # a second sweep run trains nothing: every run is finished
    monkeypatch.setattr(pipeline, "run_distill", lambda *a, **k: pytest.fail("a finished run was trained again"))
    monkeypatch.setattr("mmkd.sweep.run_distill", lambda *a, **k: pytest.fail("a finished run was trained again"))
    # (overrides may follow --grid options; these name the same three runs)
    assert cli.main(["sweep", str(config), "--grid", "kd=none,mse,kl", "train.steps=2"]) == 0
    assert capsys.readouterr().out.count("skipped") == 3


def test_a_foreign_run_in_a_sweep_folder_says_what_to_do(tmp_path: Path, minilm_path: str,
                                                          capsys: pytest.CaptureFixture) -> None:
    """A sweep run folder holding another config's checkpoint stops the sweep with advice that fits
    `mmkd sweep` (which has no --overwrite): move the folder away or use another sweep.out."""
    _teacher(tmp_path / "teacher", minilm_path)
    config = _config(tmp_path)
    sweep = load_sweep(config)
    foreign = Path(sweep.runs[0].cfg.out)
    (foreign / "checkpoints").mkdir(parents=True)
    (foreign / "checkpoints" / "step-00000001.pt").write_bytes(b"not ours")
    (foreign / "config.yaml").write_text("train: {steps: 99}\n")
    assert cli.main(["sweep", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "task-clip__kd-none" in err and "move" in err and "away (or delete it)" in err and "--overwrite" not in err
    assert (foreign / "checkpoints" / "step-00000001.pt").read_bytes() == b"not ours"


def test_seeds_sweep_board_mean_sd_bootstrap_and_resume(tmp_path: Path, minilm_path: str,
                                                         capsys: pytest.CaptureFixture) -> None:
    """--seeds 2: both seeds' runs (and scratch references) are written; the board's mean/sd are those of the
    runs' metrics.json; the bootstrap interval brackets the top-1 and is the same when written again."""
    _teacher(tmp_path / "teacher", minilm_path)
    config = _config(tmp_path)
    assert cli.main(["sweep", str(config), "--grid", "kd=none,mse", "--seeds", "2"]) == 0
    capsys.readouterr()
    runs = tmp_path / "sweep" / "runs"
    names = ["task-clip__kd-none", "task-clip__kd-none__seed-1", "task-clip__kd-mse", "task-clip__kd-mse__seed-1"]
    assert sorted(p.name for p in runs.iterdir()) == sorted(names)
    assert yaml.safe_load((runs / "task-clip__kd-mse__seed-1" / "config.yaml").read_text())["train"]["seed"] == 1
    zs = "zeroshot:world:test:colour_shape"
    top1 = {n: json.loads((runs / n / "metrics.json").read_text())["eval"][zs]["top1"] for n in names}
    hits = {n: read_per_image(runs / n)[zs] for n in names}
    assert all(h.size == 48 and h.mean() == pytest.approx(top1[n]) for n, h in hits.items())

    rows = {r["run"]: r for r in csv.DictReader((tmp_path / "sweep" / "leaderboard.csv").open())}
    assert set(rows) == {"teacher", "task-clip__kd-none", "task-clip__kd-mse"}
    for point in ("task-clip__kd-none", "task-clip__kd-mse"):
        r, values = rows[point], [top1[point], top1[point + "__seed-1"]]
        assert r["seeds"] == "2" and r["seed_list"] == "0 1"
        assert float(r["zs_top1"]) == pytest.approx(statistics.mean(values))
        assert float(r["zs_top1_sd"]) == pytest.approx(statistics.stdev(values))
        lo, hi = float(r["zs_top1_lo"]), float(r["zs_top1_hi"])
        assert lo <= float(r["zs_top1"]) <= hi
    mse = rows["task-clip__kd-mse"]
    deltas = [top1["task-clip__kd-mse"] - top1["task-clip__kd-none"],
              top1["task-clip__kd-mse__seed-1"] - top1["task-clip__kd-none__seed-1"]]  # each seed vs its own
    assert float(mse["d_top1"]) == pytest.approx(statistics.mean(deltas))
    assert float(mse["d_top1_sd"]) == pytest.approx(statistics.stdev(deltas))
    assert mse["vs_scratch"] == "task-clip__kd-none" and mse["beyond_noise"] in ("True", "False")
    assert float(mse["d_top1_lo"]) <= float(mse["d_top1"]) <= float(mse["d_top1_hi"])
    text = (tmp_path / "sweep" / "leaderboard.md").read_text()
    assert "| seeds |" in text and f"{100 * statistics.mean(deltas):+.1f} ± " in text
    sweep_json = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert sweep_json["seeds"] == [0, 1] and {r["point"] for r in sweep_json["runs"]} == set(rows) - {"teacher"}

    # deterministic: a rerun trains nothing (every run finished) and writes the same board
    csv_before = (tmp_path / "sweep" / "leaderboard.csv").read_text()
    assert cli.main(["sweep", str(config), "--grid", "kd=none,mse", "--seeds", "0,1"]) == 0
    assert capsys.readouterr().out.count("finished before (metrics.json exists), skipped") == 4
    assert (tmp_path / "sweep" / "leaderboard.csv").read_text() == csv_before
    rate = np.mean([hits["task-clip__kd-mse"], hits["task-clip__kd-mse__seed-1"]], axis=0)
    assert bootstrap_interval(rate) == bootstrap_interval(rate) == (float(mse["zs_top1_lo"]), float(mse["zs_top1_hi"]))


def test_one_seed_board_keeps_todays_columns_plus_the_interval(tmp_path: Path) -> None:
    rows = [{"run": "a", "role": "distilled", "objectives": "clip + kl", "zs_top1": 0.5, "zs_top5": 0.9,
             "i2t_r1": 0.4, "t2i_r1": 0.3, "train_s": 12.0, "d_top1": 0.1, "zs_top1_lo": 0.4, "zs_top1_hi": 0.6,
             "beyond_noise": True, "seeds": 1}]
    text = markdown(rows)
    assert "seeds" not in text and "| a | distilled | clip + kl | 50.0 | 40.0–60.0 | 90.0 | +10.0 | yes |" in text
    # a board written before seeds (leaderboard rows without the new keys) still renders
    old = [{k: v for k, v in rows[0].items() if k not in ("zs_top1_lo", "zs_top1_hi", "beyond_noise", "seeds")}]
    assert markdown(old) == ("| run | role | objectives | zero-shot top-1 % | top-5 % | Δ top-1 vs scratch (pts) | "
                             "i2t R@1 % | t2i R@1 % | train s |\n|---|---|---|---:|---:|---:|---:|---:|---:|\n"
                             "| a | distilled | clip + kl | 50.0 | 90.0 | +10.0 | 40.0 | 30.0 | 12 |\n")


@pytest.mark.parametrize("value, message", [
    ("0", "--seeds 0: 0 seeds; give a count ≥ 1"), ("x", "--seeds x: 'x' is neither a count"),
    ("1,1", "--seeds 1,1: [1, 1] repeats a seed"), ("1,a", "--seeds 1,a: '1,a' is neither")])
def test_bad_seeds_fail_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, value: str, message: str) -> None:
    config = _config(tmp_path)
    assert cli.main(["sweep", str(config), "--seeds", value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "sweep").exists()


def test_sweep_seeds_key_is_validated(tmp_path: Path) -> None:
    config = _config(tmp_path)
    data = yaml.safe_load(config.read_text())
    for bad, message in ((0, "sweep.seeds: 0 seeds"), ("three", "sweep.seeds: 'three' is neither"),
                         ([], "sweep.seeds: [] is neither"), ([2, 2], "sweep.seeds: [2, 2] repeats")):
        data["sweep"]["seeds"] = bad
        config.write_text(yaml.safe_dump(data, sort_keys=False))
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_sweep(config)
    data["sweep"]["seeds"] = [3, 5]
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    assert [r.name for r in load_sweep(config).runs][:2] == ["task-clip__kd-none__seed-3", "task-clip__kd-none__seed-5"]
    data["sweep"]["seeds"] = 2
    data["sweep"]["grid"]["train.seed"] = [0, 1]
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError, match="sweep.seeds and the grid axis train.seed"):
        load_sweep(config)


def test_per_image_bits_round_trip_and_a_broken_file_is_named(tmp_path: Path) -> None:
    hits = np.array([True, False, True] * 7, dtype=bool)  # 21 images: not a multiple of 8
    write_per_image(tmp_path, {"zeroshot:x": hits})
    assert np.array_equal(read_per_image(tmp_path)["zeroshot:x"], hits)
    assert read_per_image(tmp_path / "none") == {}  # a run finished before per-image results: no interval
    (tmp_path / "eval_per_image.json").write_text('{"format": 1, "zeroshot": {"x": {"n": 99, "top1": "AA=="}}}')
    with pytest.raises(PerImageError, match=r"eval_per_image.json: not a per-image results file .*delete it"):
        read_per_image(tmp_path)


def test_beyond_noise_rule() -> None:
    assert beyond_noise(0.05, (0.01, 0.09), None, None) is True  # one seed: the paired interval excludes 0
    assert beyond_noise(0.05, (-0.01, 0.09), None, None) is False
    assert beyond_noise(0.05, (0.01, 0.09), 0.03, 0.03) is True  # 0.05 > hypot(0.03, 0.03) = 0.042
    assert beyond_noise(0.05, (0.01, 0.09), 0.04, 0.04) is False  # within the seeds' combined spread
    assert beyond_noise(-0.05, None, 0.01, 0.01) is True  # no per-image results: the spread test alone
    assert beyond_noise(0.05, None, None, None) is None and beyond_noise(None, (0.1, 0.2), 0.0, 0.0) is None
    lo, hi = bootstrap_interval(np.array([1.0] * 30 + [0.0] * 70))
    assert lo < 0.3 < hi and (lo, hi) == bootstrap_interval(np.array([1.0] * 30 + [0.0] * 70))


def test_variants_bundle_overrides_and_get_their_own_scratch_reference(tmp_path: Path) -> None:
    """A variant applies several keys at once; each variant is its own config, so it gets its own reference."""
    path = tmp_path / "v.yaml"
    path.write_text(yaml.safe_dump({
        "train": {"steps": 3},
        "sweep": {"sets": {"clip": [{"name": "clip"}], "mse": [{"name": "fd_mse"}]},
                  "variants": {"plain": {"train.lr": 1.0e-3},
                               "views": {"data.augment": True, "data.views": 4, "train.lr": 2.0e-3}},
                  "grid": {"task": ["clip"], "kd": ["mse"], "setting": ["plain", "views"],
                           "train.weight_decay": [0.1]}}}, sort_keys=False))
    sweep = load_sweep(path)
    assert sweep.command == f"mmkd sweep {path}"  # the command that made the board: no variant key leaks into it
    runs = {r.name: r for r in sweep.runs}
    views = runs["task-clip__kd-mse__setting-views__train.weight_decay-0.1"]
    assert (views.cfg.data.augment, views.cfg.data.views, views.cfg.train.lr, views.cfg.train.weight_decay) == \
        (True, 4, 2e-3, 0.1)
    plain = runs["task-clip__kd-mse__setting-plain__train.weight_decay-0.1"]
    assert (plain.cfg.data.augment, plain.cfg.data.views, plain.cfg.train.lr) == (False, None, 1e-3)
    refs = sorted(n for n in runs if n.startswith("reference-scratch"))
    assert refs == ["reference-scratch__clip__setting-plain__train.weight_decay-0.1",
                    "reference-scratch__clip__setting-views__train.weight_decay-0.1"]
    ref = runs[refs[1]]
    assert ref.cfg.data.views == 4 and [o.name for o in ref.cfg.objectives] == ["clip"]

    for variants, grid, message in (
            ({"v": {"data.wiews": 3}}, {"s": ["v"]}, r"sweep run task-clip__s-v: unknown config key 'data.wiews'"),
            ({"v": {"dataa.views": 3}}, {"s": ["v"]}, r"sweep.variants.v: 'dataa.views' is not a config key"),
            ({"v": {}}, {"s": ["v"]}, r"variants.v must be a non-empty mapping"),
            ({"clip": {"data.views": 3}}, {"s": ["clip"]}, r"variants.clip has the name of a set"),
            ({"v": {"data.views": 3}}, {"s": ["v", "clip"]}, r"sweep.grid.s: its values name both"),
            ({"v": {"data.views": 3}}, {"s": ["w"]}, r"'w' names no objective set or variant; sets: clip; "
                                                     r"variants: v")):
        path.write_text(yaml.safe_dump({"sweep": {"sets": {"clip": [{"name": "clip"}]}, "variants": variants,
                                                  "grid": {"task": ["clip"], **grid}}}, sort_keys=False))
        with pytest.raises(ConfigError, match=message):
            load_sweep(path)


def test_a_baseline_grid_point_replaces_the_scratch_references(tmp_path: Path, minilm_path: str,
                                                               capsys: pytest.CaptureFixture) -> None:
    """sweep.baseline: no scratch run is added; each row's Δ is vs the baseline's run of the same seed."""
    _teacher(tmp_path / "teacher", minilm_path)
    config = _config(tmp_path)
    data = yaml.safe_load(config.read_text())
    data["sweep"]["variants"] = {"lr1": {"train.lr": 1.0e-3}, "lr3": {"train.lr": 3.0e-3}}
    data["sweep"]["grid"] = {"task": ["clip"], "kd": ["mse"], "setting": ["lr1", "lr3"]}
    data["sweep"]["baseline"] = "task-clip__kd-mse__setting-lr1"
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    assert cli.main(["sweep", str(config), "--seeds", "2"]) == 0
    capsys.readouterr()
    runs = tmp_path / "sweep" / "runs"
    assert sorted(p.name for p in runs.iterdir()) == sorted(
        f"task-clip__kd-mse__setting-{s}{x}" for s in ("lr1", "lr3") for x in ("", "__seed-1"))
    zs = "zeroshot:world:test:colour_shape"
    top1 = {p.name: json.loads((p / "metrics.json").read_text())["eval"][zs]["top1"] for p in runs.iterdir()}
    rows = {r["run"]: r for r in csv.DictReader((tmp_path / "sweep" / "leaderboard.csv").open())}
    base, other = "task-clip__kd-mse__setting-lr1", "task-clip__kd-mse__setting-lr3"
    deltas = [top1[other] - top1[base], top1[other + "__seed-1"] - top1[base + "__seed-1"]]
    assert rows[other]["vs_scratch"] == base and float(rows[other]["d_top1"]) == pytest.approx(statistics.mean(deltas))
    assert rows[base]["d_top1"] == ""  # the baseline itself has no Δ
    assert f"Δ top-1 vs {base} (pts)" in (tmp_path / "sweep" / "leaderboard.md").read_text()
    data["sweep"]["baseline"] = "setting-lr9"
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError, match=r"sweep.baseline: 'setting-lr9' is not a grid point of this sweep; grid "
                                          r"points: task-clip__kd-mse__setting-lr1, task-clip__kd-mse__setting-lr3"):
        load_sweep(config)


def test_a_sweep_files_recipe_is_expanded_and_its_own_keys_win(tmp_path: Path) -> None:
    """``recipe: NAME`` in a sweep file reads as in a run config: every grid point gets the recipe's objectives and
    settings, the file's own keys and a variant's overrides winning."""
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "recipe": "mobileclip", "teacher": "cache:tc", "train": {"steps": 3},
        "sweep": {"variants": {"k1": {"data.augment": False}, "k4": {"data.views": 4}},
                  "grid": {"setting": ["k1", "k4"]}, "baseline": "setting-k1"}}, sort_keys=False))
    runs = {r.name: r for r in load_sweep(path).runs}
    assert set(runs) == {"setting-k1", "setting-k4"}
    for run in runs.values():
        assert [o.name for o in run.cfg.objectives] == ["dr_clip"]
        assert run.cfg.objectives[0].params["contrastive_weight"] == 0.0
        assert run.cfg.train.steps == 3
    assert (runs["setting-k4"].cfg.data.augment, runs["setting-k4"].cfg.data.views) == (True, 4)  # the recipe's
    assert runs["setting-k1"].cfg.data.augment is False  # the variant's
