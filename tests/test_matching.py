"""Binary image–text matching: pair building, KD losses, metrics, the frozen teacher, and the CLI end to end."""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_dual_encoder

from mmkd.cli import main
from mmkd.config import ConfigError
from mmkd.data import world
from mmkd.data.records import DataError, Record
from mmkd.studies.matching.config import DemoConfig, MatchingConfig, load_matching_config
from mmkd.studies.matching.losses import KDConfig, check_kd_params, kd_bce, kd_kl, matching_loss
from mmkd.studies.matching.metrics import binary_metrics, choose_threshold, roc_auc
from mmkd.studies.matching.pairfile import read_pairs, write_pairs
from mmkd.studies.matching.pairs import BuildConfig, attribute_signature, build_pairs, summarize

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "matching"
STUDY, DEMO = str(CONFIGS / "study.yaml"), str(CONFIGS / "demo.yaml")


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread avoids oversubscription on shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def bag_of_words(texts):
    """A deterministic stand-in sentence encoder: hashed word counts, normalised."""
    out = np.zeros((len(texts), 64), np.float32)
    for i, t in enumerate(texts):
        for w in t.lower().split():
            out[i, sum(map(ord, w)) % 64] += 1.0
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


@pytest.fixture(scope="module")
def world_records(tmp_path_factory):
    return world.to_records(world.load_split("train", 300, tmp_path_factory.mktemp("world")))


# ------------------------------------------------------------------------------------------------ builder


@pytest.mark.parametrize("negatives", ["random", "hard", "mixed"])
def test_builder_balanced_and_negatives_never_belong_to_the_image(world_records, negatives):
    cfg = BuildConfig(negatives=negatives, seed=3, world_attributes=True)
    pairs = build_pairs(world_records, cfg, embed=bag_of_words)
    by_key = {r.key: r for r in world_records}
    counts = summarize(pairs)
    for split, c in counts.items():
        assert abs(c["matching"] - c["mismatching"]) <= 1, (split, c)
        assert c["pairs"] >= 2
    assert counts["train"]["pairs"] == 240 and counts["val"]["pairs"] == counts["test"]["pairs"] == 30
    split_of: dict[str, str] = {}
    for p in pairs:
        assert split_of.setdefault(p.image_key, p.split) == p.split  # an image lives in one split only
    assert len(split_of) == len(world_records)
    for p in pairs:
        own = by_key[p.image_key].captions
        if p.label == 1:
            assert p.caption in own and p.negative is None
        else:
            assert p.caption not in own and p.replaced in own
            # on the world a negative also never names the same colours and shapes as the image's captions
            assert attribute_signature(p.caption) != attribute_signature(p.replaced)
            if p.caption_of is not None:  # borrowed from another image of the same split
                assert p.caption_of != p.image_key and p.caption in by_key[p.caption_of].captions
                assert split_of[p.caption_of] == p.split
    kinds = {k for c in counts.values() for k in ("random", "nearest", "swap") if c[k]}
    expected = {"random": {"random"}, "hard": {"nearest", "swap"}, "mixed": {"random", "nearest", "swap"}}
    assert kinds == expected[negatives]


def test_builder_is_deterministic_and_hard_negative_is_the_nearest_valid_caption(world_records):
    cfg = BuildConfig(negatives="hard", seed=1, world_attributes=False)
    pairs = build_pairs(world_records, cfg, embed=bag_of_words)
    assert pairs == build_pairs(world_records, cfg, embed=bag_of_words)
    assert pairs != build_pairs(world_records, replace(cfg, seed=2), embed=bag_of_words)
    by_key = {r.key: r for r in world_records}
    negs = [p for p in pairs if p.label == 0]
    assert negs and all(p.negative == "nearest" for p in negs)
    for p in negs:
        # brute force: the most similar caption of another image of the split, below the paraphrase cut-off
        own = by_key[p.image_key].captions
        assert p.replaced in own and p.caption not in own
        keys = {q.image_key for q in pairs if q.split == p.split} - {p.image_key}
        cands = sorted({c for k in keys for c in by_key[k].captions} - set(own))
        sims = bag_of_words(cands) @ bag_of_words([p.replaced])[0]
        best = max(s for s in sims if s < cfg.max_similarity)
        chosen = float(bag_of_words([p.caption])[0] @ bag_of_words([p.replaced])[0])
        assert chosen == pytest.approx(best, abs=1e-6)


