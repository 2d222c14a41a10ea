"""Multi-process training (gloo on CPU): 2 processes must do exactly what 1 process does on the same global batch.

The contrastive loss of every rank is computed on embeddings gathered from all ranks; its gradient must
reach every rank's own slice, so that after DDP's averaging the gradients equal the single-process ones.
Feature-distillation terms are means over each rank's half; DDP's averaging makes them global means too.
The learnable projections that ``fd_*`` objectives create when widths differ live in the DDP module, so
their gradients are synchronised like the student's.

Workers are started with ``torch.multiprocessing`` (spawn) and join a gloo group through the same env vars
torchrun sets; the last test runs the real ``torchrun ... -m mmkd.cli distill`` end to end.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tiny_runs
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import yaml
from conftest import tiny_dual_encoder
from torch import nn

from mmkd import dist as mdist
from mmkd.config import ObjectiveSpec, TrainConfig
from mmkd.data.batches import ImageBank, TrainBatch, TrainData
from mmkd.data.records import Record
from mmkd.models.dual_encoder import DualEncoder
from mmkd.models.towers import tower_widths
from mmkd.objectives import contrastive
from mmkd.objectives.base import ObjectiveContext, WeightedSum, build_objectives
from mmkd.train.loop import train
from mmkd.train.task import DistillTask

WORLD = 2
IMAGE_SIZE = 32
STUDENT_DIM, TEACHER_DIM = 16, 24  # different: fd_mse_cosine must create learnable projections
N_PAIRED, N_UNPAIRED = 16, 8
BATCH, UNPAIRED_BATCH = 8, 4  # global batch; each rank takes a contiguous half
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
PROJ_PARAMS = ("objectives.objectives.1.proj.image.weight", "objectives.objectives.1.proj.text.weight")
SPAWN_TIMEOUT_S = 120


# ---------------------------------------------------------------------------------------------------------
# process plumbing


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _join_group(rank: int, world: int, port: int) -> mdist.DistInfo:
    """Inside a spawned worker: the env vars torchrun would set, then mmkd's own init."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    info = mdist.init_distributed()
    assert (info.rank, info.world_size) == (rank, world)
    assert dist.get_backend() == "gloo"
    return info


