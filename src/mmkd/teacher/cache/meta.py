"""A cache's ``meta.json``: the fingerprint of everything its targets depend on but the data (teacher, transform,
views, storage, captioner) and the layout every segment follows. Kept apart from the build loop so that what a
cache *is* reads in one place."""

from __future__ import annotations

from typing import Any

from mmkd.data.batches import ImageBank
from mmkd.data.decode import jpeg_decoder
from mmkd.data.transforms import TRANSFORM_VERSION, augmentation_settings
from mmkd.models.dual_encoder import DualEncoder
from mmkd.teacher import fingerprint as fp
from mmkd.teacher.cache import synthetic
from mmkd.teacher.cache.format import DTYPES, FORMAT, FORMAT_VERSION, row_format
from mmkd.teacher.cache.spec import BuildSpec


def cache_meta(teacher: DualEncoder, spec: BuildSpec) -> dict[str, Any]:
    """meta.json of the cache ``spec`` builds with ``teacher`` (``spec.precision`` resolved: ``BuildSpec.resolved``):
    the fingerprint of everything but the data (each segment fingerprints its own shard's data) and the layout."""
    views, seed, features = spec.views, spec.seed, spec.features
    bank = ImageBank([], teacher.meta.image_size, teacher.meta.image_mean, teacher.meta.image_std, True, seed,
                     spec.augmentation)
    identity = fp.teacher_identity(teacher, spec.source)
    dim, fdims = identity["projection_dim"], identity["feature_dims"]
    arrays: dict[str, list[int]] = {"image_embeds": [views, dim], "text_embeds": [dim]}
    if features:
        arrays.update(image_features=[views, fdims["image"]], text_features=[fdims["text"]])
    extra: dict[str, Any] = {}
    if spec.captioner is not None and spec.sampling is not None:  # N synthetic captions per sample, text targets
        extra["captioner"] = synthetic.fingerprint(spec.captioner, spec.sampling, seed)
        arrays["syncap_embeds"] = [spec.sampling.n, dim]
        if features:
            arrays["syncap_features"] = [spec.sampling.n, fdims["text"]]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fingerprint": {
            "teacher": identity,
            "transform": {"image_size": teacher.meta.image_size, "image_mean": list(teacher.meta.image_mean),
                          "image_std": list(teacher.meta.image_std),
                          "augmentation": augmentation_settings(bank.train_tf.cfg), "view_seed": int(seed),
                          "version": TRANSFORM_VERSION,
                          # simplejpeg and PIL's draft() decode a JPEG to slightly different pixels
                          "decoder": jpeg_decoder().name},
            "views": int(views),
            "storage": {"dtype": spec.dtype, "features": bool(features), "precision": spec.precision},
            **extra,
        },
        "layout": {"chunk_rows": int(spec.chunk_rows), "arrays": arrays, "numpy_dtype": DTYPES[spec.dtype].str,
                   **row_format(spec.dtype)},
    }