def test_attribute_swaps_change_one_colour_or_shape(world_records):
    pairs = build_pairs(world_records, BuildConfig(negatives="hard", swap_fraction=1.0, world_attributes=True),
                        embed=bag_of_words)
    swaps = [p for p in pairs if p.negative == "swap"]
    assert swaps and len(swaps) == sum(1 - p.label for p in pairs)
    by_key = {r.key: r for r in world_records}
    vocab = set(world.COLOURS) | set(world.SHAPES)
    for p in swaps:
        assert p.replaced in by_key[p.image_key].captions and p.caption_of is None
        a, b = p.replaced.replace(",", " ").split(), p.caption.replace(",", " ").split()
        diffs = [(x, y) for x, y in zip(a, b) if x != y]
        assert len(a) == len(b) and len(diffs) == 1, p
        x, y = diffs[0]
        assert x in vocab and y in vocab and (x in world.COLOURS) == (y in world.COLOURS)


def test_builder_errors_are_clear():
    recs = [Record(f"im{i}", np.zeros((32, 32, 3), np.uint8), (f"caption {i}", f"other {i}")) for i in range(30)]
    short = recs[:5] + [Record("lonely", np.zeros((32, 32, 3), np.uint8), ("only one",))] + recs[5:]
    with pytest.raises(DataError, match=r"'lonely' has 1 distinct caption.*captions_per_image=2"):
        build_pairs(short, BuildConfig(captions_per_image=2))
    with pytest.raises(DataError, match="too small to split: 8 images"):
        build_pairs(recs[:8], BuildConfig())
    with pytest.raises(DataError, match="appears twice"):
        build_pairs(recs + recs[:1], BuildConfig())
    with pytest.raises(ValueError, match="negatives must be one of"):
        BuildConfig(negatives="easy")
    with pytest.raises(ValueError, match="val_frac \\+ test_frac"):
        BuildConfig(val_frac=0.5, test_frac=0.5)
    with pytest.raises(ValueError, match="text encoder"):
        build_pairs(recs, BuildConfig(negatives="hard"))
    pairs = build_pairs(recs, BuildConfig(captions_per_image=2))  # 2 pairs per image, still balanced
    assert len(pairs) == 60 and all(abs(c["matching"] - c["mismatching"]) <= 1 for c in summarize(pairs).values())


def test_pairs_file_round_trip_and_bad_files(tmp_path, world_records):
    pairs = build_pairs(world_records, BuildConfig(seed=0, world_attributes=True))
    path = write_pairs(tmp_path / "p.jsonl", pairs, {"data": "world:train"})
    back = read_pairs(path)
    assert back.pairs == pairs and back.meta["counts"]["train"]["pairs"] == 240
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3] + ['{"split": "train", "image_key": "x", "caption": "c", "label": 2}']))
    with pytest.raises(DataError, match=r"p.jsonl:4: label must be 0 or 1"):
        read_pairs(path)
    (tmp_path / "p.jsonl.meta.json").unlink()
    with pytest.raises(DataError, match="meta.json not found"):
        read_pairs(path)


