"""Synthetic captions (MobileCLIP's dataset reinforcement): ``mmkd cache --captioner MODEL --synthetic-captions N``
stores N sampled captions per image and the teacher's text targets of them; ``data.synthetic_captions`` trains on
(image, real caption) and (image, synthetic caption). A tiny random VisionEncoderDecoder captioner (gibberish
captions, the real pipeline) is built and saved locally."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_runs import kill_when, losses, mmkd, mmkd_ok, start

from mmkd.teacher.cache.synthetic import draw

N_IMAGES, CHUNK = 16, 2
BUILD = ("--data", "world:train", "--world-n", str(N_IMAGES), "--chunk-rows", str(CHUNK), "--batch-size", "2",
         "--precision", "fp32", "--synthetic-captions", "3", "--caption-max-tokens", "8")


def _save_captioner(folder: Path, minilm_path: str, tokenizer: bool = True) -> Path:
    from transformers import (
        AutoTokenizer,
        BertConfig,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessor,
    )

    tok = AutoTokenizer.from_pretrained(minilm_path)
    torch.manual_seed(0)
    enc = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=64)
    dec = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, is_decoder=True, add_cross_attention=True)
    model = VisionEncoderDecoderModel(VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec))
    gen = model.generation_config
    gen.decoder_start_token_id, gen.pad_token_id = tok.cls_token_id, tok.pad_token_id
    gen.eos_token_id = tok.sep_token_id
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    if tokenizer:
        tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def captioner_dir(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> Path:
    return _save_captioner(tmp_path_factory.mktemp("captioner") / "captioner", minilm_path)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path, captioner_dir: Path) -> Path:
    """A cache with 3 synthetic captions per image, built once from the CLI (the reference of the tests here)."""
    root = tmp_path_factory.mktemp("syncache")
    mmkd_ok("cache", "--teacher", str(tiny_teacher_dir), "--captioner", str(captioner_dir), *BUILD,
            "--data-cache", str(root / "data"), "--out", str(root / "cache"))
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.mark.slow
def test_stored_captions_are_a_seeded_generate_and_their_targets_the_teachers(built: Path, captioner_dir: Path,
                                                                              tiny_teacher_dir: Path) -> None:
    from transformers import AutoTokenizer, VisionEncoderDecoderModel, ViTImageProcessor

    from mmkd.data.resolve import records_from_spec
    from mmkd.models.hub import load_dual_encoder
    from mmkd.teacher.cache import CachedTeacher
    from mmkd.teacher.cache.format import from_storage
    from mmkd.teacher.cache.synthetic import SyntheticCaptions
    from mmkd.teacher.captioner import chunk_seed
    from mmkd.teacher.targets import teacher_outputs

    cache = CachedTeacher.open(built / "cache")
    records = records_from_spec("world:train", str(built / "data"), world_n=N_IMAGES)
    stored = SyntheticCaptions(cache, 0).table([r.key for r in records])
    assert len(stored) == N_IMAGES and all(len(c) == 3 for c in stored)
    model = VisionEncoderDecoderModel.from_pretrained(captioner_dir).eval()
    tok, proc = AutoTokenizer.from_pretrained(captioner_dir), ViTImageProcessor.from_pretrained(captioner_dir)
    direct = []
    for c, lo in enumerate(range(0, N_IMAGES, CHUNK)):  # the build's chunks: one seed each, from (seed, segment, chunk)
        torch.manual_seed(chunk_seed(0, "memory", c))
        pix = proc(images=[r.image for r in records[lo:lo + CHUNK]], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            ids = model.generate(pixel_values=pix, do_sample=True, top_p=0.9, top_k=0, temperature=1.0,
                                 max_new_tokens=8, num_return_sequences=3)
        texts = [t.strip() for t in tok.batch_decode(ids, skip_special_tokens=True)]
        direct += [texts[i * 3:(i + 1) * 3] for i in range(len(texts) // 3)]
    assert stored == direct
    assert len({c for caps in stored for c in caps}) > 3  # sampled: not one caption repeated
    teacher = load_dual_encoder(tiny_teacher_dir).eval()
    flat = [c for caps in stored for c in caps]
    want = teacher_outputs(teacher, None, flat)["text_embeds"].reshape(N_IMAGES, 3, -1)
    layout = cache.layouts[0]
    got = torch.cat([from_storage(np.load(layout.shard(c, "syncap_embeds")), layout.dtype)
                     for c in layout.chunks("syncap")])
    torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
    meta = json.loads((built / "cache" / "meta.json").read_text())["fingerprint"]["captioner"]
    assert meta["sampling"] == {"n": 3, "top_p": 0.9, "temperature": 1.0, "max_tokens": 8, "batch_size": 2}
    assert len(meta["weights_sha256"]) == 64
    assert mmkd("cache", "--verify", str(built / "cache")).returncode == 0


def test_verify_names_a_corrupted_caption_table(built: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "cache"
    shutil.copytree(built / "cache", copy)
    table = next(copy.glob("segments/*/syncap-00001.syncaps.bytes.npy"))
    data = bytearray(table.read_bytes())
    data[-1] ^= 0x01
    table.write_bytes(bytes(data))
    done = mmkd("cache", "--verify", str(copy))
    assert done.returncode == 1 and "syncap-00001.syncaps" in done.stderr, done.stderr


def _distill_config(tmp_path: Path, built: Path, name: str, synthetic: str) -> Path:
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(f"""
teacher: cache:{built / 'cache'}
out: {tmp_path / name}
cache_dir: {built / 'data'}
student:
  vision: {{source: new, arch: clip_vision, config: {{image_size: 32, patch_size: 8, hidden_size: 32,
           num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 64}}}}
  text: {{source: new, arch: bert, config: {{hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2,
         intermediate_size: 64, max_position_embeddings: 64}}}}
  projection_dim: 16
  freeze: [text_model]
