"""Zero-shot classification with prompt ensembles, following CLIP_benchmark so results match papers."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmkd.errors import ConfigError
from mmkd.eval.embed import Batch, embed_images, embed_texts

Template = str | Callable[[str], str]

# Rows of the [images, classes] score matrix handled at once; bounds memory for large test sets.
_MAX_SCORE_ELEMENTS = 1 << 23


def _fill(template: Template, classname: str) -> str:
    if callable(template):
        return template(classname)
    # Both "a photo of a {}." (OpenAI style) and "a photo of a {c}." (CLIP_benchmark style) work.
    return template.format(classname, c=classname)


def zeroshot_classifier(
    model: nn.Module, classnames: Sequence[str], templates: Sequence[Template], batch_size: int = 256
) -> torch.Tensor:
    """Class embeddings [C, D]: L2-normalised mean of the L2-normalised embeddings of every filled template.

    Templates are strings with "{}" or "{c}", or callables classname -> prompt. All prompts are encoded as one
    flat list so batches stay full even with few templates per class.
    """
    if not classnames or not templates:
        raise ValueError("zeroshot_classifier needs at least one class name and one template")
    prompts = [_fill(t, c) for c in classnames for t in templates]
    emb = embed_texts(model, prompts, batch_size=batch_size)
    emb = emb.reshape(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(emb, dim=-1)


def zeroshot_scores(
    image_emb: torch.Tensor, classifier: torch.Tensor, labels: torch.Tensor
) -> dict[str, float]:
    """Top-1/top-5 accuracy and mean per-class recall (balanced accuracy) as fractions in [0, 1]; see
    :func:`zeroshot_scores_and_hits`."""
    return zeroshot_scores_and_hits(image_emb, classifier, labels)[0]


def zeroshot_scores_and_hits(
    image_emb: torch.Tensor, classifier: torch.Tensor, labels: torch.Tensor
) -> tuple[dict[str, float], torch.Tensor]:
    """Top-1/top-5 accuracy and mean per-class recall (balanced accuracy) as fractions in [0, 1], and each
    image's top-1 correctness (a bool tensor [N], for intervals over test images: ``mmkd sweep``'s bootstrap).

    The true class's rank is 1 + the number of other classes scoring at least as high, i.e. ties (and NaNs)
    count against the model, so a collapsed model with identical scores gets chance-or-worse instead of a
    lucky hit. "top5" is omitted when there are fewer than 5 classes (it would trivially be 1). Mean per-class
    recall averages top-1 recall over the classes present in ``labels``, as sklearn's balanced accuracy does.
    """
    if image_emb.ndim != 2 or classifier.ndim != 2 or image_emb.shape[1] != classifier.shape[1]:
        raise ValueError(
            f"need image_emb [N, D] and classifier [C, D], got {tuple(image_emb.shape)} and "
            f"{tuple(classifier.shape)}"
        )
    labels = torch.as_tensor(labels).reshape(-1).to(image_emb.device, torch.long)
    n, c = image_emb.shape[0], classifier.shape[0]
    if labels.shape[0] != n:
        raise ValueError(f"{n} image embeddings but {labels.shape[0]} labels")
    if n == 0:
        raise ValueError("zeroshot_scores needs at least one image")
    if labels.min() < 0 or labels.max() >= c:
        raise ValueError(f"labels must lie in [0, {c}), got range [{labels.min()}, {labels.max()}]")

    classifier = classifier.to(image_emb.device, torch.promote_types(image_emb.dtype, torch.float32))
    rows = max(1, _MAX_SCORE_ELEMENTS // max(c, 1))
    ranks = torch.empty(n, dtype=torch.long, device=image_emb.device)
    for start in range(0, n, rows):
        emb = image_emb[start : start + rows].to(classifier.dtype)
        logits = 100.0 * emb @ classifier.T  # the x100 is CLIP's logit scale; it does not change rankings
        lab = labels[start : start + rows]
        true = logits.gather(1, lab[:, None])
        # rank = 1 + #(other classes not below the true one) = c - #(classes below it); a NaN compares
        # False, so it counts as beating the true class.
        ranks[start : start + rows] = c - (logits < true).sum(dim=1)

    hit1 = (ranks <= 1).double()
    out = {"top1": hit1.mean().item()}
    if c >= 5:
        out["top5"] = (ranks <= 5).double().mean().item()
    per_class_hits = torch.zeros(c, dtype=torch.float64, device=labels.device).index_add_(0, labels, hit1)
    per_class_count = torch.bincount(labels, minlength=c).double()
    present = per_class_count > 0
    out["mean_per_class_recall"] = (per_class_hits[present] / per_class_count[present]).mean().item()
    return out, (ranks <= 1).cpu()


def sigmoid_probabilities(image_emb: torch.Tensor, classifier: torch.Tensor, labels: torch.Tensor, scale: float,
                          bias: float) -> dict[str, float]:
    """SigLIP's own reading of its scores: each (image, class) pair's probability ``sigmoid(scale * cos + bias)``,
    independent per class (they need not sum to 1). Mean over images of the true class's, of the highest one's,
    and mean over the other classes'. Rankings (top1, ...) do not depend on the bias: it shifts every score."""
    labels = torch.as_tensor(labels).reshape(-1).to(image_emb.device, torch.long)
    probs = torch.sigmoid(scale * image_emb.double() @ classifier.double().T + bias)
    true = probs.gather(1, labels[:, None]).squeeze(1)
    other = probs.scatter(1, labels[:, None], 0.0).sum(1) / max(probs.shape[1] - 1, 1)
    return {"p_true_class": true.mean().item(), "p_top1": probs.amax(1).mean().item(),
            "p_other_classes": other.mean().item()}


def evaluate_zeroshot(
    model: nn.Module,
    batches: Iterable[Batch],
    classnames: Sequence[str],
    templates: Sequence[Template],
    batch_size: int = 256,
    sigmoid: bool = False,
) -> dict[str, Any]:
    """Zero-shot classification of ``(pixel_values, labels)`` batches; keys as in :func:`zeroshot_scores`, plus
    :func:`sigmoid_probabilities` under ``sigmoid`` where asked (a model with a learnt logit bias: SigLIP)."""
    return evaluate_zeroshot_and_hits(model, batches, classnames, templates, batch_size, sigmoid)[0]


def evaluate_zeroshot_and_hits(
    model: nn.Module,
    batches: Iterable[Batch],
    classnames: Sequence[str],
    templates: Sequence[Template],
    batch_size: int = 256,
    sigmoid: bool = False,
) -> tuple[dict[str, Any], torch.Tensor]:
    """:func:`evaluate_zeroshot` and each image's top-1 correctness (bool [N], in batch order)."""
    bias = getattr(model, "logit_bias", None)
    if sigmoid and not isinstance(bias, torch.Tensor):
        raise ConfigError("sigmoid probabilities (--sigmoid, eval sigmoid: true) need a model with a learnt logit "
                          "bias (a SigLIP model); this one was trained with a softmax over cosines, whose sigmoid "
                          "means nothing: drop the option for this model")
    classifier = zeroshot_classifier(model, classnames, templates, batch_size=batch_size)
    image_emb, labels = embed_images(model, batches)
    out, hits = zeroshot_scores_and_hits(image_emb, classifier, labels)
    if sigmoid and isinstance(bias, torch.Tensor):
        scale = float(model.logit_scale.detach().float().exp())
        out = {**out, "sigmoid": sigmoid_probabilities(image_emb, classifier, labels, scale, float(bias.detach()))}
    return out, hits