def test_hard_negatives_with_real_minilm_on_coco(shared_data, minilm_path):
    from mmkd.data.sources import read_records
    from mmkd.studies.matching.text import TextEncoder

    recs = read_records(f"jsonl:{shared_data / 'coco-mini' / 'captions.jsonl'}")[:40]
    enc = TextEncoder(minilm_path)
    pairs = build_pairs(recs, BuildConfig(negatives="hard", seed=0), embed=enc)
    by_key = {r.key: r for r in recs}
    negs = [p for p in pairs if p.label == 0]
    assert negs and all(p.negative == "nearest" and p.caption not in by_key[p.image_key].captions for p in negs)
    # a hard negative is closer to the image's captions than a random caption of the split, on average
    near = [float(enc([p.caption])[0] @ enc(list(by_key[p.image_key].captions)).mean(0)) for p in negs]
    rand = build_pairs(recs, BuildConfig(negatives="random", seed=0))
    far = [float(enc([p.caption])[0] @ enc(list(by_key[p.image_key].captions)).mean(0))
           for p in rand if p.label == 0]
    assert np.mean(near) > np.mean(far) + 0.1


# ------------------------------------------------------------------------------------------------ KD losses


def _ref_kl(zs, zt, T):
    """KL(p_t || p_s) of the two-class distributions [1 - sigmoid(z/T), sigmoid(z/T)], times T², mean."""
    ps, pt = torch.sigmoid(zs / T), torch.sigmoid(zt / T)
    kl = pt * torch.log(pt / ps) + (1 - pt) * torch.log((1 - pt) / (1 - ps))
    return kl.mean() * T * T


def _ref_bce(zs, zt, T):
    ps, pt = torch.sigmoid(zs / T), torch.sigmoid(zt / T)
    return -(pt * torch.log(ps) + (1 - pt) * torch.log(1 - ps)).mean()


@pytest.mark.parametrize("T", [0.5, 1.0, 1.5, 3.0])
def test_kd_terms_match_plain_references_in_value_and_gradient(T):
    g = torch.Generator().manual_seed(0)
    zs = (torch.randn(16, generator=g, dtype=torch.float64) * 3).requires_grad_()
    zt = torch.randn(16, generator=g, dtype=torch.float64) * 3
    for fn, ref in ((kd_kl, _ref_kl), (kd_bce, _ref_bce)):
        got, want = fn(zs, zt, T), ref(zs, zt, T)
        assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-10, abs=1e-12)
        g1, = torch.autograd.grad(got, zs)
        g2, = torch.autograd.grad(want, zs)
        assert torch.allclose(g1, g2, rtol=1e-9, atol=1e-12)
    # closed forms: d(bce)/dz_s = (sigmoid(z_s/T) - sigmoid(z_t/T)) / (T·B); the KL term's gradient is T² times it
    g_bce, = torch.autograd.grad(kd_bce(zs, zt, T), zs)
    assert torch.allclose(g_bce, (torch.sigmoid(zs / T) - torch.sigmoid(zt / T)) / (T * len(zs)), atol=1e-12)
    g_kl, = torch.autograd.grad(kd_kl(zs, zt, T), zs)
    assert torch.allclose(g_kl, T * T * g_bce, atol=1e-12)


def test_kd_terms_vanish_when_student_equals_teacher_and_teacher_gets_no_gradient():
    z = torch.tensor([-4.0, -0.5, 0.0, 2.0, 7.0], dtype=torch.float64)
    assert float(kd_kl(z.clone(), z, 2.0)) == pytest.approx(0.0, abs=1e-12)
    p = torch.sigmoid(z / 2.0)
    entropy = -(p * p.log() + (1 - p) * (1 - p).log()).mean()
    assert float(kd_bce(z.clone(), z, 2.0)) == pytest.approx(float(entropy), rel=1e-10)  # BCE = KL + H(p_t)
    zt = z.clone().requires_grad_()
    zs = (z + 1).requires_grad_()
    for fn in (kd_kl, kd_bce):
        fn(zs, zt, 2.0).backward()
        assert zt.grad is None


