"""mmkd: multimodal knowledge distillation for CLIP-style dual encoders.

The Python API (README, "Python API"): ``mmkd.load``, ``mmkd.create_student``, ``mmkd.distill``,
``mmkd.evaluate``; extending mmkd (README, "Extending mmkd"): ``mmkd.register_objective``, ``register_format``,
``register_tower`` and ``list_objectives``, ``list_formats``, ``list_towers``. Importing mmkd loads neither torch
nor transformers: ``mmkd.Objective``, ``ObjectiveContext`` and ``Record`` (what a plugin subclasses or returns)
are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mmkd.api import EvalResults, RunMetrics, create_student, distill, evaluate, load
from mmkd.plugins import (
    FormatInfo,
    ObjectiveInfo,
    TowerInfo,
    list_formats,
    list_objectives,
    list_towers,
    register_format,
    register_objective,
    register_tower,
)

if TYPE_CHECKING:
    from mmkd.data.records import Record
    from mmkd.objectives.base import Objective, ObjectiveContext

__version__ = "0.1.0"

# name -> module: the classes a plugin builds on, imported when first asked for (they pull in torch)
_LAZY = {"Objective": "mmkd.objectives.base", "ObjectiveContext": "mmkd.objectives.base",
         "Record": "mmkd.data.records"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mmkd' has no attribute {name!r}")


__all__ = ["EvalResults", "FormatInfo", "Objective", "ObjectiveContext", "ObjectiveInfo", "Record", "RunMetrics",
           "TowerInfo", "__version__", "create_student", "distill", "evaluate", "list_formats", "list_objectives",
           "list_towers", "load", "register_format", "register_objective", "register_tower"]
