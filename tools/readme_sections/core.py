"""``make readme``: regenerate the results sections of README.md and docs/*.md from the runs' JSON, so their
numbers cannot go stale. A repository tool (run by ``tools/readme.py``), not part of the installed package.

A section is a marked block ``<!-- results:NAME -->`` … ``<!-- /results:NAME -->``; everything between the two
markers is replaced by what the renderer registered as NAME returns, and nothing outside them is touched.
A renderer reads its JSON under the project root (e.g. ``runs/demo/metrics.json``); a study or a sweep adds
its leaderboard by registering one more renderer. A section whose JSON has not been made on this machine yet
keeps its block as it is (and says so), so one run's results can be filled in without every other run.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmkd.errors import MmkdError
from mmkd.registry import Registry

Renderer = Callable[[Path], str]
SECTIONS: Registry[Renderer] = Registry("README results section")

_BLOCK = re.compile(r"(<!-- results:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S)


class ReadmeError(MmkdError, ValueError):
    """A README section that cannot be regenerated: the message names the section and the file it needs."""


class ResultsMissing(ReadmeError):
    """A section's JSON is not there (its run has not been made here): the block can stay as it is."""


def read_json(path: Path, section: str, how: str) -> Any:
    """A renderer's JSON input; a missing or broken file is a ReadmeError naming the section and what to run."""
    if not path.is_file():
        raise ResultsMissing(f"results:{section}: {path} not found; {how}")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ReadmeError(f"results:{section}: {path} is not valid JSON ({e}); {how}") from None


def update_readme(readme: str | Path, root: str | Path = ".", only: list[str] | None = None,
                  kept: Callable[[str], None] | None = None) -> list[str]:
    """Rewrite the marked sections of ``readme`` (all, or those named in ``only``) in place; returns their names.

    With ``kept``, a section whose JSON is missing keeps its block unchanged and ``kept`` gets the one-line
    reason; without it, that is a ResultsMissing error and nothing is written. A broken JSON is always an error.
    The file is written atomically and only if a section changed, so a second run is a no-op.
    """
    return update_pages([readme], root, only, kept)[Path(readme)]


def update_pages(pages: list[str | Path] | list[Path], root: str | Path = ".", only: list[str] | None = None,
                 kept: Callable[[str], None] | None = None) -> dict[Path, list[str]]:
    """``update_readme`` over several pages (README.md and docs/*.md): each block is rewritten in the page that
    holds it, and a block name may be in one page only. Every page is rendered before any is written, so an
    error leaves them all as they were. Returns each page's regenerated sections."""
    from mmkd.fileio import atomic_write_text

    root = Path(root)
    texts = {Path(page): Path(page).read_text() for page in pages}
    where: dict[str, Path] = {}
    for path, text in texts.items():
        found = [m.group("name") for m in _BLOCK.finditer(text)]
        unknown = sorted(set(found) - set(SECTIONS.names()))
        if unknown:
            raise ReadmeError(f"{path}: no renderer for section(s) {unknown}; "
                              f"registered: {', '.join(SECTIONS.names())}")
        for name in found:
            if name in where:
                raise ReadmeError(f"{path}: block results:{name} is also in {where[name]}; keep one of them")
            where[name] = path
    missing = sorted(set(only or []) - set(where))
    if missing:
        paths = [str(p) for p in texts]
        names = paths[0] if len(paths) == 1 else f"{paths[0]} and {len(paths) - 1} other page(s)"
        raise ReadmeError(f"{names}: no <!-- results:NAME --> … <!-- /results:NAME --> block for {missing}")
    rendered = {path: _render(text, root, only, kept) for path, text in texts.items()}
    for path, (new, _) in rendered.items():
        if new != texts[path]:
            atomic_write_text(path, new)
    return {path: done for path, (_, done) in rendered.items()}


def _render(text: str, root: Path, only: list[str] | None,
            kept: Callable[[str], None] | None) -> tuple[str, list[str]]:
    """One page's text with its (selected) blocks rendered, and the names of those regenerated."""
    done: list[str] = []

    def render(m: re.Match[str]) -> str:
        name = m.group("name")
        if only and name not in only:
            return m.group(0)
        try:
            body = SECTIONS.get(name)(root).strip("\n")
        except ResultsMissing as e:
            if kept is None:
                raise
            kept(f"{e}; its block is kept as it is")
            return m.group(0)
        except (KeyError, IndexError, TypeError) as e:  # JSON of an older or other shape than the renderer's
            raise ReadmeError(f"results:{name}: its JSON lacks or mistypes {e}; rerun what writes it (see the "
                              "section's command in the docs), then `make readme` again") from None
        done.append(name)
        return f"{m.group(1)}{body}\n{m.group(4)}"

    return _BLOCK.sub(render, text), done
