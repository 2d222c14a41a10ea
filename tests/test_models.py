"""Tests for mmkd.models: the dual encoder, saving/loading (ours and transformers' formats), clear load errors,
tower shrinking (weight inheritance), students and freezing. Tiny towers (hidden 32, 2 layers, 32 px)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_dual_encoder
from torch import nn
from transformers import (
    AutoModel,
    AutoTokenizer,
    BertConfig,
    BertTokenizer,
    CLIPConfig,
    CLIPModel,
    CLIPTokenizer,
    VisionTextDualEncoderConfig,
    VisionTextDualEncoderModel,
    ViTConfig,
)

import mmkd
from mmkd.config import StudentConfig, TowerSpec
from mmkd.models.dual_encoder import CLIP_MEAN, DualEncoder, EncoderMeta
from mmkd.models.hub import ModelLoadError, check_tokenizer, load_dual_encoder, load_tokenizer, save_dual_encoder
from mmkd.models.student import apply_freeze, build_student
from mmkd.models.towers import build_tower, default_keep, layer_stack, shrink_tower

DIM = 16
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8)
BERT = dict(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=64)
# MiniLM's tokenizer: [CLS]=101 starts, [SEP]=102 ends a text, so CLIP's EOS pooling finds the real end
CLIP_TEXT = dict(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=32, bos_token_id=101, eos_token_id=102, pad_token_id=0)
TEXTS = ["a small red circle on the left", "a blue square", "two shapes: a green star and a pink heart"]


@pytest.fixture(scope="module")
def tokenizer(minilm_path: str) -> Any:
    return AutoTokenizer.from_pretrained(minilm_path)


def images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def tiny(tokenizer: Any, text_arch: str = "bert", seed: int = 0) -> DualEncoder:
    model = tiny_dual_encoder(tokenizer, layers=2, dim=DIM, seed=seed, text_arch=text_arch)
    with torch.no_grad():  # a non-default scale, so a round trip that dropped it would show
        model.logit_scale.fill_(3.0)
    return model.eval()


def embeddings(model: DualEncoder) -> tuple[torch.Tensor, torch.Tensor]:
    tok = model.tokenize(TEXTS)
    with torch.no_grad():
        return model.encode_image(images()), model.encode_text(tok["input_ids"], tok["attention_mask"])


# ----------------------------------------------------------------------------------------------------------
# the dual encoder


@pytest.mark.parametrize("text_arch", ["bert", "clip_text"])
def test_encoders_give_projected_embeddings_and_forward_normalises(tokenizer: Any, text_arch: str) -> None:
    model = tiny(tokenizer, text_arch)
    assert model.projection_dim == DIM and model.image_size == 32
    img, txt = embeddings(model)
    assert img.shape == (3, DIM) and txt.shape == (len(TEXTS), DIM)
    tok = model.tokenize(TEXTS)
    assert tok["input_ids"].shape == tok["attention_mask"].shape and tok["input_ids"].shape[0] == len(TEXTS)
    with torch.no_grad():
        out = model(pixel_values=images(), input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
    assert out["image_features"].shape == (3, 32) and out["text_features"].shape == (len(TEXTS), 32)
    torch.testing.assert_close(out["image_embeds"].norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out["text_embeds"].norm(dim=-1), torch.ones(len(TEXTS)))
    torch.testing.assert_close(out["image_embeds"], F.normalize(img, dim=-1))
    torch.testing.assert_close(out["text_embeds"], F.normalize(txt, dim=-1))
    assert out["logit_scale"].item() == pytest.approx(torch.e ** 3.0)
    # one modality at a time; a missing attention mask means "attend to everything"
    with torch.no_grad():
        only_img = model(pixel_values=images())
        no_mask = model(input_ids=tok["input_ids"][:1])
    assert "text_embeds" not in only_img and "image_embeds" not in no_mask
    torch.testing.assert_close(only_img["image_embeds"], out["image_embeds"])


def test_mean_pooling_ignores_padding(tokenizer: Any) -> None:
    """A text embeds the same alone or padded in a batch with a longer one."""
    model = tiny(tokenizer)
    alone = model.tokenize(TEXTS[1:2])
    batch = model.tokenize(TEXTS[1:])
    assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]  # really padded
    with torch.no_grad():
        a = model.encode_text(alone["input_ids"], alone["attention_mask"])
        b = model.encode_text(batch["input_ids"], batch["attention_mask"])[:1]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_tokenize_without_tokenizer_says_why(tokenizer: Any) -> None:
    model = tiny(tokenizer)
    model.tokenizer = None
    with pytest.raises(RuntimeError, match="tokenizer"):
        model.tokenize(["x"])


# ----------------------------------------------------------------------------------------------------------
# save / load


@pytest.mark.parametrize("text_arch", ["bert", "clip_text"])
def test_save_load_round_trip_is_exact(tokenizer: Any, tmp_path: Path, text_arch: str) -> None:
    model = tiny(tokenizer, text_arch)
    model.meta.image_mean = (0.5, 0.4, 0.3)
    folder = save_dual_encoder(model, tmp_path / "student")
    assert {"config.json", "model.safetensors"} <= {p.name for p in folder.iterdir()}
    assert [p.name for p in tmp_path.iterdir()] == ["student"]  # no temporary folder left behind
    loaded = mmkd.load(str(folder))
    assert isinstance(loaded, DualEncoder) and not loaded.training
    assert loaded.meta == model.meta
    assert len(loaded.tokenizer) == len(tokenizer)
    assert loaded.logit_scale.item() == model.logit_scale.item()
    for a, b in zip(embeddings(model), embeddings(loaded)):
        assert torch.equal(a, b)
    # saving again over the folder replaces it atomically
    with torch.no_grad():
        model.visual_projection.weight.mul_(2)
    save_dual_encoder(model, folder)
    again = load_dual_encoder(folder)
    assert torch.equal(again.visual_projection.weight, model.visual_projection.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["student"]


def test_saved_folder_is_read_by_transformers_alone(tokenizer: Any, tmp_path: Path) -> None:
    """CLIP vision + CLIP text, both pooled by their poolers: transformers computes the same features."""
    model = tiny(tokenizer, "clip_text")
    folder = save_dual_encoder(model, tmp_path / "m")
    hf, info = VisionTextDualEncoderModel.from_pretrained(str(folder), output_loading_info=True)
    hf.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ours_img, ours_txt = embeddings(model)
    tok = model.tokenize(TEXTS)
    with torch.no_grad():
        img = hf.get_image_features(pixel_values=images())
        txt = hf.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
    # transformers 5 returns a model output whose pooler_output is the projected embedding
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    torch.testing.assert_close(img, ours_img, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(txt, ours_txt, rtol=1e-5, atol=1e-6)
    assert hf.logit_scale.item() == pytest.approx(model.logit_scale.item())


def test_mean_pooled_bert_folder_lacks_only_the_unused_pooler(tokenizer: Any, tmp_path: Path) -> None:
    """mmkd drops poolers its pooling ignores; transformers then re-creates only those, nothing else."""
    folder = save_dual_encoder(tiny(tokenizer, "bert"), tmp_path / "m")
    _, info = VisionTextDualEncoderModel.from_pretrained(str(folder), output_loading_info=True)
    assert set(info["missing_keys"]) <= {"text_model.pooler.dense.weight", "text_model.pooler.dense.bias"}
    assert not info["unexpected_keys"] and not info["mismatched_keys"]


def clip_folder(tokenizer: Any, folder: Path) -> CLIPModel:
    torch.manual_seed(1)
    cfg = CLIPConfig(text_config=CLIP_TEXT, vision_config=VISION, projection_dim=DIM)
    clip = CLIPModel(cfg).eval()
    with torch.no_grad():
        clip.logit_scale.fill_(2.5)
    clip.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return clip


def test_clip_model_loads_with_identical_features(tokenizer: Any, tmp_path: Path) -> None:
    clip = clip_folder(tokenizer, tmp_path / "clip")
    (tmp_path / "clip" / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1, 0.2, 0.3],
                                                                           "image_std": [0.4, 0.5, 0.6]}))
    model = mmkd.load(str(tmp_path / "clip"))
    assert model.meta.image_size == 32 and model.meta.max_text_length == 32
    assert model.meta.image_mean == (0.1, 0.2, 0.3) and model.meta.image_std == (0.4, 0.5, 0.6)
    assert model.logit_scale.item() == pytest.approx(2.5)
    img, txt = embeddings(model)
    tok = model.tokenize(TEXTS)
    with torch.no_grad():
        ref_img = clip.get_image_features(pixel_values=images())
        ref_txt = clip.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
    torch.testing.assert_close(img, getattr(ref_img, "pooler_output", ref_img), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(txt, getattr(ref_txt, "pooler_output", ref_txt), rtol=1e-5, atol=1e-6)
    # and the loaded CLIP saves as an mmkd folder that loads back exactly
    again = load_dual_encoder(save_dual_encoder(model, tmp_path / "again"))
    assert again.meta.image_mean == (0.1, 0.2, 0.3)
    for a, b in zip((img, txt), embeddings(again)):
        assert torch.equal(a, b)


def test_plain_transformers_dual_encoder_loads_with_identical_features(tokenizer: Any, tmp_path: Path) -> None:
    """A ViT + BERT VisionTextDualEncoderModel saved by transformers (its legacy names, its poolers)."""
    torch.manual_seed(2)
    cfg = VisionTextDualEncoderConfig.from_vision_text_configs(ViTConfig(**VISION), BertConfig(**BERT),
                                                               projection_dim=DIM)
    hf = VisionTextDualEncoderModel(cfg).eval()
    hf.save_pretrained(str(tmp_path / "vtde"))
    tokenizer.save_pretrained(str(tmp_path / "vtde"))
    model = mmkd.load(str(tmp_path / "vtde"))
    assert model.meta.vision_pooling == "pooler" and model.meta.text_pooling == "pooler"
    assert model.meta.image_mean == CLIP_MEAN and model.meta.image_size == 32
    img, txt = embeddings(model)
    tok = model.tokenize(TEXTS)
    with torch.no_grad():
        ref_img = hf.get_image_features(pixel_values=images())
        ref_txt = hf.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
    torch.testing.assert_close(img, getattr(ref_img, "pooler_output", ref_img), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(txt, getattr(ref_txt, "pooler_output", ref_txt), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# bad input fails clearly


def test_folder_without_weights(tokenizer: Any, tmp_path: Path) -> None:
    folder = save_dual_encoder(tiny(tokenizer), tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError) as e:
        load_dual_encoder(folder)
    assert str(folder) in str(e.value) and "weights" in str(e.value)


def test_folder_with_weights_that_do_not_fit(tokenizer: Any, tmp_path: Path) -> None:
    folder = save_dual_encoder(tiny(tokenizer), tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["vision_config"]["num_hidden_layers"] = 3
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="do not fit"):
        load_dual_encoder(folder)


@pytest.mark.parametrize("content, words", [(None, "no config.json"), ("{not json", "not valid JSON"),
                                            ('{"model_type": "bert"}', "supported")])
def test_bad_config(tmp_path: Path, content: str | None, words: str) -> None:
    tmp_path.joinpath("m").mkdir()
    if content is not None:
        (tmp_path / "m" / "config.json").write_text(content)
    with pytest.raises(ModelLoadError, match=words):
        load_dual_encoder(tmp_path / "m")


def test_tokenizer_with_tiny_vocabulary(tokenizer: Any, tmp_path: Path) -> None:
    folder = save_dual_encoder(tiny(tokenizer), tmp_path / "m")
    for f in folder.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special_tokens")):
            f.unlink()
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red"]))
    BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(str(folder))
    with pytest.raises(ModelLoadError) as e:
        load_dual_encoder(folder)
    assert "vocabulary" in str(e.value) and str(folder) in str(e.value)


def test_check_tokenizer_refuses_empty_ones() -> None:
    class Empty:
        def __len__(self) -> int:
            return 0

    for tok in (Empty(), None):
        with pytest.raises(ModelLoadError, match="vocabulary"):
            check_tokenizer(tok, "somewhere")
    big = [0] * 5000
    assert check_tokenizer(big, "x") is big


def test_offline_clip_tokenizer_trap() -> None:
    """Offline, transformers may hand back an empty CLIP tokenizer instead of failing: mmkd must refuse it."""
    hub_id = "openai/clip-vit-base-patch32"
    try:
        tok = CLIPTokenizer.from_pretrained(hub_id)
    except Exception:
        tok = None
    if tok is not None and len(tok) >= 1000:
        pytest.skip("the real CLIP tokenizer is in the local cache; the trap cannot be reproduced")
    if tok is not None:
        with pytest.raises(ModelLoadError, match="vocabulary"):
            check_tokenizer(tok, hub_id)
    with pytest.raises(ModelLoadError, match=hub_id):
        load_tokenizer(hub_id)


def test_loading_with_an_unusable_tokenizer_path(tokenizer: Any, tmp_path: Path) -> None:
    folder = save_dual_encoder(tiny(tokenizer), tmp_path / "m")
    with pytest.raises(ModelLoadError):
        load_dual_encoder(folder, tokenizer_path="openai/clip-vit-base-patch32")


@pytest.mark.parametrize("where", ["local", "hub"])
def test_nonexistent_path_or_hub_id(tmp_path: Path, where: str) -> None:
    target = str(tmp_path / "no" / "such" / "model") if where == "local" else "mmkd-tests/no-such-model"
    with pytest.raises(ModelLoadError) as e:
        mmkd.load(target)
    assert target in str(e.value)


def test_a_file_is_not_a_model(tmp_path: Path) -> None:
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_dual_encoder(f)


# ----------------------------------------------------------------------------------------------------------
# shrinking towers


def stack_of(model: nn.Module) -> nn.ModuleList:
    return layer_stack(model)[2]


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("arch, cfg", [("clip_vision", VISION), ("bert", BERT), ("clip_text", CLIP_TEXT),
                                       ("vit", VISION)])
def test_shrink_keeps_chosen_layers_with_identical_weights(arch: str, cfg: dict[str, Any]) -> None:
    torch.manual_seed(3)
    old = build_tower(arch, {**cfg, "num_hidden_layers": 5})
    keep = [0, 3, 4]
    new = shrink_tower(old, keep)
    assert new.config.num_hidden_layers == 3 and len(stack_of(new)) == 3
    assert old.config.num_hidden_layers == 5 and len(stack_of(old)) == 5  # the original is untouched
    for i, j in enumerate(keep):
        assert same_state(stack_of(new)[i], stack_of(old)[j])
        assert stack_of(new)[i] is not stack_of(old)[j]  # a copy, so training the student leaves the teacher
    # everything outside the stack (embeddings, final norms) is inherited too
    outside = {k: v for k, v in old.state_dict().items() if not re.search(r"(^|\.)layers?\.\d+\.", k)}
    new_state = new.state_dict()
    assert outside and all(torch.equal(new_state[k], v) for k, v in outside.items())


def test_shrink_keeping_every_layer_computes_the_same_function() -> None:
    torch.manual_seed(4)
    old = build_tower("clip_vision", {**VISION, "num_hidden_layers": 3}).eval()
    new = shrink_tower(old, [0, 1, 2]).eval()
    with torch.no_grad():
        torch.testing.assert_close(new(pixel_values=images()).pooler_output, old(pixel_values=images()).pooler_output)
        assert not torch.allclose(shrink_tower(old, [0, 2])(pixel_values=images()).pooler_output,
                                  old(pixel_values=images()).pooler_output)


def test_default_keep_is_every_second_layer_ending_with_the_last() -> None:
    assert default_keep(6) == [1, 3, 5]
    assert default_keep(5) == [0, 2, 4]
    assert default_keep(12) == [1, 3, 5, 7, 9, 11]
    assert default_keep(1) == [0]
    torch.manual_seed(5)
    old = build_tower("bert", {**BERT, "num_hidden_layers": 4})
    new = shrink_tower(old)
    assert new.config.num_hidden_layers == 2
    assert same_state(stack_of(new)[0], stack_of(old)[1]) and same_state(stack_of(new)[1], stack_of(old)[3])


@pytest.mark.parametrize("keep", [[], [4], [-1, 2], [2, 1], [1, 1], [0, 1, 2, 3, 4]])
def test_shrink_rejects_bad_keep_lists(keep: list[int]) -> None:
    tower = build_tower("clip_vision", {**VISION, "num_hidden_layers": 4})
    with pytest.raises(ValueError, match="keep_layers"):
        shrink_tower(tower, keep)


# ----------------------------------------------------------------------------------------------------------
# students and freezing


@pytest.fixture(scope="module")
def minilm_teacher(minilm_path: str, tokenizer: Any) -> DualEncoder:
    torch.manual_seed(6)
    vision = build_tower("clip_vision", {**VISION, "num_hidden_layers": 2})
    text = AutoModel.from_pretrained(minilm_path)
    text.pooler = None
    meta = EncoderMeta(vision_pooling="pooler", text_pooling="mean", image_size=32, max_text_length=32)
    return DualEncoder(vision, text, DIM, meta, tokenizer, logit_scale_init=2.0).eval()


def test_student_from_teacher_inherits_layers_and_projections(minilm_teacher: DualEncoder) -> None:
    t = minilm_teacher
    assert t.text_model.config.num_hidden_layers == 6
    student = build_student(t, StudentConfig(vision=TowerSpec(keep_layers=[1]), text=TowerSpec()))
    assert student.text_model.config.num_hidden_layers == 3 and len(stack_of(student.text_model)) == 3
    for i, j in enumerate([1, 3, 5]):
        assert same_state(stack_of(student.text_model)[i], stack_of(t.text_model)[j])
    assert same_state(stack_of(student.vision_model)[0], stack_of(t.vision_model)[1])
    assert torch.equal(student.text_model.embeddings.word_embeddings.weight,
                       t.text_model.embeddings.word_embeddings.weight)
    assert torch.equal(student.visual_projection.weight, t.visual_projection.weight)
    assert torch.equal(student.text_projection.weight, t.text_projection.weight)
    assert student.logit_scale.item() == pytest.approx(t.logit_scale.item())
    assert student.meta.text_pooling == "mean" and student.tokenizer is t.tokenizer
    # the student is its own copy: training it leaves the teacher alone
    before = {k: v.clone() for k, v in t.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    assert all(torch.equal(v, before[k]) for k, v in t.state_dict().items())
    img, txt = embeddings(student)
    assert img.shape == (3, DIM) and txt.shape == (len(TEXTS), DIM)


def test_student_trains_what_its_own_freeze_says_not_what_the_teacher_froze(minilm_teacher: DualEncoder) -> None:
    """The demo trains its teacher in memory with a frozen text tower; a student shrunk from it must still train its
    inherited text layers (the bug: a first demo run froze them, a rerun from the saved teacher did not)."""
    teacher = copy.deepcopy(minilm_teacher)
    apply_freeze(teacher, ["text_model", "vision_model.embeddings"])
    frozen_word = "text_model.embeddings.word_embeddings"
    student = build_student(teacher, StudentConfig(text=TowerSpec(keep_layers=[1, 3, 5]), freeze=[frozen_word]))
    for name, p in student.named_parameters():
        assert p.requires_grad == (not name.startswith(frozen_word)), name
    assert not any(p.requires_grad for p in teacher.text_model.parameters())  # the teacher is left as it was


NEW_CLIP_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 max_position_embeddings=64)


def test_a_new_clip_text_tower_pools_the_end_its_tokenizer_writes(minilm_teacher: DualEncoder) -> None:
    """Issue 19 item 8: a new clip_text tower kept CLIPTextConfig's eos_token_id 49407 (CLIP's vocabulary) under a
    BERT tokenizer, so its pooler read position 0 ([CLS], which the causal mask shows nothing else): one embedding
    for every text. It takes the tokenizer's end id ([SEP] = 102) now."""
    cfg = StudentConfig(vision=TowerSpec(source="new", arch="clip_vision", config=dict(VISION)),
                        text=TowerSpec(source="new", arch="clip_text", config=dict(NEW_CLIP_TEXT)), projection_dim=8)
    student = build_student(minilm_teacher, cfg, seed=0)
    sep = minilm_teacher.tokenizer.sep_token_id
    assert student.meta.text_pooling == "pooler" and student.text_model.config.eos_token_id == sep == 102
    student.eval()
    with torch.no_grad():
        batch = student.tokenize(["a red square", "two small dogs running on the beach"])
        emb = student.encode_text(batch["input_ids"], batch["attention_mask"])
    assert not torch.allclose(emb[0], emb[1], atol=1e-4)  # on 7b79a9b both were the [CLS] position's


