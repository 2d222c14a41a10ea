"""The demo's run configs load as they are and with --quick, and the two config keys they rely on work."""

from __future__ import annotations

from pathlib import Path

from mmkd.config import StudentConfig, TowerSpec, load_config
from mmkd.demo import RUNS, config_key, demo_configs
from mmkd.models.student import build_student

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "demo"


def test_demo_configs_load_and_point_at_the_demo_folders(tmp_path: Path) -> None:
    for quick in (False, True):
        cfgs = demo_configs(CONFIGS, tmp_path / "out", tmp_path / "cache", quick)
        assert list(cfgs) == list(RUNS)
        teacher = cfgs["teacher"]
        assert teacher.teacher == "" and teacher.out == str(tmp_path / "cache" / f"teacher-{config_key(teacher)}")
        for name in ("student", "scratch"):
            assert cfgs[name].teacher == str(Path(teacher.out) / "student")
            assert cfgs[name].out == str(tmp_path / "out" / "train" / name)
        assert cfgs["student_cached"].teacher.startswith("cache:")
        for c in cfgs.values():
            assert c.cache_dir == str(tmp_path / "cache")
            assert 0 < c.train.ckpt_every < c.train.steps  # the killed run needs a checkpoint before its end
    full = demo_configs(CONFIGS, tmp_path, tmp_path, False)["teacher"]
    quick = demo_configs(CONFIGS, tmp_path, tmp_path, True)["teacher"]
    assert config_key(full) != config_key(quick) and full.train.steps > quick.train.steps


def test_a_pretrained_tower_can_be_shrunk_with_keep_layers(minilm_path: str) -> None:
    vision = TowerSpec(source="new", arch="clip_vision", config=dict(image_size=32, patch_size=8, hidden_size=32,
                                                                     num_hidden_layers=1, num_attention_heads=2,
                                                                     intermediate_size=64))
    whole = build_student(None, StudentConfig(vision=vision, text=TowerSpec(source=minilm_path, pooling="mean"),
                                              projection_dim=16))
    shrunk = build_student(None, StudentConfig(vision=vision, text=TowerSpec(source=minilm_path, keep_layers=[0, 2, 4],
                                                                             pooling="mean"), projection_dim=16))
    assert len(whole.text_model.encoder.layer) == 6 and len(shrunk.text_model.encoder.layer) == 3
    w, s = whole.text_model.encoder.layer, shrunk.text_model.encoder.layer
    for i, j in ((0, 0), (2, 1), (4, 2)):  # the kept layers carry their pretrained weights
        assert all((a == b).all() for a, b in zip(w[i].parameters(), s[j].parameters()))


def test_augment_paired_false_augments_only_the_uncaptioned_images(tmp_path: Path, minilm_path: str) -> None:
    from mmkd.dist import DistInfo
    from mmkd.pipeline import _online_setup

    overrides = [f"cache_dir={tmp_path}", "data.world_size_train=16", "data.world_size_unpaired=16",
                 "data.unpaired_batch_size=4", "data.batch_size=4", "data.augment=true",
                 "student.vision.config={image_size: 32, patch_size: 8, hidden_size: 32, num_hidden_layers: 1, "
                 "num_attention_heads: 2, intermediate_size: 64}"]
    base = load_config(CONFIGS / "teacher.yaml", [*overrides, "data.unpaired=world:train"])
    data, *_ = _online_setup(base, DistInfo(), print, None)
    assert data.paired.augment and data.unpaired.augment
    cfg = load_config(CONFIGS / "teacher.yaml", [*overrides, "data.unpaired=world:train", "data.augment_paired=false"])
    data, *_ = _online_setup(cfg, DistInfo(), print, None)
    assert not data.paired.augment and data.unpaired.augment
    batch = data.batch(3)
    assert batch.views[:batch.n_paired] == [0] * batch.n_paired  # captioned images keep the plain view
