"""Named recipes (``recipe: NAME`` in a run config): a published method's objectives and data/student settings.

A recipe is a partial run config shipped as ``assets/recipes/NAME.yaml`` (``about``: one line; ``config``: the
keys it sets). It is the base under the user's config: every key the user writes wins (mappings merge key by
key; lists such as ``objectives`` and plain values are replaced whole), as student presets are refined.
It sits below ``mmkd.config``, which expands it before anything is parsed, so it raises its own error type.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mmkd.errors import MmkdError

FOLDER = Path(__file__).parent / "assets" / "recipes"


class RecipeError(MmkdError, ValueError):
    """An unknown recipe, or a recipe key of the wrong shape: the message names it and the valid recipes."""


@dataclass(frozen=True)
class Recipe:
    name: str
    about: str
    config: dict[str, Any]


def recipe_names() -> list[str]:
    return sorted(p.stem for p in FOLDER.glob("*.yaml"))


def load_recipe(name: str) -> Recipe:
    """The shipped recipe ``name``; an unknown one names the valid ones."""
    path = FOLDER / f"{name}.yaml"
    if name not in recipe_names():
        raise RecipeError(f"recipe: unknown recipe {name!r}; valid: {', '.join(recipe_names())} "
                          "(`mmkd recipes` shows what each sets)")
    data = yaml.safe_load(path.read_text()) or {}
    return Recipe(name, str(data.get("about", "")), dict(data.get("config") or {}))


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: mappings merge key by key, anything else in ``over`` replaces ``base``'s."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def expand_recipe(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with its ``recipe`` key replaced by the recipe's keys, the config's own keys winning."""
    if "recipe" not in data:
        return data
    rest = {k: v for k, v in data.items() if k != "recipe"}
    name = data["recipe"]
    if name is None or name == "":  # `recipe: null` (e.g. an override switching it off): no recipe
        return rest
    if not isinstance(name, str):
        raise RecipeError(f"recipe: expected a recipe name, got {name!r}; valid: {', '.join(recipe_names())}")
    return merge(load_recipe(name).config, rest)
