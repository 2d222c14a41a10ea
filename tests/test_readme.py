"""`make readme` (tools/readme.py): the results blocks of README.md and docs/*.md are rebuilt from the runs' JSON;
nothing else is touched."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from readme import main
from readme_sections import ReadmeError, update_pages, update_readme

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]  # the front page and the docs site's pages


def _model(top1: float, params: int, ms: float) -> dict:
    zs = {cs: {"top1": top1, "top5": min(1.0, top1 + 0.4)} for cs in ("colour_shape", "shape", "colour")}
    return {"params": params, "zeroshot": zs, "retrieval": {"i2t_r1": 0.05, "t2i_r1": 0.06},
            "latency_ms_per_image": ms, "latency": {"latency_ms_per_image_b64": ms / 5}}


def fake_demo(root: Path, student_top1: float = 0.45) -> None:
    models = {"teacher": _model(0.50, 27_600_000, 4.0), "student": _model(student_top1, 18_100_000, 1.0),
              "student_cached": _model(0.44, 18_100_000, 1.0), "scratch": _model(0.35, 18_100_000, 1.0)}
    models["student_cached"]["killed_and_resumed"] = {
        "killed_with": "SIGKILL", "checkpoint_step": 300, "last_logged_step_before_kill": 300,
        "resumed_with": "mmkd distill runs/demo/configs/student_cached.yaml --resume"}
    metrics = {"models": models, "demo": {"seconds": 600.0, "settings": {"cache_views": 2},
                                          "phases_s": {"teacher": 240.0, "evaluation": 60.0},
                                          "machine": {"cpu_count": 2, "torch_threads": 2, "bf16": False}}}
    (root / "runs" / "demo").mkdir(parents=True, exist_ok=True)
    (root / "runs" / "demo" / "metrics.json").write_text(json.dumps(metrics))


BEFORE = "# Title\n\nIntro text, kept as is.\n\n<!-- results:demo -->\n"
AFTER = "<!-- /results:demo -->\n\n## Next section\n\n| a | b |\n|---|---|\n"


def test_demo_section_is_replaced_and_the_rest_untouched(tmp_path: Path) -> None:
    fake_demo(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(BEFORE + "an old, hand-pasted table\n| teacher | 99.9 |\n" + AFTER)
    assert update_readme(readme, tmp_path) == ["demo"]
    text = readme.read_text()
    assert text.startswith(BEFORE) and text.endswith(AFTER)
    body = text[len(BEFORE):-len(AFTER)]
    assert "hand-pasted" not in body and "99.9" not in body
    assert "| teacher | – | 27.6 | 50.0 |" in body and "| distilled student | – | 18.1 | 45.0 |" in body
    assert "beats the same-shape student trained from scratch for the same steps by 10.0 points" in body
    assert "killed with SIGKILL as soon as its step-300 checkpoint" in body
    assert "teacher 4.0, evaluation 1.0" in body  # minutes per phase

    # twice is the same as once: the file is not even rewritten
    mtime = readme.stat().st_mtime_ns
    assert update_readme(readme, tmp_path) == ["demo"]
    assert readme.read_text() == text and readme.stat().st_mtime_ns == mtime

    # new figures in the JSON show up in the section on the next run
    fake_demo(tmp_path, student_top1=0.47)
    update_readme(readme, tmp_path)
    assert "| distilled student | – | 18.1 | 47.0 |" in readme.read_text()


def test_demo_section_says_what_each_student_got_and_its_robust_speed_up(tmp_path: Path) -> None:
    fake_demo(tmp_path)
    path = tmp_path / "runs" / "demo" / "metrics.json"
    metrics = json.loads(path.read_text())
    models = metrics["models"]
    models["teacher"]["flops"] = {"image_gflops": 0.03}
    models["student"].update(flops={"image_gflops": 0.01}, from_teacher="targets + inherited ViT layers",
                             speedup_b1={"median": 2.5, "rounds": [2.4, 2.5, 2.7], "batch_size": 1})
    models["scratch"]["from_teacher"] = "nothing (captions only)"
    path.write_text(json.dumps(metrics))
    readme = tmp_path / "README.md"
    readme.write_text(BEFORE + AFTER)
    update_readme(readme, tmp_path)
    text = readme.read_text()
    # the paired median (2.5), not the ratio of single latencies (4.0 / 1.0); the FLOPs ratio beside it
    assert "| distilled student | targets + inherited ViT layers | 18.1 | 45.0 |" in text
    assert "| 2.5 / 4.0 | 3.0 | 90.0% |" in text
    assert "| scratch student | nothing (captions only) | 18.1 | 35.0 |" in text
    assert "is 2.5× faster per image at batch 1 (4.0× at batch 64, 3.0× fewer FLOPs per image)" in text


def test_cli_regenerates_and_names_what_is_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    readme = tmp_path / "README.md"
    old = BEFORE + "the last run's table\n" + AFTER
    readme.write_text(old)
    # every section: one whose JSON has not been made here keeps its block, and the command says so in one line
    assert main(["--page", str(readme), "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "results:demo: " in out and "runs/demo/metrics.json not found; run `make demo`" in out
    assert "its block is kept as it is" in out and "regenerated no section" in out
    assert readme.read_text() == old
    # asked for by name, it must be there: an error, nothing written
    assert main(["--page", str(readme), "--root", str(tmp_path), "--section", "demo"]) == 2
    assert "runs/demo/metrics.json not found; run `make demo`" in capsys.readouterr().err
    assert readme.read_text() == old

    fake_demo(tmp_path)
    assert main(["--page", str(readme), "--root", str(tmp_path)]) == 0
    assert "regenerated demo" in capsys.readouterr().out

    (tmp_path / "runs" / "demo" / "metrics.json").write_text("{not json")  # a broken file is never skipped
    with pytest.raises(ReadmeError, match="metrics.json is not valid JSON"):
        update_readme(readme, tmp_path, kept=print)
    (tmp_path / "runs" / "demo" / "metrics.json").write_text("{}")  # valid JSON of another shape: one line too
    assert main(["--page", str(readme), "--root", str(tmp_path), "--section", "demo"]) == 2
    err = capsys.readouterr().err
    assert "results:demo: its JSON lacks or mistypes" in err and "internal error" not in err, err

    readme.write_text("<!-- results:nosuch -->\nx\n<!-- /results:nosuch -->\n")
    with pytest.raises(ReadmeError, match=r"no renderer for section\(s\) \['nosuch'\]"):
        update_readme(readme, tmp_path)


def test_bench_section_comes_from_the_committed_results(tmp_path: Path) -> None:
    shutil.copytree(REPO / "bench" / "results", tmp_path / "bench" / "results")
    cost = json.loads((tmp_path / "bench" / "results" / "cache_cost.json").read_text())
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:bench-cache -->\n<!-- /results:bench-cache -->\n")
    assert update_readme(readme, tmp_path, only=["bench-cache"]) == ["bench-cache"]
    text = readme.read_text()
    assert f"| {cost['cached_over_plain_time']:.3f} | {cost['demo_cached_over_plain_time']:.3f} | ≤ 1.05 |" in text
    assert f"{cost['online_over_cached_time']:.2f}" in text


def test_loader_bench_section_comes_from_the_committed_results(tmp_path: Path) -> None:
    shutil.copytree(REPO / "bench" / "results", tmp_path / "bench" / "results")
    r = json.loads((tmp_path / "bench" / "results" / "loader_throughput.json").read_text())
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:bench-loader -->\n<!-- /results:bench-loader -->\n")
    assert update_readme(readme, tmp_path, only=["bench-loader"]) == ["bench-loader"]
    text = readme.read_text()
    train = r["details"]["decoders"]["views"]["train224"]
    assert f"| simplejpeg (every n/8) | {train['simplejpeg']['images_per_s']:.0f} (" in text and "**mmkd's**" in text
    assert f"`loader_w2_over_bare` = {r['loader_w2_over_bare']:.2f} (target ≥ 1.7)" in text
    assert f"`decoder_over_pil` = {r['decoder_over_pil']:.2f}" in text
    assert "<!-- results:bench-loader -->" in (REPO / "docs" / "scaling-up.md").read_text()


def test_data_scale_and_cache_lookup_sections_come_from_the_committed_results(tmp_path: Path) -> None:
    shutil.copytree(REPO / "bench" / "results", tmp_path / "bench" / "results")
    scale = json.loads((tmp_path / "bench" / "results" / "data_scale.json").read_text())
    lookup = json.loads((tmp_path / "bench" / "results" / "cache_lookup.json").read_text())
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:bench-data-scale -->\n<!-- /results:bench-data-scale -->\n\n"
                      "<!-- results:bench-cache-lookup -->\n<!-- /results:bench-cache-lookup -->\n")
    assert sorted(update_readme(readme, tmp_path)) == ["bench-cache-lookup", "bench-data-scale"]
    text = readme.read_text()
    big = scale["400000"]
    assert f"| 400,000 (400) | {big['index_build_s']:.1f} s | {big['first_batch_s']:.2f} s |" in text
    assert f"**{scale['rss_400k_over_20k']:.2f}**" in text
    assert f"| {lookup['variants']['dict']['rss_mb']:.0f} MB | {lookup['variants']['index']['rss_mb']:.1f} MB" in text


def test_cache_build_memory_section_comes_from_the_committed_results(tmp_path: Path) -> None:
    shutil.copytree(REPO / "bench" / "results", tmp_path / "bench" / "results")
    r = json.loads((tmp_path / "bench" / "results" / "cache_build_memory.json").read_text())
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:bench-cache-build-memory -->\n<!-- /results:bench-cache-build-memory -->\n")
    assert update_readme(readme, tmp_path, only=["bench-cache-build-memory"]) == ["bench-cache-build-memory"]
    text = readme.read_text()
    big = r["300000"]["build"]
    assert f"| 300,000 (300) | {big['index_s'] + big['build_s']:.0f} s | {big['peak_rss_mb']:.0f} MB" in text
    assert f"**{r['rss_300k_over_30k']:.2f}**" in text and "target ≤ 1.15" in text


def test_demo_seeds_section_is_mean_and_sd_with_its_command(tmp_path: Path) -> None:
    folder = tmp_path / "runs" / "demo-seeds"
    folder.mkdir(parents=True)
    summary = {"teacher_top1": {"mean": 0.512, "sd": 0.011}, "kd_minus_scratch": {"mean": 0.093, "sd": 0.008},
               "kept": {"mean": 0.931, "sd": 0.02}}
    (folder / "seeds.json").write_text(json.dumps({"command": "mmkd demo --seeds 3", "seeds": 3, "per_seed": [],
                                                   "summary": summary}))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:demo-seeds -->\nnot run yet\n<!-- /results:demo-seeds -->\n")
    assert update_readme(readme, tmp_path) == ["demo-seeds"]
    text = readme.read_text()
    assert "| teacher colour+shape top-1 | 51.2 ± 1.1% |" in text and "| KD − scratch | 9.3 ± 0.8 points |" in text
    assert "| kept of teacher | 93.1 ± 2.0% |" in text and "`mmkd demo --seeds 3`" in text and "not run" not in text


def test_the_project_readme_has_its_sections_and_every_one_has_a_renderer() -> None:
    from readme_sections.core import _BLOCK, SECTIONS

    names: list[str] = []
    for page in PAGES:
        text = page.read_text()
        found = [m.group("name") for m in _BLOCK.finditer(text)]
        # well-formed: every opening marker is closed by its own closing marker, none is left over or nested
        opened = re.findall(r"^<!-- results:([\w.-]+) -->$", text, re.M)
        closed = re.findall(r"^<!-- /results:([\w.-]+) -->$", text, re.M)
        assert opened == closed == found, page
        for m in _BLOCK.finditer(text):
            assert "<!-- results:" not in m.group("body") and "<!-- /results:" not in m.group("body")
        names += found
    assert {"demo", "demo-seeds", "bench-cache", "matching", "matching-seeds", "matching-sweep", "sweep-s1",
            "bench-loader", "bench-data-scale", "bench-cache-lookup", "reinforce-world",
            "bench-cache-build-memory"} <= set(names)
    assert set(names) <= set(SECTIONS.names()) and len(names) == len(set(names))  # each block in one page
    assert "<!-- results:demo -->" in (REPO / "README.md").read_text()  # the headline table stays on the front page


def _board_row(run: str, role: str, top1: float | None, ref: str = "", d: float | None = None) -> dict:
    return {"run": run, "role": role, "objectives": "clip" if role != "teacher" else "runs/t", "zs_top1": top1,
            "zs_top5": 0.9, "i2t_r1": 0.1, "t2i_r1": 0.05, "train_s": None if role == "teacher" else 30.0,
            "vs_scratch": ref, "d_top1": d}


def test_sweep_s1_section_is_the_sweeps_leaderboard_and_its_command(tmp_path: Path) -> None:
    rows = [_board_row("teacher", "teacher", 0.416),
            _board_row("task-clip__kd-mse", "distilled", 0.39, "task-clip__kd-scratch", 0.39 - 0.30),
            _board_row("task-clip__kd-kl", "distilled", 0.31, "task-clip__kd-scratch", 0.31 - 0.30),
            _board_row("task-clip__kd-scratch", "scratch", 0.30)]
    folder = tmp_path / "runs" / "s1_compare"
    folder.mkdir(parents=True)
    cmd = "mmkd sweep configs/s1_compare.yaml teacher=runs/world_teacher/student train.threads=1"
    (folder / "leaderboard.json").write_text(json.dumps({"command": cmd, "notes": "Zero-shot: world:test.",
                                                         "rows": rows}))
    readme = tmp_path / "README.md"
    readme.write_text("## S1\n<!-- results:sweep-s1 -->\n| old | 39.0 |\n<!-- /results:sweep-s1 -->\nprose\n")
    assert update_readme(readme, tmp_path) == ["sweep-s1"]
    text = readme.read_text()
    assert f"written by `{cmd}` (3 runs, 2 minutes of student training). Zero-shot: world:test." in text
    assert "| old |" not in text and text.endswith("<!-- /results:sweep-s1 -->\nprose\n")
    assert ("| run | role | objectives | zero-shot top-1 % | top-5 % | Δ top-1 vs scratch (pts) | i2t R@1 % | "
            "t2i R@1 % | train s |\n|---|---|---|---:|---:|---:|---:|---:|---:|\n"
            "| teacher | teacher | runs/t | 41.6 | 90.0 |  | 10.0 | 5.0 |  |\n"
            "| task-clip__kd-mse | distilled | clip | 39.0 | 90.0 | +9.0 | 10.0 | 5.0 | 30 |\n"
            "| task-clip__kd-kl | distilled | clip | 31.0 | 90.0 | +1.0 | 10.0 | 5.0 | 30 |\n"
            "| task-clip__kd-scratch | scratch | clip | 30.0 | 90.0 |  | 10.0 | 5.0 | 30 |\n") in text
    assert ("- Against `task-clip__kd-scratch` (30.0% top-1): the 2 distilled runs gain +1.0 to +9.0 points; "
            "best `task-clip__kd-mse`, 39.0%.") in text
    assert "- The best student, `task-clip__kd-mse`, is 2.6 points of top-1 below the teacher (41.6%)." in text


def test_sweep_s1_section_counts_seeded_runs_and_says_which_gains_are_beyond_noise(tmp_path: Path) -> None:
    """With --seeds the board judges every distilled row by the noise rule; the section counts and names them."""
    rows = [_board_row("task-clip__kd-mse", "distilled", 0.39, "task-clip__kd-scratch", 0.09),
            _board_row("task-clip__kd-kl", "distilled", 0.31, "task-clip__kd-scratch", 0.01),
            _board_row("task-clip__kd-scratch", "scratch", 0.30)]
    rows[0]["beyond_noise"], rows[1]["beyond_noise"] = True, False
    for r in rows:
        r["seeds"] = 3  # each row the mean of 3 runs of 30 s
    folder = tmp_path / "runs" / "s1_compare"
    folder.mkdir(parents=True)
    (folder / "leaderboard.json").write_text(json.dumps({"command": "mmkd sweep x --seeds 3", "notes": "",
                                                         "rows": rows}))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:sweep-s1 -->\n<!-- /results:sweep-s1 -->\n")
    update_readme(readme, tmp_path)
    assert "written by `mmkd sweep x --seeds 3` (9 runs, 4 minutes of student training)." in readme.read_text()
    assert ("the 2 distilled runs gain +1.0 to +9.0 points; best `task-clip__kd-mse`, 39.0%. 1 of 2 beyond noise "
            "(`task-clip__kd-mse`).") in readme.read_text()


def _r(f1: float) -> dict:
    return {"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": f1, "roc_auc": 0.5}


def test_matching_seeds_section_is_mean_and_sd_over_the_seeds(tmp_path: Path) -> None:
    f1 = {("baseline", None): [0.80, 0.82, 0.84], ("kd_kl", 0): [0.85, 0.85, 0.85], ("kd_kl", 4): [0.90, 0.94, 0.92],
          ("kd_bce", 0): [0.81, 0.83, 0.85], ("kd_bce", 4): [0.86, 0.86, 0.89]}
    runs = [{"seed": seed, "model": m, "transfer": t, "reused": seed == 0 and t in (None, 4), "val": _r(v),
             "test": _r(v), "train_seconds": 1.0} for (m, t), vs in f1.items() for seed, v in enumerate(vs)]
    seeds = {"seeds": [0, 1, 2], "transfer": [0, 4], "kd": ["kd_kl", "kd_bce"],
             "settings": {"random": {"teacher": _r(0.96), "runs": runs, "seconds": 10.0}}}
    (tmp_path / "runs" / "matching").mkdir(parents=True)
    (tmp_path / "runs" / "matching" / "seeds.json").write_text(json.dumps(seeds))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:matching-seeds -->\n<!-- /results:matching-seeds -->\n")
    assert update_readme(readme, tmp_path) == ["matching-seeds"]
    text = readme.read_text()
    assert "seeds 0, 1, 2 on the same pairs and teacher" in text and "12 extra student runs" in text
    assert ("| negatives | teacher | KD students trained on | baseline (BCE) | KD-KL | KD-BCE |\n"
            "|---|---|---|---|---|---|\n"
            "| random | 96.0 | labelled pairs only (S2) | 82.0 ± 2.0 | 85.0 ± 0.0 | 83.0 ± 2.0 |\n"
            "| random | 96.0 | + 4 transfer pairs per pair | 82.0 ± 2.0 | 92.0 ± 2.0 | 87.0 ± 1.7 |\n") in text
    assert ("- random: mean test F1 as a share of the teacher's: baseline 85%, KD-KL 89% / 96%, KD-BCE 86% / 91% "
            "(labelled only / + 4 transfer).") in text


def test_matching_sweep_section_shows_the_top_the_last_and_the_references(tmp_path: Path) -> None:
    def row(rank: object, model: str, variant: str, t: object, a: object, val: float) -> dict:
        return {"rank": rank, "model": model, "variant": variant, "temperature": t, "alpha": a, "val_f1": val,
                "val_accuracy": val, "test_accuracy": 0.9, "test_precision": 0.8, "test_recall": 1.0,
                "test_f1": val - 0.01, "test_roc_auc": 0.95}

    kd = [row(i + 1, "kd_bce" if i % 2 else "kd_kl", "bce" if i % 2 else "kl", 1.5 + 0.5 * (i // 2) % 4,
              0.5, 0.91 - 0.005 * i) for i in range(8)]
    kd[3] = row(4, "kd_bce", "bce", 3.0, 0.5, kd[3]["val_f1"])
    refs = [row("", "teacher", "", "", "", 0.95), row("", "baseline", "", "", "", 0.877)]
    sweep = {"pairs": "runs/matching/pairs/random.jsonl", "leaderboard": kd + refs, "runs": [],
             "config": {"train": {"epochs": 15, "transfer": 0}}, "seconds": 300.0}
    (tmp_path / "runs" / "matching" / "sweep").mkdir(parents=True)
    (tmp_path / "runs" / "matching" / "sweep" / "sweep.json").write_text(json.dumps(sweep))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:matching-sweep -->\n<!-- /results:matching-sweep -->\n")
    assert update_readme(readme, tmp_path) == ["matching-sweep"]
    text = readme.read_text()
    assert ("written by `mmkd matching sweep configs/matching/demo_sweep.yaml` on `runs/matching/pairs/random.jsonl`"
            " (8 KD runs, 15 epochs each, transfer pairs per pair: 0; 5 minutes in all)") in text
    table = [line for line in text.splitlines() if line.startswith("| ")]  # the header, then the rows
    ranks = [line.split("|")[1].strip() for line in table[1:]]
    assert ranks == ["1", "2", "3", "4", "5", "…", "8", "", ""]
    assert "| 4 | KD-BCE | 3.0 | 0.5 | 89.5 | 90.0 | 80.0 | 100.0 | 88.5 | 95.0 |" in text
    assert "|  | teacher |  |  | 95.0 | 90.0 | 80.0 | 100.0 | 94.0 | 95.0 |" in text
    assert ("The 8 KD runs span 87.5–91.0 validation F1 and 86.5–90.0 test F1; teacher 95.0 / 94.0; "
            "baseline (BCE) 87.7 / 86.7 (validation / test F1).") in text
    assert "S2's best setting (KD-BCE, T = 3, α = 0.5) ranks 4 of 8 here." in text


def test_matching_section_from_the_study_demo_json(tmp_path: Path) -> None:
    r = {"accuracy": 0.9, "precision": 0.8, "recall": 1.0, "f1": 0.889, "roc_auc": 0.95}
    results = {"random": {"teacher": r, "kd_kl": {**r, "f1": 0.8}}}
    folder = tmp_path / "runs" / "matching"
    folder.mkdir(parents=True)
    (folder / "matching.json").write_text(json.dumps(results))
    (folder / "demo.json").write_text(json.dumps({"seconds": 300.4, "settings": {"random": {"seconds": 120.0}},
                                                  "config": {"train": {"seed": 0}}}))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:matching -->\nold\n<!-- /results:matching -->\nend\n")
    assert update_readme(readme, tmp_path) == ["matching"]
    text = readme.read_text()
    assert text.startswith("intro\n<!-- results:matching -->\nFrom `runs/matching/matching.json`") and "old" not in text
    assert "300 s in all, 120 s of it in the studies" in text and text.endswith("<!-- /results:matching -->\nend\n")
    assert "| random | KD-KL | 90.0 | 80.0 | 100.0 | 80.0 | 95.0 | 90% |" in text


def test_bad_input_table_names_tests_that_exist() -> None:
    """Every test the docs' "What mmkd does with bad input" table cites exists (names drift when tests move)."""
    text = (REPO / "docs" / "bad-input.md").read_text()
    table = text[text.index("# What mmkd does with bad input"):]
    table = table.split("\n## ")[0]
    cited: list[tuple[str, str]] = []
    for line in table.splitlines():
        if not line.startswith("| ") or line.startswith("| fault"):
            continue
        last_file = None
        for m in re.finditer(r"(tests/test_\w+\.py)?(?:::|`)(test_\w+)", line):
            last_file = m.group(1) or last_file
            if last_file:
                cited.append((last_file, m.group(2)))
    assert len(cited) > 40
    missing = [f"{f}::{name}" for f, name in cited if f"def {name}(" not in (REPO / f).read_text()]
    assert not missing, missing


