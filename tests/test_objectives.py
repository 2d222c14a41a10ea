"""Tests for mmkd.objectives: losses against plainly written float64 references (values and gradients)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmkd.config import ObjectiveSpec
from mmkd.objectives import OBJECTIVES, ObjectiveContext, build_objectives
from mmkd.objectives.base import WeightedSum
from mmkd.objectives.contrastive import ClipObjective
from mmkd.objectives.feature import FdCosine, FdMse, FdMseCosine

DIM = 6


def unit(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def ctx(student_dim: int = DIM, teacher_dim: int | None = DIM, s_feats: dict[str, int] | None = None,
        t_feats: dict[str, int] | None = None) -> ObjectiveContext:
    return ObjectiveContext(student_dim, teacher_dim, s_feats or {}, t_feats or {})


# ----------------------------------------------------------------------------------------------------------
# clip: symmetric InfoNCE


def ref_clip(image: list[list[float]], text: list[list[float]], scale: float) -> tuple[float, list, list, float]:
    """Loss and its analytic gradients (image, text, scale), written out with loops in python floats."""
    n, d = len(image), len(image[0])
    logits = [[scale * sum(image[i][k] * text[j][k] for k in range(d)) for j in range(n)] for i in range(n)]
    rows = [[math.exp(logits[i][j]) / sum(math.exp(x) for x in logits[i]) for j in range(n)] for i in range(n)]
    cols = [[math.exp(logits[i][j]) / sum(math.exp(logits[r][j]) for r in range(n)) for j in range(n)]
            for i in range(n)]
    i2t = sum(-math.log(rows[i][i]) for i in range(n)) / n
    t2i = sum(-math.log(cols[j][j]) for j in range(n)) / n
    loss = 0.5 * (i2t + t2i)
    # dloss/dlogit[i][j] = 0.5 * ((row softmax - identity) + (column softmax - identity)) / n
    g = [[0.5 * (rows[i][j] + cols[i][j] - 2.0 * (i == j)) / n for j in range(n)] for i in range(n)]
    g_img = [[scale * sum(g[i][j] * text[j][k] for j in range(n)) for k in range(d)] for i in range(n)]
    g_txt = [[scale * sum(g[i][j] * image[i][k] for i in range(n)) for k in range(d)] for j in range(n)]
    g_scale = sum(g[i][j] * logits[i][j] / scale for i in range(n) for j in range(n))
    return loss, g_img, g_txt, g_scale


@pytest.mark.parametrize("n, scale", [(1, 1.0), (5, 14.3), (7, 0.5)])
def test_clip_matches_reference_values_and_gradients(n: int, scale: float) -> None:
    image = unit(n + 3, DIM, seed=n).requires_grad_()  # 3 unpaired images after the paired ones: ignored
    text = unit(n, DIM, seed=100 + n).requires_grad_()
    logit_scale = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    obj = ClipObjective(ctx(), ["image", "text"])
    out = obj({"image_embeds": image, "text_embeds": text, "logit_scale": logit_scale, "n_paired": n}, {})
    assert set(out) == {"clip"}
    loss = out["clip"]
    g_img, g_txt, g_scale = torch.autograd.grad(loss, [image, text, logit_scale])
    r_loss, r_img, r_txt, r_scale = ref_clip(image[:n].tolist(), text.tolist(), scale)
    assert loss.item() == pytest.approx(r_loss, rel=1e-10, abs=1e-12)
    torch.testing.assert_close(g_img[:n], torch.tensor(r_img, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    assert torch.all(g_img[n:] == 0)  # unpaired rows take no part in the contrastive loss
    torch.testing.assert_close(g_txt, torch.tensor(r_txt, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    assert g_scale.item() == pytest.approx(r_scale, rel=1e-9, abs=1e-12)


def test_clip_is_symmetric_in_its_two_directions() -> None:
    """Swapping images and texts leaves the loss unchanged (both directions are averaged)."""
    image, text = unit(6, DIM, seed=1), unit(6, DIM, seed=2)
    scale = torch.tensor(10.0, dtype=torch.float64)
    obj = ClipObjective(ctx(), ["image", "text"])
    a = obj({"image_embeds": image, "text_embeds": text, "logit_scale": scale, "n_paired": 6}, {})["clip"]
    b = obj({"image_embeds": text, "text_embeds": image, "logit_scale": scale, "n_paired": 6}, {})["clip"]
    assert a.item() == pytest.approx(b.item(), rel=1e-12)
    assert not obj.uses_teacher


def test_clip_fixed_temperature_and_scale_clamp() -> None:
    image, text = unit(4, DIM, seed=3), unit(4, DIM, seed=4)
    fixed = ClipObjective(ctx(), ["image", "text"], temperature=0.05)
    big = torch.tensor(500.0, dtype=torch.float64, requires_grad=True)
    s = {"image_embeds": image, "text_embeds": text, "logit_scale": big, "n_paired": 4}
    assert fixed(s, {})["clip"].item() == pytest.approx(ref_clip(image.tolist(), text.tolist(), 20.0)[0], rel=1e-9)
    clamped = ClipObjective(ctx(), ["image", "text"], max_logit_scale=100.0)
    loss = clamped(s, {})["clip"]
    assert loss.item() == pytest.approx(ref_clip(image.tolist(), text.tolist(), 100.0)[0], rel=1e-9)
    (g,) = torch.autograd.grad(loss, [big])
    assert g.item() == 0.0  # clamped: the scale gets no gradient above the cap


def test_clip_perfect_alignment_beats_random() -> None:
    aligned = unit(8, DIM, seed=5)
    scale = torch.tensor(50.0, dtype=torch.float64)
    obj = ClipObjective(ctx(), ["image", "text"])
    good = obj({"image_embeds": aligned, "text_embeds": aligned, "logit_scale": scale, "n_paired": 8}, {})["clip"]
    bad = obj({"image_embeds": aligned, "text_embeds": unit(8, DIM, seed=6), "logit_scale": scale,
               "n_paired": 8}, {})["clip"]
    assert good.item() < bad.item()


# ----------------------------------------------------------------------------------------------------------
# feature distillation


def ref_normalize(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / max(norm, 1e-12) for x in v]


def ref_fd(s: list[list[float]], t: list[list[float]], normalize: bool) -> dict[str, float]:
    """Per-sample squared L2 (summed over dims) and 1 - cosine, averaged over the teacher's rows."""
    s = s[: len(t)]
    if normalize:
        s, t = [ref_normalize(x) for x in s], [ref_normalize(x) for x in t]
    mse = sum(sum((a - b) ** 2 for a, b in zip(x, y)) for x, y in zip(s, t)) / len(t)
    cos = sum(1 - sum(a * b for a, b in zip(x, y)) / math.sqrt(sum(a * a for a in x) * sum(b * b for b in y))
              for x, y in zip(s, t)) / len(t)
    return {"mse": mse, "cosine": cos}