@pytest.mark.parametrize("variant", ["kl", "bce"])
@pytest.mark.parametrize("T,alpha", [(1.5, 0.4), (3.0, 0.5), (2.0, 0.0), (2.5, 1.0)])
def test_matching_loss_mixes_kd_and_bce_by_alpha(variant, T, alpha):
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(12, generator=g), torch.randn(12, generator=g) * 2
    y = (torch.rand(12, generator=g) > 0.5).float()
    parts = matching_loss(zs, y, zt, KDConfig(variant, T, alpha))
    bce = F.binary_cross_entropy_with_logits(zs, y)
    kd = (_ref_kl if variant == "kl" else _ref_bce)(zs.double(), zt.double(), T).float()
    assert float(parts["loss"]) == pytest.approx(float(alpha * kd + (1 - alpha) * bce), rel=1e-5)
    assert float(parts["task"]) == pytest.approx(float(bce), rel=1e-6)
    assert float(matching_loss(zs, y)["loss"]) == pytest.approx(float(bce), rel=1e-6)  # baseline: BCE alone


def test_transfer_pairs_join_the_kd_term_only():
    g = torch.Generator().manual_seed(2)
    zs, zt, y = torch.randn(8, generator=g), torch.randn(8, generator=g), (torch.rand(8, generator=g) > 0.5).float()
    xs, xt = torch.randn(24, generator=g), torch.randn(24, generator=g)
    kd = KDConfig("bce", 2.0, 0.6)
    parts = matching_loss(zs, y, zt, kd, xs, xt)
    bce = F.binary_cross_entropy_with_logits(zs, y)
    want = 0.6 * _ref_bce(torch.cat([zs, xs]), torch.cat([zt, xt]), 2.0) + 0.4 * bce
    assert float(parts["loss"]) == pytest.approx(float(want), rel=1e-5)
    assert float(matching_loss(zs, y, None, None, xs, xt)["loss"]) == pytest.approx(
        float(F.binary_cross_entropy_with_logits(zs, y)), rel=1e-6)  # the baseline never sees them


@pytest.mark.parametrize("T,alpha,match", [(3.0, 1.5, "alpha"), (3.0, -0.1, "alpha"), (0.0, 0.5, "temperature"),
                                           (-1.0, 0.5, "temperature"), (math.nan, 0.5, "temperature"),
                                           (2.0, math.nan, "alpha")])
def test_bad_alpha_or_temperature_fail_clearly(T, alpha, match):
    with pytest.raises(ValueError, match=match):
        KDConfig("kl", T, alpha)
    with pytest.raises(ValueError, match=match):
        check_kd_params(T, alpha)
    with pytest.raises(KeyError, match="valid: bce, kl"):
        KDConfig("mse", 2.0, 0.5)


# ------------------------------------------------------------------------------------------------ metrics


def test_metrics_against_brute_force():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.normal(size=200) + y, 1)  # rounded: many ties
    pos, neg = s[y == 1], s[y == 0]
    brute = np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg])
    assert roc_auc(s, y) == pytest.approx(brute, abs=1e-12)
    assert roc_auc([0.1, 0.9], [0, 1]) == 1.0 and roc_auc([0.9, 0.1], [0, 1]) == 0.0
    assert math.isnan(roc_auc([0.1, 0.2], [1, 1]))
    th = choose_threshold(s, y)
    best = max(np.mean((s >= c) == y) for c in np.r_[s, s.max() + 1])
    assert np.mean((s >= th) == y) == pytest.approx(best)
    m = binary_metrics([0.9, 0.8, 0.3, 0.7, 0.1, 0.2], [1, 1, 1, 0, 0, 0], threshold=0.5)
    assert m["confusion"] == {"tp": 2, "fp": 1, "tn": 2, "fn": 1}
    assert (m["accuracy"], m["precision"], m["recall"]) == pytest.approx((4 / 6, 2 / 3, 2 / 3))
    assert m["f1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        binary_metrics([0.1], [2])


# ------------------------------------------------------------------------------------------------ models


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, minilm_path):
    """A tiny dual-encoder teacher and a tiny sentence encoder (another draw's text tower), saved as folders
    (MiniLM's tokenizer)."""
    from mmkd.models.hub import save_dual_encoder

    root = tmp_path_factory.mktemp("tiny")
    teacher = tiny_dual_encoder(minilm_path, dim=16)
    save_dual_encoder(teacher, root / "teacher")
    tiny_dual_encoder(minilm_path, seed=1).text_model.save_pretrained(root / "sentence")
    teacher.tokenizer.save_pretrained(root / "sentence")
    return root / "teacher", root / "sentence"


