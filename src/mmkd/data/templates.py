"""Zero-shot prompt templates: CLIP_benchmark's per-dataset ensembles, kept as editable data files.

The files live in ``mmkd/assets/templates/<name>.txt``, one template per line with ``{c}`` (or ``{}``) where
the class name goes; blank lines and lines starting with ``#`` are ignored. Which ensemble a data spec gets
follows its format (CIFAR-10/100: CLIP's 18, STL-10: 2, anything else: the 80 ImageNet ones, the
general-purpose ensemble), and a user's own file replaces it (``--templates FILE``).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from mmkd.errors import UsageError

# data format -> built-in ensemble; formats not listed get DEFAULT_TEMPLATES.
FORMAT_TEMPLATES = {"cifar10": "cifar10", "cifar100": "cifar100", "stl10": "stl10"}
DEFAULT_TEMPLATES = "imagenet"


def builtin_template_names() -> list[str]:
    folder = resources.files("mmkd") / "assets" / "templates"
    return sorted(p.name[:-4] for p in folder.iterdir() if p.name.endswith(".txt"))


def parse_templates(text: str, where: str) -> list[str]:
    """Templates from file text; each must hold exactly one class-name slot (``{c}`` or ``{}``)."""
    out: list[str] = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        slots = line.count("{c}") + line.count("{}")
        if slots != 1 or line.count("{") != 1:
            raise UsageError(f"{where}:{n}: template {line!r} must contain the class-name slot {{c}} (or {{}}) "
                             "exactly once and no other braces")
        out.append(line)
    if not out:
        raise UsageError(f"{where}: no templates (one per line, e.g. 'a photo of a {{c}}.')")
    return out


def load_templates(name_or_path: str | Path) -> list[str]:
    """A built-in ensemble by name (``cifar10``, ``cifar100``, ``stl10``, ``imagenet``) or a template file."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return parse_templates(path.read_text(encoding="utf-8"), str(path))
    name = str(name_or_path)
    builtin = resources.files("mmkd") / "assets" / "templates" / f"{name}.txt"
    if "/" not in name and builtin.is_file():
        return parse_templates(builtin.read_text(encoding="utf-8"), f"mmkd/assets/templates/{name}.txt")
    raise UsageError(f"templates {name!r}: no such file and not a built-in ensemble "
                     f"(built-in: {', '.join(builtin_template_names())})")


def templates_for_format(fmt: str) -> list[str]:
    """The CLIP_benchmark ensemble for a data format (see FORMAT_TEMPLATES), ImageNet's 80 otherwise."""
    return load_templates(FORMAT_TEMPLATES.get(fmt, DEFAULT_TEMPLATES))
