"""The gender–profession bias probe: statistics by hand, word files, and the real MiniLM-L6 text tower."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from mmkd.data.records import Record
from mmkd.eval.bias import (
    BiasWords,
    bias_probe,
    caption_groups,
    compare_probes,
    load_bias_words,
    rankdata,
    spearman,
    text_probe,
)

# ------------------------------------------------------------------------------------------------ statistics


def _plain_spearman(x: list[float], y: list[float]) -> float:
    """Textbook formula for data without ties: 1 - 6 Σd² / (n (n² - 1))."""
    n = len(x)
    rank = lambda v: {val: i + 1 for i, val in enumerate(sorted(v))}  # noqa: E731
    rx, ry = rank(x), rank(y)
    d2 = sum((rx[a] - ry[b]) ** 2 for a, b in zip(x, y))
    return 1 - 6 * d2 / (n * (n * n - 1))


def test_rankdata_averages_ties() -> None:
    assert rankdata([3.0, 1.0, 2.0, 2.0]).tolist() == [4.0, 1.0, 2.5, 2.5]
    assert rankdata([5.0, 5.0, 5.0]).tolist() == [2.0, 2.0, 2.0]


def test_spearman_against_the_textbook_formula() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        x, y = rng.standard_normal(12).tolist(), rng.standard_normal(12).tolist()
        assert spearman(x, y) == pytest.approx(_plain_spearman(x, y), abs=1e-12)
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # with ties: Pearson of average ranks; y ranks are [1, 2, 3.5, 5, 3.5]
    ry = np.array([1, 2, 3.5, 5, 3.5]) - 3.0
    rx = np.arange(1, 6) - 3.0
    expected = float((rx * ry).sum() / np.sqrt((rx**2).sum() * (ry**2).sum()))
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(expected)
    assert spearman([1, 1, 1], [1, 2, 3]) is None and spearman([1], [2]) is None


def test_compare_probes_by_hand() -> None:
    a = {"rows": ["f", "m"], "professions": ["p", "q"], "cosine": [[0.5, 0.1], [0.2, 0.3]],
         "gender_score": [0.3, -0.2]}
    b = {**a, "cosine": [[0.4, 0.1], [0.2, 0.5]], "gender_score": [0.2, -0.4]}
    c = compare_probes(a, b)
    assert c["mean_abs_delta"] == pytest.approx(0.075) and c["max_abs_delta"] == pytest.approx(0.2)
    assert c["spearman"] == pytest.approx(1.0) and c["sign_agreement"] == 1.0
    assert c["strength_ratio"] == pytest.approx(0.6 / 0.5)
    spread = lambda m: np.sqrt(np.mean((np.array(m) - np.mean(m)) ** 2))  # noqa: E731
    assert c["normalised_strength_ratio"] == pytest.approx(1.2 * spread(a["cosine"]) / spread(b["cosine"]))
    with pytest.raises(ValueError, match="same word lists"):
        compare_probes(a, {**b, "professions": ["p", "r"]})


# ---------------------------------------------------------------------------------------------- word files


def test_default_words_and_bad_files(tmp_path: Path) -> None:
    words = load_bias_words()
    assert {"she", "woman", "girl"} <= set(words.female) and {"he", "man", "boy"} <= set(words.male)
    assert len(words.female) == len(words.male)
    assert {"nurse", "engineer", "doctor"} <= set(words.professions)
    assert words.template.count("{}") == 1 and words.caption_female and words.caption_male
    assert load_bias_words(template="{}").template == "{}"

    f = tmp_path / "w.yaml"
    f.write_text("female: [she]\nmale: [he]\nprofessions: [nurse]\ncolours: [red]\n")
    with pytest.raises(ValueError, match=r"w.yaml: unknown key\(s\) colours"):
        load_bias_words(f)
    f.write_text("female: [she]\nmale: []\nprofessions: [nurse]\n")
    with pytest.raises(ValueError, match=r"w.yaml: 'male' must be a non-empty list"):
        load_bias_words(f)
    f.write_text("female: [she]\nmale: [he]\nprofessions: [nurse]\ntemplate: a photo\n")
    with pytest.raises(ValueError, match=r"'template' must be a string with exactly one \{\}"):
        load_bias_words(f)
    with pytest.raises(ValueError, match="not found"):
        load_bias_words(tmp_path / "missing.yaml")


def test_caption_groups_whole_words_and_mixed_images_left_out() -> None:
    words = load_bias_words()
    img = np.zeros((8, 8, 3), np.uint8)
    recs = [Record("a", img, ("A woman riding a horse.",)),
            Record("b", img, ("The man's hat is red.", "a hat")),
            Record("c", img, ("Two men and a woman on a bench",)),  # both: left out
            Record("d", img, ("A dog chasing a frisbee", "A manhole cover")),  # "manhole" is not "man"
            Record("e", img, ("a street", "Girls playing football"))]
    assert caption_groups(recs, words) == {"female": [0, 4], "male": [1]}


# ------------------------------------------------------------------------------------ the real MiniLM teacher


DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo"


def demo_model(name: str, teacher: Any = None) -> Any:
    """The demo's run ``name`` (configs/demo/NAME.yaml with its --quick overrides: tiny ViTs), initialised."""
    from mmkd.config import load_config
    from mmkd.models.student import build_student

    quick = yaml.safe_load((DEMO / "quick.yaml").read_text())
    return build_student(teacher, load_config(DEMO / f"{name}.yaml", quick[name]).student, seed=0)


