"""S4: an image-only teacher, a student with a shared final block; image and caption regress the teacher's CLS."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_dual_encoder
from transformers import CLIPVisionConfig, CLIPVisionModel

from mmkd.config import load_config
from mmkd.models.hub import load_dual_encoder, save_dual_encoder
from mmkd.models.shared_block import SharedBlockDualEncoder
from mmkd.pipeline import run_distill
from mmkd.teacher.unimodal import ImageTeacher, load_image_teacher

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TEACHER_MEAN, TEACHER_STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def _save_vision_teacher(folder: Path) -> CLIPVisionModel:
    """Any HF vision model saved with save_pretrained, plus its preprocessing (as image processors write it)."""
    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=96))
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": TEACHER_MEAN,
                                                                 "image_std": TEACHER_STD}))
    return model


def test_image_teacher_from_a_vision_model_folder_and_from_a_dual_encoder(tmp_path: Path, minilm_path: str) -> None:
    model = _save_vision_teacher(tmp_path / "vision")
    teacher = load_image_teacher(tmp_path / "vision")
    assert isinstance(teacher, ImageTeacher) and teacher.meta.vision_pooling == "pooler"
    assert (teacher.meta.image_size, list(teacher.meta.image_mean)) == (32, TEACHER_MEAN)
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(teacher.image_features(px), model(pixel_values=px).pooler_output)

    # a dual encoder's folder: its image tower alone
    de = tiny_dual_encoder(minilm_path, width=48, dim=8)
    save_dual_encoder(de, tmp_path / "dual")
    from_dual = load_image_teacher(tmp_path / "dual")
    with torch.no_grad():
        torch.testing.assert_close(from_dual.image_features(px), de.vision_model(pixel_values=px).pooler_output)

    (tmp_path / "text").mkdir()
    de.text_model.save_pretrained(tmp_path / "text")
    with pytest.raises(Exception, match="not an image model"):
        load_image_teacher(tmp_path / "text")


def _s4_config(tmp_path: Path, minilm_path: str, steps: int):
    overrides = [
        f"teacher={tmp_path / 'vision'}", f"out={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}",
        f"student.tokenizer={minilm_path}",
        "student.vision.config.hidden_size=32", "student.vision.config.intermediate_size=64",
        "student.vision.config.num_hidden_layers=1",
        "student.text.config.hidden_size=32", "student.text.config.intermediate_size=64",
        "student.text.config.num_hidden_layers=1", "student.shared.heads=2", "student.projection_dim=32",
        "data.world_size_train=64", "data.batch_size=32", f"train.steps={steps}", "train.warmup_steps=1",
        "train.log_every=1", "train.ckpt_every=0", "train.lr=3.0e-3",
        "eval.0.limit=64", "eval.1.limit=64",
    ]
    return load_config(CONFIGS / "s4_unimodal.yaml", overrides)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


@pytest.mark.slow
def test_s4_config_trains_and_both_regression_terms_fall(tmp_path: Path, minilm_path: str) -> None:
    _save_vision_teacher(tmp_path / "vision")
    cfg = _s4_config(tmp_path, minilm_path, steps=24)
    assert cfg.teacher_modality == "image" and cfg.student.shared is not None
    metrics = run_distill(cfg, progress=False)

    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 25))
    image = [m["cls_regression/image"] for m in lines]
    caption = [m["cls_regression/caption"] for m in lines]
    assert "clip" in lines[0]
    assert _mean(image[-4:]) < 0.8 * _mean(image[:4]), image
    assert _mean(caption[-4:]) < 0.8 * _mean(caption[:4]), caption

    # the student is a dual encoder with a shared block: saved, reloaded, evaluated like any other
    assert set(metrics["eval"]) == {"zeroshot:world:test:colour_shape", "retrieval:world:test"}
    student = load_dual_encoder(tmp_path / "run" / "student")
    assert isinstance(student, SharedBlockDualEncoder) and student.image_in.out_features == 48  # teacher's CLS width
    tok = student.tokenize(["a red circle", "a small blue star on grass"])
    with torch.no_grad():
        emb = student(torch.randn(2, 3, 32, 32), tok["input_ids"], tok["attention_mask"])
    assert emb["image_embeds"].shape == emb["text_embeds"].shape == (2, 32)