def _spawn(fn: Any, args: tuple, world: int = WORLD, timeout: float = SPAWN_TIMEOUT_S) -> None:
    """Run ``fn(rank, *args)`` in ``world`` fresh processes; a failure in any raises here, a hang fails."""
    ctx = mp.start_processes(fn, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{world} worker processes did not finish within {timeout:.0f} s (deadlock?)")


# ---------------------------------------------------------------------------------------------------------
# the tiny setup every process builds identically


def _records(n: int, prefix: str, captioned: bool, seed: int) -> list[Record]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    words = ("red", "green", "blue", "small", "large", "circle", "square", "star")
    recs = []
    for i in range(n):
        # captions of different lengths: each rank pads its half differently from the full batch
        caption = f"a photo of {' '.join(words[: 1 + i % 7])} number {i}" if captioned else None
        recs.append(Record(key=f"{prefix}-{i}", image=images[i], captions=(caption,) if caption else ()))
    return recs


class FakeTeacher:
    """Fixed random unit vectors per sample key and per caption, at the teacher's (different) width."""

    def __init__(self, keys: list[str], captions: list[str]) -> None:
        g = torch.Generator().manual_seed(1234)
        self.image = F.normalize(torch.randn(len(keys), TEACHER_DIM, generator=g), dim=-1)
        self.text = F.normalize(torch.randn(len(captions), TEACHER_DIM, generator=g), dim=-1)
        self.image_row = {k: i for i, k in enumerate(keys)}
        self.text_row = {c: i for i, c in enumerate(captions)}

    def __call__(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        return {"image_embeds": self.image[[self.image_row[k] for k in batch.keys]],
                "text_embeds": self.text[[self.text_row[c] for c in batch.captions]]}


def _tiny_student(tok_path: str, layers: int = 1, dim: int = STUDENT_DIM) -> DualEncoder:
    # no dropout: ranks are seeded differently, so random masks could never match the 1-process run
    return tiny_dual_encoder(tok_path, layers=layers, image_size=IMAGE_SIZE, dim=dim, dropout=False)


def _setup(tok_path: str, world: int) -> tuple[DualEncoder, WeightedSum, TrainData, FakeTeacher]:
    """Student, clip + fd_mse_cosine (with projections), data batched for ``world`` ranks, fake teacher."""
    torch.manual_seed(0)
    student = _tiny_student(tok_path)
    ctx = ObjectiveContext(STUDENT_DIM, TEACHER_DIM, tower_widths(student), {})
    objectives = build_objectives([ObjectiveSpec(name="clip"),
                                   ObjectiveSpec(name="fd_mse_cosine", weight=0.5, towers=["image", "text"])], ctx)
    assert set(objectives.objectives[1].proj) == {"image", "text"}
    paired = _records(N_PAIRED, "p", True, seed=1)
    unpaired = _records(N_UNPAIRED, "u", False, seed=2)
    data = TrainData(ImageBank(paired, IMAGE_SIZE, MEAN, STD), ImageBank(unpaired, IMAGE_SIZE, MEAN, STD),
                     BATCH, UNPAIRED_BATCH, world=world, seed=0)
    teacher = FakeTeacher([r.key for r in paired + unpaired], [r.captions[0] for r in paired])
    return student, objectives, data, teacher


def _loss_and_grads(tok_path: str, world: int, rank: int, step: int = 0) -> dict[str, Any]:
    """One forward/backward of rank ``rank``'s share of global batch ``step``, wrapped as train() wraps it."""
    student, objectives, data, teacher = _setup(tok_path, world)
    task = DistillTask(student, objectives)
    model: nn.Module = task
    if world > 1:
        model = nn.parallel.DistributedDataParallel(task, find_unused_parameters=False)
        ddp_params = {id(p) for p in model.parameters()}
        assert all(id(p) in ddp_params for p in objectives.parameters())
    batch = data.batch(step, rank)
    terms = model(batch, teacher(batch))
    terms["loss"].backward()
    missing = [n for n, p in task.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without a gradient: {missing}"
    return {
        "keys": list(batch.keys),
        "local": {k: float(v.detach()) for k, v in terms.items()},  # this rank's value
        "mean": {k: float(mdist.all_reduce_mean(v.detach())) for k, v in terms.items()},  # averaged over ranks
        "grads": {n: p.grad.detach().clone() for n, p in task.named_parameters()},
    }


def _gather_without_grad(x: torch.Tensor) -> torch.Tensor:
    """A broken gather (the classic bug): other ranks' slices are constants, so their gradients are lost."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def _grads_worker(rank: int, world: int, port: int, tok_path: str, out: str) -> None:
    _join_group(rank, world, port)
    result = {"ok": _loss_and_grads(tok_path, world, rank)}
    real = contrastive.gather_with_grad
    contrastive.gather_with_grad = _gather_without_grad
    try:
        result["broken"] = _loss_and_grads(tok_path, world, rank)
    finally:
        contrastive.gather_with_grad = real
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_two_processes_match_one_process_loss_and_gradients(minilm_path: str, tmp_path: Path) -> None:
    _spawn(_grads_worker, (WORLD, _free_port(), minilm_path, str(tmp_path)))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    ref = _loss_and_grads(minilm_path, 1, 0)

    # the ranks saw the two contiguous halves of the same global batch
    half_p, half_u = BATCH // WORLD, UNPAIRED_BATCH // WORLD
    merged = [k for r in ranks for k in r["ok"]["keys"][:half_p]] + [k for r in ranks for k in r["ok"]["keys"][half_p:]]
    assert merged == ref["keys"]  # each rank: paired then unpaired; regrouped, exactly the 1-process batch
    assert all(len(r["ok"]["keys"]) == half_p + half_u for r in ranks)

    # every rank computes the contrastive loss on the gathered global batch: the 1-process value
    for r in ranks:
        assert r["ok"]["local"]["clip"] == pytest.approx(ref["local"]["clip"], rel=1e-5)
    # feature terms are local means (the halves differ); their mean over ranks is the global mean
    fd_keys = [k for k in ref["local"] if k.startswith("fd_mse_cosine/")]
    assert sorted(fd_keys) == sorted(f"fd_mse_cosine/{d}_{t}" for d in ("mse", "cosine") for t in ("image", "text"))
    assert ranks[0]["ok"]["local"][fd_keys[0]] != pytest.approx(ranks[1]["ok"]["local"][fd_keys[0]], rel=1e-3)
    for k, v in ref["local"].items():
        assert ranks[0]["ok"]["mean"][k] == pytest.approx(v, rel=1e-5), k

    # gradients: DDP-synchronised (identical on both ranks, the KD projections included) and equal to 1 process
    assert set(ranks[0]["ok"]["grads"]) == set(ref["grads"])
    assert all(name in ref["grads"] for name in PROJ_PARAMS)
    for name, g in ref["grads"].items():
        g0, g1 = ranks[0]["ok"]["grads"][name], ranks[1]["ok"]["grads"][name]
        torch.testing.assert_close(g1, g0, atol=1e-7, rtol=1e-6, msg=lambda m, n=name: f"{n} not synced: {m}")
        torch.testing.assert_close(g0, g, atol=1e-6, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    for name in PROJ_PARAMS:
        assert ref["grads"][name].abs().max() > 1e-4  # a real gradient, not a trivially equal zero

    # the comparison has teeth: a gather that drops other ranks' gradients gives the same loss, wrong grads
    broken = ranks[0]["broken"]
    assert broken["mean"]["loss"] == pytest.approx(ref["local"]["loss"], rel=1e-5)
    bad = ref["grads"]["student.visual_projection.weight"]
    assert not torch.allclose(broken["grads"]["student.visual_projection.weight"], bad, atol=1e-6, rtol=1e-4)


def test_rank_slices_make_up_the_one_process_batch_with_several_captions() -> None:
    recs = [Record(f"k{i}", np.zeros((8, 8, 3), np.uint8), tuple(f"caption {i} variant {j}" for j in range(4)))
            for i in range(16)]
    bank = ImageBank(recs, 8, MEAN, STD, augment=True)
    one = TrainData(bank, None, 8, 0, world=1, seed=0, views=3)
    two = TrainData(bank, None, 8, 0, world=WORLD, seed=0, views=3)
    for step in range(4):
        ref, parts = one.batch(step, 0), [two.batch(step, r) for r in range(WORLD)]
        assert [k for b in parts for k in b.keys] == ref.keys
        assert [c for b in parts for c in b.captions] == ref.captions
        assert [v for b in parts for v in b.views] == ref.views


# ---------------------------------------------------------------------------------------------------------
# the real training loop


def _train_cfg() -> TrainConfig:
    return TrainConfig(steps=3, lr=1e-3, weight_decay=0.05, warmup_steps=1, grad_clip=1.0, log_every=1,
                       ckpt_every=2, keep_checkpoints=5, seed=0)


def _train_worker(rank: int, world: int, port: int, tok_path: str, out: str) -> None:
    info = _join_group(rank, world, port)
    student, objectives, data, teacher = _setup(tok_path, world)
    result = train(student, objectives, data, teacher, _train_cfg(), out, info, progress=False)
    state = {f"student.{k}": v for k, v in student.state_dict().items()}
    state.update({f"objectives.{k}": v for k, v in objectives.state_dict().items()})
    torch.save({"state": state, "final_loss": result.final_loss, "steps": result.steps},
               Path(out) / f"weights-rank{rank}.pt")
    dist.destroy_process_group()


def _loss_invariant(name: str) -> bool:
    """Attention key biases: q·(k + b) adds q·b to every key's score of a query, which softmax cancels, so their
    gradient is rounding noise (~1e-9) and Adam's update of them is noise divided by eps: no run can match another
    on them (one failed by 1.25e-6), and no error in the loss could show in them either."""
    return name.endswith(("self_attn.k_proj.bias", "attention.self.key.bias"))


def _metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_two_process_training_matches_one_process(minilm_path: str, tmp_path: Path) -> None:
    out2, out1 = tmp_path / "two", tmp_path / "one"
    out2.mkdir()
    _spawn(_train_worker, (WORLD, _free_port(), minilm_path, str(out2)))
    cfg = _train_cfg()

    student, objectives, data, teacher = _setup(minilm_path, 1)
    init = {k: v.clone() for k, v in DistillTask(student, objectives).state_dict().items()}
    ref = train(student, objectives, data, teacher, cfg, out1, None, progress=False)
    ref_state = DistillTask(student, objectives).state_dict()

    # rank 0 alone writes: one metrics line per step (not one per rank) and the checkpoints
    lines, ref_lines = _metrics(out2 / "metrics.jsonl"), _metrics(out1 / "metrics.jsonl")
    assert [m["step"] for m in lines] == [1, 2, 3]
    for m, r in zip(lines, ref_lines):
        assert m["loss"] == pytest.approx(r["loss"], rel=1e-5), (m, r)
        assert m["clip"] == pytest.approx(r["clip"], rel=1e-5)
        assert m["lr"] == pytest.approx(r["lr"])
    ckpts = sorted(p.name for p in (out2 / "checkpoints").glob("step-*.pt"))
    assert ckpts == ["step-00000002.pt", "step-00000003.pt"]
    assert (out2 / "checkpoints" / "latest").read_text().strip() == "step-00000003.pt"
    ckpt = torch.load(out2 / "checkpoints" / "step-00000003.pt", map_location="cpu", weights_only=False)
    assert all(name in ckpt["task"] for name in PROJ_PARAMS)  # the KD projections are saved with the student

    # the same weights on both ranks and in the checkpoint, equal to the 1-process run's
    w = [torch.load(out2 / f"weights-rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert [x["steps"] for x in w] == [3, 3]
    assert w[0]["final_loss"] == pytest.approx(ref.final_loss, rel=1e-5)
    assert w[1]["final_loss"] == pytest.approx(w[0]["final_loss"], rel=1e-6)
    assert set(w[0]["state"]) == set(ref_state) == set(ckpt["task"])
    moved = 0.0
    for name, v in ref_state.items():
        torch.testing.assert_close(w[1]["state"][name], w[0]["state"][name], atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(ckpt["task"][name], w[0]["state"][name], atol=0.0, rtol=0.0)
        if not v.is_floating_point():
            assert torch.equal(w[0]["state"][name], v), name
            continue
        if _loss_invariant(name):
            continue
        # the update each run made, compared relative to its own size: 2 processes sum in another order, and
        # Adam turns any gradient into a step of about lr, so absolute bounds on weights are rounding coin tosses
        ref_update, update = v - init[name], w[0]["state"][name] - init[name]
        scale = float(ref_update.abs().max())
        torch.testing.assert_close(update, ref_update, atol=1e-3 * scale + 1e-9, rtol=0,
                                   msg=lambda m, n=name: f"{n}: {m}")
        moved = max(moved, scale)
    assert moved > 1e-3  # training changed the weights, so equality is not trivial
    for name in PROJ_PARAMS:
        assert not torch.equal(ref_state[name], init[name])


# ---------------------------------------------------------------------------------------------------------
# end to end: torchrun + the CLI


def _torchrun() -> list[str]:
    exe = Path(sys.executable).parent / "torchrun"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "torch.distributed.run"]


def torchrun_env() -> dict[str, str]:
    """This checkout's code (even with a relative PYTHONPATH and another working directory), one thread, no
    network, no rank inherited from a surrounding job."""
    return {k: v for k, v in tiny_runs.env().items()
            if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}


def test_torchrun_cli_distill_two_processes(minilm_path: str, tmp_path: Path) -> None:
    from mmkd.models.hub import load_dual_encoder, save_dual_encoder

    torch.manual_seed(0)
    save_dual_encoder(_tiny_student(minilm_path, layers=2, dim=TEACHER_DIM), tmp_path / "teacher")
    out = tmp_path / "out"
    config = {
        "teacher": str(tmp_path / "teacher"),
        "student": {"projection_dim": STUDENT_DIM},  # ≠ the teacher's width: projections in the objectives
        "data": {"train": "world:train", "world_size_train": 64, "batch_size": 16},
        "objectives": [{"name": "clip"}, {"name": "fd_mse_cosine", "towers": ["image", "text"]}],
        "train": {"steps": 3, "warmup_steps": 1, "log_every": 1, "ckpt_every": 0},
        "out": str(out),
        "cache_dir": str(tmp_path / "cache"),
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    env = torchrun_env()
    cmd = [*_torchrun(), "--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "mmkd.cli", "distill", str(tmp_path / "run.yaml")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"

    assert (out / "student" / "model.safetensors").is_file()
    assert [m["step"] for m in _metrics(out / "metrics.jsonl")] == [1, 2, 3]  # rank 0 only
    assert json.loads((out / "metrics.json").read_text())["train"]["steps"] == 3
    ckpt = torch.load(out / "checkpoints" / "step-00000003.pt", map_location="cpu", weights_only=False)
    assert all(name in ckpt["task"] for name in PROJ_PARAMS)
    student = load_dual_encoder(out / "student")
    assert student.projection_dim == STUDENT_DIM