def test_export_bench_section_comes_from_the_committed_results(tmp_path: Path) -> None:
    shutil.copytree(REPO / "bench" / "results", tmp_path / "bench" / "results")
    r = json.loads((tmp_path / "bench" / "results" / "export.json").read_text())
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:bench-export -->\n<!-- /results:bench-export -->\n")
    assert update_readme(readme, tmp_path, only=["bench-export"]) == ["bench-export"]
    text = readme.read_text()
    lat, top1 = r["latency_ms_per_image"]["onnx_int8"], r["zeroshot_top1"]["onnx_int8"]
    assert f"| ONNX int8 | {lat['1']:.3f} | {lat['64']:.3f} | {r['size_mb_total']['onnx_int8']:.1f} MB" in text
    assert f"| {100 * top1:.1f} |" in text
    assert f"**{r['int8_speedup_over_pytorch_b1']:.2f}×** faster at batch 1" in text


def test_blocks_are_rewritten_in_whichever_page_holds_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The front page and the docs pages are one set: each block is rendered in its own page, a name in two pages
    is refused before anything is written, and the tool's default pages are README.md and docs/*.md."""
    fake_demo(tmp_path)
    shutil.copytree(REPO / "bench" / "results", tmp_path / "bench" / "results")
    front, page = tmp_path / "README.md", tmp_path / "docs" / "guide.md"
    page.parent.mkdir()
    front.write_text(BEFORE + "old\n" + AFTER)
    page.write_text("# Guide\n<!-- results:bench-cache -->\nold\n<!-- /results:bench-cache -->\nend\n")
    assert main(["--root", str(tmp_path)]) == 0
    assert f"{page}: regenerated bench-cache" in capsys.readouterr().out
    assert "| teacher | – | 27.6 | 50.0 |" in front.read_text() and "old" not in front.read_text()
    text = page.read_text()
    assert text.startswith("# Guide\n<!-- results:bench-cache -->\n") and "≤ 1.05" in text and "old" not in text

    before = {p: p.read_text() for p in (front, page)}
    page.write_text(page.read_text() + "<!-- results:demo -->\nx\n<!-- /results:demo -->\n")
    before[page] = page.read_text()
    with pytest.raises(ReadmeError, match=r"block results:demo is also in .*README\.md; keep one of them"):
        update_pages([front, page], tmp_path)
    assert main(["--root", str(tmp_path)]) == 2
    assert "keep one of them" in capsys.readouterr().err
    assert {p: p.read_text() for p in (front, page)} == before  # nothing written


