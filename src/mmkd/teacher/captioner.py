"""An image-to-text model that writes synthetic captions for the teacher cache (MobileCLIP's dataset
reinforcement: several sampled captions per image, whose teacher embeddings training reads beside the real ones).

Loaded with transformers from a folder or hub id: ``AutoModelForImageTextToText`` where the config maps to it
(BLIP, GIT, VisionEncoderDecoder, ...), else ``VisionEncoderDecoderModel``; pixels through the model's own image
processor, text through its tokenizer. Sampling is seeded per call, so the same seed gives the same captions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmkd.errors import MmkdError
from mmkd.teacher.fingerprint import state_dict_sha256


class CaptionerError(MmkdError, ValueError):
    """A captioner that cannot be loaded or run: the message names the model and what to do."""


@dataclass(frozen=True)
class Sampling:
    """How captions are sampled. Defaults follow MobileCLIP's generator (CoCa, ``generation_type="top_p"``,
    ``top_p=0.9``, temperature 1, open_clip's 30-token captions); ``top_k`` is off (0) so the nucleus alone
    decides. ``batch_size`` is recorded because a batch's samples share one random stream."""

    n: int
    top_p: float = 0.9
    temperature: float = 1.0
    max_tokens: int = 30
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.n < 1:
            raise CaptionerError(f"--synthetic-captions must be ≥ 1 (captions per image), got {self.n}")
        if not 0 < self.top_p <= 1:
            raise CaptionerError(f"--caption-top-p must be in (0, 1], got {self.top_p}")
        if self.temperature <= 0:
            raise CaptionerError(f"--caption-temperature must be > 0, got {self.temperature}")
        if self.max_tokens < 1 or self.batch_size < 1:
            raise CaptionerError(f"--caption-max-tokens and the batch size must be ≥ 1, got {self.max_tokens} and "
                                 f"{self.batch_size}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def chunk_seed(seed: int, segment: str, chunk: int) -> int:
    """The sampling seed of one cache chunk: a pure function of (seed, segment, chunk), so a resumed or re-run
    build writes the same captions whatever was built before."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{segment}:{chunk}".encode(), digest_size=8).digest(),
                          "little") >> 1


class Captioner:
    """An image-to-text model, its image processor and tokenizer."""

    def __init__(self, model: Any, image_processor: Any, tokenizer: Any, source: str) -> None:
        self.model, self.image_processor, self.tokenizer, self.source = model, image_processor, tokenizer, source
        self.model.eval()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: Any) -> Captioner:
        self.model.to(device)
        return self

    def identity(self) -> dict[str, Any]:
        """What the captions depend on: the weights (hashed), the class; ``source`` only names it for people."""
        return {"source": self.source, "class": type(self.model).__name__,
                "weights_sha256": state_dict_sha256(self.model)}

    def generate_kwargs(self, sampling: Sampling) -> dict[str, Any]:
        return dict(do_sample=True, top_p=sampling.top_p, top_k=0, temperature=sampling.temperature,
                    max_new_tokens=sampling.max_tokens, num_return_sequences=sampling.n)

    def inputs(self, images: Sequence[Image.Image | np.ndarray]) -> dict[str, torch.Tensor]:
        pil = [Image.fromarray(im) if isinstance(im, np.ndarray) else im.convert("RGB") for im in images]
        enc = self.image_processor(images=pil, return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items() if isinstance(v, torch.Tensor)}

    def caption(self, images: Sequence[Image.Image | np.ndarray], sampling: Sampling, seed: int) -> list[list[str]]:
        """``sampling.n`` captions of each image, sampled with ``seed`` (batches of ``sampling.batch_size`` in
        order, one random stream): the same images, settings and seed give the same captions. The global torch
        RNG is left as it was."""
        out: list[list[str]] = []
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(seed)
            for lo in range(0, len(images), sampling.batch_size):
                batch = images[lo:lo + sampling.batch_size]
                ids = self.model.generate(**self.inputs(batch), **self.generate_kwargs(sampling))
                texts = [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
                out += [texts[i * sampling.n:(i + 1) * sampling.n] for i in range(len(batch))]
        return out


def load_captioner(name: str) -> Captioner:
    """The image-to-text model in folder/hub id ``name``, or CaptionerError naming it and what to do."""
    import transformers
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    hint = ("give --captioner a folder holding a transformers image-to-text model (config.json, weights, tokenizer "
            "files, preprocessor_config.json), or a hub id with the network (or the hub cache) available")
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError, KeyError) as e:
        raise CaptionerError(f"captioner {name}: cannot read its config ({_first_line(e)}); {hint}") from None
    try:
        if type(config) in AutoModelForImageTextToText._model_mapping:
            model = AutoModelForImageTextToText.from_pretrained(name)
        elif getattr(config, "model_type", "") == "vision-encoder-decoder":
            model = transformers.VisionEncoderDecoderModel.from_pretrained(name)
        else:
            raise CaptionerError(f"captioner {name}: a {type(config).__name__} is not an image-to-text model "
                                 "transformers generates captions with (AutoModelForImageTextToText or "
                                 "VisionEncoderDecoderModel); give a captioning model such as BLIP, GIT or a "
                                 "VisionEncoderDecoder")
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise CaptionerError(f"captioner {name}: cannot load its weights ({_first_line(e)}); {hint}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CaptionerError(f"captioner {name}: cannot load its tokenizer ({_first_line(e)}); save the tokenizer "
                             "files beside the model (tokenizer.save_pretrained(FOLDER))") from None
    if len(tokenizer) == 0:  # transformers' offline trap: an empty tokenizer that decodes every id to ""
        raise CaptionerError(f"captioner {name}: its tokenizer is empty (vocabulary size 0: the tokenizer files are "
                             "missing or were not downloaded); save the tokenizer files beside the model "
                             "(tokenizer.save_pretrained(FOLDER)) or allow the hub download")
    try:
        image_processor = AutoImageProcessor.from_pretrained(name)
    except (OSError, ValueError, KeyError) as e:
        raise CaptionerError(f"captioner {name}: cannot load its image processor ({_first_line(e)}); save it beside "
                             "the model (image_processor.save_pretrained(FOLDER): preprocessor_config.json)") from None
    _fill_generation_ids(model, tokenizer)
    return Captioner(model, image_processor, tokenizer, name)


def _fill_generation_ids(model: Any, tokenizer: Any) -> None:
    """A VisionEncoderDecoder saved without its decoder start / pad ids (common for fresh ones) gets them from the
    tokenizer (CLS or BOS starts, PAD pads), as its training would have set them."""
    cfg, gen = model.config, model.generation_config
    if gen.decoder_start_token_id is None and cfg.model_type == "vision-encoder-decoder":
        start = getattr(cfg, "decoder_start_token_id", None)
        if start is None:
            start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
        gen.decoder_start_token_id = start
    if gen.pad_token_id is None:
        gen.pad_token_id = getattr(cfg, "pad_token_id", None)
        if gen.pad_token_id is None:
            gen.pad_token_id = tokenizer.pad_token_id
    if gen.eos_token_id is None:
        gen.eos_token_id = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