data: {{train: "world:train", world_size_train: {N_IMAGES}, batch_size: 4, workers: 0{synthetic}}}
objectives: [{{name: clip}}, {{name: fd_mse_cosine}}]
train: {{steps: 3, log_every: 1, warmup_steps: 1, threads: 1}}
""")
    return cfg


@pytest.mark.slow
def test_distill_with_synthetic_captions_trains_and_differs(built: Path, tmp_path: Path) -> None:
    """A frozen student text tower (its features tabled, synthetic captions included) trains from the CLI."""
    on = _distill_config(tmp_path, built, "on", ", synthetic_captions: {enabled: true}")
    off = _distill_config(tmp_path, built, "off", "")
    mmkd_ok("distill", str(on))
    mmkd_ok("distill", str(off))
    with_syn, without = losses(tmp_path / "on"), losses(tmp_path / "off")
    assert all("synthetic/loss" in row for row in with_syn) and not any("synthetic/loss" in r for r in without)
    for a, b in zip(with_syn, without):  # the real-caption terms are the same at step 1; the total adds the second
        assert a["loss"] == pytest.approx(b["loss"] + a["synthetic/loss"], rel=1e-4) or a["step"] > 1
    assert with_syn[-1]["loss"] != pytest.approx(without[-1]["loss"])


def test_synthetic_draw_is_a_pure_function_of_seed_key_and_step() -> None:
    keys = [f"k{i}" for i in range(64)]
    a = draw(0, keys, 5, 3)
    assert a == draw(0, keys, 5, 3) == [draw(0, [k], 5, 3)[0] for k in keys]  # per key: any batch order or rank
    assert a == list(reversed(draw(0, list(reversed(keys)), 5, 3)))
    assert a != draw(0, keys, 6, 3) and a != draw(1, keys, 5, 3)
    assert set(a) == {0, 1, 2}


@pytest.mark.slow
def test_killed_build_resumes_to_the_same_bytes(built: Path, tiny_teacher_dir: Path, captioner_dir: Path,
                                                tmp_path: Path) -> None:
    out = tmp_path / "cache"
    args = ("cache", "--teacher", str(tiny_teacher_dir), "--captioner", str(captioner_dir), *BUILD,
            "--data-cache", str(built / "data"), "--out", str(out))
    proc = start(*args, log=tmp_path / "log.txt")
    kill_when(proc, lambda: any(out.glob("segments/*/syncap-00000.done.json")), "a committed caption chunk")
    assert not any(out.glob(f"segments/*/syncap-{N_IMAGES // CHUNK - 1:05d}.done.json"))
    mmkd_ok(*args)
    assert _files(out) == _files(built / "cache")


def test_captioner_without_tokenizer_is_one_line(tmp_path: Path, minilm_path: str, tiny_teacher_dir: Path) -> None:
    bad = _save_captioner(tmp_path / "notok", minilm_path, tokenizer=False)
    done = mmkd("cache", "--teacher", str(tiny_teacher_dir), "--captioner", str(bad), *BUILD,
                "--data-cache", str(tmp_path / "data"), "--out", str(tmp_path / "cache"))
    assert done.returncode != 0
    assert "Traceback" not in done.stderr and str(bad) in done.stderr and "tokenizer" in done.stderr, done.stderr
    assert not (tmp_path / "cache").exists()  # refused before anything was written


def test_captioner_that_is_not_a_model_is_one_line(tmp_path: Path, tiny_teacher_dir: Path) -> None:
    (tmp_path / "empty").mkdir()
    done = mmkd("cache", "--teacher", str(tiny_teacher_dir), "--captioner", str(tmp_path / "empty"), *BUILD,
                "--data-cache", str(tmp_path / "data"), "--out", str(tmp_path / "cache"))
    assert done.returncode != 0 and "Traceback" not in done.stderr and "captioner" in done.stderr, done.stderr


def test_training_with_synthetic_captions_from_a_cache_without_them_names_the_flag(
        built: Path, tiny_teacher_dir: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    mmkd_ok("cache", "--teacher", str(tiny_teacher_dir), "--data", "world:train", "--world-n", str(N_IMAGES),
            "--data-cache", str(built / "data"), "--out", str(plain))
    cfg = _distill_config(tmp_path, built, "run", ", synthetic_captions: {enabled: true}")
    cfg.write_text(cfg.read_text().replace(f"cache:{built / 'cache'}", f"cache:{plain}"))
    done = mmkd("distill", str(cfg))
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert str(plain) in done.stderr and "--synthetic-captions" in done.stderr, done.stderr


def test_synthetic_captions_need_a_teacher_cache(tmp_path: Path, tiny_teacher_dir: Path) -> None:
    from mmkd.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="data.synthetic_captions.enabled.*cache:DIR"):
        config_from_dict({"teacher": str(tiny_teacher_dir), "data": {"synthetic_captions": {"enabled": True}}})
    with pytest.raises(ConfigError, match="data.synthetic_captions"):
        config_from_dict({"data": {"synthetic_captions": {"enable": True}}})


def test_batches_carry_synthetic_captions_of_paired_or_all_images() -> None:
    """TrainData draws through the synthetic source for the paired keys, or every key with ``unpaired``; a batch
    is the same built twice (as on resume or in another worker)."""
    from mmkd.data.batches import ImageBank, TrainData
    from mmkd.data.records import Record

    recs = [Record(key=f"p{i}", image=np.zeros((8, 8, 3), np.uint8), captions=(f"c{i}",)) for i in range(8)]
    extra = [Record(key=f"u{i}", image=np.zeros((8, 8, 3), np.uint8), captions=()) for i in range(8)]

    class Source:
        def __init__(self, unpaired: bool) -> None:
            self.unpaired = unpaired

        def __call__(self, keys: list[str], step: int) -> tuple[list[str], list[int]]:
            idx = draw(0, keys, step, 3)
            return [f"{k}/syn{i}" for k, i in zip(keys, idx)], idx

    for unpaired in (False, True):
        bank = ImageBank(recs, 8, (0.5,) * 3, (0.25,) * 3)
        ubank = ImageBank(extra, 8, (0.5,) * 3, (0.25,) * 3)
        data = TrainData(bank, ubank, 4, 4, world=1, seed=0, synthetic=Source(unpaired))
        a, b = data.raw_batch(3), data.raw_batch(3)
        assert a.synthetic == b.synthetic and a.synthetic_idx == b.synthetic_idx
        n = len(a.keys) if unpaired else a.n_paired
        assert a.synthetic == [f"{k}/syn{i}" for k, i in zip(a.keys[:n], draw(0, a.keys[:n], 3, 3))]


@pytest.mark.slow
def test_an_ensembles_caches_give_each_teachers_targets_of_the_same_synthetic_captions(
        built: Path, tiny_teacher_dir: Path, captioner_dir: Path, tmp_path: Path) -> None:
    """Two caches of one teacher with the same captions: the ensemble's losses equal the single cache's (each
    member's synthetic pass reads that member's targets of the drawn captions); captions sampled otherwise are
    refused, naming both caches."""
    twin = tmp_path / "twin"
    mmkd_ok("cache", "--teacher", str(tiny_teacher_dir), "--captioner", str(captioner_dir), *BUILD,
            "--data-cache", str(built / "data"), "--out", str(twin))
    single = _distill_config(tmp_path, built, "single", ", synthetic_captions: {enabled: true}")
    pair = _distill_config(tmp_path, built, "pair", ", synthetic_captions: {enabled: true}")
    for cfg in (single, pair):  # dr_clip averaging the teachers' softmaxes has no learnable maps: two identical
        cfg.write_text(cfg.read_text().replace(  # teachers are the one teacher
            "objectives: [{name: clip}, {name: fd_mse_cosine}]",
            "objectives: [{name: dr_clip, params: {average_after_softmax: true}}]"))
    pair.write_text(pair.read_text().replace(f"teacher: cache:{built / 'cache'}",
                                             f"teacher: ['cache:{built / 'cache'}', 'cache:{twin}']"))
    mmkd_ok("distill", str(single))
    mmkd_ok("distill", str(pair))
    one, two = losses(tmp_path / "single"), losses(tmp_path / "pair")
    assert [r["synthetic/loss"] for r in two] == pytest.approx([r["synthetic/loss"] for r in one], rel=1e-5)
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-5)

    other = tmp_path / "other"
    mmkd_ok("cache", "--teacher", str(tiny_teacher_dir), "--captioner", str(captioner_dir), *BUILD,
            "--caption-top-p", "0.5", "--data-cache", str(built / "data"), "--out", str(other))
    pair.write_text(pair.read_text().replace(f"cache:{twin}", f"cache:{other}").replace(
        f"out: {tmp_path / 'pair'}", f"out: {tmp_path / 'refused'}"))
    done = mmkd("distill", str(pair))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "hold different synthetic captions" in done.stderr and str(other) in done.stderr, done.stderr


def test_a_cache_reuses_another_caches_captions(built: Path, tiny_teacher_dir: Path, tmp_path: Path) -> None:
    """--captioner cache:DIR: the captions are read, not sampled again (the same strings, the same fingerprint, so
    an ensemble of the two passes), and embedded by this build's teacher; other --chunk-rows are refused."""
    from mmkd.teacher.cache.format import read_meta

    reuse = tmp_path / "reuse"
    mmkd_ok("cache", "--teacher", str(tiny_teacher_dir), "--captioner", f"cache:{built / 'cache'}", *BUILD,
            "--data-cache", str(built / "data"), "--out", str(reuse))
    src_files, new_files = _files(built / "cache" / "segments"), _files(reuse / "segments")
    syn = {k: v for k, v in src_files.items() if ".syncap" in k and not k.endswith("done.json")}
    assert syn and all(new_files[k] == v for k, v in syn.items())  # strings and (same teacher) embeddings
    assert read_meta(reuse)["fingerprint"]["captioner"] == read_meta(built / "cache")["fingerprint"]["captioner"]
    bad = mmkd("cache", "--teacher", str(tiny_teacher_dir), "--captioner", f"cache:{built / 'cache'}", *BUILD[:4],
               "--chunk-rows", "4", *BUILD[6:], "--data-cache", str(built / "data"), "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert "--chunk-rows 2" in bad.stderr and not (tmp_path / "bad").exists(), bad.stderr
    plain = mmkd("cache", "--teacher", str(tiny_teacher_dir), "--captioner", f"cache:{reuse / 'nope'}", *BUILD,
                 "--data-cache", str(built / "data"), "--out", str(tmp_path / "none"))
    assert plain.returncode == 2 and "Traceback" not in plain.stderr, plain.stderr
