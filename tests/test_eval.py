"""Tests for mmkd.eval: metrics against plainly written float64 references, plus a tiny fake dual encoder."""

from __future__ import annotations

import time
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mmkd.eval.efficiency import count_parameters, flops, latency, peak_memory_mb
from mmkd.eval.embed import embed_images, embed_texts
from mmkd.eval.retrieval import evaluate_retrieval, retrieval_scores
from mmkd.eval.zeroshot import evaluate_zeroshot, zeroshot_classifier, zeroshot_scores

IMAGE_SIZE, HIDDEN, DIM, VOCAB = 8, 16, 8, 97


class FakeDualEncoder(nn.Module):
    """Smallest thing with the dual-encoder interface: linear image tower, embedding-bag text tower."""

    image_size = IMAGE_SIZE

    def __init__(self) -> None:
        super().__init__()
        self.vision_model = nn.Linear(3 * IMAGE_SIZE * IMAGE_SIZE, HIDDEN)
        self.visual_projection = nn.Linear(HIDDEN, DIM, bias=False)
        self.text_model = nn.EmbeddingBag(VOCAB, HIDDEN, mode="mean", padding_idx=0)
        self.text_projection = nn.Linear(HIDDEN, DIM, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(4.6))

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        ids = [[zlib.crc32(w.encode()) % (VOCAB - 1) + 1 for w in t.lower().split()] or [0] for t in texts]
        length = max(len(x) for x in ids)
        input_ids = torch.tensor([x + [0] * (length - len(x)) for x in ids])
        return {"input_ids": input_ids, "attention_mask": (input_ids != 0).long()}

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(self.vision_model(pixel_values.flatten(1)))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.text_projection(self.text_model(input_ids * attention_mask))


@pytest.fixture
def model() -> FakeDualEncoder:
    torch.manual_seed(0)
    return FakeDualEncoder()


def _unit(rng: np.random.Generator, n: int, d: int) -> torch.Tensor:
    x = rng.standard_normal((n, d))
    return torch.tensor(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=torch.float32)


def _assert_no_near_ties(row: np.ndarray, correct: list[int]) -> None:
    """float32 and float64 rankings agree only if no score is within rounding error of a correct item's."""
    for c in correct:
        others = np.delete(row, c)
        assert np.abs(others - row[c]).min() > 1e-5, "fixture has a near-tie; pick another seed"


# ---------------------------------------------------------------- references (python loops, float64)


