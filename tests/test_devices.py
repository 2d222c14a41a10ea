"""The device plane: ``train.device``/``--device`` resolution and errors, the process-group backend and autocast
following the tensors' device (not ``torch.cuda.is_available()``), ``train.precision`` (fp16 with a grad scaler,
``train.bf16`` as its alias), ``train.compile``, gradient checkpointing, and bench/gpu_check.py's CPU smoke path.
CUDA-only checks skip with a reason here."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import tiny_dual_encoder, write_run_config

from mmkd.cli import main
from mmkd.config import ConfigError, ObjectiveSpec, TrainConfig, config_from_dict
from mmkd.data import world
from mmkd.data.batches import ImageBank, TrainData
from mmkd.devices import DeviceError, autocast, grad_scaler, resolve_device
from mmkd.models.dual_encoder import CLIP_MEAN, CLIP_STD
from mmkd.objectives import ObjectiveContext, build_objectives
from mmkd.train.acceleration import AccelerationError, enable_grad_checkpointing
from mmkd.train.checkpoint import read_checkpoint
from mmkd.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def data() -> TrainData:
    bank = ImageBank(world.to_records(world.generate(16, seed=0)), 32, CLIP_MEAN, CLIP_STD)
    return TrainData(bank, None, batch_size=8, unpaired_batch_size=0, world=1, seed=0)


def _train(minilm_path: str, data: TrainData, out: Path, student: Any = None, **cfg: Any) -> tuple[Any, Any]:
    """A few steps of a tiny student under clip alone (no teacher); returns (student, result)."""
    student = student if student is not None else tiny_dual_encoder(minilm_path, dim=16, seed=0, dropout=False)
    objectives = build_objectives([ObjectiveSpec(name="clip")], ObjectiveContext(16, None), seed=0)
    settings = {"steps": 2, "lr": 1e-3, "warmup_steps": 1, "log_every": 1, "ckpt_every": 0, "device": "cpu", **cfg}
    return student, train(student, objectives, data, None, TrainConfig(**settings), out, progress=False)


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("overrides, names", [
    (["train.device=gpu"], ["train.device", "auto, cpu, cuda, cuda:N"]),
    (["train.device=cpu:0"], ["train.device"]),
    (["train.device=cuda:x"], ["train.device"]),
    (["train.precision=fp8"], ["train.precision", "fp32, bf16, fp16"]),
    (["train.bf16=true", "train.precision=fp16"], ["train.bf16", "train.precision"]),
    (["train.bf16=false", "train.precision=bf16"], ["train.bf16", "train.precision"]),
    (["train.compile=yes please"], ["train.compile"]),
])
def test_bad_device_settings_name_the_key(overrides: list[str], names: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict({}, overrides)
    assert "\n" not in str(e.value)
    for name in names:
        assert name in str(e.value)


def test_bf16_is_an_alias_of_precision() -> None:
    assert config_from_dict({}, ["train.bf16=true"]).train.precision == "bf16"
    assert config_from_dict({}, ["train.bf16=false"]).train.precision == "fp32"
    assert config_from_dict({}, ["train.bf16=true", "train.precision=bf16"]).train.precision == "bf16"
    t = config_from_dict({}).train
    assert (t.precision, t.device, t.compile, t.grad_checkpointing) == ("fp32", "auto", False, False)


@pytest.mark.skipif(not NO_CUDA, reason="checks the CPU-only answer; this machine has CUDA")
def test_auto_is_the_cpu_without_cuda() -> None:
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(DeviceError, match=r"^train\.device: 'cuda:1' asks for a GPU.*no CUDA device"):
        resolve_device("cuda:1")


def test_distill_on_a_missing_gpu_fails_in_one_line(tmp_path: Path, tiny_teacher_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = write_run_config(tmp_path, tiny_teacher_dir)
    assert main(["distill", str(cfg), "train.device=cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.device" in err and "no CUDA device" in err
    assert not (tmp_path / "run").exists()  # nothing was started


# ------------------------------------------------------------------------------------------------ backend


def test_backend_follows_the_tensors_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU run on a GPU machine must use gloo (nccl refuses CPU tensors); before, nccl was chosen whenever CUDA
    existed."""
    import torch.distributed as tdist

    from mmkd import dist

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dist.backend_for("cpu") == "gloo" and dist.backend_for(torch.device("cuda", 0)) == "nccl"
    chosen: list[str] = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(tdist, "is_initialized", lambda: False)
    monkeypatch.setattr(tdist, "init_process_group", lambda backend: chosen.append(backend))
    monkeypatch.setattr(tdist, "get_rank", lambda: 1)
    monkeypatch.setattr(tdist, "get_world_size", lambda: 2)
    info = dist.init_distributed(resolve_device("cpu"))
    assert chosen == ["gloo"] and (info.rank, info.world_size, info.local_rank) == (1, 2, 1)