def fd_inputs(n_img: int = 6, n_txt: int = 4, s_dim: int = DIM, t_dim: int = DIM, seed: int = 0
              ) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    student = {"image_embeds": r(n_img, s_dim), "text_embeds": r(n_txt, s_dim), "image_features": r(n_img, s_dim + 2),
               "text_features": r(n_txt, s_dim + 1), "n_paired": n_txt}
    # the teacher has image targets for every image (paired + unpaired), text targets for paired ones only
    teacher = {"image_embeds": r(n_img, t_dim), "text_embeds": r(n_txt, t_dim), "image_features": r(n_img, s_dim + 2),
               "text_features": r(n_txt, s_dim + 1)}
    return student, teacher


@pytest.mark.parametrize("cls, terms", [(FdMse, ["mse"]), (FdCosine, ["cosine"]), (FdMseCosine, ["mse", "cosine"])])
@pytest.mark.parametrize("normalize", [True, False])
def test_fd_matches_reference(cls: type, terms: list[str], normalize: bool) -> None:
    student, teacher = fd_inputs()
    for key in ("image_embeds", "text_embeds"):
        student[key].requires_grad_()
    obj = cls(ctx(), ["image", "text"], normalize=normalize)
    assert len(obj.proj) == 0  # equal widths: nothing to learn
    out = obj(student, teacher)
    assert set(out) == {f"{t}_{tower}" for t in terms for tower in ("image", "text")}
    for tower in ("image", "text"):
        ref = ref_fd(student[f"{tower}_embeds"].tolist(), teacher[f"{tower}_embeds"].tolist(), normalize)
        for t in terms:
            assert out[f"{t}_{tower}"].item() == pytest.approx(ref[t], rel=1e-10, abs=1e-12)
    # gradients against autograd through a plain per-element reference
    total = sum(out.values())
    got = torch.autograd.grad(total, [student["image_embeds"], student["text_embeds"]])
    ref_total = 0.0
    for tower in ("image", "text"):
        s, t = student[f"{tower}_embeds"][: teacher[f"{tower}_embeds"].shape[0]], teacher[f"{tower}_embeds"]
        if normalize:
            s = s / s.pow(2).sum(-1, keepdim=True).sqrt()
            t = t / t.pow(2).sum(-1, keepdim=True).sqrt()
        for i in range(t.shape[0]):
            if "mse" in terms:
                ref_total = ref_total + sum((s[i, k] - t[i, k]) ** 2 for k in range(s.shape[1])) / t.shape[0]
            if "cosine" in terms:
                dot = sum(s[i, k] * t[i, k] for k in range(s.shape[1]))
                ref_total = ref_total + (1 - dot / (s[i].norm() * t[i].norm())) / t.shape[0]
    want = torch.autograd.grad(ref_total, [student["image_embeds"], student["text_embeds"]])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert torch.all(got[0][teacher["text_embeds"].shape[0]:] != 0)  # unpaired images do get image targets