def _ref_zeroshot(img: torch.Tensor, cls: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    logits = 100.0 * img.double().numpy() @ cls.double().numpy().T
    y = labels.numpy()
    for i in range(len(y)):
        _assert_no_near_ties(logits[i], [int(y[i])])
    pred = np.argmax(logits, axis=1)
    top1 = float(np.mean(pred == y))
    top5 = float(np.mean([y[i] in np.argsort(-logits[i])[:5] for i in range(len(y))]))
    recalls = [np.mean(pred[y == c] == c) for c in sorted(set(y.tolist()))]
    return {"top1": top1, "top5": top5, "mean_per_class_recall": float(np.mean(recalls))}


def _ref_retrieval(img: torch.Tensor, txt: torch.Tensor, t2i: list[int]) -> dict[str, float]:
    sims = img.double().numpy() @ txt.double().numpy().T
    i2t_ranks, t2i_ranks = [], []
    for i in range(sims.shape[0]):
        if i not in t2i:
            continue
        _assert_no_near_ties(sims[i], [j for j in range(len(t2i)) if t2i[j] == i])
        order = np.argsort(-sims[i])
        i2t_ranks.append(next(pos + 1 for pos, j in enumerate(order) if t2i[j] == i))
    for j in range(sims.shape[1]):
        _assert_no_near_ties(sims[:, j], [t2i[j]])
        order = np.argsort(-sims[:, j])
        t2i_ranks.append(int(np.where(order == t2i[j])[0][0]) + 1)
    out: dict[str, float] = {}
    for name, ranks in (("i2t", np.array(i2t_ranks)), ("t2i", np.array(t2i_ranks))):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = float(np.mean(ranks <= k))
        out[f"{name}_mean_rank"] = float(np.mean(ranks))
        out[f"{name}_median_rank"] = float(np.median(ranks))
    return out


# ---------------------------------------------------------------- zero-shot


def test_zeroshot_scores_match_reference() -> None:
    rng = np.random.default_rng(1)
    cls = _unit(rng, 10, 16)
    labels = torch.tensor(rng.integers(0, 10, size=60))
    # Images near their class embedding, with enough noise that top-1 is far from perfect.
    img = F.normalize(cls[labels] + 1.4 * _unit(rng, 60, 16), dim=-1)
    got = zeroshot_scores(img, cls, labels)
    ref = _ref_zeroshot(img, cls, labels)
    assert set(got) == {"top1", "top5", "mean_per_class_recall"}
    for key in ref:
        assert got[key] == pytest.approx(ref[key], abs=1e-12), key
    assert 0.1 < got["top1"] < 0.9  # the fixture exercises both hits and misses
    assert got["top5"] >= got["top1"]


def test_zeroshot_scores_fewer_than_five_classes_and_perfect() -> None:
    rng = np.random.default_rng(2)
    cls = _unit(rng, 3, 16)
    labels = torch.tensor([0, 1, 2, 2, 2, 1])
    img = F.normalize(cls[labels] + 0.3 * _unit(rng, 6, 16), dim=-1)
    got = zeroshot_scores(img, cls, labels)
    assert "top5" not in got
    ref = _ref_zeroshot(img, cls, labels)
    assert got["top1"] == pytest.approx(ref["top1"])
    assert got["mean_per_class_recall"] == pytest.approx(ref["mean_per_class_recall"])
    assert zeroshot_scores(cls[labels], cls, labels) == {"top1": 1.0, "mean_per_class_recall": 1.0}


def test_zeroshot_scores_ties_count_against_the_model() -> None:
    cls = torch.eye(6)
    collapsed = torch.zeros(4, 6)  # every class scores 0: no lucky argmax hit
    got = zeroshot_scores(collapsed, cls, torch.tensor([0, 1, 2, 3]))
    assert got == {"top1": 0.0, "top5": 0.0, "mean_per_class_recall": 0.0}
    with pytest.raises(ValueError):
        zeroshot_scores(cls, cls, torch.tensor([0, 1, 2, 3, 4, 6]))


def test_zeroshot_classifier_is_normalised_mean_of_normalised_templates(model: FakeDualEncoder) -> None:
    classnames = ["cat", "red circle", "dog"]
    templates = ["a photo of a {}.", "a drawing of the {c}", lambda c: f"{c} {c} itself"]
    got = zeroshot_classifier(model, classnames, templates, batch_size=2)
    with torch.no_grad():
        expected = []
        for c in classnames:
            prompts = [f"a photo of a {c}.", f"a drawing of the {c}", f"{c} {c} itself"]
            rows = []
            for p in prompts:
                tok = model.tokenize([p])
                rows.append(F.normalize(model.encode_text(tok["input_ids"], tok["attention_mask"])[0], dim=0))
            expected.append(F.normalize(torch.stack(rows).mean(0), dim=0))
    assert got.shape == (3, DIM)
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-5, atol=1e-6)


def test_evaluate_zeroshot_end_to_end(model: FakeDualEncoder) -> None:
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(20, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen), torch.arange(20) % 6)
    names = [f"c{i}" for i in range(6)]
    out = evaluate_zeroshot(model, DataLoader(data, batch_size=7), names, ["{}"])
    with torch.no_grad():  # the whole path (batched embedding, classifier, scoring) against the reference
        img = F.normalize(model.encode_image(data.tensors[0]), dim=-1)
        cls = F.normalize(model.encode_text(**model.tokenize(names)), dim=-1)
    ref = _ref_zeroshot(img, cls, data.tensors[1])
    assert out == pytest.approx(ref, abs=1e-9)


# ---------------------------------------------------------------- retrieval


def _retrieval_fixture(seed: int, n: int = 40) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    rng = np.random.default_rng(seed)
    img = _unit(rng, n, 16)
    t2i = [i for i in range(n) for _ in range(int(rng.integers(1, 4)))]  # 1-3 captions per image
    rng.shuffle(t2i)
    txt = F.normalize(img[t2i] + 1.4 * _unit(rng, len(t2i), 16), dim=-1)
    return img, txt, t2i


@pytest.mark.parametrize("chunk_size", [None, 7, 1])
def test_retrieval_scores_match_reference(chunk_size: int | None) -> None:
    img, txt, t2i = _retrieval_fixture(3)
    got = retrieval_scores(img, txt, torch.tensor(t2i), chunk_size=chunk_size)
    ref = _ref_retrieval(img, txt, t2i)
    assert set(got) == set(ref)
    for key in ref:
        assert got[key] == pytest.approx(ref[key], abs=1e-12), key
    assert 0.0 < got["i2t_r1"] < 1.0 and 0.0 < got["t2i_r1"] < 1.0
    assert got["i2t_r1"] <= got["i2t_r5"] <= got["i2t_r10"]


