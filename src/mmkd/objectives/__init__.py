"""Objectives: task and distillation losses, registered by name and composed as a weighted sum."""

from mmkd.objectives import contrastive, dr_clip, feature, logit, relational  # noqa: F401,E402  (registers them)
from mmkd.objectives.base import OBJECTIVES, Objective, ObjectiveContext, build_objectives  # noqa: F401
