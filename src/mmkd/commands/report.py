"""``mmkd report RUN ... [--out FILE]``: an HTML page (+ Markdown) comparing the models of one or more runs."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    r = sub.add_parser("report", help="an HTML page (+ Markdown) comparing the models of one or more runs")
    r.add_argument("runs", nargs="+", help="run folders holding metrics.json (mmkd demo, eval all, distill)")
    r.add_argument("--out", default="report.html", help="HTML file to write (default report.html)")
    r.add_argument("--md", default=None, help="Markdown file (default: the HTML path with .md); PNGs go beside it")
    r.add_argument("--no-md", action="store_true", help="write the HTML page only")
    r.add_argument("--title", default="mmkd report", help="page title")
    r.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mmkd.report.page import write_report

    out = Path(args.out)
    md = None if args.no_md else Path(args.md) if args.md else out.with_suffix(".md")
    report = write_report(args.runs, out, md, args.title)
    print(f"report: {out} ({len(report.figures)} figures, {len(report.tables)} tables)"
          + (f"; markdown: {md}" if md else ""))
    return 0
