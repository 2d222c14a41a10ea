"""The dataset-reinforcement results section (``tools/readme_sections/reinforce.py``) and the bytes a setting stores
(``bench/reinforce_world.py``): rendered from the JSON, with verdicts that follow the sweep's noise rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_runs import bench_script

from readme_sections import ResultsMissing, update_readme
from readme_sections.reinforce import reinforce_world_section, verdict


def _bench():
    return bench_script("reinforce_world")


def _size(views: int, syn: int) -> dict:
    n, d = 10, 4  # 10 samples, 4-d float16 embeddings, 2 captions each, `syn` synthetic captions each
    arrays = {"image_embeds": n * views * d * 2, "text_embeds": 2 * n * d * 2}
    if syn:
        arrays["syncap_embeds"] = n * syn * d * 2
    return {"n_samples": n, "views": views, "arrays": arrays, "embedding_bytes_per_sample": sum(arrays.values()) / n,
            "folder_bytes_per_sample": 1000.0}


def test_a_setting_stores_its_views_captions_and_synthetic_captions() -> None:
    rw = _bench()
    sizes = {"a1": _size(1, 0), "b1": _size(1, 0), "a10": _size(10, 5)}
    one = rw.setting_bytes({"teacher": "cache:runs/x/a1"}, sizes)
    assert one == {"caches": ["a1"], "views": 1, "randaugment": False, "synthetic_captions": False,
                   "embedding_bytes_per_sample": 8 + 16}
    assert rw.setting_bytes({"teacher": ["cache:a1", "cache:b1"]}, sizes)["embedding_bytes_per_sample"] == 2 * 24
    k10 = rw.setting_bytes({"teacher": "cache:a10", "data.views": 10, "data.randaugment": {"num_ops": 2}}, sizes)
    assert k10["embedding_bytes_per_sample"] == 80 + 16 and k10["randaugment"]
    # a K=1 setting reading a K=10 cache with synthetic captions: what a cache built for it would hold
    syn = rw.setting_bytes({"teacher": "cache:a10", "data.synthetic_captions": {"enabled": True}}, sizes)
    assert syn["embedding_bytes_per_sample"] == 8 + 16 + 40 and syn["views"] == 1


def test_the_verdict_says_helped_only_beyond_noise() -> None:
    row = {"run": "setting-x", "d_top1": 0.021, "d_top1_sd": 0.004, "d_top1_lo": 0.01, "d_top1_hi": 0.03,
           "beyond_noise": True}
    assert verdict(row, "setting-base") == ("`setting-x` **helped**: +2.1 ± 0.4 points of top-1 vs `setting-base`, "
                                            "paired 95% interval +1.0 to +3.0.")
    assert "**hurt**" in verdict(dict(row, d_top1=-0.021, d_top1_lo=-0.03, d_top1_hi=-0.01), "b")
    assert "no difference beyond noise" in verdict(dict(row, beyond_noise=False), "b")
    assert verdict({"run": "base", "d_top1": None}, "b") == ""


def test_the_section_renders_from_the_json_and_waits_for_it(tmp_path: Path) -> None:
    with pytest.raises(ResultsMissing, match="bench/reinforce_world.py"):
        reinforce_world_section(tmp_path)
    board = {"command": "mmkd sweep configs/reinforce/world.yaml --seeds 3", "notes": "Zero-shot: world:test.",
             "versus": "setting-t1_k1", "rows": [
                 {"run": "setting-t1_k1", "role": "distilled", "objectives": "dr_clip", "seeds": 3, "zs_top1": 0.30,
                  "zs_top1_sd": 0.01, "train_s": 60.0},
                 {"run": "setting-t2_k1", "role": "distilled", "objectives": "dr_clip", "seeds": 3, "zs_top1": 0.33,
                  "zs_top1_sd": 0.01, "d_top1": 0.03, "d_top1_sd": 0.005, "d_top1_lo": 0.01, "d_top1_hi": 0.05,
                  "beyond_noise": True, "train_s": 70.0}]}
    (tmp_path / "runs" / "reinforce" / "sweep").mkdir(parents=True)
    (tmp_path / "runs" / "reinforce" / "sweep" / "leaderboard.json").write_text(json.dumps(board))
    bench = {"command": "python bench/reinforce_world.py", "seconds": 1800.0,
             "teachers": {"a": {"model": "runs/demo/teacher", "zeroshot": {"top1": 0.456}}},
             "captioner": {"config": {"steps": 2000}, "train_seconds": 140.0, "images": 200,
                           "colour_and_shape_greedy": 0.525, "colour_and_shape_sampled": 0.44, "bleu4_greedy": 37.5},
             "caches": {"cache-a-k1": {"embedding_bytes_per_sample": 1806.2, "folder_bytes_per_sample": 2230.5}},
             "settings": {"t1_k1": {"caches": ["cache-a-k1"], "views": 1, "randaugment": False,
                                    "synthetic_captions": False, "embedding_bytes_per_sample": 1806.2}}}
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "reinforce_world.json").write_text(json.dumps(bench))
    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- results:reinforce-world -->\nold\n<!-- /results:reinforce-world -->\ny\n")
    assert update_readme(readme, tmp_path, ["reinforce-world"]) == ["reinforce-world"]
    text = readme.read_text()
    assert "| Δ top-1 vs setting-t1_k1 (pts) |" in text
    assert "| setting-t2_k1 | distilled | dr_clip | 3 | 33.0 ± 1.0" in text
    assert "A (runs/demo/teacher) 45.6%" in " ".join(text.split()) and "52.5% of the time" in " ".join(text.split())
    assert "| t1_k1 | cache-a-k1 | 1 |  |  | 1,806 |" in text
    flat = " ".join(text.split())  # (prose is wrapped)
    assert "`setting-t2_k1` **helped**: +3.0 ± 0.5 points" in flat
    assert "(2 settings × 3 seeds, 6 minutes of student training)" in flat
    assert text.startswith("x\n") and text.endswith("y\n")
