"""Optional speed/memory trades for the student's towers: gradient checkpointing (HF towers) and torch.compile.

Both act on the towers in place, so parameter names (checkpoints, saved students, DDP) stay what they were.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from mmkd.errors import MmkdError


class AccelerationError(MmkdError, ValueError):
    """A ``train.compile`` or ``train.grad_checkpointing`` request this student or machine cannot honour."""


def _trainable_towers(student: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The student's towers that train (a frozen tower keeps no activations for a backward to recompute)."""
    for name in ("vision_model", "text_model"):
        tower = getattr(student, name, None)
        if tower is not None and any(p.requires_grad for p in tower.parameters()):
            yield name, tower


def enable_grad_checkpointing(student: nn.Module) -> list[str]:
    """Turn on Hugging Face gradient checkpointing in every trainable tower; the names of the towers changed.

    A tower that cannot recompute its activations is refused by name rather than left using full memory."""
    done = []
    for name, tower in _trainable_towers(student):
        new = getattr(tower, "activation_checkpointing_enable", None)  # transformers ≥ 5's name
        old = getattr(tower, "gradient_checkpointing_enable", None)
        if not getattr(tower, "supports_gradient_checkpointing", False) or (new is None and old is None):
            raise AccelerationError(f"train.grad_checkpointing: the student's {name} ({type(tower).__name__}) does "
                                    "not support gradient checkpointing; set train.grad_checkpointing: false")
        # non-reentrant: the recomputation needs no input that requires grad (pixels do not)
        kwargs = {"use_reentrant": False}
        if new is not None:
            new(activation_checkpointing_kwargs=kwargs)
        else:
            old(gradient_checkpointing_kwargs=kwargs)
        done.append(name)
    return done


def compile_towers(student: nn.Module, **options: Any) -> list[str]:
    """``torch.compile`` each trainable tower in place (``nn.Module.compile``: the state-dict keys do not change).

    Compilation happens lazily, at the first forward; ``compile_failure`` turns its failure into one line."""
    done = []
    for name, tower in _trainable_towers(student):
        tower.compile(**options)
        done.append(name)
    return done


@contextmanager
def compile_failure(enabled: bool) -> Iterator[None]:
    """Around the first step of a compiled run: a compiler failure (no C compiler, an unsupported op) becomes one
    line naming ``train.compile`` instead of a traceback through torch's internals."""
    if not enabled:
        yield
        return
    from torch._dynamo.exc import TorchDynamoException

    try:
        yield
    except TorchDynamoException as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise AccelerationError(f"train.compile: torch.compile failed on this machine ({type(e).__name__}: {first}); "
                                "set train.compile: false") from None