# ------------------------------------------------------------------------------------------------ precision


def test_autocast_follows_the_parameters(minilm_path: str, data: TrainData, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """precision bf16 on a CPU run autocasts on the CPU even where CUDA is "available" (before: autocast('cuda'),
    which left the CPU run in fp32)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [])  # the checkpoint's RNG snapshot asks for it
    student = tiny_dual_encoder(minilm_path, dim=16, seed=0, dropout=False)
    seen: list[torch.dtype] = []
    student.visual_projection.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    _train(minilm_path, data, tmp_path / "run", student, precision="bf16")
    assert seen and set(seen) == {torch.bfloat16}
    assert all(p.device.type == "cpu" for p in student.parameters())


def test_fp16_trains_on_the_cpu_with_a_grad_scaler(minilm_path: str, data: TrainData, tmp_path: Path) -> None:
    """torch 2.13 autocasts fp16 on the CPU and scales its loss there too: fp16 works, its scaler is checkpointed."""
    assert grad_scaler(torch.device("cpu"), "fp16") is not None and grad_scaler(torch.device("cpu"), "bf16") is None
    with autocast(torch.device("cpu"), "fp16"):
        assert torch.nn.Linear(4, 4)(torch.ones(2, 4)).dtype == torch.float16
    _, result = _train(minilm_path, data, tmp_path / "run", precision="fp16", steps=3)
    assert np.isfinite(result.final_loss)
    ckpt = read_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000003.pt")
    assert "scaler" in ckpt and ckpt["scaler"]["scale"] > 0


# ----------------------------------------------------------------------------------------- compile, checkpointing


def _checkpointing(tower: Any) -> bool:
    """Whether a HF tower recomputes activations (transformers ≥ 5 renamed the flag)."""
    flag = getattr(type(tower), "is_activation_checkpointing", None)
    return bool(tower.is_activation_checkpointing if flag is not None else tower.is_gradient_checkpointing)


def test_gradient_checkpointing_gives_the_same_loss(minilm_path: str, data: TrainData, tmp_path: Path) -> None:
    plain, _ = _train(minilm_path, data, tmp_path / "plain", steps=3)
    ckpt, _ = _train(minilm_path, data, tmp_path / "ckpt", steps=3, grad_checkpointing=True)
    assert _checkpointing(ckpt.text_model) and _checkpointing(ckpt.vision_model)
    assert not _checkpointing(plain.text_model)
    np.testing.assert_allclose(_losses(tmp_path / "ckpt"), _losses(tmp_path / "plain"), rtol=1e-5)
    for (name, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name


def test_gradient_checkpointing_refuses_a_tower_without_it(minilm_path: str) -> None:
    student = tiny_dual_encoder(minilm_path, dim=16)
    student.vision_model = torch.nn.Sequential(torch.nn.Linear(3, 3))  # trains, cannot recompute
    with pytest.raises(AccelerationError, match=r"^train\.grad_checkpointing: the student's vision_model "
                                                r"\(Sequential\) does not support"):
        enable_grad_checkpointing(student)
    for p in student.vision_model.parameters():  # a frozen tower is left alone: it keeps no activations
        p.requires_grad_(False)
    assert enable_grad_checkpointing(student) == ["text_model"]


def test_a_compiler_failure_is_one_line(minilm_path: str, data: TrainData, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_backend(gm: Any, inputs: Any) -> Any:
        raise RuntimeError("no C compiler found")

    real = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: real(self, backend=broken_backend))
    torch._dynamo.reset()
    try:
        with pytest.raises(AccelerationError, match=r"^train\.compile: torch\.compile failed on this machine "
                                                    r".*set train\.compile: false$"):
            _train(minilm_path, data, tmp_path / "run", compile=True)
    finally:
        torch._dynamo.reset()


@pytest.mark.slow
def test_compile_trains_on_the_cpu(minilm_path: str, data: TrainData, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """train.compile traces the towers with torch.compile and trains to the same losses; the towers keep their
    state-dict keys. The backend is aot_eager (dynamo + AOT autograd, no C++ code generation): inductor works
    here too but takes minutes on 2 cores for these towers."""
    real = torch.nn.Module.compile
    traced: list[str] = []

    def compile_aot_eager(self: torch.nn.Module, **kw: Any) -> None:
        traced.append(type(self).__name__)
        real(self, backend="aot_eager")

    monkeypatch.setattr(torch.nn.Module, "compile", compile_aot_eager)
    torch._dynamo.reset()
    try:
        plain, _ = _train(minilm_path, data, tmp_path / "plain")
        compiled, _ = _train(minilm_path, data, tmp_path / "compiled", compile=True)
    finally:
        torch._dynamo.reset()
    assert sorted(traced) == ["BertModel", "CLIPVisionModel"]
    assert compiled.state_dict().keys() == plain.state_dict().keys()
    np.testing.assert_allclose(_losses(tmp_path / "compiled"), _losses(tmp_path / "plain"), rtol=1e-4)


# ------------------------------------------------------------------------------------------------ commands


def test_eval_and_cache_take_a_device(tmp_path: Path, tiny_teacher_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--data", "world:test", "--world-n", "12", "--cache", str(tmp_path / "w")]
    assert main(["eval", "zeroshot", "--model", str(tiny_teacher_dir), *common, "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 12
    assert main(["cache", "--teacher", str(tiny_teacher_dir), "--data", "world:train", "--world-n", "8",
                 "--data-cache", str(tmp_path / "w"), "--out", str(tmp_path / "cache"), "--device", "cpu"]) == 0
    assert "teacher cache ready" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv in (["eval", "zeroshot", "--model", str(tiny_teacher_dir), *common, "--device", "cuda"],
                 ["cache", "--teacher", str(tiny_teacher_dir), "--data", "world:train", "--out",
                  str(tmp_path / "c2"), "--device", "cuda:0"],
                 ["matching", "train", str(ROOT / "configs/matching/study.yaml"), "--device", "cuda"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "no CUDA device" in err, argv
    assert not (tmp_path / "c2").exists()
    assert main(["eval", "zeroshot", "--model", str(tiny_teacher_dir), *common, "--device", "tpu"]) == 2
    assert "--device: 'tpu' is not a device" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ bench


def _gpu_check() -> Any:
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not NO_CUDA, reason="checks the no-GPU exit; this machine has CUDA")
def test_gpu_check_without_cuda_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _gpu_check().main(["--json", str(tmp_path / "g.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA device" in err and "--device cpu --smoke" in err
    assert not (tmp_path / "g.json").exists()


@pytest.mark.slow
def test_gpu_check_smoke_runs_on_the_cpu(tmp_path: Path, minilm_path: str, keep_threads: None) -> None:
    out = tmp_path / "g.json"
    assert _gpu_check().main(["--device", "cpu", "--smoke", "--json", str(out), "--work", str(tmp_path / "w")]) == 0
    figures = json.loads(out.read_text())
    for key in ("demo_first_loss_cpu", "demo_first_loss_fp32", "demo_first_loss_bf16", "ok_first_loss_fp32",
                "ok_losses_fall", "zeroshot_top1_device", "student_step_samples_per_s_fp32",
                "student_step_samples_per_s_bf16", "cache_build_images_per_s", "ok"):
        assert key in figures, key
    assert figures["ok"] and figures["demo_first_loss_fp32"] == figures["demo_first_loss_cpu"]


# ------------------------------------------------------------------------------------------------ CUDA only


@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA device (bench/gpu_check.py covers the GPU at scale)")
def test_training_runs_on_the_gpu(minilm_path: str, data: TrainData, tmp_path: Path) -> None:
    student, result = _train(minilm_path, data, tmp_path / "run", device="cuda", precision="bf16")
    assert all(p.device.type == "cuda" for p in student.parameters()) and np.isfinite(result.final_loss)