def test_a_clip_text_tower_whose_eos_id_its_tokenizer_never_writes_is_refused(minilm_teacher: DualEncoder) -> None:
    text = TowerSpec(source="new", arch="clip_text", config={**NEW_CLIP_TEXT, "eos_token_id": 49407})
    cfg = StudentConfig(vision=TowerSpec(source="new", arch="clip_vision", config=dict(VISION)), text=text,
                        projection_dim=8)
    with pytest.raises(ValueError, match=r"student\.text: the clip_text tower's pooler reads the position of token "
                                         r"id 49407 .*ends every text with id 102 \('\[SEP\]'\).*set "
                                         r"student\.text\.config\.eos_token_id: 102.*student\.text\.pooling: eos"):
        build_student(minilm_teacher, cfg, seed=0)
    text.pooling = "eos"  # the last real token: no eos id needed
    assert build_student(minilm_teacher, cfg, seed=0).meta.text_pooling == "eos"


def test_student_projections_not_copied_when_shapes_differ(minilm_teacher: DualEncoder) -> None:
    student = build_student(minilm_teacher, StudentConfig(projection_dim=8))
    assert student.projection_dim == 8 and student.text_projection.weight.shape == (8, 384)
    fresh = build_student(minilm_teacher, StudentConfig(init_projections_from_teacher=False))
    assert not torch.equal(fresh.text_projection.weight, minilm_teacher.text_projection.weight)


