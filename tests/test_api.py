"""The public API: the README's example runs as written, and ``import mmkd`` stays light."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_dual_encoder

import mmkd
from mmkd.models.hub import save_dual_encoder

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture
def tiny_model(minilm_path: str):
    return lambda: tiny_dual_encoder(minilm_path, layers=2)


def readme_example() -> str:
    block = re.search(r"<!-- api-example -->\n```python\n(.*?)```\n<!-- /api-example -->", README.read_text(), re.S)
    assert block, "README.md lost its <!-- api-example --> block"
    return block.group(1)


@pytest.mark.slow
def test_readme_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model,
                             capsys: pytest.CaptureFixture[str]) -> None:
    save_dual_encoder(tiny_model(), tmp_path / "runs" / "demo" / "teacher")  # where `make demo` puts it
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_example(), "README.md:api-example", "exec"), namespace)  # noqa: S102 - our own README
    out = capsys.readouterr().out
    assert "student parameters" in out and "'uses_teacher': True" in out
    assert namespace["metrics"]["train"]["steps"] == 20
    assert (tmp_path / "runs" / "api-example" / "student" / "config.json").is_file()
    assert namespace["distilled"].projection_dim == namespace["teacher"].projection_dim
    direct = mmkd.evaluate("runs/api-example/student", {"kind": "zeroshot", "data": "world:test",
                                                       "class_set": "shape", "limit": 200})
    assert direct == {"zeroshot:world:test:shape": namespace["scores"]["zeroshot:world:test:shape"]}


def test_api_names_and_light_import() -> None:
    assert {"load", "create_student", "distill", "evaluate", "list_objectives"} <= set(mmkd.__all__)
    code = "import sys, mmkd; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_create_student_takes_presets_dicts_and_refuses_nonsense(tiny_model) -> None:
    teacher = tiny_model()
    a = mmkd.create_student(teacher, "half-depth-locked-text")
    assert not any(p.requires_grad for p in a.text_model.parameters())
    b = mmkd.create_student(teacher, {"preset": "half-depth", "freeze": []})
    assert all(p.requires_grad for p in b.parameters())
    from mmkd.config import ConfigError

    with pytest.raises(ConfigError, match="unknown preset 'quarter'"):
        mmkd.create_student(teacher, "quarter")
