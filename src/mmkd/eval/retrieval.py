"""Image↔text retrieval recall@k and ranks, following CLIP_benchmark's definition of a hit."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from mmkd.eval.embed import Batch, embed_images, embed_texts

# Elements of one similarity-matrix chunk (32 MiB in fp32): never materialise the full [N, M] matrix,
# which is 10 GB for 50k x 50k.
_MAX_CHUNK_ELEMENTS = 1 << 23


def _median(x: torch.Tensor) -> float:
    """Median with the midpoint for even counts (numpy's convention; torch.median returns the lower one)."""
    s = x.double().sort().values
    n = s.shape[0]
    return float((s[(n - 1) // 2] + s[n // 2]) / 2)


def _rank_summary(prefix: str, ranks: torch.Tensor, ks: Sequence[int]) -> dict[str, float]:
    out = {f"{prefix}_r{k}": (ranks <= k).double().mean().item() for k in ks}
    out[f"{prefix}_mean_rank"] = ranks.double().mean().item()
    out[f"{prefix}_median_rank"] = _median(ranks)
    return out


def retrieval_scores(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Recall@k (fractions) and mean/median 1-based rank of the first correct item, in both directions.

    ``text_to_image[j]`` is the row of ``image_emb`` that caption j describes; an image may have several
    captions, and image→text counts a hit if any of them is in the top k. Images without captions are left
    out of the image→text numbers. Ties (and NaNs) are broken against the correct item, so a collapsed model
    whose embeddings are all equal ranks last rather than first. The similarity matrix is processed in row
    chunks (``chunk_size`` rows, default sized to ~32 MiB) so tens of thousands of items fit in memory.
    """
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(
            f"need image_emb [N, D] and text_emb [M, D], got {tuple(image_emb.shape)} and "
            f"{tuple(text_emb.shape)}"
        )
    n, m = image_emb.shape[0], text_emb.shape[0]
    if n == 0 or m == 0:
        raise ValueError("retrieval_scores needs at least one image and one text")
    device = image_emb.device
    t2i = torch.as_tensor(text_to_image).reshape(-1).to(device, torch.long)
    if t2i.shape[0] != m:
        raise ValueError(f"{m} text embeddings but {t2i.shape[0]} entries in text_to_image")
    if t2i.min() < 0 or t2i.max() >= n:
        raise ValueError(f"text_to_image must lie in [0, {n}), got range [{t2i.min()}, {t2i.max()}]")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dtype = torch.promote_types(image_emb.dtype, torch.float32)  # fp16 scores tie far too often
    img, txt = image_emb.to(dtype), text_emb.to(device, dtype)

    # Ranks come from counting, not sorting: rank = 1 + #(wrong items scoring >= the correct one). Only one
    # float chunk and one bool chunk are alive at a time; "not less than" is counted as total minus "less
    # than", which also makes NaN scores count against the correct item.

    # image -> text: rank of the best-scoring correct caption among all captions.
    rows = chunk_size or max(1, _MAX_CHUNK_ELEMENTS // m)
    i2t_ranks = torch.empty(n, dtype=torch.long, device=device)
    order = torch.argsort(t2i, stable=True)  # captions grouped by image, so a chunk's captions are a slice
    bounds = torch.searchsorted(
        t2i[order], torch.arange(0, n + rows, rows, device=device).clamp_(max=n)
    ).tolist()
    for c, start in enumerate(range(0, n, rows)):
        stop = min(start + rows, n)
        sims = img[start:stop] @ txt.T  # [r, M]
        own = order[bounds[c] : bounds[c + 1]]  # captions of images start..stop-1
        own_row = t2i[own] - start
        own_sims = sims[own_row, own]
        best = torch.full((stop - start,), float("-inf"), dtype=dtype, device=device)
        best.scatter_reduce_(0, own_row, own_sims, reduce="amax")
        not_less = m - (sims < best[:, None]).sum(dim=1)
        own_not_less = torch.zeros(stop - start, dtype=torch.long, device=device)
        own_not_less.index_add_(0, own_row, (~(own_sims < best[own_row])).long())
        i2t_ranks[start:stop] = 1 + not_less - own_not_less
        del sims
    has_caption = torch.bincount(t2i, minlength=n) > 0

    # text -> image: rank of the caption's own image among all images.
    rows = chunk_size or max(1, _MAX_CHUNK_ELEMENTS // n)
    t2i_ranks = torch.empty(m, dtype=torch.long, device=device)
    for start in range(0, m, rows):
        sims = txt[start : start + rows] @ img.T  # [r, N]
        correct = sims.gather(1, t2i[start : start + rows, None])
        # n - less counts the image itself too (it is not less than itself), hence no extra +1.
        t2i_ranks[start : start + rows] = n - (sims < correct).sum(dim=1)
        del sims

    return {**_rank_summary("i2t", i2t_ranks[has_caption], ks), **_rank_summary("t2i", t2i_ranks, ks)}


def evaluate_retrieval(
    model: nn.Module,
    batches: Iterable[Batch],
    captions_per_image: Sequence[Sequence[str]],
    batch_size: int = 256,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Retrieval over ``(pixel_values, image_index)`` batches; image_index points into captions_per_image.

    Batches may come in any order (e.g. a shuffled loader) and may cover a subset of the images: only the
    captions of images actually seen are used as the text gallery, so both directions search the same set.
    """
    image_emb, indices = embed_images(model, batches)
    return retrieval_from_embeddings(model, image_emb, indices, captions_per_image, batch_size=batch_size, ks=ks)


def retrieval_from_embeddings(
    model: nn.Module,
    image_emb: torch.Tensor,
    indices: torch.Tensor,
    captions_per_image: Sequence[Sequence[str]],
    batch_size: int = 256,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Retrieval from image embeddings already computed (row i is image ``indices[i]``), so a caller that
    also scores zero-shot on the same images embeds them once."""
    indices = indices.long().tolist()
    if len(set(indices)) != len(indices):
        raise ValueError("the batches contain the same image index more than once")
    texts: list[str] = []
    text_to_row: list[int] = []
    for row, index in enumerate(indices):
        if not 0 <= index < len(captions_per_image):
            raise ValueError(
                f"image index {index} is outside captions_per_image (length {len(captions_per_image)})"
            )
        for caption in captions_per_image[index]:
            texts.append(caption)
            text_to_row.append(row)
    if not texts:
        raise ValueError("none of the evaluated images has a caption")
    text_emb = embed_texts(model, texts, batch_size=batch_size)
    return retrieval_scores(image_emb, text_emb, torch.tensor(text_to_row), ks=ks)
