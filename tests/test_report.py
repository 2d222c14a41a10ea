"""`mmkd report`: a self-contained HTML page and Markdown from run folders, with every figure and table."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmkd.cli import main
from mmkd.report.collect import load_runs
from mmkd.report.figures import pareto_front
from mmkd.report.page import write_report

PROFS = ["nurse", "engineer", "pilot"]
ROWS = ["she", "woman", "he", "man"]


def _model(top1: float, ms: float, params: int, flat_retrieval: bool) -> dict:
    ret = {f"{d}_r{k}": min(1.0, top1 * k / 10) for d in ("i2t", "t2i") for k in (1, 5, 10)}
    ret.update(i2t_mean_rank=4.0, i2t_median_rank=3.0, t2i_mean_rank=5.0, t2i_median_rank=3.5)
    return {
        "params": params, "params_per_tower": {"image": params // 3, "text": params - params // 3, "total": params},
        "flops": {"image_gflops": params / 1e9, "text_gflops": params / 2e9},
        "latency_ms_per_image": ms,
        "latency": {"latency_ms_per_image": ms, "latency_ms_per_caption": ms / 2, "latency_ms_per_image_b64": ms / 8,
                    "images_per_s_b64": 8000 / ms, "latency_ms_per_caption_b64": ms / 16,
                    "captions_per_s_b64": 16000 / ms, "threads": 2},
        "peak_memory_mb": {"image_b64": params / 1e5, "caption_b64": params / 2e5},
        "zeroshot": {"colour_shape": {"top1": top1, "top5": min(1.0, 3 * top1), "mean_per_class_recall": top1},
                     "shape": {"top1": top1 + 0.1, "mean_per_class_recall": top1 + 0.1}},
        "retrieval": ret if flat_retrieval else {"world": ret},
    }


def _probe(shift: float, image: bool) -> dict:
    rng = np.random.default_rng(int(shift * 100))
    out = {"text": {"rows": ROWS, "professions": PROFS,
                    "cosine": (0.5 + shift + 0.1 * rng.standard_normal((4, 3))).tolist(),
                    "gender_score": [0.1 - shift, -0.05, 0.02 + shift], "mean_abs_gender_score": 0.06}}
    if image:
        out["image"] = {"rows": ["female images", "male images"], "professions": PROFS,
                        "cosine": (0.1 * rng.standard_normal((2, 3))).tolist(), "gender_score": [0.01, -0.02, 0.0],
                        "mean_abs_gender_score": 0.01, "n_images": {"female": 21, "male": 57}}
    return out


def _comparison() -> dict:
    return {"mean_abs_delta": 0.1, "max_abs_delta": 0.3, "spearman": 0.8, "sign_agreement": 0.67,
            "strength_ratio": 0.5}


def fake_run(root: Path, demo: bool = True, image_bias: bool = True) -> Path:
    """What `mmkd demo` leaves behind (metrics.json, training logs), small and fast to write."""
    root.mkdir(parents=True)
    models = {"teacher": _model(0.8, 2.0, 22_000_000, demo), "student": _model(0.6, 0.5, 6_000_000, demo),
              "scratch": _model(0.4, 0.7, 6_000_000, demo)}  # scratch: slower and worse than student
    names = list(models)
    bias = {"words": {"template": "a photo of a {}.", "professions": PROFS}, "reference": "teacher",
            "data": "coco:mini" if image_bias else None,
            "models": {n: _probe(0.1 * i, image_bias) for i, n in enumerate(names)},
            "vs_reference": {n: {k: _comparison() for k in (("text", "image") if image_bias else ("text",))}
                             for n in names[1:]}}
    metrics = {"models": models, "bias": bias}
    if demo:
        metrics["demo"] = {"quick": True, "config": {}, "seconds": 60}
    (root / "metrics.json").write_text(json.dumps(metrics))
    for name, start in (("student", 7.0), ("scratch", 6.0)):
        (root / "train" / name).mkdir(parents=True)
        (root / "train" / name / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "lr": 1e-3, "loss": start / (1 + s / 10)}) + "\n" for s in range(10, 101, 10)))
    (root / "teacher").mkdir()
    lines = [{"step": s, "loss": 4.0 / (1 + s / 50)} for s in range(10, 201, 10)]
    lines += [{"step": s, "eval": {"zeroshot_colour_shape_top1": s / 250}} for s in (50, 100, 150, 200)]
    (root / "teacher" / "train_metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


EXPECTED_FIGURES = {"fig-zeroshot-colour-shape", "fig-zeroshot-shape", "fig-retrieval-world", "fig-pareto",
                    "fig-efficiency", "fig-curves", "fig-bias-text", "fig-bias-text-scores", "fig-bias-image",
                    "fig-bias-image-scores"}
EXPECTED_TABLES = {"table-comparison", "table-efficiency", "table-bias"}


def _figures(page: str) -> dict[str, Image.Image]:
    found = {}
    for fid, data in re.findall(r'<figure id="([^"]+)"><img alt="[^"]*" src="data:image/png;base64,([^"]+)"', page):
        img = Image.open(io.BytesIO(base64.b64decode(data)))
        img.load()
        found[fid] = img
    return found


def _table(page: str, tid: str) -> list[list[str]]:
    body = re.search(rf'<table id="{tid}">(.*?)</table>', page, re.S)
    assert body, tid
    return [re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row) for row in re.findall(r"<tr>(.*?)</tr>", body.group(1))]


def test_report_has_every_figure_and_table(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "demo")
    report = write_report([run], tmp_path / "out" / "report.html", tmp_path / "out" / "report.md")
    assert {f.id for f in report.figures} == EXPECTED_FIGURES
    assert {t.id for t in report.tables} == EXPECTED_TABLES

    page = (tmp_path / "out" / "report.html").read_text()
    figs = _figures(page)
    assert set(figs) == EXPECTED_FIGURES  # embedded, decodable PNGs
    assert all(img.width > 300 and img.height > 150 for img in figs.values())
    assert not re.search(r'(src|href)="(https?:|file:|/)', page)  # self-contained: nothing to fetch
    for tid in EXPECTED_TABLES:
        assert f'<table id="{tid}">' in page

    comp = _table(page, "table-comparison")
    assert [r[0] for r in comp[1:]] == ["teacher", "distilled student", "scratch student"]
    header = comp[0]
    kept = "kept of teacher (colour_shape top-1)"  # one definition, as the demo's table and the README's
    assert "colour_shape top-1" in header and "world I→T R@1" in header and kept in header
    teacher = dict(zip(header, comp[1]))
    assert teacher["colour_shape top-1"] == "80.0" and teacher[kept] == "100.0%"
    assert dict(zip(header, comp[2]))[kept] == "75.0%"  # 0.6/0.8, not averaged with shape's 0.7/0.9
    eff = _table(page, "table-efficiency")
    front = {r[0]: r[-1] for r in eff[1:]}
    assert front == {"teacher": "yes", "distilled student": "yes", "scratch student": ""}
    bias = _table(page, "table-bias")
    assert "text: Spearman of gender scores" in bias[0] and "0.800" in bias[2]
    assert "21 images whose captions mention only female words" in page

    md = (tmp_path / "out" / "report.md").read_text()
    assert "| teacher |" in md and "| model | params (M) |" in md
    for fid in EXPECTED_FIGURES:
        assert f"(report_files/{fid}.png)" in md
        assert (tmp_path / "out" / "report_files" / f"{fid}.png").stat().st_size > 1000


def test_curves_come_from_each_run(tmp_path: Path) -> None:
    data = load_runs([fake_run(tmp_path / "demo")])
    curves = {c.label: c for c in data.curves}
    assert set(curves) == {"distilled student", "scratch student", "teacher"}
    assert curves["teacher"].evals[-1] == (200, {"zeroshot_colour_shape_top1": 0.8})
    assert curves["scratch student"].loss[0] == (10, 3.0)


def test_pareto_front() -> None:
    pts = [(2.0, 0.8), (0.5, 0.6), (0.7, 0.4), (0.5, 0.6), (3.0, 0.8), (0.1, 0.1), (1.0, 0.6)]
    # (0.7, .4), (3, .8) and (1, .6) are dominated; the duplicate (0.5, .6) stays
    assert pareto_front(pts) == [5, 1, 3, 0]
    assert pareto_front([]) == []


def test_several_runs_distill_and_eval_all(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    demo = fake_run(tmp_path / "demo")
    evals = fake_run(tmp_path / "eval", demo=False, image_bias=False)
    distill = tmp_path / "distill"
    distill.mkdir()
    (distill / "metrics.json").write_text(json.dumps({
        "train": {"steps": 20, "seconds": 3.0, "final_loss": 1.0},
        "eval": {"zeroshot:world:test:shape": {"top1": 0.5, "top5": 0.9, "mean_per_class_recall": 0.5},
                 "retrieval:world:test": {"i2t_r1": 0.1, "t2i_r1": 0.2}}}))
    (distill / "metrics.jsonl").write_text('{"step": 10, "loss": 2.0}\n{"step": 20, "loss": 1.5}\n')
    capsys.readouterr()
    assert main(["report", str(demo), str(evals), str(distill), "--out", str(tmp_path / "all.html"), "--no-md"]) == 0
    assert "figures" in capsys.readouterr().out and not (tmp_path / "all.md").exists()
    page = (tmp_path / "all.html").read_text()
    labels = [r[0] for r in _table(page, "table-comparison")[1:]]
    assert labels == ["demo/teacher", "distilled student", "scratch student", "eval/teacher", "eval/student",
                      "scratch", "distill/student"]
    figs = _figures(page)
    assert {"fig-zeroshot-world-test-shape", "fig-retrieval-world-test", "fig-bias-text-2"} <= set(figs)
    assert "fig-bias-image-2" not in figs  # the second run has no image probe

    assert main(["report", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.html")]) == 2
    assert "no metrics.json" in capsys.readouterr().err


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_headless_screenshot_is_not_blank(tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    write_report([fake_run(tmp_path / "demo")], page)
    shot = tmp_path / "shot.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1200,2000",
                        page.resolve().as_uri()], capture_output=True, timeout=120, check=False)
    assert shot.is_file(), "chromium wrote no screenshot"
    img = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
    assert img.shape[:2] == (2000, 1200)
    assert img.std() > 20  # a blank page is one flat colour
    colours = len(np.unique(img.reshape(-1, 3), axis=0))
    assert colours > 200  # charts (antialiased lines and bars), not just text on white
    top = img[:400]
    assert (top < 100).all(axis=2).mean() > 0.002  # dark text (the title and the table) near the top


def test_efficiency_table_warns_about_a_busy_cpu(tmp_path: Path) -> None:
    from mmkd.report.page import efficiency_table

    run = fake_run(tmp_path / "demo")
    quiet = efficiency_table(load_runs([run]), set())
    assert quiet is not None and "oversubscribed" not in quiet.note
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["models"]["student"]["latency"].update(cpu_load_1min=9.5, cpu_count=2)
    (run / "metrics.json").write_text(json.dumps(metrics))
    busy = efficiency_table(load_runs([run]), set())
    assert busy is not None and "oversubscribed" in busy.note and "load up to 9.5 on 2 cores" in busy.note


def test_one_model_in_two_runs_is_one_row_with_readable_titles(tmp_path: Path) -> None:
    """`mmkd report runs/eval runs/clip_half_depth` (eval all of that run's student): the student once, columns
    titled by the data set rather than its whole spec, one "Comparison" heading, and scores on data the run
    trained on marked."""
    coco = "coco:/data/coco/annotations/captions_val2017.json"
    distill = tmp_path / "clip_half_depth"
    distill.mkdir()
    (distill / "metrics.json").write_text(json.dumps({
        "train": {"steps": 20, "seconds": 3.0, "final_loss": 1.0},
        "eval": {f"retrieval:{coco}": {"i2t_r1": 0.368, "t2i_r1": 0.3}},
        "eval_overlap": {f"retrieval:{coco}": {"images": 239, "of_images": 239, "captions": 0, "of_captions": 5}}}))
    evals = tmp_path / "eval"
    evals.mkdir()
    (evals / "metrics.json").write_text(json.dumps({
        "models": {"teacher": _model(0.8, 2.0, 22_000_000, False), "student": _model(0.6, 0.5, 6_000_000, False)},
        "eval": {"suite": "s", "models": {"teacher": str(tmp_path / "teacher"), "student": str(distill / "student")}}}))
    write_report([evals, distill], tmp_path / "r.html", tmp_path / "r.md")
    page = (tmp_path / "r.html").read_text()
    rows = _table(page, "table-comparison")
    assert [r[0] for r in rows[1:]] == ["teacher", "student"]
    assert "coco captions_val2017 I→T R@1" in rows[0] and not any("/data/" in h for h in rows[0])
    student = dict(zip(rows[0], rows[2]))
    assert student["coco captions_val2017 I→T R@1"] == "36.8" and student["world I→T R@1"] not in ("", "–")
    assert page.count(">Comparison</h") == 1 and (tmp_path / "r.md").read_text().count("Comparison\n") == 1
    assert "Not held out (the run trained on these images): student on coco captions_val2017 (239 of 239" in page
