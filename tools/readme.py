"""``make readme``: regenerate the results blocks of README.md and docs/*.md from the runs' JSON.

    python tools/readme.py [--root .] [--page FILE …] [--section NAME …]

A repository tool, not part of the installed package: it reads ``runs/…`` and ``bench/results/…`` under the
project root and rewrites every ``<!-- results:NAME -->`` … ``<!-- /results:NAME -->`` block of the pages
(default: README.md and docs/*.md under the root), whichever page holds it. Exit 2 with one line on a bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # readme_sections beside this file, however it is run

from mmkd.errors import MmkdError  # noqa: E402
from readme_sections import update_pages  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/readme.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=".", help="project root the JSON paths and default pages are under (default .)")
    p.add_argument("--page", action="append", default=[], metavar="FILE",
                   help="a file whose blocks to rewrite (repeatable). Default: README.md and docs/*.md under --root")
    p.add_argument("--section", action="append", default=[], metavar="NAME",
                   help="only this section (repeatable; its JSON must exist). Default: every marked one, "
                        "keeping as they are those whose JSON has not been made here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    root = Path(args.root)
    pages = [Path(p) for p in args.page] or [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    kept = None if args.section else print
    try:
        done = update_pages(pages, root, args.section or None, kept=kept)
    except MmkdError as e:
        print(f"tools/readme.py: error: {e}", file=sys.stderr)
        return 2
    for page, names in done.items():
        if names:
            print(f"{page}: regenerated {', '.join(names)}")
    if not any(done.values()):
        print(f"{', '.join(map(str, pages))}: regenerated no section")
    return 0


if __name__ == "__main__":
    sys.exit(main())