def test_retrieval_scores_skip_uncaptioned_images_and_even_median() -> None:
    img, txt, t2i = _retrieval_fixture(4, n=12)
    keep = [j for j, i in enumerate(t2i) if i != 5]  # image 5 loses its captions but stays in the gallery
    t2i_kept = [t2i[j] for j in keep]
    got = retrieval_scores(img, txt[keep], torch.tensor(t2i_kept))
    ref = _ref_retrieval(img, txt[keep], t2i_kept)
    for key in ref:
        assert got[key] == pytest.approx(ref[key], abs=1e-12), key
    # Two images with ranks 1 and 2 -> median 1.5 (midpoint), not the lower value.
    two = retrieval_scores(
        torch.eye(2), torch.tensor([[1.0, 0.0], [1.0, 0.1]]), torch.tensor([0, 1]), ks=(1,)
    )
    assert two["t2i_median_rank"] == 1.5 and two["t2i_mean_rank"] == 1.5


def test_retrieval_collapsed_embeddings_rank_last() -> None:
    img, txt = torch.ones(4, 3), torch.ones(8, 3)
    got = retrieval_scores(img, txt, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), ks=(1,))
    assert got["i2t_r1"] == 0.0 and got["t2i_r1"] == 0.0
    assert got["i2t_mean_rank"] == 7.0  # behind the 6 other images' captions
    assert got["t2i_mean_rank"] == 4.0
    img[1, 0] = float("nan")  # a diverged model ranks last too, instead of crashing or scoring hits
    txt[3, 0] = float("nan")
    nan = retrieval_scores(img, txt, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), ks=(1,))
    assert nan["i2t_mean_rank"] == 7.0 and nan["t2i_mean_rank"] == 4.0
    with pytest.raises(ValueError):
        retrieval_scores(img, txt, torch.tensor([0, 0, 1, 1, 2, 2, 3, 4]))


def test_evaluate_retrieval_aligns_shuffled_batches(model: FakeDualEncoder) -> None:
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randn(9, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
    words = ["red", "blue", "circle", "square", "left", "right", "big", "small", "green"]
    captions = [
        [f"a {w} thing", f"{w} {words[(i + 1) % 9]}"] if i % 3 else [f"only {w}"] for i, w in enumerate(words)
    ]
    order = torch.tensor([4, 0, 8, 2, 6, 1, 3, 7, 5])
    batches = [(pixels[order[s : s + 4]], order[s : s + 4]) for s in range(0, 9, 4)]
    got = evaluate_retrieval(model, batches, captions)

    # Same thing by hand in natural order.
    img = F.normalize(model.encode_image(pixels).detach(), dim=-1)
    texts = [c for caps in captions for c in caps]
    t2i = [i for i, caps in enumerate(captions) for _ in caps]
    tok = model.tokenize(texts)
    txt = F.normalize(model.encode_text(tok["input_ids"], tok["attention_mask"]).detach(), dim=-1)
    expected = retrieval_scores(img, txt, torch.tensor(t2i))
    assert got == pytest.approx(expected)


# ---------------------------------------------------------------- embeddings


def test_embed_normalised_and_mode_restored(model: FakeDualEncoder) -> None:
    model.train()
    texts = ["a cat", "two dogs on a mat", "x"]
    emb = embed_texts(model, texts, batch_size=2)
    assert emb.shape == (3, DIM) and not emb.is_inference()
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    batches = [(torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE), torch.tensor([5, 6]))] * 2
    img, extra = embed_images(model, batches)
    assert img.shape == (4, DIM) and extra.tolist() == [5, 6, 5, 6]
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(4))
    assert model.training


# ---------------------------------------------------------------- efficiency


def test_count_parameters(model: FakeDualEncoder) -> None:
    counts = count_parameters(model)
    image = (3 * IMAGE_SIZE**2 + 1) * HIDDEN + HIDDEN * DIM
    text = VOCAB * HIDDEN + HIDDEN * DIM
    assert counts == {"image": image, "text": text, "total": image + text + 1}  # +1: logit_scale
    model.text_projection.weight = model.visual_projection.weight  # tied heads count once in the total
    tied = count_parameters(model)
    assert tied["image"] == image and tied["text"] == text
    assert tied["total"] == image + text + 1 - HIDDEN * DIM


def test_flops_per_item_and_scaling(model: FakeDualEncoder) -> None:
    one = flops(model, batch_size=1)
    four = flops(model, batch_size=4)
    assert one["image_gflops"] > 0 and one["text_gflops"] > 0
    # Per-item numbers are batch-independent, i.e. the total scales linearly with the batch.
    assert four == pytest.approx(one)
    assert one["image_gflops"] == pytest.approx(2 * (3 * IMAGE_SIZE**2 * HIDDEN + HIDDEN * DIM) / 1e9)
    assert one["text_gflops"] == pytest.approx(2 * HIDDEN * DIM / 1e9)  # embedding-bag look-ups are free