@pytest.mark.parametrize("name", ["fd_mse", "fd_cosine", "fd_mse_cosine"])
@pytest.mark.parametrize("level", ["embeds", "features"])
def test_fd_is_zero_when_student_equals_teacher(name: str, level: str) -> None:
    student, _ = fd_inputs(seed=3)
    teacher = {k: v.clone() for k, v in student.items() if k != "n_paired"}
    feats = {"image": student["image_features"].shape[1], "text": student["text_features"].shape[1]}
    obj = OBJECTIVES.get(name)(ctx(s_feats=feats, t_feats=feats), ["image", "text"], level=level)
    out = obj(student, teacher)
    assert out and all(abs(v.item()) < 1e-12 for v in out.values())
    shifted = {k: v + 0.5 for k, v in teacher.items()}
    assert all(v.item() > 1e-6 for v in obj(student, shifted).values())


def test_fd_learnable_projection_when_widths_differ() -> None:
    s_dim, t_dim = 4, 7
    student, teacher = fd_inputs(s_dim=s_dim, t_dim=t_dim, seed=7)
    student = {k: (v.float() if torch.is_tensor(v) else v) for k, v in student.items()}
    teacher = {k: v.float() for k, v in teacher.items()}
    total = build_objectives([ObjectiveSpec(name="clip"), ObjectiveSpec(name="fd_mse", weight=2.0,
                                                                        towers=["image"])], ctx(s_dim, t_dim))
    fd = total.objectives[1]
    assert set(fd.proj) == {"image"}  # only the listed tower gets a map
    proj = fd.proj["image"]
    assert tuple(proj.weight.shape) == (t_dim, s_dim) and proj.bias is None
    # a real parameter of the module tree: the optimizer, DDP and checkpoints see it
    names = dict(total.named_parameters())
    assert names["objectives.1.proj.image.weight"] is proj.weight
    assert "objectives.1.proj.image.weight" in total.state_dict()
    # the term uses the mapped student vectors
    out = fd(student, teacher)
    mapped = (student["image_embeds"] @ proj.weight.detach().t()).tolist()
    assert out["mse_image"].item() == pytest.approx(ref_fd(mapped, teacher["image_embeds"].tolist(), True)["mse"],
                                                    rel=1e-5)
    # and it is trained: a backward pass gives it a gradient, an optimizer step moves it
    student["logit_scale"] = torch.tensor(10.0)
    loss = total(student, teacher)["loss"]
    loss.backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    before = proj.weight.detach().clone()
    torch.optim.SGD(total.parameters(), lr=0.1).step()
    assert not torch.equal(before, proj.weight.detach())
    # a state dict round trip restores it
    other = build_objectives([ObjectiveSpec(name="clip"), ObjectiveSpec(name="fd_mse", weight=2.0,
                                                                        towers=["image"])], ctx(s_dim, t_dim))
    other.load_state_dict(total.state_dict())
    assert torch.equal(other.objectives[1].proj["image"].weight, proj.weight)


