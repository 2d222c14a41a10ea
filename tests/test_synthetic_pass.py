"""The synthetic-caption pass (``data.synthetic_captions``) applies only the terms that read captions, once.

MobileCLIP (apple/ml-mobileclip, training/open_clip_v2.patch) adds its DRClipLoss again on (image, synthetic
caption); a loss that never reads a caption has nothing to repeat. 7b79a9b reran every objective, so image-only
terms (fd_* image, mfd, rkd image, cls_regression image) counted (1 + weight) times.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_dual_encoder

from mmkd.config import ObjectiveSpec
from mmkd.data.batches import TrainBatch
from mmkd.models.student import feature_widths
from mmkd.objectives.base import ObjectiveContext, build_objectives
from mmkd.objectives.contrastive import clip_loss
from mmkd.train.task import DistillTask

S_DIM, T_DIM, T_FEAT, N, U = 16, 24, 40, 5, 2
WEIGHT = 0.7
IMAGE_ONLY = ["fd_mse/mse_image", "mfd/mse_image", "rkd/distance_image", "rkd/angle_image", "cls_regression/image"]
CAPTION = ["fd_mse/mse_text", "rkd/distance_text", "rkd/angle_text", "cls_regression/caption", "clip", "kl/i2t",
           "kl/t2i"]


def _case(minilm_path: str, synthetic: bool = True) -> tuple[dict[str, torch.Tensor], DistillTask, TrainBatch]:
    student = tiny_dual_encoder(minilm_path, dim=S_DIM, dropout=False).double()
    ctx = ObjectiveContext(S_DIM, T_DIM, feature_widths(student), {"image": T_FEAT, "text": T_FEAT})
    specs = [ObjectiveSpec(name="fd_mse"), ObjectiveSpec(name="mfd", params={"mask_ratio": 0.0}),
             ObjectiveSpec(name="rkd"), ObjectiveSpec(name="cls_regression"), ObjectiveSpec(name="clip"),
             ObjectiveSpec(name="kl")]
    task = DistillTask(student, build_objectives(specs, ctx, seed=0).double(), synthetic_weight=WEIGHT).train()
    g = torch.Generator().manual_seed(0)
    batch = TrainBatch(torch.randn(N + U, 3, 32, 32, generator=g, dtype=torch.float64),
                       [f"k{i}" for i in range(N + U)], [0] * (N + U), [f"a red thing {i}" for i in range(N)], N,
                       np.arange(N), np.arange(U),
                       synthetic=[f"synthetic blue {i}" for i in range(N)] if synthetic else None)

    def unit(n: int, d: int) -> torch.Tensor:
        return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)

    teacher = {"image_embeds": unit(N + U, T_DIM), "text_embeds": unit(N, T_DIM),
               "image_features": torch.randn(N + U, T_FEAT, generator=g, dtype=torch.float64),
               "synthetic_text_embeds": unit(N, T_DIM), "logit_scale": torch.tensor(30.0, dtype=torch.float64)}
    return task(batch, teacher), task, batch


def test_synthetic_pass_repeats_caption_terms_only(minilm_path: str) -> None:
    with_syn, task, batch = _case(minilm_path)
    logged = {k[len("synthetic/"):] for k in with_syn if k.startswith("synthetic/")}
    assert logged == set(CAPTION) | {"loss"}  # 7b79a9b: every term, image-only ones included
    # the total: every term once, plus the weight times the caption terms of the synthetic pass
    once = sum(with_syn[k] for k in IMAGE_ONLY + CAPTION)
    again = sum(with_syn[f"synthetic/{k}"] for k in CAPTION)
    assert float(with_syn["loss"].detach()) == pytest.approx(float(once + WEIGHT * again), rel=1e-12)
    # the synthetic clip term is CLIP on (image, synthetic caption)
    s = task.student
    tok = s.tokenize(batch.synthetic)
    syn_text = F.normalize(s.text_projection(s.text_features(tok["input_ids"], tok["attention_mask"])), dim=-1)
    image = F.normalize(s.visual_projection(s.image_features(batch.pixel_values)), dim=-1)[:N]
    ref = clip_loss(image, syn_text, s.logit_scale.exp().clamp(max=100))
    assert float(with_syn["synthetic/clip"]) == pytest.approx(float(ref.detach()), rel=1e-10)


def test_image_only_terms_count_once_in_the_gradient(minilm_path: str) -> None:
    """fd_mse's image map is read by its image term alone: synthetic captions must not change its gradient."""
    grads = []
    for synthetic in (True, False):
        terms, task, _ = _case(minilm_path, synthetic)
        proj = task.objectives.objectives[0].proj["image"].weight
        grads.append(torch.autograd.grad(terms["loss"], [proj])[0])
    assert float(grads[1].abs().max()) > 1e-6
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-14)  # 7b79a9b: (1 + 0.7) times