def test_latency_keys_positive(model: FakeDualEncoder) -> None:
    out = latency(model, batch_sizes=(1, 64), repeats=3, warmup=1, budget_s=1.0)
    keys = {
        "latency_ms_per_image",
        "latency_ms_per_image_b64",
        "latency_ms_per_caption",
        "latency_ms_per_caption_b64",
        "images_per_s_b64",
        "captions_per_s_b64",
    }
    assert set(out) == keys
    assert all(v > 0 for v in out.values())


def test_paired_speedup_alternates_times_one_thread_and_gives_the_flops_ratio(model: FakeDualEncoder,
                                                                               monkeypatch) -> None:
    """Each round times both models back to back, the first alternating (neither always runs on what the other
    left in the cache), at one intra-op thread (restored afterwards); the figure is the median of the rounds'
    ratios, by the thread's CPU time (which other processes cannot stretch), so the round whose CPU time a spike
    still moved (the last) does not move it. The wall-clock ratio and the FLOPs ratio stand beside it (half the
    image tower's width: half its FLOPs)."""
    from mmkd.errors import UsageError
    from mmkd.eval import efficiency

    small = FakeDualEncoder()
    small.vision_model = nn.Linear(3 * IMAGE_SIZE**2, HIDDEN // 2)
    small.visual_projection = nn.Linear(HIDDEN // 2, DIM, bias=False)
    cpu = {"ref": iter([3.0, 3.3, 3.0, 2.8, 3.1]), "small": iter([1.0, 1.1, 1.0, 1.0, 4.0])}
    wall = {"ref": iter([2.0] * 5), "small": iter([1.0, 1.0, 1.0, 1.0, 2.0])}
    order: list[str] = []
    threads: list[int] = []

    def fake_time_call(fn, repeats, warmup, budget_s, sync):  # noqa: ANN001, ANN202
        who = "ref" if fn.__defaults__[0] is model else "small"  # each timed fn binds its model
        order.append(who)
        threads.append(torch.get_num_threads())
        fn()
        return next(wall[who]), next(cpu[who])

    monkeypatch.setattr(efficiency, "_time_call", fake_time_call)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = efficiency.paired_speedup(model, small, rounds=5, budget_s=1.0)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert order == ["ref", "small", "small", "ref"] * 2 + ["ref", "small"]
    assert threads == [1] * 10 and out["threads"] == 1 and out["batch_size"] == 1
    assert out["rounds"] == pytest.approx([3.0, 3.0, 3.0, 2.8, 0.775])
    assert out["median"] == pytest.approx(3.0) and out["clock"] == "thread CPU time"
    assert out["median_wall"] == pytest.approx(2.0)
    full, half = 3 * IMAGE_SIZE**2 * HIDDEN + HIDDEN * DIM, 3 * IMAGE_SIZE**2 * HIDDEN // 2 + HIDDEN // 2 * DIM
    assert out["flops_ratio"] == pytest.approx(full / half)
    with pytest.raises(UsageError, match="rounds must be >= 1"):
        efficiency.paired_speedup(model, model, rounds=0)


def test_peak_memory_sees_a_transient_allocation() -> None:
    def allocate() -> None:
        # 64 MiB of fresh pages, touched: an mmap, because a tensor may reuse pages the allocator freed earlier
        # but kept resident (after other tests), which adds nothing to RSS
        import mmap

        buf = mmap.mmap(-1, 64 * 2**20)
        buf.write(b"\1" * len(buf))
        time.sleep(0.05)
        buf.close()

    assert peak_memory_mb(allocate) > 32
    assert peak_memory_mb(lambda: None) < 16  # relative to the start: an idle call adds next to nothing


def test_world_metrics_embeds_once_and_matches_each_task_alone(minilm_path: str, tmp_path, monkeypatch) -> None:
    """world_metrics scores every class set and retrieval from one pass over the test images; the figures are
    those of each evaluation run on its own."""
    from conftest import tiny_dual_encoder

    from mmkd.data import world
    from mmkd.eval import suite

    model = tiny_dual_encoder(minilm_path).eval()
    test = world.to_records(world.load_split("test", 300, tmp_path / "world"))
    calls = []
    real = suite.embed_images

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(suite, "embed_images", counting)
    got = suite.world_metrics(model, test, latency_budget_s=0.05, retrieval_images=100)
    monkeypatch.undo()
    assert len(calls) == 1
    for cs in ("colour_shape", "shape", "colour"):
        alone = suite.zeroshot(model, test, world.class_sets()[cs], world.templates(cs), suite.world_labels(test, cs))
        assert got["zeroshot"][cs] == pytest.approx(alone, abs=1e-6)
    assert got["retrieval"] == pytest.approx(suite.retrieval(model, test[:100]), abs=1e-6)
