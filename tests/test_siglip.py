"""SigLIP (transformers' SiglipModel) as teacher and as student source: load, shrink, distil, save, evaluate."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import write_run_config

WIDTH = 32


def tiny_siglip(tok: Any, *, layers: int = 2, image_size: int = 32, seed: int = 0) -> Any:
    """A tiny random SiglipModel whose text vocabulary is the given (real) tokenizer's."""
    from transformers import SiglipConfig, SiglipModel

    if len(tok) == 0:
        raise AssertionError("the stand-in tokenizer is empty: its files are missing")
    common = {"hidden_size": WIDTH, "intermediate_size": 64, "num_hidden_layers": layers,
              "num_attention_heads": 4}
    cfg = SiglipConfig(
        text_config={**common, "vocab_size": len(tok), "max_position_embeddings": 16, "projection_size": WIDTH,
                     "pad_token_id": tok.pad_token_id, "bos_token_id": tok.cls_token_id,
                     "eos_token_id": tok.sep_token_id},
        vision_config={**common, "image_size": image_size, "patch_size": 8})
    torch.manual_seed(seed)
    model = SiglipModel(cfg).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(117.0))  # a trained SigLIP's scale is above CLIP's cap of 100
        model.logit_bias.fill_(-12.5)
    return model


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> Path:
    """A saved tiny SiglipModel with real tokenizer files and a processor config with its own mean/std."""
    from transformers import AutoTokenizer, SiglipImageProcessor

    tok = AutoTokenizer.from_pretrained(minilm_path)
    folder = tmp_path_factory.mktemp("siglip") / "teacher"
    tiny_siglip(tok).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    SiglipImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.4, 0.5, 0.6],
                         image_std=[0.2, 0.3, 0.4]).save_pretrained(str(folder))
    return folder


def _inputs(model: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    pixels = torch.randn(3, 3, model.image_size, model.image_size)
    return pixels, model.tokenize(["a red square", "a blue circle on the left", "green"])


def test_siglip_folder_loads_with_transformers_embeddings(siglip_dir: Path) -> None:
    from transformers import SiglipModel

    from mmkd.models.dual_encoder import SiglipDualEncoder
    from mmkd.models.hub import load_dual_encoder

    model = load_dual_encoder(siglip_dir)
    assert isinstance(model, SiglipDualEncoder)
    assert model.meta.image_mean == (0.4, 0.5, 0.6) and model.meta.image_std == (0.2, 0.3, 0.4)
    assert model.image_size == 32 and model.meta.max_text_length == 16
    assert float(model.logit_scale.detach().exp()) == pytest.approx(117.0) and float(model.logit_bias.detach()) == -12.5
    pixels, tok = _inputs(model)
    assert tok["input_ids"].shape[1] == 16  # padded to the full length: the text head pools the last position
    hf = SiglipModel.from_pretrained(str(siglip_dir)).eval()
    with torch.no_grad():
        out = model(pixels, tok["input_ids"], tok["attention_mask"])
        img = hf.get_image_features(pixel_values=pixels).pooler_output
        txt = hf.get_text_features(**tok).pooler_output
        logits = hf(pixel_values=pixels, **tok).logits_per_image
    torch.testing.assert_close(model.encode_image(pixels), img, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.encode_text(tok["input_ids"], tok["attention_mask"]), txt, atol=1e-5, rtol=0)
    ours = out["logit_scale"] * out["image_embeds"] @ out["text_embeds"].t() + out["logit_bias"]
    torch.testing.assert_close(ours, logits, atol=1e-4, rtol=0)


def test_siglip_saved_by_mmkd_loads_in_transformers(siglip_dir: Path, tmp_path: Path) -> None:
    from transformers import SiglipImageProcessor, SiglipModel

    from mmkd.models.hub import load_dual_encoder, save_dual_encoder

    model = load_dual_encoder(siglip_dir)
    out = save_dual_encoder(model, tmp_path / "copy")
    assert json.loads((out / "config.json").read_text())["model_type"] == "siglip"
    hf = SiglipModel.from_pretrained(str(out)).eval()
    assert list(SiglipImageProcessor.from_pretrained(str(out)).image_mean) == [0.4, 0.5, 0.6]
    pixels, tok = _inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(hf.get_image_features(pixel_values=pixels).pooler_output,
                                   model.encode_image(pixels), atol=1e-5, rtol=0)
        torch.testing.assert_close(hf.get_text_features(**tok).pooler_output,
                                   model.encode_text(tok["input_ids"], tok["attention_mask"]), atol=1e-5, rtol=0)
    assert float(hf.logit_bias.detach()) == -12.5
    again = load_dual_encoder(out)
    assert again.meta == model.meta


def test_siglip_student_shrinks_the_teacher(siglip_dir: Path) -> None:
    from mmkd.config import StudentConfig, TowerSpec
    from mmkd.models.dual_encoder import SiglipDualEncoder
    from mmkd.models.hub import load_dual_encoder
    from mmkd.models.student import build_student

    teacher = load_dual_encoder(siglip_dir)
    cfg = StudentConfig(vision=TowerSpec(source="teacher", keep_layers=[1]),
                        text=TowerSpec(source="teacher", keep_layers=[1]))
    student = build_student(teacher, cfg, seed=0)
    assert isinstance(student, SiglipDualEncoder)
    assert student.vision_model.config.num_hidden_layers == 1
    assert float(student.logit_bias.detach()) == -12.5
    assert float(student.logit_scale.detach().exp()) == pytest.approx(117.0)
    assert student.meta.text_padding == "max_length"
    # the kept layer's weights are the teacher's second layer
    torch.testing.assert_close(student.vision_model.encoder.layers[0].mlp.fc1.weight,
                               teacher.vision_model.encoder.layers[1].mlp.fc1.weight)


def test_siglip2_refused_by_name(tmp_path: Path, minilm_path: str) -> None:
    import shutil

    from mmkd.models.hub import ModelLoadError, load_dual_encoder

    folder = tmp_path / "s2"
    shutil.copytree(minilm_path, folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "siglip2"}))
    with pytest.raises(ModelLoadError, match="SigLIP 2 .*NaFlex"):
        load_dual_encoder(folder)


