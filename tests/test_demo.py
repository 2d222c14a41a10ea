"""End to end: `mmkd demo --quick` trains, distils, evaluates and reports; a second run reuses the teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmkd.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "demo"


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path: Path, minilm_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--configs", str(CONFIGS)]) == 0
    printed = capsys.readouterr().out
    assert "| teacher |" in printed and "| distilled student |" in printed and "| scratch student |" in printed

    metrics = json.loads((out / "metrics.json").read_text())
    for name in ("teacher", "student", "scratch"):
        m = metrics["models"][name]
        assert isinstance(m["params"], int) and m["params"] > 0
        assert m["latency_ms_per_image"] > 0
        for cs in ("colour_shape", "shape", "colour"):
            assert 0.0 <= m["zeroshot"][cs]["top1"] <= m["zeroshot"][cs]["top5"] <= 1.0
        for k in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"):
            assert 0.0 <= m["retrieval"][k] <= 1.0
    # the student really is smaller than the teacher, and both students are the same size
    assert metrics["models"]["student"]["params"] < metrics["models"]["teacher"]["params"]
    assert metrics["models"]["student"]["params"] == metrics["models"]["scratch"]["params"]

    # the cached student ran as `mmkd distill` in a child process, was SIGKILLed after its first checkpoint and
    # finished in a new process with --resume: its log shows both starts, and the kill is recorded
    kill = metrics["models"]["student_cached"]["killed_and_resumed"]
    cached_cfg = metrics["demo"]["configs"]["student_cached"]
    assert kill["killed_with"] == "SIGKILL" and kill["checkpoint_step"] == cached_cfg["train"]["ckpt_every"]
    assert kill["checkpoint_step"] <= kill["last_logged_step_before_kill"] < cached_cfg["train"]["steps"]
    assert kill["resumed_with"].endswith("--resume")
    run_log = (out / "train" / "student_cached.log").read_text()
    assert run_log.count("teacher targets from the cache") == 2  # two processes
    assert (out / "train" / "student_cached" / "student" / "model.safetensors").is_file()
    # the cache holds exactly the views the online student's teacher runs on, and both students start from the
    # same weights and batches: they differ only in where the targets come from (stored as float16), so their
    # losses agree step for step to rounding, through the kill and the resume
    def losses(name: str) -> list[tuple[int, float]]:
        rows = (json.loads(line) for line in (out / "train" / name / "metrics.jsonl").read_text().splitlines())
        return [(r["step"], r["loss"]) for r in rows if "loss" in r]

    online, cached = losses("student"), losses("student_cached")
    assert [s for s, _ in online] == [s for s, _ in cached] and len(online) >= 4
    assert all(abs(a - b) <= 1e-3 * abs(a) for (_, a), (_, b) in zip(online, cached)), (online, cached)
    # every model is a config run through run_distill, evaluated once by the demo; the phases are timed
    assert set(metrics["demo"]["configs"]) == {"teacher", "student", "student_cached", "scratch"}
    assert {"teacher", "student", "scratch", "evaluation", "report"} <= set(metrics["demo"]["phases_s"])
    assert "time per phase: teacher" in printed

    report = (out / "report.md").read_text()
    assert "accuracy.png" in report and "curves.png" in report and "| teacher |" in report
    for png in ("accuracy.png", "curves.png"):
        assert (out / png).stat().st_size > 5000
    for name in ("teacher", "student", "scratch"):
        assert (out / name / "model.safetensors").is_file()
    assert (out / "train" / "student" / "metrics.jsonl").is_file()

    # the demo ends with the HTML report, teacher and both students side by side, bias probe included
    page = (out / "report.html").read_text()
    for fid in ("fig-zeroshot-colour-shape", "fig-retrieval-world", "fig-pareto", "fig-curves", "fig-bias-text",
                "table-comparison", "table-efficiency", "table-bias"):
        assert f'id="{fid}"' in page, fid
    assert "distilled student" in page and "scratch student" in page and "data:image/png;base64," in page
    bias = metrics["bias"]
    students = set(metrics["models"]) - {"teacher"}  # distilled, cached-teacher and scratch students
    assert {"student", "student_cached", "scratch"} <= students
    assert bias["reference"] == "teacher" and set(bias["vs_reference"]) == students
    teacher = bias["models"]["teacher"]["text"]
    nurse = teacher["professions"].index("nurse")
    she, he = teacher["rows"].index("she"), teacher["rows"].index("he")
    assert teacher["cosine"][she][nurse] > teacher["cosine"][he][nurse]

    # a second run reuses the finished teacher and students (same configs) instead of training them again
    assert main(["demo", "--quick", "--out", str(out), "--configs", str(CONFIGS)]) == 0
    again = capsys.readouterr().out
    assert "reusing the cached teacher" in again and "training" not in again
    assert "reusing student_cached" in again
