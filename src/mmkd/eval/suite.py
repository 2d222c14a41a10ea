"""Running the evaluations on records: pixel batches from records, and the metrics block of one model."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from mmkd.data.batches import ImageBank
from mmkd.data.records import DataError, Record
from mmkd.eval.efficiency import efficiency_metrics
from mmkd.eval.embed import embed_images
from mmkd.eval.retrieval import evaluate_retrieval, retrieval_from_embeddings
from mmkd.eval.zeroshot import evaluate_zeroshot_and_hits, zeroshot_classifier, zeroshot_scores


def pixel_batches(model: Any, records: Sequence[Record], second: Sequence[int] | None = None,
                  batch_size: int = 256) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(pixels, labels-or-indices) batches preprocessed with the model's own size, mean and std."""
    meta = model.meta
    bank = ImageBank(records, meta.image_size, meta.image_mean, meta.image_std)
    values = list(second) if second is not None else list(range(len(records)))
    for i in range(0, len(records), batch_size):
        idx = list(range(i, min(i + batch_size, len(records))))
        yield bank.pixels(idx), torch.tensor([values[j] for j in idx])


def world_labels(records: Sequence[Record], class_set: str) -> list[int]:
    """The built-in world's records carry colour_shape labels; derive shape or colour from them."""
    from mmkd.data import world

    n_shapes = len(world.SHAPES)
    out = []
    for r in records:
        if r.label is None:
            raise DataError(f"{r.key}: no label (two-object image); zero-shot needs single-object images")
        out.append({"colour_shape": r.label, "shape": r.label % n_shapes, "colour": r.label // n_shapes}[class_set])
    return out


def zeroshot(model: Any, records: Sequence[Record], classnames: list[str], templates: list[str],
             labels: Sequence[int] | None = None, sigmoid: bool = False) -> dict[str, Any]:
    return zeroshot_and_hits(model, records, classnames, templates, labels, sigmoid)[0]


def zeroshot_and_hits(model: Any, records: Sequence[Record], classnames: list[str], templates: list[str],
                      labels: Sequence[int] | None = None, sigmoid: bool = False
                      ) -> tuple[dict[str, Any], torch.Tensor]:
    """Zero-shot scores and each record's top-1 correctness (bool [N], in record order)."""
    labels = labels if labels is not None else [r.label for r in records]  # type: ignore[misc]
    for r, lab in zip(records, labels):
        if lab is None:
            raise DataError(f"{r.origin or r.key}: no label; zero-shot evaluation needs a label on every image")
        if not 0 <= lab < len(classnames):
            raise DataError(f"{r.origin or r.key}: label {lab} is out of range: the data has {len(classnames)} "
                            f"classes (labels 0..{len(classnames) - 1}); fix the label or the class list "
                            "(e.g. classes.txt beside WebDataset shards)")
    return evaluate_zeroshot_and_hits(model, pixel_batches(model, records, labels), classnames, templates,
                                      sigmoid=sigmoid)


def retrieval(model: Any, records: Sequence[Record]) -> dict[str, float]:
    caps = [list(r.captions) for r in records]
    if not any(caps):
        raise DataError("retrieval needs captioned images")
    return evaluate_retrieval(model, pixel_batches(model, records), caps)


def world_metrics(model: Any, test: Sequence[Record], class_sets: Sequence[str] = ("colour_shape", "shape",
                  "colour"), latency_budget_s: float = 3.0, retrieval_images: int | None = None) -> dict[str, Any]:
    """The metrics.json block of one model on the built-in world's test split (retrieval on the first
    ``retrieval_images`` images when given: its gallery is all their captions, the costliest part). The test
    images are embedded once and scored for every class set and for retrieval."""
    from mmkd.data import world

    out: dict[str, Any] = efficiency_metrics(model, budget_s=latency_budget_s)
    image_emb, rows = embed_images(model, pixel_batches(model, test))
    out["zeroshot"] = {
        cs: zeroshot_scores(image_emb, zeroshot_classifier(model, world.class_sets()[cs], world.templates(cs)),
                            torch.tensor(world_labels(test, cs)))
        for cs in class_sets
    }
    n = min(retrieval_images or len(test), len(test))
    out["retrieval"] = retrieval_from_embeddings(model, image_emb[:n], rows[:n], [list(r.captions) for r in test])
    return out