def test_siglip_with_a_foreign_tokenizer_is_refused(siglip_dir: Path, tmp_path: Path) -> None:
    import shutil

    from mmkd.models.hub import ModelLoadError, load_dual_encoder

    folder = tmp_path / "small_vocab"
    shutil.copytree(siglip_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["text_config"]["vocab_size"] = 1000
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="tokenizer has 30522 tokens but the text tower's vocabulary is 1000"):
        load_dual_encoder(folder)


@pytest.mark.slow
def test_distil_a_siglip_teacher_into_a_siglip_student(siglip_dir: Path, tmp_path: Path,
                                                       tiny_teacher_dir: Path) -> None:
    """mmkd distill shrinks the SigLIP teacher, trains with its sigmoid probabilities (its bias), saves a student
    SiglipModel loads with the same embeddings, and mmkd eval zeroshot reports its sigmoid probabilities."""
    from tiny_runs import mmkd, mmkd_ok
    from transformers import SiglipModel

    from mmkd.models.hub import load_dual_encoder

    cfg = write_run_config(tmp_path, siglip_dir, objectives="[{name: siglip, params: {targets: teacher}}, "
                           "{name: fd_mse_cosine}]")
    shrink_text = "  text: {source: teacher}\n"
    assert shrink_text in cfg.read_text()
    cfg.write_text(cfg.read_text().replace(shrink_text, "  text: {source: teacher, keep_layers: [0]}\n"))
    mmkd_ok("distill", str(cfg))
    folder = tmp_path / "run" / "student"
    student = load_dual_encoder(folder)
    assert student.vision_model.config.num_hidden_layers == 1 and student.text_model.config.num_hidden_layers == 1
    hf = SiglipModel.from_pretrained(str(folder)).eval()
    pixels, tok = _inputs(student)
    with torch.no_grad():
        torch.testing.assert_close(hf.get_image_features(pixel_values=pixels).pooler_output,
                                   student.encode_image(pixels), atol=1e-5, rtol=0)
        torch.testing.assert_close(hf.get_text_features(**tok).pooler_output,
                                   student.encode_text(tok["input_ids"], tok["attention_mask"]), atol=1e-5, rtol=0)
    bias = float(hf.logit_bias.detach())
    assert bias == pytest.approx(float(student.logit_bias.detach()))
    assert bias != -12.5  # trained: the bias is the student's, started from the teacher's
    assert float(hf.logit_scale.detach().exp()) > 100  # SigLIP's scale is not capped at CLIP's 100

    done = mmkd_ok("eval", "zeroshot", "--model", str(folder), "--data", "world:test", "--world-n", "24",
                   "--cache", str(tmp_path / "cache"), "--sigmoid")
    got = json.loads(done.stdout)["zeroshot"]
    assert 0 <= got["top1"] <= 1 and 0 < got["sigmoid"]["p_true_class"] < 1
    assert got["sigmoid"]["p_top1"] >= got["sigmoid"]["p_true_class"]
    # a model without a learnt bias: the option is refused in one line, no traceback
    refused = mmkd("eval", "zeroshot", "--model", str(tiny_teacher_dir), "--data", "world:test", "--world-n", "24",
                   "--cache", str(tmp_path / "cache"), "--sigmoid")
    assert refused.returncode == 2 and "learnt logit bias" in refused.stderr and "Traceback" not in refused.stderr


def test_a_siglip_teacher_cache_carries_the_bias(siglip_dir: Path, tmp_path: Path) -> None:
    """mmkd cache stores a SigLIP teacher's bias; distilling from the cache with targets: teacher runs (it would
    be refused without the bias in the objective's context, and fail without it in the targets)."""
    from mmkd.cli import main
    from mmkd.teacher.cache import CachedTeacher

    cfg = write_run_config(tmp_path, f"cache:{tmp_path / 'tc'}", objectives="[{name: siglip, params: "
                           "{targets: teacher}}]", world_size=16)
    student = ("student:\n  vision: {source: new, arch: vit, config: {hidden_size: 16, num_hidden_layers: 1, "
               "num_attention_heads: 2, intermediate_size: 32, image_size: 32, patch_size: 8}}\n"
               "  text: {source: new, arch: bert, config: {hidden_size: 16, num_hidden_layers: 1, "
               "num_attention_heads: 2, intermediate_size: 32}}\n")
    text = cfg.read_text()
    old = "student:\n  vision: {source: teacher, keep_layers: [1]}\n  text: {source: teacher}\n"
    assert old in text
    cfg.write_text(text.replace(old, student))
    assert main(["cache", "--teacher", str(siglip_dir), "--config", str(cfg), "--threads", "1"]) == 0
    cache = CachedTeacher.open(tmp_path / "tc")
    assert cache.info.teacher.logit_bias == -12.5
    assert main(["distill", str(cfg), "train.threads=1"]) == 0
    log = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert "siglip" in log