@pytest.fixture(scope="module")
def world_pairs(tmp_path_factory, world_records):
    from mmkd.studies.matching.pairfile import build_pairs_file

    cache = tmp_path_factory.mktemp("wcache")
    path, _ = build_pairs_file("world:train", cache / "pairs.jsonl", BuildConfig(seed=0), cache_dir=cache, world_n=200)
    return path


def _study_cfg(sentence):
    """The study config from configs/matching/study.yaml with tiny budgets, as a user's overrides would set it."""
    resnet = json.dumps(SMALL_RESNET)
    return load_matching_config(STUDY, ["teacher.epochs=1", "teacher.lr=1e-4", f"student.resnet={resnet}",
                                        "train.epochs=1", "train.batch_size=32", "train.lr=1e-3", "train.transfer=2",
                                        "kd.0.temperature=2.0", "kd.1.temperature=2.0", f"text_encoder={sentence}"])


SMALL_RESNET = dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")


def test_teacher_is_frozen_during_kd_and_never_runs_per_step(tmp_path, tiny_models, world_pairs):
    from mmkd.studies.matching.data import load_pair_data
    from mmkd.studies.matching.study import MatchingStudy

    teacher_dir, sentence = tiny_models
    study = MatchingStudy(load_pair_data(world_pairs), teacher_dir, tmp_path / "study", _study_cfg(sentence),
                          log=lambda s: None)
    teacher = study.prepare_teacher()
    assert len(study.logits["train"]) == len(study.data.splits["train"])
    transfer = study.transfer_set()  # the teacher scores every training image × caption once, before training
    train = study.data.splits["train"]
    assert transfer.logits.shape == (len(train.image_idx.unique()), len(train.caption_idx.unique()))
    with torch.no_grad():  # a cached entry is the teacher's logit for that pair
        inputs = study._inputs
        for r, c in ((0, 0), (3, 5), (len(transfer.images) - 1, len(transfer.captions) - 1)):
            img = inputs.image_embeds(transfer.images[r:r + 1])
            txt = inputs.text_embeds(transfer.captions[c:c + 1])
            assert float(teacher(img, txt)) == pytest.approx(float(transfer.logits[r, c]), abs=1e-4)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    calls = []

    def spy(module, args):
        calls.append(type(module).__name__)

    hooks = [m.register_forward_pre_hook(spy) for m in (teacher, teacher.encoder.vision_model,
                                                        teacher.encoder.text_model)]
    for kd in study.cfg.kd:
        result = study.run_student(kd)
        assert set(result["test"]) >= {"accuracy", "precision", "recall", "f1", "roc_auc", "confusion"}
    for h in hooks:
        h.remove()
    assert calls == []  # the KD students (labelled and transfer pairs) used cached logits only
    assert not teacher.training and all(not m.training for m in teacher.modules())
    assert all(not p.requires_grad for p in teacher.parameters())
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the fine-tuned teacher is reused (not retrained) by a second study on the same pairs and settings
    again = MatchingStudy(load_pair_data(world_pairs), teacher_dir, tmp_path / "study", _study_cfg(sentence),
                          log=lambda s: None)
    again.prepare_teacher()
    assert torch.equal(again.logits["test"], study.logits["test"])


