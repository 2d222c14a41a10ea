"""The half-depth-CLIP study's gender–profession bias probe: does distillation spread, shrink or keep bias?

Text probe: every gender term and profession goes through the model's text tower (inside a prompt template),
and the cosine matrix [gender terms × professions] is the model's association map. A profession's *gender
score* is its mean cosine to the female terms minus its mean cosine to the male terms (positive: closer to
the female terms). Comparing two models (a student against its teacher) gives the mean and largest absolute
change of the matrix, the Spearman rank correlation of the gender scores (1: the same professions lean the
same way in the same order) and the fraction of professions whose sign agrees.

Image probe (only with a captioned image set): images are grouped by whether their captions mention female
or male words (images mentioning both are left out), each group's normalised mean image embedding is compared
with the professions' prompt embeddings, and the gender score is the difference of the two rows. It says
which professions the model's *image* space puts nearer to pictures of women than of men; it depends on what
the pictures show (a caption saying "man" does not make a picture a random sample of men), so compare models
on the same images only, and read small groups with care (group sizes are reported).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from mmkd.config_io import load_yaml
from mmkd.data.records import Record
from mmkd.errors import UsageError
from mmkd.eval.embed import embed_images, embed_texts
from mmkd.eval.suite import pixel_batches

MIN_GROUP_IMAGES = 5


@dataclass
class BiasWords:
    """The probe's word lists (the packaged ``assets/bias_words.yaml`` or a user's copy)."""

    female: list[str]
    male: list[str]
    professions: list[str]
    template: str = "a photo of a {}."
    caption_female: list[str] = field(default_factory=list)
    caption_male: list[str] = field(default_factory=list)
    image_template: str = "a photo of a {}."

    def to_json(self) -> dict[str, Any]:
        return {"female": self.female, "male": self.male, "professions": self.professions,
                "template": self.template, "image_template": self.image_template,
                "caption_words": {"female": self.caption_female, "male": self.caption_male}}


def _words(data: dict[str, Any], key: str, where: str) -> list[str]:
    value = data.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(w, str) and w.strip() for w in value):
        raise UsageError(f"{where}: '{key}' must be a non-empty list of words")
    return [w.strip() for w in value]


def _template(data: dict[str, Any], key: str, default: str, where: str) -> str:
    value = data.get(key, default)
    if not isinstance(value, str) or value.count("{}") != 1:
        raise UsageError(f"{where}: '{key}' must be a string with exactly one {{}} for the word, got {value!r}")
    return value


def load_bias_words(path: str | Path | None = None, template: str | None = None) -> BiasWords:
    """Read the word lists; ``template`` (if given) replaces the file's text-probe template."""
    if path is None:
        where = "mmkd/assets/bias_words.yaml"
        text = (resources.files("mmkd") / "assets" / "bias_words.yaml").read_text(encoding="utf-8")
    else:
        p = Path(path).expanduser()
        if not p.is_file():
            raise UsageError(f"bias word file {p} not found")
        where, text = str(p), p.read_text(encoding="utf-8")
    try:
        data = load_yaml(text, where)
    except yaml.YAMLError as e:
        raise UsageError(f"{where}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{where}: the top level must be a mapping (female, male, professions, ...)")
    known = {"template", "female", "male", "professions", "caption_words", "image_template"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    caps = data.get("caption_words") or {}
    if not isinstance(caps, dict):
        raise UsageError(f"{where}: 'caption_words' must be a mapping with 'female' and 'male' lists")
    if template is not None:
        data["template"] = template
    return BiasWords(
        female=_words(data, "female", where), male=_words(data, "male", where),
        professions=_words(data, "professions", where),
        template=_template(data, "template", "a photo of a {}.", where),
        caption_female=_words(caps, "female", f"{where}: caption_words") if caps else [],
        caption_male=_words(caps, "male", f"{where}: caption_words") if caps else [],
        image_template=_template(data, "image_template", "a photo of a {}.", where),
    )


# ------------------------------------------------------------------------------------------------ statistics


def rankdata(x: Sequence[float]) -> np.ndarray:
    """1-based ranks with ties sharing their average rank (what Spearman's correlation needs)."""
    a = np.asarray(x, dtype=np.float64)
    order = np.argsort(a, kind="stable")
    ranks = np.empty(len(a), dtype=np.float64)
    sorted_a = a[order]
    start = 0
    while start < len(a):
        stop = start + 1
        while stop < len(a) and sorted_a[stop] == sorted_a[start]:
            stop += 1
        ranks[order[start:stop]] = (start + stop + 1) / 2.0  # mean of ranks start+1 .. stop
        start = stop
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman rank correlation (Pearson of average ranks); None when undefined (constant input, n < 2)."""
    if len(x) != len(y):
        raise ValueError(f"spearman needs equal lengths, got {len(x)} and {len(y)}")
    if len(x) < 2:
        return None
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float(np.sqrt((rx * rx).sum() * (ry * ry).sum()))
    if denom == 0.0:
        return None
    return float((rx * ry).sum() / denom)


def _probe_summary(rows: list[str], cosine: torch.Tensor, n_female: int, professions: list[str]) -> dict[str, Any]:
    cos = cosine.double()
    score = cos[:n_female].mean(0) - cos[n_female:].mean(0)
    return {"rows": rows, "professions": professions,
            "cosine": [[round(float(v), 6) for v in row] for row in cos],
            "gender_score": [round(float(v), 6) for v in score],
            "mean_abs_gender_score": float(score.abs().mean()), "cosine_std": float(cos.std(unbiased=False))}


def compare_probes(reference: Mapping[str, Any], other: Mapping[str, Any]) -> dict[str, Any]:
    """How ``other``'s association map differs from ``reference``'s (same rows and professions)."""
    if reference["rows"] != other["rows"] or reference["professions"] != other["professions"]:
        raise ValueError("bias probes to compare must use the same word lists")
    a, b = np.asarray(reference["cosine"]), np.asarray(other["cosine"])
    delta = b - a
    sa, sb = np.asarray(reference["gender_score"]), np.asarray(other["gender_score"])
    ref_strength = float(np.abs(sa).mean())
    strength = float(np.abs(sb).mean() / ref_strength) if ref_strength > 0 else None
    # The same ratio with each model's scores in units of its own cosine spread: a space where every pair is
    # similar (common after dropping layers) shows smaller raw differences without being any less biased.
    spread_a, spread_b = float(a.std()), float(b.std())
    normalised = strength * spread_a / spread_b if strength is not None and spread_b > 0 else None
    return {
        "mean_abs_delta": float(np.abs(delta).mean()),
        "max_abs_delta": float(np.abs(delta).max()),
        "spearman": spearman(sa, sb),
        "sign_agreement": float(np.mean(np.sign(sa) == np.sign(sb))),
        "strength_ratio": strength,
        "normalised_strength_ratio": normalised,
    }


# --------------------------------------------------------------------------------------------------- probes


def text_probe(model: Any, words: BiasWords) -> dict[str, Any]:
    """Cosine matrix [female + male terms × professions] of the model's text embeddings."""
    rows = words.female + words.male
    fill = words.template.format
    gender = embed_texts(model, [fill(w) for w in rows])
    prof = embed_texts(model, [fill(p) for p in words.professions])
    return _probe_summary(rows, gender @ prof.T, len(words.female), words.professions)


def _mentions(text: str, vocab: set[str]) -> bool:
    return any(tok in vocab for tok in re.findall(r"[a-z]+", text.lower()))


def caption_groups(records: Sequence[Record], words: BiasWords) -> dict[str, list[int]]:
    """Indices of images whose captions mention only female words / only male words."""
    if not words.caption_female or not words.caption_male:
        raise UsageError("the word file has no caption_words (female, male); the image probe needs them")
    fem, mal = {w.lower() for w in words.caption_female}, {w.lower() for w in words.caption_male}
    groups: dict[str, list[int]] = {"female": [], "male": []}
    for i, r in enumerate(records):
        f = any(_mentions(c, fem) for c in r.captions)
        m = any(_mentions(c, mal) for c in r.captions)
        if f != m:
            groups["female" if f else "male"].append(i)
    return groups


def image_probe(model: Any, records: Sequence[Record], groups: Mapping[str, list[int]],
                words: BiasWords) -> dict[str, Any]:
    """Cosine of each group's normalised mean image embedding with every profession prompt."""
    chosen = [records[i] for i in groups["female"] + groups["male"]]
    emb, _ = embed_images(model, pixel_batches(model, chosen))
    nf = len(groups["female"])
    centroids = torch.stack([emb[:nf].mean(0), emb[nf:].mean(0)])
    centroids = torch.nn.functional.normalize(centroids, dim=-1)
    prof = embed_texts(model, [words.image_template.format(p) for p in words.professions])
    out = _probe_summary(["female images", "male images"], centroids @ prof.T, 1, words.professions)
    out["n_images"] = {"female": nf, "male": len(groups["male"])}
    return out


def bias_probe(models: Mapping[str, Any], words: BiasWords | None = None, reference: str | None = "teacher",
               records: Sequence[Record] | None = None, data: str | None = None,
               min_group_images: int = MIN_GROUP_IMAGES) -> dict[str, Any]:
    """The ``bias`` block of metrics.json for several models, compared with ``reference`` when present.

    ``records`` (a captioned image set, named ``data`` in the output) adds the image probe; it is skipped,
    with the reason recorded under ``image_skipped``, when a caption group has fewer than
    ``min_group_images`` images.
    """
    if not models:
        raise ValueError("bias_probe needs at least one model")
    words = words or load_bias_words()
    out: dict[str, Any] = {"words": words.to_json(), "reference": reference if reference in models else None,
                           "models": {}, "vs_reference": {}}
    groups = None
    if records is not None:
        out["data"] = data
        groups = caption_groups(records, words)
        small = [f"{k}: {len(v)}" for k, v in groups.items() if len(v) < min_group_images]
        if small:
            out["image_skipped"] = (f"too few images per caption group ({', '.join(small)}; need "
                                    f"{min_group_images}) in {data or 'the given records'}")
            groups = None
    for name, model in models.items():
        entry = {"text": text_probe(model, words)}
        if groups is not None:
            entry["image"] = image_probe(model, records, groups, words)  # type: ignore[arg-type]
        out["models"][name] = entry
    ref = out["reference"]
    if ref is not None:
        for name, entry in out["models"].items():
            if name != ref:
                out["vs_reference"][name] = {kind: compare_probes(out["models"][ref][kind], probe)
                                             for kind, probe in entry.items()}
    return out


def format_bias(bias: dict[str, Any]) -> str:
    """Per-profession gender scores side by side, then the comparison with the reference."""
    names = list(bias["models"])
    lines = []
    for kind in ("text", "image"):
        if not all(kind in bias["models"][n] for n in names):
            continue
        first = bias["models"][names[0]][kind]
        lines.append(f"gender score per profession ({kind} probe; > 0: closer to the female terms)")
        lines.append(f"{'profession':<16}" + "".join(f"{n:>14}" for n in names))
        for j, prof in enumerate(first["professions"]):
            lines.append(f"{prof:<16}" + "".join(f"{bias['models'][n][kind]['gender_score'][j]:>14.4f}"
                                                 for n in names))
        lines.append(f"{'mean |score|':<16}" + "".join(f"{bias['models'][n][kind]['mean_abs_gender_score']:>14.4f}"
                                                      for n in names))
        if kind == "image":
            lines.append(f"images: {first['n_images']['female']} female-caption, {first['n_images']['male']} "
                         f"male-caption ({bias.get('data')})")
        for n, comp in bias.get("vs_reference", {}).items():
            c = comp.get(kind)
            if c:
                rho = "undefined" if c["spearman"] is None else f"{c['spearman']:.3f}"
                ratio = c.get("normalised_strength_ratio")
                lines.append(f"{n} vs {bias['reference']}: mean |Δ| {c['mean_abs_delta']:.4f}, max |Δ| "
                             f"{c['max_abs_delta']:.4f}, Spearman {rho}, same sign {100 * c['sign_agreement']:.0f}%, "
                             f"bias strength {'undefined' if ratio is None else f'{ratio:.2f}'} × (spread-normalised)")
        lines.append("")
    if bias.get("image_skipped"):
        lines.append(f"image probe skipped: {bias['image_skipped']}")
    return "\n".join(lines).rstrip()
