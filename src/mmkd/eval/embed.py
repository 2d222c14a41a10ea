"""Turn texts and image batches into L2-normalised embeddings, the common input of every metric here."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the model's weights, so inputs can be moved/cast to match.

    Falls back to CPU / float32 for a model without (floating) parameters.
    """
    device, dtype = torch.device("cpu"), torch.float32
    for i, p in enumerate(model.parameters()):
        if i == 0:
            device = p.device
        if p.is_floating_point():
            return p.device, p.dtype
    return device, dtype


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put the model in eval mode for the block and restore its previous train/eval state afterwards.

    Restoring matters because evaluation is often called from inside a training loop.
    """
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    # fp32 before normalising: fp16/bf16 norms lose precision and metrics compare near-equal scores.
    return F.normalize(x.float(), dim=-1)


def embed_texts(model: nn.Module, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """Encode texts into L2-normalised float32 embeddings [len(texts), D] on the model's device.

    Tokenisation happens per batch so padding stays short; the result is cloned out of inference mode so
    callers may use it freely afterwards (inference tensors refuse in-place updates and autograd).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    texts = list(texts)
    if not texts:
        raise ValueError("embed_texts needs at least one text")
    device, _ = model_device_dtype(model)
    chunks: list[torch.Tensor] = []
    with eval_mode(model), torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            tokens = model.tokenize(texts[start : start + batch_size])
            out = model.encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
            chunks.append(_normalise(out))
        emb = torch.cat(chunks)
    return emb.clone()


def embed_images(model: nn.Module, batches: Iterable[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode every batch; return (L2-normalised float32 embeddings [N, D], concatenated second elements [N]).

    The second elements (class labels or image indices) are passed through untouched, so the caller can align
    embeddings with whatever the data loader yields, in whatever order it yields them.
    """
    device, dtype = model_device_dtype(model)
    embs: list[torch.Tensor] = []
    extras: list[torch.Tensor] = []
    with eval_mode(model), torch.inference_mode():
        for pixel_values, extra in batches:
            out = model.encode_image(pixel_values.to(device=device, dtype=dtype))
            embs.append(_normalise(out))
            extras.append(torch.as_tensor(extra).reshape(-1).cpu())
        if not embs:
            raise ValueError("embed_images got no batches")
        emb, extra_all = torch.cat(embs), torch.cat(extras)
    if emb.shape[0] != extra_all.shape[0]:
        raise ValueError(f"{emb.shape[0]} images but {extra_all.shape[0]} labels/indices in the batches")
    return emb.clone(), extra_all.clone()
