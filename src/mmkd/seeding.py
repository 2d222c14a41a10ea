"""Seeded construction: a module's random initialisation as a function of (seed, what it is), never of process state.

torch seeds its global CPU generator from the OS at start-up, so anything built before the training loop seeds
it (students, objectives' learnable maps) would otherwise differ between two runs of the same config.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def derived_seed(seed: int, stream: str) -> int:
    """A 63-bit seed for one named stream: the student's and the objectives' inits never share random numbers."""
    digest = hashlib.sha256(f"{seed}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@contextmanager
def seeded(seed: int | None, stream: str) -> Iterator[None]:
    """Run the block with torch's CPU generator seeded from ``(seed, stream)``; the global state is restored after.

    seed None: use the global generator as it stands (callers that seed it themselves).
    """
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived_seed(seed, stream))
        yield