def test_student_with_new_towers(minilm_teacher: DualEncoder) -> None:
    cfg = StudentConfig(vision=TowerSpec(source="new", arch="clip_vision", config=dict(VISION)),
                        text=TowerSpec(source="new", arch="bert", config={k: v for k, v in BERT.items()
                                                                          if k != "vocab_size"}))
    student = build_student(minilm_teacher, cfg)
    assert student.text_model.config.vocab_size == len(minilm_teacher.tokenizer)  # sized from the tokenizer
    assert student.meta.text_pooling == "mean" and student.meta.vision_pooling == "pooler"
    assert embeddings(student)[1].shape == (len(TEXTS), DIM)
    with pytest.raises(ValueError, match="not a text tower"):
        build_student(minilm_teacher, StudentConfig(text=TowerSpec(source="new", arch="vit")))
    with pytest.raises(ValueError, match="arch is required"):
        build_student(minilm_teacher, StudentConfig(vision=TowerSpec(source="new")))


def test_student_freeze_from_config(minilm_teacher: DualEncoder) -> None:
    student = build_student(minilm_teacher, StudentConfig(freeze=["text_model", "logit_scale"]))
    for name, p in student.named_parameters():
        assert p.requires_grad == (not (name.startswith("text_model.") or name == "logit_scale")), name


