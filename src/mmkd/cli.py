"""The ``mmkd`` command: one entry point, one subcommand per job (``mmkd.commands``), failures as one line."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from mmkd.commands.errors import run_command

# every subcommand, in the order ``mmkd --help`` lists them: each module exposes ``add_parser(subparsers)``,
# which registers its options with ``set_defaults(func=run)``; a study package adds its own module here
COMMAND_MODULES = (
    "mmkd.commands.demo",
    "mmkd.commands.distill",
    "mmkd.commands.sweep",
    "mmkd.commands.objectives",
    "mmkd.commands.recipes",
    "mmkd.commands.cache",
    "mmkd.commands.eval",
    "mmkd.commands.export",
    "mmkd.commands.report",
    "mmkd.studies.matching.cli",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmkd", description="Multimodal knowledge distillation for CLIP-style models.")
    p.add_argument("--plugin", dest="cli_plugins", action="append", default=[], metavar="MODULE",
                   help="import this module before the command (repeatable): a plugin registering the objectives, "
                        "formats or towers a model or config names, e.g. mmkd --plugin my_pkg.towers eval …")
    sub = p.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options (argparse gives a nargs='*' positional only one chance)
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