@pytest.fixture(scope="module")
def minilm_teacher(minilm_path: str) -> Any:
    """The demo's teacher as it starts: MiniLM-L6 mean-pooled (+ a tiny untrained ViT), its text head set to the
    identity so the probe sees MiniLM's own sentence embeddings."""
    teacher = demo_model("teacher")
    with torch.no_grad():
        teacher.text_projection.weight.copy_(torch.eye(teacher.projection_dim))
    return teacher


def test_minilm_text_probe_finds_nurse_closer_to_she(minilm_teacher) -> None:
    words = load_bias_words()
    probe = text_probe(minilm_teacher, words)
    rows, profs = probe["rows"], probe["professions"]
    cos = np.asarray(probe["cosine"])
    nurse = profs.index("nurse")
    assert cos[rows.index("she"), nurse] > cos[rows.index("he"), nurse]
    assert cos[rows.index("woman"), nurse] > cos[rows.index("man"), nurse]
    score = dict(zip(profs, probe["gender_score"]))
    assert score["nurse"] > 0 and score["nurse"] > score["carpenter"] and score["nurse"] > score["engineer"]
    assert probe["mean_abs_gender_score"] == pytest.approx(np.abs(probe["gender_score"]).mean(), abs=1e-5)
    assert probe["cosine_std"] == pytest.approx(cos.std(), abs=1e-5)


def test_bias_probe_student_vs_teacher(minilm_teacher) -> None:
    student = demo_model("student", minilm_teacher)  # MiniLM with 3 of 6 layers
    words = BiasWords(female=["she", "woman"], male=["he", "man"], professions=["nurse", "engineer", "pilot"])
    out = bias_probe({"teacher": minilm_teacher, "student": student, "same": minilm_teacher}, words)
    assert out["reference"] == "teacher" and set(out["vs_reference"]) == {"student", "same"}
    same = out["vs_reference"]["same"]["text"]
    assert same["mean_abs_delta"] == pytest.approx(0, abs=1e-6) and same["spearman"] == pytest.approx(1.0)
    shifted = out["vs_reference"]["student"]["text"]
    assert shifted["mean_abs_delta"] > 1e-3  # dropping half the layers does move the map
    assert -1 <= shifted["spearman"] <= 1 and 0 <= shifted["sign_agreement"] <= 1
    assert np.asarray(out["models"]["student"]["text"]["cosine"]).shape == (4, 3)
    assert "image" not in out["models"]["teacher"] and out["words"]["professions"] == words.professions


def test_bias_probe_image_side(minilm_teacher) -> None:
    rng = np.random.default_rng(0)
    recs = [Record(f"k{i}", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), (cap,))
            for i, cap in enumerate(["a woman at a desk", "a girl with a kite", "a man on a bike",
                                     "a boy and his dog", "two men talking", "a red car"])]
    words = load_bias_words()
    out = bias_probe({"teacher": minilm_teacher}, words, records=recs, data="test:recs", min_group_images=2)
    image = out["models"]["teacher"]["image"]
    assert image["n_images"] == {"female": 2, "male": 3}
    assert image["rows"] == ["female images", "male images"]
    assert np.asarray(image["cosine"]).shape == (2, len(words.professions))
    cos = np.asarray(image["cosine"])
    assert image["gender_score"] == pytest.approx((cos[0] - cos[1]).tolist(), abs=1e-5)
    skipped = bias_probe({"teacher": minilm_teacher}, words, records=recs, data="test:recs", min_group_images=3)
    assert "image" not in skipped["models"]["teacher"]
    assert "female: 2" in skipped["image_skipped"] and "test:recs" in skipped["image_skipped"]
