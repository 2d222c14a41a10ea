"""``mmkd recipes``: every shipped recipe, what it is for and the config keys it expands to."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    r = sub.add_parser("recipes", help="list the named recipes (recipe: NAME in a run config) and what each sets")
    r.add_argument("name", nargs="?", default=None, help="show only this recipe")
    r.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import yaml

    from mmkd.recipes import load_recipe, recipe_names

    for name in [args.name] if args.name else recipe_names():
        recipe = load_recipe(name)
        print(f"{recipe.name}: {recipe.about}")
        body = yaml.safe_dump(recipe.config, sort_keys=False, default_flow_style=None, width=110)
        print("".join(f"    {line}\n" for line in body.splitlines()))
    return 0
