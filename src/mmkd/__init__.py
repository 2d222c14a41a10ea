"""mmkd: multimodal knowledge distillation for CLIP-style dual encoders.

The Python API (README, "Python API"): ``mmkd.load``, ``mmkd.create_student``, ``mmkd.distill``,
``mmkd.evaluate``, ``mmkd.list_objectives``. Importing mmkd loads neither torch nor transformers.
"""

from __future__ import annotations

from mmkd.api import create_student, distill, evaluate, list_objectives, load

__version__ = "0.1.0"

__all__ = ["__version__", "create_student", "distill", "evaluate", "list_objectives", "load"]
