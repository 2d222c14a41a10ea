"""``mmkd objectives``: every registered objective with its parameters and defaults."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    o = sub.add_parser("objectives", help="list every registered objective with its parameters and defaults")
    o.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mmkd.objectives import OBJECTIVES
    from mmkd.objectives.base import objective_params

    for name in OBJECTIVES.names():
        params = objective_params(OBJECTIVES.get(name))
        print(" ".join([name, *(f"{k}={v!r}" for k, v in params.items())]))
    return 0