def test_the_renderer_is_not_in_the_installed_package() -> None:
    """`mmkd readme` is a repository tool now (tools/readme.py): neither the package nor its CLI carry it."""
    import importlib.util

    from mmkd.cli import COMMAND_MODULES

    assert importlib.util.find_spec("mmkd.report.readme") is None
    assert not any("readme" in m for m in COMMAND_MODULES)


def test_the_front_page_is_short_and_links_every_docs_page() -> None:
    """README.md is a front page (issue 22): at most ~300 lines, none over 200 characters outside the generated
    blocks, one statement of the test time, and a link to each page of the docs site."""
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    prose = _BLOCK_ANY.sub("", text)
    assert [line for line in prose.splitlines() if len(line) > 200] == []
    assert len(re.findall(r"minutes on 2 cores", text)) == 1
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)", text))
    assert {p.name for p in (REPO / "docs").glob("*.md")} <= linked


_BLOCK_ANY = re.compile(r"<!-- results:([\w.-]+) -->\n.*?<!-- /results:\1 -->", re.S)


def test_matching_hard_section_comes_from_the_committed_results(tmp_path: Path) -> None:
    shutil.copytree(REPO / "bench" / "results", tmp_path / "bench" / "results")
    r = json.loads((tmp_path / "bench" / "results" / "matching_hard.json").read_text())
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:matching-hard -->\n<!-- /results:matching-hard -->\n")
    assert update_readme(readme, tmp_path, only=["matching-hard"]) == ["matching-hard"]
    text = readme.read_text()
    chosen = [row for row in r["rows"] if row["chosen"]]
    assert len(chosen) == 1 and chosen[0]["label"] == r["chosen"]
    # chosen on validation: no KD setting has a higher mean validation F1
    assert chosen[0]["val_f1"] == max(row["val_f1"] for row in r["rows"] if row["alpha"] is not None)
    assert text.count("| yes |") == 1 and f"keeps {100 * chosen[0]['kept']:.1f}%" in text
    assert f"{100 * chosen[0]['test_f1']:.1f} ± {100 * chosen[0]['test_f1_sd']:.1f}" in text
    assert sum(line.startswith("| ") for line in text.splitlines()) == 2 + len(r["rows"])  # header, teacher, rows