def test_fd_feature_level_uses_feature_widths() -> None:
    obj = FdMse(ctx(4, 4, {"image": 8, "text": 5}, {"image": 12, "text": 5}), ["image", "text"], level="features")
    assert set(obj.proj) == {"image"} and tuple(obj.proj["image"].weight.shape) == (12, 8)
    with pytest.raises(ValueError, match="level"):
        FdMse(ctx(), ["image"], level="pixels")


def test_fd_without_teacher_target_names_the_key() -> None:
    student, teacher = fd_inputs()
    del teacher["text_embeds"]
    with pytest.raises(KeyError, match="text_embeds"):
        FdMse(ctx(), ["image", "text"])(student, teacher)


# ----------------------------------------------------------------------------------------------------------
# the weighted sum


def test_weighted_sum_total_is_sum_of_weighted_terms() -> None:
    student, teacher = fd_inputs(seed=11)
    student["image_embeds"] = F.normalize(student["image_embeds"], dim=-1).requires_grad_()
    student["text_embeds"] = F.normalize(student["text_embeds"], dim=-1)
    student["logit_scale"] = torch.tensor(12.0, dtype=torch.float64)
    c = ctx()
    weights = {"clip": 0.5, "fd_mse_cosine": 3.0, "fd_cosine": -0.25}
    total = WeightedSum([("clip", 0.5, ClipObjective(c, ["image", "text"])),
                         ("fd_mse_cosine", 3.0, FdMseCosine(c, ["image", "text"])),
                         ("fd_cosine", -0.25, FdCosine(c, ["text"]))])
    assert total.needs_teacher
    out = total(student, teacher)
    assert set(out) == {"loss", "clip", "fd_mse_cosine/mse_image", "fd_mse_cosine/cosine_image",
                        "fd_mse_cosine/mse_text", "fd_mse_cosine/cosine_text", "fd_cosine/cosine_text"}
    expected = sum(weights[k.split("/")[0]] * v.item() for k, v in out.items() if k != "loss")
    assert out["loss"].item() == pytest.approx(expected, rel=1e-12)
    # terms are logged detached; the total carries the gradient
    assert out["loss"].requires_grad and not any(v.requires_grad for k, v in out.items() if k != "loss")
    # independently recomputed
    img, txt = student["image_embeds"].tolist(), student["text_embeds"].tolist()
    fi = ref_fd(img, teacher["image_embeds"].tolist(), True)
    ft = ref_fd(txt, teacher["text_embeds"].tolist(), True)
    ref = (0.5 * ref_clip(img[:4], txt, 12.0)[0] + 3.0 * (fi["mse"] + fi["cosine"] + ft["mse"] + ft["cosine"])
           - 0.25 * ft["cosine"])
    assert out["loss"].item() == pytest.approx(ref, rel=1e-10)


def test_weighted_sum_without_teacher_objectives() -> None:
    total = build_objectives([ObjectiveSpec(name="clip", weight=2.0)], ctx())
    assert not total.needs_teacher
    image, text = unit(3, DIM, seed=8), unit(3, DIM, seed=9)
    out = total({"image_embeds": image, "text_embeds": text, "logit_scale": torch.tensor(5.0, dtype=torch.float64),
                 "n_paired": 3}, {})
    assert out["loss"].item() == pytest.approx(2.0 * ref_clip(image.tolist(), text.tolist(), 5.0)[0], rel=1e-10)
