"""Tiny real runs for process-level tests: pretrained tower folders, a JSONL data set, run configs (the
teacher is conftest's ``tiny_teacher_dir``), and the ``mmkd`` command run in a real subprocess (so nothing in
this process's state can help it)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from mmkd.models.hub import load_tokenizer
from mmkd.models.towers import build_tower

VISION = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
              intermediate_size=64)
BERT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64)


def save_pretrained_towers(folder: Path, tok_path: str) -> tuple[Path, Path]:
    """A vision and a text tower saved as Hugging Face models (the text one with its tokenizer), as a hub gives."""
    torch.manual_seed(1)
    tok = load_tokenizer(tok_path)
    vision, text = folder / "vision", folder / "text"
    build_tower("clip_vision", VISION).save_pretrained(str(vision))
    build_tower("bert", dict(BERT, vocab_size=len(tok))).save_pretrained(str(text))
    tok.save_pretrained(str(text))
    return vision, text


def write_pairs(folder: Path, n: int = 24, seed: int = 0) -> Path:
    """``n`` random 40×48 images with two captions each, as a JSONL file (non-square: augmented crops differ)."""
    rng = np.random.default_rng(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)).save(folder / "img" / f"s{i:03d}.png")
        lines.append(json.dumps({"image": f"img/s{i:03d}.png", "captions": [f"a shape number {i}", f"thing {i % 5}"],
                                 "key": f"s{i:03d}"}))
    path = folder / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def student(kind: str, towers: tuple[Path, Path] | None = None) -> dict[str, Any]:
    """The student section for each way of making one: new towers, pretrained (hub-style) towers, or the teacher's
    towers shrunk. Width 16 ≠ the teacher's 24, so projections are always drawn at random."""
    if kind == "new":
        return {"vision": {"source": "new", "arch": "clip_vision", "config": VISION},
                "text": {"source": "new", "arch": "bert", "config": BERT}, "projection_dim": 16}
    if kind == "pretrained":
        assert towers is not None
        return {"vision": {"source": str(towers[0])}, "text": {"source": str(towers[1])}, "projection_dim": 16}
    if kind == "shrunk":
        return {"vision": {"source": "teacher", "keep_layers": [0]}, "text": {"source": "teacher", "keep_layers": [0]},
                "projection_dim": 16}
    raise ValueError(kind)


def run_config(path: Path, teacher: str, pairs: Path, out: Path, student_section: dict[str, Any],
               **train: Any) -> Path:
    """A distill config: clip plus an embedding-level feature term (a learnable 16 → 24 map), augmented views."""
    cfg = {
        "teacher": teacher, "out": str(out), "cache_dir": str(path.parent / "data-cache"),
        "student": student_section,
        "data": {"train": f"jsonl:{pairs}", "batch_size": 8, "augment": True, "views": 2},
        "objectives": [{"name": "clip"}, {"name": "fd_mse", "weight": 2.0}],
        "train": {"steps": 3, "lr": 3e-3, "warmup_steps": 1, "log_every": 1, "ckpt_every": 0, "threads": 1, **train},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def env() -> dict[str, str]:
    """The subprocess sees this checkout's code, one thread, no network."""
    e = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    e["PYTHONPATH"] = src + os.pathsep + e.get("PYTHONPATH", "")
    e.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return e


def mmkd(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``mmkd ARGS`` to completion in a fresh process."""
    return subprocess.run([sys.executable, "-m", "mmkd.cli", *args], env=env(), capture_output=True, text=True,
                          timeout=timeout)


def mmkd_ok(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    done = mmkd(*args, timeout=timeout)
    assert done.returncode == 0, f"mmkd {' '.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done


def start(*args: str, log: Path) -> subprocess.Popen[bytes]:
    """Start ``mmkd ARGS`` in the background, its output going to ``log`` (never a pipe nobody reads)."""
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "mmkd.cli", *args], env=env(), stdout=f,
                                stderr=subprocess.STDOUT)


def kill_when(proc: subprocess.Popen[bytes], ready: Callable[[], bool], what: str, deadline_s: float = 120,
              poll_s: float = 0.0) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` holds; fails if it exits first or the deadline passes."""
    end = time.monotonic() + deadline_s
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the process exited ({proc.returncode}) before {what}")
        if time.monotonic() > end:
            proc.kill()
            proc.wait()
            raise AssertionError(f"no {what} within {deadline_s} s")
        if poll_s:
            time.sleep(poll_s)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


def signal_after_first_checkpoint(cfg: Path, folder: Path, sig: int, default_sigint: bool = False,
                                  deadline_s: float = 300) -> tuple[int, str]:
    """Start a real ``mmkd distill CFG``, send ``sig`` once ``folder`` (its checkpoints) holds one, and return its
    exit code and stderr. default_sigint: give the child SIGINT's default disposition, as a terminal's foreground
    process has (a shell's background job, such as a suite started with ``&``, inherits SIGINT ignored)."""
    env = {k: v for k, v in os.environ.items() if k != "MMKD_DEBUG"}
    proc = subprocess.Popen([sys.executable, "-m", "mmkd.cli", "distill", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) if default_sigint
                            else None)
    deadline = time.monotonic() + deadline_s
    try:
        while not (folder / "latest").is_file():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, f"no checkpoint within {deadline_s:.0f} s"
            time.sleep(0.1)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    """Bit-identical tensors (same ops, same order, same CPU: anything else is a real difference)."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert differ == [], f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def losses(run: Path) -> list[dict[str, float]]:
    """Every logged step's loss terms (times left out: they are the only thing allowed to differ)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k not in ("time_s", "cpu_s")} for r in rows if "loss" in r]


# a fresh tiny student (a 1-layer ViT and BERT, 16-d projections), as a config's YAML `student:` section
NEW_STUDENT_YAML = """
student:
  vision: {source: new, arch: clip_vision, config: {image_size: 32, patch_size: 8, hidden_size: 32,
           num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 64}}
  text: {source: new, arch: bert, config: {hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2,
         intermediate_size: 64, max_position_embeddings: 64}}
  projection_dim: 16
"""


def bench_script(name: str) -> Any:
    """A script of bench/ as a module (registered first: its dataclasses look their module up while building)."""
    import importlib.util

    if name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]
