"""Fingerprints of what a teacher cache depends on: the teacher's weights, the data, the transform.

A cached embedding is only a valid target if the same teacher saw the same image through the same view; these
digests let a reader prove that (or say precisely which part differs) without running or even loading the
teacher. Hashes are SHA-256 (hardware-accelerated on current CPUs), streamed from the tensors' own buffers.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from mmkd.data.records import Record
from mmkd.models.dual_encoder import DualEncoder
from mmkd.models.towers import tower_widths


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (any dtype, bfloat16 included) without a numpy dtype round trip."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def state_dict_sha256(model: torch.nn.Module) -> str:
    """Hash of every tensor's name, dtype, shape and bytes, in name order: equal iff the weights are equal."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(_tensor_bytes(t))
    return h.hexdigest()


def tokenizer_sha256(tokenizer: Any) -> str | None:
    """Hash of everything that maps text to token ids (None when there is no tokenizer).

    Fast tokenizers serialise their whole pipeline (vocabulary, normaliser, pre-tokeniser) in one Rust call (less
    the truncation/padding state the last call left);
    slow ones are identified by their vocabulary and settings.
    """
    if tokenizer is None:
        return None
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # truncation and padding are per-call state (encoding a batch sets them), not the mapping: a teacher that
        # has tokenised a batch must keep its identity, or a second build into its cache would be refused
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
        h.update(json.dumps(state, sort_keys=True, ensure_ascii=False).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
        h.update(repr(getattr(tokenizer, "do_lower_case", None)).encode())
    h.update(json.dumps(sorted(map(str, tokenizer.all_special_tokens))).encode())
    return h.hexdigest()


def teacher_identity(model: DualEncoder, source: str = "") -> dict[str, Any]:
    """Everything about the teacher a cached target depends on, and what a student needs to be built without it."""
    config = model.hf_config()
    config.pop("logit_scale_init_value", None)  # a weight, covered by the weights hash
    identity = {
        "source": source,
        "weights_sha256": state_dict_sha256(model),
        "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest(),
        "tokenizer_sha256": tokenizer_sha256(model.tokenizer),
        "projection_dim": int(model.projection_dim),
        "feature_dims": tower_widths(model),
        "logit_scale": float(model.logit_scale.detach().float().exp()),
        "meta": model.meta.to_json(),
    }
    bias = getattr(model, "logit_bias", None)
    if isinstance(bias, torch.Tensor):  # a SigLIP teacher: its sigmoid probabilities need the bias too
        identity["logit_bias"] = float(bias.detach().float())
    return identity


def record_digest(record: Record) -> str:
    """Per-sample content digest: the bytes of in-memory images, the size of image files.

    Files are identified by size, not content, so that checking a large on-disk dataset against a cache costs a
    ``stat`` per file rather than reading every image again; in-memory arrays and tar members are hashed.
    """
    ref = record.image
    if isinstance(ref, np.ndarray):
        h = hashlib.blake2b(f"{ref.shape}|{ref.dtype}".encode(), digest_size=12)
        h.update(memoryview(np.ascontiguousarray(ref)).cast("B"))
        return "array:" + h.hexdigest()
    if isinstance(ref, bytes):
        return "bytes:" + hashlib.blake2b(ref, digest_size=12).hexdigest()
    try:
        return f"file-size:{os.stat(ref).st_size}"
    except OSError:
        return "file-missing"


def record_digests(records: Sequence[Record]) -> list[str]:
    return [record_digest(r) for r in records]


def data_sha256(keys: Iterable[str], digests: Iterable[str]) -> str:
    h = hashlib.sha256()
    for k, d in zip(keys, digests):
        h.update(f"{k}\t{d}\n".encode())
    return h.hexdigest()


def captions_sha256(captions: Iterable[str]) -> str:
    h = hashlib.sha256()
    for c in captions:
        h.update(c.encode())
        h.update(b"\0")
    return h.hexdigest()


def diff(a: Any, b: Any, path: str = "", names: tuple[str, str] = ("expected", "found")) -> list[str]:
    """Dotted paths where two JSON-like values differ, each with both values labelled by ``names``."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            where = f"{path}.{k}" if path else str(k)
            if k not in a or k not in b:
                out.append(f"{where}: only in {names[0] if k in a else names[1]}")
            else:
                out += diff(a[k], b[k], where, names)
        return out
    if _plain(a) != _plain(b):
        return [f"{path}: {names[0]} {short(a)}, {names[1]} {short(b)}"]
    return []


def _plain(v: Any) -> Any:
    """JSON round trip: tuples and lists compare equal, as they do once written to meta.json."""
    return json.loads(json.dumps(v))


def short(v: Any) -> str:
    s = json.dumps(v) if not isinstance(v, str) else repr(v)
    return s if len(s) <= 80 else s[:77] + "..."
