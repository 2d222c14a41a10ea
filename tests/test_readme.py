"""`mmkd readme`: the README's results sections are rebuilt from the runs' JSON; nothing else is touched."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from mmkd.cli import main
from mmkd.report.readme import ReadmeError, update_readme

REPO = Path(__file__).resolve().parents[1]


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
    assert "| teacher | 27.6 | 50.0 |" in body and "| distilled student | 18.1 | 45.0 |" in body
    assert "beats the same student trained from scratch for the same steps by 10.0 points" in body
    assert "killed with SIGKILL as soon as its step-300 checkpoint" in body
    assert "teacher 4.0, evaluation 1.0" in body  # minutes per phase

    # twice is the same as once: the file is not even rewritten
    mtime = readme.stat().st_mtime_ns
    assert update_readme(readme, tmp_path) == ["demo"]
    assert readme.read_text() == text and readme.stat().st_mtime_ns == mtime

    # new figures in the JSON show up in the section on the next run
    fake_demo(tmp_path, student_top1=0.47)
    update_readme(readme, tmp_path)
    assert "| distilled student | 18.1 | 47.0 |" in readme.read_text()


def test_cli_regenerates_and_names_what_is_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(BEFORE + AFTER)
    assert main(["readme", "--readme", str(readme), "--root", str(tmp_path)]) == 2
    assert "runs/demo/metrics.json not found; run `make demo`" in capsys.readouterr().err
    assert readme.read_text() == BEFORE + AFTER  # nothing written on failure

    fake_demo(tmp_path)
    assert main(["readme", "--readme", str(readme), "--root", str(tmp_path)]) == 0
    assert "regenerated demo" in capsys.readouterr().out

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
    assert "<!-- results:bench-loader -->" in (REPO / "README.md").read_text()


def test_the_project_readme_has_its_sections_and_every_one_has_a_renderer() -> None:
    from mmkd.report.readme import _BLOCK, SECTIONS

    names = {m.group("name") for m in _BLOCK.finditer((REPO / "README.md").read_text())}
    assert {"demo", "bench-cache"} <= names <= set(SECTIONS.names())


def test_matching_section_from_the_study_demo_json(tmp_path: Path) -> None:
    import mmkd.studies.matching.report  # noqa: F401  (registers the section, as `mmkd readme` does)

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
    """Every test the README's "What mmkd does with bad input" table cites exists (names drift when tests move)."""
    text = (REPO / "README.md").read_text()
    table = text[text.index("## What mmkd does with bad input"):]
    table = table[:table.index("\n## ")]
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
