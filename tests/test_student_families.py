"""Efficient student families: any transformers vision model type as a student image tower (``arch: hf:<type>``).

Each listed family, tiny: it builds, trains a step (every tower parameter gets a gradient and moves), saves and
loads to identical embeddings; types that are no tower, or that transformers cannot build, are refused naming them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from mmkd.config import ConfigError, StudentConfig, TowerSpec
from mmkd.models.dual_encoder import EncoderMeta
from mmkd.models.hub import load_dual_encoder, save_dual_encoder
from mmkd.models.student import TeacherInfo, build_student

TEXT = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
        "max_position_embeddings": 32}
# the smallest settings each family accepts (mobilevitv2 needs 64 px: its last stage unfolds 2×2 patches)
FAMILIES: dict[str, dict[str, Any]] = {
    "mobilevit": dict(image_size=32, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 32],
                      num_attention_heads=2),
    "mobilevitv2": dict(image_size=64, width_multiplier=0.25),
    "convnext": dict(image_size=32, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1]),
    "efficientnet": dict(image_size=32, width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=128),
    "mobilenet_v2": dict(image_size=32, depth_multiplier=0.25, finegrained_output=False),
    "levit": dict(image_size=32, hidden_sizes=[16, 24, 32], num_attention_heads=[1, 1, 1], depths=[1, 1, 1],
                  key_dim=[8, 8, 8]),
    "regnet": dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], embedding_size=8, groups_width=8),
}


@pytest.fixture(scope="module")
def info(minilm_path: str) -> TeacherInfo:
    """A cached teacher's settings (no weights): the student's towers are all new."""
    return TeacherInfo(EncoderMeta(image_size=32, max_text_length=32), projection_dim=12, logit_scale=10.0,
                       tokenizer=AutoTokenizer.from_pretrained(minilm_path))


def student(info: TeacherInfo, model_type: str, config: dict[str, Any]) -> Any:
    cfg = StudentConfig(vision=TowerSpec(source="new", arch=f"hf:{model_type}", config=dict(config)),
                        text=TowerSpec(source="new", arch="bert", config=dict(TEXT)))
    return build_student(info, cfg, seed=0)


def pixels(model: Any, n: int = 2, seed: int = 0) -> torch.Tensor:
    s = model.meta.image_size
    return torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_family_builds_trains_a_step_saves_and_loads_identically(info: TeacherInfo, model_type: str,
                                                                  tmp_path: Path) -> None:
    model = student(info, model_type, FAMILIES[model_type])
    assert model.vision_model.config.model_type == model_type
    assert model.meta.vision_pooling == "pooler"  # every listed family has a pooled image output
    # one training step: a contrastive loss over a batch of pairs reaches every trainable tower parameter
    model.train()
    before = {k: v.detach().clone() for k, v in model.vision_model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)  # bounded steps
    tok = model.tokenize(["a red circle", "a blue square"])
    out = model(pixel_values=pixels(model), **tok)
    logits = out["logit_scale"] * out["image_embeds"] @ out["text_embeds"].T
    loss = F.cross_entropy(logits, torch.arange(2))
    loss.backward()
    no_grad = [k for k, p in model.vision_model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters a step never reaches (DDP would stop): {no_grad[:5]}"
    opt.step()
    assert any(not torch.equal(before[k], v) for k, v in model.vision_model.named_parameters())
    # saved and loaded by mmkd: identical embeddings (batch norms in eval mode read their running statistics)
    model.eval()
    folder = save_dual_encoder(model, tmp_path / "student")
    loaded = load_dual_encoder(folder)
    assert type(loaded.vision_model) is type(model.vision_model) and loaded.meta == model.meta
    x = pixels(model, seed=1)
    with torch.no_grad():
        emb = model.encode_image(x)
        assert torch.isfinite(emb).all() and torch.equal(emb, loaded.encode_image(x))
        assert torch.equal(model.encode_text(**tok), loaded.encode_text(**tok))


@pytest.mark.parametrize("model_type", ["efficientnet", "regnet", "levit"])
def test_other_poolings_keep_a_weightless_pooler(info: TeacherInfo, model_type: str) -> None:
    """Dropping an unused pooler is for dead weights; EfficientNet's and RegNet's average pool, called in every
    forward, was dropped too (a TypeError at the first image)."""
    cfg = StudentConfig(vision=TowerSpec(source="new", arch=f"hf:{model_type}", config=dict(FAMILIES[model_type]),
                                         pooling="mean"), text=TowerSpec(source="new", arch="bert", config=dict(TEXT)))
    model = build_student(info, cfg, seed=0).eval()
    assert model.meta.vision_pooling == "mean"
    with torch.no_grad():
        assert model.encode_image(pixels(model)).shape == (2, 12)


def test_image_size_comes_from_the_family_config(info: TeacherInfo) -> None:
    assert student(info, "mobilevitv2", FAMILIES["mobilevitv2"]).meta.image_size == 64
    assert student(info, "regnet", FAMILIES["regnet"]).meta.image_size == 32  # no image_size: the teacher's


@pytest.mark.parametrize("arch, words", [
    ("hf:bert", "not a transformers vision model type; valid: .*hf:convnext"),
    ("hf:no_such_type", "not a transformers vision model type; valid: .*hf:mobilevit"),
    ("hf:clip", "a whole dual encoder .*valid: .*hf:regnet"),
    ("hf:timm_wrapper", "cannot build it from a config alone"),
])
def test_types_that_are_no_tower_are_refused_with_the_valid_ones(info: TeacherInfo, arch: str, words: str) -> None:
    with pytest.raises(ConfigError, match=f"student.vision.arch '{arch}' (is )?.*{words}"):
        student(info, arch[3:], {})


def test_a_family_named_without_hf_prefix_is_a_config_error_suggesting_it(info: TeacherInfo) -> None:
    """It was an internal error (a KeyError from the registry, exit 1) before the hf: towers."""
    cfg = StudentConfig(vision=TowerSpec(source="new", arch="convnext"))
    with pytest.raises(ConfigError, match="student.vision.arch 'convnext' is unknown \\(did you mean 'hf:convnext'"):
        build_student(info, cfg)
    cfg = StudentConfig(vision=TowerSpec(source="new", arch="nope"))
    with pytest.raises(ConfigError, match="'nope' is unknown; valid: bert, .*or hf:<model_type>"):
        build_student(info, cfg)


def test_a_misspelt_setting_is_refused_naming_it(info: TeacherInfo) -> None:
    """transformers keeps unknown kwargs as attributes: the typo would silently build the default-sized model."""
    with pytest.raises(ConfigError, match="student.vision.config: 'hiden_sizes' is not a setting of hf:convnext"):
        student(info, "convnext", {"hiden_sizes": [8, 16, 24, 32]})


def test_a_config_transformers_cannot_build_is_refused_naming_it(info: TeacherInfo) -> None:
    with pytest.raises(ConfigError, match="transformers cannot build hf:levit from this config"):
        student(info, "levit", dict(FAMILIES["levit"], num_attention_heads=[1]))  # one head count for 3 stages


def test_an_image_too_small_for_the_family_is_refused_naming_it(info: TeacherInfo) -> None:
    with pytest.raises(ConfigError, match="hf:mobilevitv2 gives no pooled image output for a 32-pixel image"):
        student(info, "mobilevitv2", dict(FAMILIES["mobilevitv2"], image_size=32))


def test_an_hf_tower_is_an_image_tower_only(info: TeacherInfo) -> None:
    cfg = StudentConfig(vision=TowerSpec(source="new", arch="hf:convnext", config=dict(FAMILIES["convnext"])),
                        text=TowerSpec(source="new", arch="hf:convnext"))
    with pytest.raises(ConfigError, match="'hf:convnext' is an? image tower, not a text tower"):
        build_student(info, cfg)


def test_readme_section_renders_the_leaderboard_latency_and_int8_bytes(tmp_path: Path) -> None:
    import json

    from readme_sections.families import student_families_section

    rows = [{"run": "student-vit", "role": "distilled", "zs_top1": 0.40, "zs_top1_sd": 0.02, "seeds": 3,
             "train_s": 200},
            {"run": "student-convnext", "role": "distilled", "zs_top1": 0.45, "zs_top1_sd": 0.01, "seeds": 3,
             "d_top1": 0.05, "d_top1_lo": 0.01, "d_top1_hi": 0.09, "beyond_noise": True, "train_s": 400}]
    lat = {"student-vit": {"ms": 1.6, "params_vision": 622208, "model_type": "clip_vision_model"},
           "student-convnext": {"ms": 1.9, "params_vision": 899232, "model_type": "convnext"}}
    size = {"float16": {"embedding_bytes_per_sample": 384.0}, "int8": {"embedding_bytes_per_sample": 200.0}}
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "student_families.json").write_text(json.dumps({
        "command": "python bench/student_families.py", "sweep_command": "mmkd sweep x", "notes": "Zero-shot: …",
        "versus": "student-vit", "rows": rows, "latency": lat, "pareto": ["student-vit", "student-convnext"],
        "figure": "bench/results/student_families.png", "seconds": 1800, "cache_sizes": size,
        "teacher_zeroshot": {"top1": 0.124, "top5": 0.516}}))
    text = student_families_section(tmp_path)
    assert "| `student-convnext` (convnext) | 899,232 | 1.90 | 45.0 ± 1.0 | +5.0 (+1.0 to +9.0) beyond noise | yes |" \
        in text
    assert "| `student-vit` (clip_vision_model) | 622,208 | 1.60 | 40.0 ± 2.0 | — | yes |" in text
    assert "2 grid points × 3 seeds, 30 minutes of student training" in text and "took 30 minutes" in text
    assert "float16 384 bytes per sample" in text and "int8 200 (0.521×)" in text
    assert "![accuracy–latency Pareto figure](bench/results/student_families.png)" in text
    assert "zero-shot top-1 12.4%, top-5 51.6%" in text


def _families_json(tmp_path: Path, diffs: dict[str, float]) -> None:
    import json

    rows = [{"run": "tower-vit", "role": "distilled", "zs_top1": 0.50, "zs_top1_sd": 0.01, "seeds": 3, "train_s": 60},
            {"run": "tower-vit_int8", "role": "distilled", "zs_top1": 0.501, "zs_top1_sd": 0.012, "seeds": 3,
             "d_top1": 0.001, "d_top1_lo": -0.004, "d_top1_hi": 0.006, "beyond_noise": False, "train_s": 60}]
    mean = sum(diffs.values()) / len(diffs)
    q8 = {"per_seed": diffs, "mean": mean, "bound": 0.003, "mean_within_bound": abs(mean) <= 0.003,
          "every_seed_within_bound": all(abs(d) <= 0.003 for d in diffs.values()), "interval": [-0.004, 0.006],
          "beyond_noise": False}
    size = {"float16": {"embedding_bytes_per_sample": 1536.0, "n_samples": 22000},
            "int8": {"embedding_bytes_per_sample": 776.0, "n_samples": 22000}}
    res = tmp_path / "bench" / "results"
    res.mkdir(parents=True, exist_ok=True)
    (res / "student_families.json").write_text(json.dumps({
        "command": "python bench/student_families.py --teacher T", "sweep_command": "mmkd sweep x", "notes": "",
        "versus": "tower-vit", "rows": rows, "latency": {}, "pareto": [], "figure": "bench/results/f.png",
        "seconds": 60, "cache_sizes": size, "teacher": "T", "teacher_command": None,
        "teacher_zeroshot": {"top1": 0.556, "top5": 0.9}, "int8_vs_float16": q8}))
    for name, ratio, steps in (("cache_cost.json", 1.0037, 10), ("cache_cost_int8.json", 0.942, 5)):
        (res / name).write_text(json.dumps({"demo_cached_over_plain_time": ratio,
                                            "details": {"steps": steps, "repeats": 2}}))


def test_readme_int8_cache_table_has_bytes_step_cost_and_paired_kd_difference(tmp_path: Path) -> None:
    from readme_sections.families import cache_int8_section, student_families_section

    _families_json(tmp_path, {"0": 0.002, "1": -0.001, "2": 0.002})
    text = cache_int8_section(tmp_path)
    assert "| float16 | 1,536 | 1.000 | 1.004 | 50.0 ± 1.0 |" in text
    assert "| int8 | 776 | 0.505 | 0.942 | 50.1 ± 1.2 |" in text
    paired = "seed 0 +0.20, seed 1 -0.10, seed 2 +0.20; mean +0.10. Within 0.3 points: every seed and the mean"
    assert paired in " ".join(text.split())
    assert "within noise (paired 95% interval over test images -0.4 to +0.6 points)" in " ".join(text.split())
    assert paired in " ".join(student_families_section(tmp_path).split())
    assert "The teacher (`--teacher`, `T`)" in student_families_section(tmp_path)
    _families_json(tmp_path, {"0": 0.002, "1": -0.005, "2": 0.002})  # one seed 0.5 points off, the mean 0.03
    assert "Within 0.3 points: the mean but not every seed" in " ".join(cache_int8_section(tmp_path).split())


@pytest.mark.parametrize("model_type", ["convnext", "levit", "regnet", "mobilenet_v2", "mobilevit"])
def test_family_exports_to_onnx_with_the_parity_bound(info: TeacherInfo, model_type: str, tmp_path: Path) -> None:
    """Item 2's towers go through item 1's export: ONNX fp32 embeddings match PyTorch's (cosine ≥ PARITY_MIN).

    The BatchNorm families' running statistics are first set by forward passes in training mode: freshly
    initialised, their eval-mode outputs underflow to zero (|embedding| < 1e-12), which no cosine can check.
    (The tiny efficientnet of FAMILIES stays at zero even then, features < 1e-36: left out, see README.)"""
    pytest.importorskip("onnx", reason="pip install 'mmkd[export]'")
    pytest.importorskip("onnxruntime", reason="pip install 'mmkd[export]'")
    from mmkd.exporting import ExportOptions, export_student
    from mmkd.models.onnx_export import PARITY_MIN

    torch.set_num_threads(1)
    model = student(info, model_type, FAMILIES[model_type]).train()
    with torch.no_grad():
        for seed in range(5):
            model.encode_image(pixels(model, n=8, seed=seed))
    folder = save_dual_encoder(model.eval(), tmp_path / "student")
    opts = ExportOptions(tmp_path / "onnx", data="world:test", limit=8, cache_dir=str(tmp_path / "cache"))
    parity = export_student(str(folder), opts, log=lambda _: None)["parity"]["fp32"]
    assert parity["image_cosine"] >= PARITY_MIN and parity["text_cosine"] >= PARITY_MIN
