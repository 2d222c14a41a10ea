"""``mmkd objectives``: every registered objective with its parameters and defaults (a plugin's too)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    o = sub.add_parser("objectives", help="list every registered objective with its parameters and defaults")
    o.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import this module first (as a config's plugins: does), to list the objectives it registers")
    o.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mmkd.plugin_modules import import_plugins
    from mmkd.plugins import list_objectives

    import_plugins(args.plugin, key="--plugin")
    for name, info in list_objectives().items():
        print(" ".join([name, *(f"{k}={v!r}" for k, v in info["params"].items())]))
    return 0