def test_apply_freeze_by_prefix(tokenizer: Any) -> None:
    model = tiny(tokenizer)
    stack = "vision_model.encoder.layers"
    apply_freeze(model, [f"{stack}.1", "text_projection"])
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters()
                      if n.startswith(f"{stack}.1.") or n.startswith("text_projection.")}
    assert frozen and not any(n.startswith(f"{stack}.0.") for n in frozen)


def test_apply_freeze_matches_whole_name_components() -> None:
    """Freezing layer 1 of a 12-layer stack must not also freeze layers 10 and 11."""
    model = nn.Module()
    model.layers = nn.ModuleList([nn.Linear(2, 2) for _ in range(12)])
    apply_freeze(model, ["layers.1"])
    frozen = sorted({n.split(".")[1] for n, p in model.named_parameters() if not p.requires_grad})
    assert frozen == ["1"]


def test_apply_freeze_prefix_matching_nothing_raises(tokenizer: Any) -> None:
    model = tiny(tokenizer)
    with pytest.raises(ValueError) as e:
        apply_freeze(model, ["text_model", "txt_model"])
    assert "txt_model" in str(e.value) and "text_model" in str(e.value) and "visual_projection" in str(e.value)
    assert all(p.requires_grad for p in model.parameters())  # nothing half-applied
