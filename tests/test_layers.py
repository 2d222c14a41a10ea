"""The layers of shared/docs/DESIGN.md hold: errors live in ``mmkd.errors``, and no package hides an import circle."""

from __future__ import annotations

import ast
from pathlib import Path

import mmkd.config
import mmkd.errors

SRC = Path(__file__).resolve().parents[1] / "src" / "mmkd"


def test_config_error_lives_with_the_other_errors() -> None:
    # config.py re-exports it, so ``from mmkd.config import ConfigError`` keeps working for users
    assert mmkd.errors.ConfigError is mmkd.config.ConfigError
    assert issubclass(mmkd.errors.ConfigError, (mmkd.errors.MmkdError, ValueError))


def _imports_config_only_for_its_error(path: Path) -> bool:
    names = [a.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ImportFrom)
             and node.module == "mmkd.config" for a in node.names]
    return names == ["ConfigError"]


def test_no_module_imports_config_only_for_config_error() -> None:
    offenders = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if _imports_config_only_for_its_error(p)]
    assert offenders == []
