"""The layers of shared/docs/DESIGN.md hold: errors live in ``mmkd.errors``, and no package hides an import circle."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


ROOT = SRC.parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(src: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run([str(LINT), "--no-cache", str(ROOT / "pyproject.toml")], capture_output=True, text=True,
                          env=env, cwd=src)


@pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (pip install -e '.[dev]')")
def test_every_import_contract_is_kept() -> None:
    out = _lint(SRC.parent)
    assert out.returncode == 0, out.stdout[-3000:]
    assert "acyclic_siblings" in (ROOT / "pyproject.toml").read_text()


@pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (pip install -e '.[dev]')")
@pytest.mark.parametrize(("module", "back"), [("data/loader.py", "mmkd.data.batches"),
                                              ("models/siglip.py", "mmkd.models.hub"),
                                              ("report/collect.py", "mmkd.report.demo_report")])
def test_a_circle_inside_a_package_fails_the_contracts(tmp_path: Path, module: str, back: str) -> None:
    # the circles of issue 22, put back as imports inside a function, where they used to hide
    shutil.copytree(SRC, tmp_path / "mmkd", ignore=shutil.ignore_patterns("__pycache__"))
    with open(tmp_path / "mmkd" / module, "a") as f:
        f.write(f"\n\ndef _circle() -> None:\n    import {back}  # noqa: F401\n")
    out = _lint(tmp_path)
    package = back.rsplit(".", 1)[0]
    assert out.returncode != 0 and f"No cycles are allowed in {package}" in out.stdout, out.stdout[-3000:]


def test_one_helper_where_two_did_the_same_and_no_dead_code() -> None:
    import mmkd.data.batches
    import mmkd.data.resolve
    import mmkd.data.transforms
    import mmkd.models.hub
    import mmkd.models.student
    import mmkd.train.loop
    from mmkd.data.records import DataError
    from mmkd.data.resolve import split_options

    assert split_options("cifar10:x", "test") == {"split": "test"} and split_options("jsonl:x", "test") == {}
    with pytest.raises(DataError, match=r"split 'test' given, but only cifar10, cifar100, stl10 have splits"):
        split_options("jsonl:x", "test", strict=True)  # a run's eval: naming a split the format lacks
    assert mmkd.train.loop.first_nonfinite is mmkd.models.hub.first_nonfinite  # the loop and the loader agree
    gone = [(mmkd.data.batches, "BatchPlan"), (mmkd.data.resolve, "spec_options"),
            (mmkd.data.transforms, "resize_shorter"), (mmkd.data.transforms, "center_crop"),
            (mmkd.models.student, "tower_widths")]
    assert [name for module, name in gone if hasattr(module, name)] == []