def test_student_learns_from_the_teacher_logits_not_the_labels(tmp_path, tiny_models, world_pairs):
    """With α = 1 the labels play no part: flipping them leaves the KD student unchanged; the baseline changes."""
    from mmkd.studies.matching.data import load_pair_data
    from mmkd.studies.matching.models import StudentConfig
    from mmkd.studies.matching.train import StudentTrainConfig, train_student

    data = load_pair_data(world_pairs)
    feats = torch.randn(len(data.captions), 8, generator=torch.Generator().manual_seed(0))
    t_logits = torch.randn(len(data.splits["train"]), generator=torch.Generator().manual_seed(1))
    cfg = StudentConfig(resnet=dict(embedding_size=8, hidden_sizes=[8], depths=[1], layer_type="basic"))
    tcfg = StudentTrainConfig(epochs=1, batch_size=64, lr=1e-3)
    kd = KDConfig("bce", 2.0, 1.0)
    a = train_student(data, feats, cfg, tcfg, kd, t_logits, log=lambda s: None).model
    train = data.splits["train"]
    train.labels = 1 - train.labels
    b = train_student(data, feats, cfg, tcfg, kd, t_logits, log=lambda s: None).model
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(ValueError, match="one cached teacher logit per train pair"):
        train_student(data, feats, cfg, tcfg, kd, t_logits[:-1], log=lambda s: None)


# ------------------------------------------------------------------------------------------------ CLI


def test_config_errors_name_the_key():
    for override, key, what in (("kd.0.alpha=1.5", "kd[0]", "alpha"), ("kd.1.temperature=0", "kd[1]", "temperature"),
                                ("sweep.alphas=[0.5,1.5]", "sweep", "alpha"),
                                ("kd.0.variant=mse", "kd[0]", "valid: bce, kl"),
                                ("teacher.trainable=some", "teacher", "trainable"),
                                ("pairs.build.negatives=easy", "pairs.build", "negatives"),
                                ("student.fusion=sum", "student", "valid: concat, interact"),
                                ("train.epochs=0", "train", "epochs"), ("pairs.negatives=hard", "pairs.negatives", "")):
        with pytest.raises(ConfigError, match=rf"{re.escape(key)}.*{re.escape(what)}"):
            load_matching_config(STUDY, [override])
    cfg = load_matching_config(STUDY, ["sweep.temperatures=[1.5,3]", "sweep.alphas=[0.5]"])
    assert [(k.variant, k.temperature, k.alpha) for k in cfg.sweep.configs()] == [
        ("kl", 1.5, 0.5), ("kl", 3.0, 0.5), ("bce", 1.5, 0.5), ("bce", 3.0, 0.5)]
    assert isinstance(cfg, MatchingConfig) and cfg.student.image_mean == tuple(cfg.student.image_mean)
    demo = load_matching_config(DEMO, ["settings.coco=null"], DemoConfig, quick=True)
    assert list(demo.setting_list()) == ["random", "hard"] and demo.setting_list()["hard"].world_n == 240
    with pytest.raises(ConfigError, match="settings: name at least one"):
        load_matching_config(DEMO, ["settings.coco=null", "settings.random=null", "settings.hard=null"],
                             DemoConfig).setting_list()


