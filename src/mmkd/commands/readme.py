"""``mmkd readme``: regenerate the README's results sections from the runs' JSON."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    rd = sub.add_parser("readme", help="regenerate the README's results sections from the runs' JSON")
    rd.add_argument("--readme", default="README.md", help="the file whose <!-- results:NAME --> blocks to rewrite")
    rd.add_argument("--root", default=".", help="project root the JSON paths are read under (default .)")
    rd.add_argument("--section", action="append", default=[], metavar="NAME",
                    help="only this section (repeatable; its JSON must exist). Default: every marked one, "
                         "keeping as they are those whose JSON has not been made here")
    rd.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import mmkd.report.families  # noqa: F401  (registers the student-families section)
    import mmkd.report.reinforce  # noqa: F401  (registers the dataset-reinforcement section)
    import mmkd.studies.matching.report  # noqa: F401  (registers the matching study's README sections)
    from mmkd.report.readme import update_readme

    kept = None if args.section else print
    done = update_readme(args.readme, args.root, args.section or None, kept=kept)
    print(f"{args.readme}: regenerated {', '.join(done) or 'no section'}")
    return 0
