"""Frozen sentence features (mean-pooled MiniLM by default), computed once per distinct caption.

The student's text side and the hard-negative miner both use them; neither ever trains the encoder, so
every caption is encoded once per process (and once ever, with a cache file) instead of once per step.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from mmkd.fileio import atomic_write
from mmkd.models.hub import MINILM

DEFAULT_TEXT_ENCODER = MINILM  # all-MiniLM-L6-v2 from its installed package (models.hub.PACKAGED_MODELS)


class TextEncoder:
    """Mean-pooled, L2-normalised sentence embeddings from a Hugging Face text model folder."""

    def __init__(self, path: str = DEFAULT_TEXT_ENCODER, cache_file: str | Path | None = None,
                 batch_size: int = 256, max_length: int = 64) -> None:
        from transformers import AutoModel

        from mmkd.models.hub import load_tokenizer, resolve

        self.path = str(resolve(path))  # a folder, package:NAME or a hub id
        self.tokenizer = load_tokenizer(self.path)
        self.model = AutoModel.from_pretrained(self.path).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.dim = int(self.model.config.hidden_size)
        self.batch_size, self.max_length = batch_size, max_length
        self.cache_file = Path(cache_file) if cache_file else None
        self._memo: dict[str, np.ndarray] = {}
        self._loaded_from_disk = 0
        if self.cache_file is not None and self.cache_file.is_file():
            self._load_cache()

    @property
    def fingerprint(self) -> str:
        return hashlib.sha1(os.path.abspath(self.path).encode()).hexdigest()[:10]

    def _load_cache(self) -> None:
        try:
            with np.load(self.cache_file, allow_pickle=False) as z:
                if str(z["model"]) != self.fingerprint or z["emb"].shape[1:] != (self.dim,):
                    return
                self._memo.update(zip(z["texts"].tolist(), z["emb"]))
                self._loaded_from_disk = len(self._memo)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # unreadable: it only costs recomputation
            self._memo.clear()

    def save_cache(self) -> None:
        if self.cache_file is None or len(self._memo) == self._loaded_from_disk:
            return
        texts = list(self._memo)
        atomic_write(self.cache_file, lambda f: np.savez(f, model=np.array(self.fingerprint),
                                                         texts=np.array(texts, dtype=str),
                                                         emb=np.stack([self._memo[t] for t in texts])))
        self._loaded_from_disk = len(self._memo)

    @torch.inference_mode()
    def _encode(self, texts: list[str]) -> np.ndarray:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        hidden = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return torch.nn.functional.normalize(pooled.float(), dim=-1).numpy()

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), dim] float32, each distinct text encoded once per encoder (and cache file)."""
        todo = sorted({t for t in texts if t not in self._memo}, key=len)  # similar lengths: short padding
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            self._memo.update(zip(chunk, self._encode(chunk)))
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([self._memo[t] for t in texts]).astype(np.float32)
