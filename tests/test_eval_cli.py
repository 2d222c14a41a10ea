"""`mmkd eval` end to end against plainly written references, `mmkd eval all` suites, and their errors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_dual_encoder
from PIL import Image

from mmkd.cli import main
from mmkd.config import EvalSpec
from mmkd.data.batches import ImageBank
from mmkd.data.sources import read_records
from mmkd.data.templates import load_templates
from mmkd.eval.runner import SuiteConfig, load_suite, validate_suite
from mmkd.models.dual_encoder import DualEncoder
from mmkd.models.hub import load_dual_encoder, save_dual_encoder

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
WORDS = ["red", "blue", "circle", "square", "left", "right", "big", "small", "green", "dog", "cat", "car"]


def _random_model(minilm_path: str, seed: int, width: int = 32, layers: int = 2) -> DualEncoder:
    # the teacher's seed is one whose random zero-shot predictions spread over several classes (a check below)
    return tiny_dual_encoder(minilm_path, width=width, layers=layers, seed=seed, dim=16)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"teacher": save_dual_encoder(_random_model(minilm_path, 2, 48, 2), root / "teacher"),
            "student": save_dual_encoder(_random_model(minilm_path, 1, 32, 1), root / "student")}


@pytest.fixture(scope="module")
def cifar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hand-made cifar-10-batches-py test batch: 60 images, labels 0..9."""
    root = tmp_path_factory.mktemp("cifar") / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    # flat random colours with a little noise: different enough for a random model to tell apart
    colours = rng.integers(0, 256, (60, 3, 1), dtype=np.int64)
    rows = np.clip(colours + rng.integers(-20, 21, (60, 3, 1024)), 0, 255).astype(np.uint8).reshape(60, 3072)
    with (root / "test_batch").open("wb") as f:
        pickle.dump({b"labels": [i % 10 for i in range(60)], b"data": rows}, f)
    with (root / "batches.meta").open("wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in CIFAR_NAMES]}, f)
    return root


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A JSONL set of 16 noise images with 1-3 captions each; a few mention women or men."""
    root = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(1)
    lines = []
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / f"{i}.png")
        caps = [" ".join(rng.choice(WORDS, 4)) for _ in range(int(rng.integers(1, 4)))]
        if i < 6:
            caps[0] = f"a {'woman' if i % 2 else 'man'} with a {caps[0]}"
        lines.append(json.dumps({"image": f"{i}.png", "captions": caps}))
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return root / "pairs.jsonl"


def _run_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def _image_embeddings(model: DualEncoder, spec: str, **options) -> tuple[np.ndarray, list]:
    """Embeddings straight from encode_image on the model's own preprocessing, in float64."""
    records = read_records(spec, **options)
    bank = ImageBank(records, model.meta.image_size, model.meta.image_mean, model.meta.image_std)
    with torch.no_grad():
        emb = model.encode_image(bank.pixels(list(range(len(records)))))
    return F.normalize(emb.double(), dim=-1).numpy(), records


def _text_embedding(model: DualEncoder, text: str) -> np.ndarray:
    tok = model.tokenize([text])
    with torch.no_grad():
        return F.normalize(model.encode_text(tok["input_ids"], tok["attention_mask"]).double(), dim=-1)[0].numpy()


def _no_near_tie(row: np.ndarray, correct: int) -> None:
    assert np.abs(np.delete(row, correct) - row[correct]).min() > 1e-5, "near-tie in the fixture; change a seed"


def test_zeroshot_cli_matches_reference(models: dict[str, Path], cifar: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    got = _run_json(capsys, ["eval", "zeroshot", "--model", str(models["teacher"]), "--data", f"cifar10:{cifar}"])
    assert got["n"] == 60

    model = load_dual_encoder(models["teacher"]).eval()
    img, records = _image_embeddings(model, f"cifar10:{cifar}", split="test")
    labels = [r.label for r in records]
    # CLIP_benchmark: class = normalised mean of the normalised embeddings of CIFAR's 18 prompts
    classes = []
    for name in CIFAR_NAMES:
        prompts = [t.replace("{c}", name) for t in load_templates("cifar10")]
        assert len(prompts) == 18
        mean = np.mean([_text_embedding(model, p) for p in prompts], axis=0)
        classes.append(mean / np.linalg.norm(mean))
    logits = 100 * img @ np.stack(classes).T
    hits1, hits5, per_class = 0, 0, {c: [] for c in range(10)}
    for i, y in enumerate(labels):
        _no_near_tie(logits[i], y)
        order = list(np.argsort(-logits[i]))
        hits1 += order[0] == y
        hits5 += y in order[:5]
        per_class[y].append(order[0] == y)
    ref = {"top1": hits1 / 60, "top5": hits5 / 60,
           "mean_per_class_recall": float(np.mean([np.mean(v) for v in per_class.values()]))}
    for key, value in ref.items():
        assert got["zeroshot"][key] == pytest.approx(value, abs=1e-9), key
    assert len({int(np.argmax(r)) for r in logits}) > 2  # the random model does not predict one class only


def test_retrieval_cli_matches_reference(models: dict[str, Path], pairs: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    got = _run_json(capsys, ["eval", "retrieval", "--model", str(models["student"]), "--data", f"jsonl:{pairs}"])
    model = load_dual_encoder(models["student"]).eval()
    img, records = _image_embeddings(model, f"jsonl:{pairs}")
    texts = [(c, i) for i, r in enumerate(records) for c in r.captions]
    txt = np.stack([_text_embedding(model, c) for c, _ in texts])
    sims = img @ txt.T
    i2t, t2i = [], []
    for i in range(len(records)):
        order = list(np.argsort(-sims[i]))
        i2t.append(min(order.index(j) for j, (_, owner) in enumerate(texts) if owner == i) + 1)
    for j, (_, owner) in enumerate(texts):
        _no_near_tie(sims[:, j], owner)
        t2i.append(list(np.argsort(-sims[:, j])).index(owner) + 1)
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in (1, 5, 10):
            assert got["retrieval"][f"{name}_r{k}"] == pytest.approx(np.mean(np.array(ranks) <= k)), (name, k)
        assert got["retrieval"][f"{name}_mean_rank"] == pytest.approx(np.mean(ranks))
        assert got["retrieval"][f"{name}_median_rank"] == pytest.approx(np.median(ranks))


def _suite(tmp_path: Path, cifar: Path, pairs: Path) -> Path:
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"""
name: test
cache_dir: {tmp_path / 'cache'}
world_n: 64
tasks:
  - {{kind: zeroshot, data: "cifar10:{cifar}", name: cifar10}}
  - {{kind: zeroshot, data: "world:test", class_set: shape}}
  - {{kind: retrieval, data: "jsonl:{pairs}", name: pairs}}
  - {{kind: bias, data: "jsonl:{pairs}", min_group_images: 3}}
  - {{kind: efficiency, batch_sizes: [1, 4], budget_s: 0.3}}
""")
    return suite


def test_eval_all_writes_the_extended_schema(tmp_path: Path, models: dict[str, Path], cifar: Path, pairs: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "eval"
    capsys.readouterr()
    assert main(["eval", "all", "--teacher", str(models["teacher"]), "--model", str(models["student"]),
                 "--suite", str(_suite(tmp_path, cifar, pairs)), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| teacher |" in printed and "| student |" in printed and "cifar10 top-1" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["models"]) == {"teacher", "student"}
    for m in metrics["models"].values():
        assert isinstance(m["params"], int) and m["params"] == m["params_per_tower"]["total"]
        assert m["latency_ms_per_image"] > 0 and m["latency"]["images_per_s_b4"] > 0 and m["latency"]["threads"] >= 1
        assert m["flops"]["image_gflops"] > 0 and m["flops"]["text_gflops"] > 0
        assert set(m["peak_memory_mb"]) == {"image_b64", "caption_b64"}
        assert set(m["zeroshot"]) == {"cifar10", "shape"} and "top5" in m["zeroshot"]["cifar10"]
        assert set(m["retrieval"]) == {"pairs"} and 0 <= m["retrieval"]["pairs"]["i2t_r10"] <= 1
    assert metrics["models"]["student"]["params"] < metrics["models"]["teacher"]["params"]
    bias = metrics["bias"]
    assert bias["reference"] == "teacher" and set(bias["vs_reference"]) == {"student"}
    assert bias["models"]["student"]["image"]["n_images"] == {"female": 3, "male": 3}
    assert set(bias["vs_reference"]["student"]) == {"text", "image"}
    assert metrics["eval"]["suite"] == "test" and metrics["eval"]["models"]["teacher"] == str(models["teacher"])

    # the suite's numbers are those of the single-task command
    single = _run_json(capsys, ["eval", "zeroshot", "--model", str(models["student"]), "--data", f"cifar10:{cifar}"])
    assert metrics["models"]["student"]["zeroshot"]["cifar10"] == pytest.approx(single["zeroshot"])

    assert main(["report", str(out), "--out", str(tmp_path / "r.html")]) == 0
    assert "fig-bias-image" in (tmp_path / "r.html").read_text() and (tmp_path / "r.md").is_file()

    # another command's metrics.json is never overwritten
    other = tmp_path / "demo"
    other.mkdir()
    (other / "metrics.json").write_text('{"models": {}, "demo": {}}')
    capsys.readouterr()
    assert main(["eval", "all", "--model", str(models["student"]), "--suite", str(_suite(tmp_path, cifar, pairs)),
                 "--out", str(other)]) == 2
    assert "not written by mmkd eval all" in capsys.readouterr().err
    assert (other / "metrics.json").read_text() == '{"models": {}, "demo": {}}'


def test_eval_bias_and_efficiency_commands(tmp_path: Path, models: dict[str, Path], pairs: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["eval", "bias", "--teacher", str(models["teacher"]), "--model", f"small={models['student']}",
                 "--data", f"jsonl:{pairs}", "--min-group-images", "3", "--json", str(tmp_path / "b.json")]) == 0
    printed = capsys.readouterr().out
    assert "nurse" in printed and "small vs teacher: mean |Δ|" in printed and "images: 3 female-caption" in printed
    saved = json.loads((tmp_path / "b.json").read_text())["bias"]
    assert set(saved["models"]) == {"teacher", "small"}

    got = _run_json(capsys, ["eval", "efficiency", "--teacher", str(models["teacher"]), "--model",
                             str(models["student"]), "--batch-sizes", "1", "8", "--budget", "0.3", "--threads", "1"])
    assert set(got["models"]) == {"teacher", "student"}
    t, s = got["models"]["teacher"], got["models"]["student"]
    assert s["params_per_tower"]["image"] < t["params_per_tower"]["image"]
    assert s["flops"]["image_gflops"] < t["flops"]["image_gflops"]
    assert t["latency"]["threads"] == 1 and "images_per_s_b8" in t["latency"]


def test_suite_errors_name_the_task(tmp_path: Path, models: dict[str, Path],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match=r"tasks\[1\].kind: unknown kind 'zeroshoot'; valid: bias, efficiency"):
        validate_suite(SuiteConfig(tasks=[EvalSpec("efficiency"), EvalSpec("zeroshoot", data="world:test")]))
    with pytest.raises(ValueError, match=r"tasks\[0\]: kind retrieval needs 'data'"):
        validate_suite(SuiteConfig(tasks=[EvalSpec("retrieval")]))
    with pytest.raises(ValueError, match=r"tasks\[1\]: tasks\[0\] is also a zeroshot task named 'shape'"):
        validate_suite(SuiteConfig(tasks=[EvalSpec("zeroshot", "world:test", class_set="shape"),
                                          EvalSpec("zeroshot", "world:val", class_set="shape")]))
    with pytest.raises(ValueError, match=r"tasks\[0\].data: .*unknown format 'cifar11'"):
        validate_suite(SuiteConfig(tasks=[EvalSpec("zeroshot", "cifar11:x")]))
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks:\n  - {kind: zeroshot, data: 'world:test', limt: 3}\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown config key 'tasks\[0\].limt'"):
        load_suite(bad)
    assert load_suite(Path(__file__).parents[1] / "configs/suites/demo.yaml").tasks[1].name == "colour_shape"
    shipped = Path(__file__).parents[1] / "configs/suites/cifar10_coco.yaml"
    if (Path(__file__).parents[2] / "shared" / "data").is_dir():  # its paths, relative to it, must exist
        assert {t.name for t in load_suite(shipped).tasks} >= {"cifar10", "coco-mini"}
    # through the CLI: exit code 2 and the message on stderr
    assert main(["eval", "all", "--model", str(models["student"]), "--suite", str(bad)]) == 2
    assert "limt" in capsys.readouterr().err
    assert main(["eval", "zeroshot", "--model", str(models["student"]), "--data", f"stl10:{tmp_path / 'no'}"]) == 2
    assert "stl10_binary" in capsys.readouterr().err


def test_retrieval_and_bias_groups_on_coco_mini(shared_data: Path, models: dict[str, Path],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from mmkd.eval.bias import caption_groups, load_bias_words

    coco = f"coco:{shared_data / 'coco-mini' / 'captions_coco_format.json'}"
    got = _run_json(capsys, ["eval", "retrieval", "--model", str(models["student"]), "--data", coco])
    assert got["n"] == 239
    r = got["retrieval"]
    assert 0 <= r["i2t_r1"] <= r["i2t_r5"] <= r["i2t_r10"] <= 1 and 1 <= r["t2i_median_rank"] <= 239
    groups = caption_groups(read_records(coco), load_bias_words())
    assert {k: len(v) for k, v in groups.items()} == {"female": 21, "male": 57}  # the sizes README quotes


def test_one_dispatch_for_runs_suites_and_commands(tmp_path: Path, models: dict[str, Path], cifar: Path,
                                                   pairs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``evaluate`` (a run's ``eval:``, the public API) gives the numbers of ``mmkd eval KIND``, under the run's
    names and defaults (world:test, split test, an explicit split strict); unknown kinds fail before training."""
    from mmkd.config import ConfigError, RunConfig
    from mmkd.data.records import DataError
    from mmkd.eval.tasks import evaluate
    from mmkd.pipeline import run_distill

    model = load_dual_encoder(models["student"])
    specs = [EvalSpec("zeroshot", class_set="shape", limit=16), EvalSpec("retrieval", f"jsonl:{pairs}"),
             EvalSpec("zeroshot", f"cifar10:{cifar}", name="cifar")]
    got = evaluate(model, specs, cache_dir=tmp_path / "cache")
    assert list(got) == ["zeroshot:world:test:shape", f"retrieval:jsonl:{pairs}", "cifar"]
    world = _run_json(capsys, ["eval", "zeroshot", "--model", str(models["student"]), "--data", "world:test",
                               "--class-set", "shape", "--world-n", "16", "--cache", str(tmp_path / "cache")])
    assert world["n"] == 16 and got["zeroshot:world:test:shape"] == pytest.approx(world["zeroshot"])
    ret = _run_json(capsys, ["eval", "retrieval", "--model", str(models["student"]), "--data", f"jsonl:{pairs}"])
    assert got[f"retrieval:jsonl:{pairs}"] == pytest.approx(ret["retrieval"])
    zs = _run_json(capsys, ["eval", "zeroshot", "--model", str(models["student"]), "--data", f"cifar10:{cifar}"])
    assert got["cifar"] == pytest.approx(zs["zeroshot"])

    # a split named in a run's eval: must exist; the command's default split is ignored where there is none
    with pytest.raises(DataError, match="split 'val' given"):
        evaluate(model, [EvalSpec("retrieval", f"jsonl:{pairs}", split="val")])
    assert _run_json(capsys, ["eval", "retrieval", "--model", str(models["student"]), "--data", f"jsonl:{pairs}",
                              "--split", "val"])["n"] == ret["n"]

    # every kind of the dispatch, also those that read no data or compare models
    more = evaluate(model, [EvalSpec("efficiency", batch_sizes=[1], budget_s=0.1), EvalSpec("bias")])
    assert set(more) == {"efficiency", "bias"}
    assert more["efficiency"]["params"] == sum(p.numel() for p in model.parameters())
    assert set(more["bias"]["models"]) == {"model"} and more["bias"]["reference"] is None

    cfg = RunConfig(eval=[EvalSpec("retrieval", f"jsonl:{pairs}"), EvalSpec("zeroshoot")],
                    out=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"eval\[1\].kind: unknown kind 'zeroshoot'; valid: bias, efficiency"):
        run_distill(cfg)
    assert not (tmp_path / "run").exists()
