"""Run under torchrun (2 gloo processes) by test_ddp_any_objective.py, once for all variants (test time matters):

1. every objective of the registry alone, and freeze / towers / level / fixed-scale variants, trains 3 steps with
   `mmkd.train.loop.train` (7b79a9b's DDP stopped at step 2 wherever a trainable parameter got no gradient);
2. one exactly accumulated step (2 micro-batches of 2 samples per rank) whose synchronised gradients the test
   compares with one process on the batch of 8.

argv: the MiniLM tokenizer folder, the output folder. Rank 0 writes variants.json; each rank grads-rank{r}.pt.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import tiny_dual_encoder  # noqa: E402

from mmkd import dist as mdist  # noqa: E402
from mmkd.config import ObjectiveSpec, TrainConfig  # noqa: E402
from mmkd.data.batches import ImageBank, TrainBatch, TrainData  # noqa: E402
from mmkd.data.records import Record  # noqa: E402
from mmkd.models.dual_encoder import SiglipDualEncoder  # noqa: E402
from mmkd.models.student import feature_widths  # noqa: E402
from mmkd.objectives import OBJECTIVES  # noqa: E402
from mmkd.objectives.base import ObjectiveContext, build_objectives  # noqa: E402
from mmkd.train.accumulate import accumulated_backward  # noqa: E402
from mmkd.train.loop import train  # noqa: E402
from mmkd.train.sync import average_gradients  # noqa: E402
from mmkd.train.task import DistillTask  # noqa: E402

S_DIM, T_DIM, T_FEAT = 16, 24, 40
MEAN, STD = (0.5,) * 3, (0.25,) * 3


def records(n: int, prefix: str, captioned: bool) -> list[Record]:
    g = torch.Generator().manual_seed(len(prefix) + n)
    images = torch.randint(0, 256, (n, 32, 32, 3), generator=g, dtype=torch.uint8).numpy()
    return [Record(f"{prefix}{i}", images[i], (f"a photo of item {i} " + "red " * (i % 3),) if captioned else ())
            for i in range(n)]


PAIRED, UNPAIRED = records(16, "p", True), records(8, "u", False)


class Teacher:
    """Fixed random targets per key and caption: embeddings, pooled features and a logit scale."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        g = torch.Generator().manual_seed(5)
        keys = [r.key for r in PAIRED + UNPAIRED]
        caps = [r.captions[0] for r in PAIRED]
        self.rows = {k: i for i, k in enumerate(keys)}
        self.caps = {c: i for i, c in enumerate(caps)}
        self.t = {"image_embeds": F.normalize(torch.randn(len(keys), T_DIM, generator=g), dim=-1),
                  "text_embeds": F.normalize(torch.randn(len(caps), T_DIM, generator=g), dim=-1),
                  "image_features": torch.randn(len(keys), T_FEAT, generator=g),
                  "text_features": torch.randn(len(caps), T_FEAT, generator=g)}
        self.t = {k: v.to(dtype) for k, v in self.t.items()}
        self.dtype = dtype

    def __call__(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        i = [self.rows[k] for k in batch.keys]
        c = [self.caps[x] for x in batch.captions]
        return {"image_embeds": self.t["image_embeds"][i], "image_features": self.t["image_features"][i],
                "text_embeds": self.t["text_embeds"][c], "text_features": self.t["text_features"][c],
                "logit_scale": torch.tensor(30.0, dtype=self.dtype)}


SIGLIP_STUDENT = "siglip_student."  # a freeze entry that asks for a SigLIP-shaped student (its own scale and bias)


def setup(tok: str, specs: list[ObjectiveSpec], world: int, batch: int, unpaired: int,
          freeze: tuple[str, ...] = (), double: bool = False) -> tuple[Any, Any, TrainData]:
    student = tiny_dual_encoder(tok, dim=S_DIM, dropout=False)
    if SIGLIP_STUDENT in freeze:
        student = SiglipDualEncoder(student.vision_model, student.text_model, student.meta, student.tokenizer)
    for name, p in student.named_parameters():
        if name.startswith(freeze):
            p.requires_grad_(False)
    ctx = ObjectiveContext(student.projection_dim, T_DIM, feature_widths(student), {"image": T_FEAT, "text": T_FEAT},
                           teacher_logit_scale=30.0, student_logit_bias=SIGLIP_STUDENT in freeze)
    objectives = build_objectives(specs, ctx, seed=0)
    if double:
        student, objectives = student.double(), objectives.double()
    data = TrainData(ImageBank(PAIRED, 32, MEAN, STD), ImageBank(UNPAIRED, 32, MEAN, STD), batch, unpaired,
                     world=world, seed=0)
    return student, objectives, data


def variants() -> list[tuple[str, list[ObjectiveSpec], tuple[str, ...]]]:
    out: list[tuple[str, list[ObjectiveSpec], tuple[str, ...]]] = [
        (n, [ObjectiveSpec(name=n)], ()) for n in OBJECTIVES.names()]
    out += [
        ("kl scale fixed", [ObjectiveSpec(name="kl", params={"scale": 50.0})], ()),
        ("crd scale fixed", [ObjectiveSpec(name="crd", params={"scale": 50.0})], ()),
        ("fd_mse towers [image]", [ObjectiveSpec(name="fd_mse", towers=["image"])], ()),
        ("fd_mse level features", [ObjectiveSpec(name="fd_mse", params={"level": "features"})], ()),
        ("clip, text tower frozen", [ObjectiveSpec(name="clip")], ("text_model.",)),
        ("clip + fd_mse, vision tower frozen", [ObjectiveSpec(name="clip"), ObjectiveSpec(name="fd_mse")],
         ("vision_model.",)),
        ("icl temperature fixed, logit_scale frozen", [ObjectiveSpec(name="icl", params={"temperature": 0.07})],
         ("logit_scale",)),
        ("SigLIP student without siglip", [ObjectiveSpec(name="clip"), ObjectiveSpec(name="fd_mse")],
         (SIGLIP_STUDENT,)),
        ("SigLIP student with siglip", [ObjectiveSpec(name="siglip")], (SIGLIP_STUDENT,)),
    ]
    return out


def main() -> None:
    tok, out = sys.argv[1], Path(sys.argv[2])
    info = mdist.init_distributed("cpu")
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    cfg = TrainConfig(steps=3, lr=1e-3, warmup_steps=0, log_every=1, ckpt_every=0, seed=0)
    for name, specs, freeze in variants():
        student, objectives, data = setup(tok, specs, info.world_size, 8, 4, freeze)
        before = {k: v.clone() for k, v in student.state_dict().items()}
        try:
            res = train(student, objectives, data, Teacher(), cfg, out / "runs" / name.replace(" ", "_"), info,
                        progress=False, workers=0)
            moved = any(not torch.equal(v, student.state_dict()[k]) for k, v in before.items())
            results[name] = {"ok": True, "steps": res.steps, "loss": res.final_loss, "moved": moved}
        except Exception as e:  # noqa: BLE001 - reported per variant, so one failure does not hide the others
            results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500],
                             "trace": traceback.format_exc()[-1500:]}
    # one exactly accumulated step: 2 micro-batches of (2 paired + 1 unpaired) per rank
    specs = [ObjectiveSpec(name="clip"), ObjectiveSpec(name="icl"), ObjectiveSpec(name="fd_mse", weight=0.5)]
    student, objectives, data = setup(tok, specs, info.world_size, 4, 2, double=True)
    task = DistillTask(student, objectives).train()
    teacher = Teacher(torch.float64)
    micros = [(b, teacher(b)) for b in (data.batch(0, info.rank), data.batch(1, info.rank))]
    terms = accumulated_backward(task, micros, "fp32", torch.device("cpu"))
    average_gradients([p for p in task.parameters() if p.requires_grad])
    torch.save({"grads": {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None},
                "terms": {k: float(v) for k, v in terms.items()}}, out / f"grads-rank{info.rank}.pt")
    if info.is_main:
        (out / "variants.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