def test_demo_seeds_section_is_typed_and_checked():
    demo = load_matching_config(DEMO, [], DemoConfig)
    assert demo.seeds.seeds == [0, 1, 2] and demo.seed_settings() == ["random", "hard"]
    assert load_matching_config(DEMO, ["settings.hard=null"], DemoConfig).seed_settings() == ["random"]
    assert load_matching_config(DEMO, ["seeds.seeds=[]"], DemoConfig).seed_settings() == []
    assert load_matching_config(DEMO, ["seeds.settings=[]"], DemoConfig).seed_settings() == ["random", "hard", "coco"]
    for override, message in (("seeds.settings=[nope]", "seeds.settings: 'nope' is not one of the demo's settings"),
                              ("seeds.seeds=[1, 1]", "seeds: each seed once"),
                              ("seeds.seeds=[a]", "seeds.seeds[0]: expected an integer"),
                              ("seeds.runs=3", "unknown config key 'seeds.runs'")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_matching_config(DEMO, [override], DemoConfig)


def test_cli_rejects_bad_settings_before_any_work(tmp_path, capsys):
    missing = str(tmp_path / "nothing.jsonl")
    base = [STUDY, f"pairs.file={missing}", "teacher.source=x", "--out", str(tmp_path)]
    assert main(["matching", "train", *base, "kd.0.alpha=1.2"]) == 2
    assert "kd[0]: alpha" in capsys.readouterr().err
    assert main(["matching", "train", *base, "kd.1.temperature=0"]) == 2
    assert "kd[1]: temperature" in capsys.readouterr().err
    assert main(["matching", "sweep", *base, "sweep.alphas=[0.5,1.5]"]) == 2
    assert "sweep: alpha" in capsys.readouterr().err
    assert main(["matching", "train", *base]) == 2
    assert "pairs file" in capsys.readouterr().err
    assert main(["matching", "train", STUDY, f"pairs.file={missing}"]) == 2  # no teacher named
    assert "teacher.source" in capsys.readouterr().err


def test_cli_build_errors(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    from PIL import Image

    for i in range(6):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    data.write_text("".join(json.dumps({"image": f"{i}.png", "captions": [f"c{i}"]}) + "\n" for i in range(6)))
    build = ["matching", "build", STUDY, f"pairs.source=jsonl:{data}", f"pairs.file={tmp_path / 'p.jsonl'}"]
    assert main(build) == 2
    assert "too small to split" in capsys.readouterr().err
    assert main([*build, "pairs.build.captions_per_image=2"]) == 2
    assert "captions_per_image=2" in capsys.readouterr().err
    assert not (tmp_path / "p.jsonl").exists()


def test_cli_build_writes_pairs_and_sidecar(tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    assert main(["matching", "build", STUDY, f"pairs.file={out}", "pairs.world_n=60",
                 f"pairs.cache_dir={tmp_path / 'cache'}", "pairs.build.seed=4"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["pairs"] == str(out) and printed["counts"]["train"]["pairs"] == 48
    back = read_pairs(out)
    assert back.meta["data"] == "world:train" and back.meta["build"]["seed"] == 4


def test_demo_fails_in_one_line_when_a_settings_data_is_missing(tmp_path, capsys):
    gone = tmp_path / "coco-mini" / "captions.jsonl"
    assert main(["matching", "demo", DEMO, "--out", str(tmp_path / "out"), f"settings.coco.data=jsonl:{gone}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "settings.coco.data" in err and "settings.coco=null" in err
    assert not (tmp_path / "out").exists()  # nothing trained or written


@pytest.mark.slow
def test_cli_train_and_sweep_end_to_end(tmp_path, tiny_models, world_pairs, capsys):
    teacher_dir, sentence = tiny_models
    common = [STUDY, f"pairs.file={world_pairs}", f"teacher.source={teacher_dir}", "teacher.epochs=1",
              "train.epochs=1", "train.lr=1e-3", f"text_encoder={sentence}",
              f"student.resnet={json.dumps(SMALL_RESNET)}"]
    out = tmp_path / "train"
    assert main(["matching", "train", *common, "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["models"]) == ["teacher", "baseline", "kd_kl", "kd_bce"]
    for m in metrics["models"].values():
        assert set(m["test"]) >= {"accuracy", "precision", "recall", "f1", "roc_auc", "confusion"}
    report = (out / "report.md").read_text()
    assert "Confusion tables" in report and "teacher's errors" in report
    for e in metrics["teacher_errors"]:
        assert e["predicted"] != e["label"] and e["caption"]
    assert (out / "teacher" / "head.safetensors").is_file()

    sweep = tmp_path / "sweep"
    assert main(["matching", "sweep", *common, "--out", str(sweep), "sweep.temperatures=[1.5,3]",
                 "sweep.alphas=[0.5]"]) == 0
    rows = list(csv.DictReader((sweep / "leaderboard.csv").open()))
    kd_rows = [r for r in rows if r["rank"]]
    assert len(kd_rows) == 4 and {r["variant"] for r in kd_rows} == {"kl", "bce"}
    val_f1 = [float(r["val_f1"]) for r in kd_rows]
    assert val_f1 == sorted(val_f1, reverse=True)
    assert {r["model"] for r in rows if not r["rank"]} == {"teacher", "baseline"}
    assert "| rank |" in (sweep / "leaderboard.md").read_text()
    assert "leaderboard" in capsys.readouterr().out


@pytest.mark.slow
def test_matching_demo_quick_writes_the_contract(tmp_path, tiny_models, shared_data):
    teacher_dir, _ = tiny_models
    out = tmp_path / "demo"
    coco = shared_data / "coco-mini" / "captions.jsonl"
    assert main(["matching", "demo", DEMO, "--quick", "--out", str(out), f"teacher.source={teacher_dir}",
                 f"settings.coco.data=jsonl:{coco}"]) == 0
    result = json.loads((out / "matching.json").read_text())
    assert list(result) == ["random", "hard", "coco"]
    for setting in result.values():
        assert list(setting) == ["teacher", "baseline", "kd_kl", "kd_bce"]
        for r in setting.values():
            assert list(r) == ["accuracy", "precision", "recall", "f1", "roc_auc"]
            assert all(0.0 <= v <= 1.0 for v in r.values())
    assert (out / "matching.png").stat().st_size > 0
    assert "| hard | KD-BCE |" in (out / "report.md").read_text()
    hard = read_pairs(out / "pairs" / "hard.jsonl")
    assert {p.negative for p in hard.pairs if p.label == 0} == {"nearest", "swap"}

    # the quick section's seeds: [0, 1] on the random pairs, KD with transfer 0 and 2; seed 0 at transfer 2 is
    # the demo's own students, reused
    seeds = json.loads((out / "seeds.json").read_text())
    assert (seeds["seeds"], seeds["transfer"], seeds["kd"]) == ([0, 1], [0, 2], ["kd_kl", "kd_bce"])
    assert list(seeds["settings"]) == ["random"]
    assert seeds["settings"]["random"]["teacher"] == result["random"]["teacher"]
    runs = seeds["settings"]["random"]["runs"]
    keys = {(r["seed"], r["model"], r["transfer"]) for r in runs}
    assert len(runs) == len(keys) == 2 * (1 + 2 * 2)
    reused = {(r["model"], r["transfer"]): r["test"] for r in runs if r["reused"]}
    assert set(reused) == {("baseline", None), ("kd_kl", 2), ("kd_bce", 2)}
    assert all(r["seed"] == 0 for r in runs if r["reused"])
    for (model, _), test in reused.items():
        assert test == result["random"][model]
    assert "| random |" in (out / "report.md").read_text().split("## Over seeds 0, 1")[1]


def test_teacher_pretrain_runs_the_distill_config_once(tmp_path, minilm_path):
    """Without teacher.source, the demo's teacher config is trained by run_distill into the cache, then reused."""
    from mmkd.studies.matching.pretrain import teacher_source

    quick = load_matching_config(DEMO, [f"out={tmp_path}"], DemoConfig, quick=True)
    logs: list[str] = []
    folder = teacher_source(quick, logs.append)
    assert (folder / "model.safetensors").is_file() and (folder.parent / "metrics.json").is_file()
    assert folder.parent.parent == tmp_path / "cache" and "training" in logs[0]
    assert teacher_source(quick, logs.append) == folder and "reusing" in logs[-1]


def test_cli_wires_command_modules_without_knowing_their_flags(monkeypatch):
    """mmkd.cli only imports each module of COMMAND_MODULES and calls its add_parser (how the study registers)."""
    import sys
    import types

    import mmkd.cli as cli

    fake = types.ModuleType("fake_study_cli")
    fake.add_parser = lambda sub: sub.add_parser("fake").add_argument("--knob")
    monkeypatch.setitem(sys.modules, "fake_study_cli", fake)
    monkeypatch.setattr(cli, "COMMAND_MODULES", (*cli.COMMAND_MODULES, "fake_study_cli"))
    parser = cli.build_parser()
    assert parser.parse_args(["fake", "--knob", "3"]).knob == "3"
    args = parser.parse_args(["matching", "train", "cfg.yaml", "train.epochs=1", "--out", "o"])
    assert (args.config, args.overrides, args.out) == ("cfg.yaml", ["train.epochs=1"], "o")
