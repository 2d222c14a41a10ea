"""Bring your own embeddings: `mmkd cache import` reads clip-retrieval's layout as a one-view teacher cache that
`mmkd distill` trains from with no teacher weights, `mmkd cache export` writes a cache back to that layout, and
every mismatch between the import and the data is refused in one line naming the file."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import tiny_dual_encoder, write_clip_retrieval
from PIL import Image
from tiny_runs import NEW_STUDENT_YAML

from mmkd.cli import main
from mmkd.data.batches import ImageBank
from mmkd.data.records import Record
from mmkd.teacher.cache import CachedTeacher, verify_cache
from mmkd.teacher.targets import teacher_outputs

pq = pytest.importorskip("pyarrow.parquet")
N = 12


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> dict[str, Any]:
    """A JSONL data set of N images with one caption each, and a tiny model's float16 embeddings of it (as
    clip-retrieval computes them: normalised, then cast to float16)."""
    root = tmp_path_factory.mktemp("byoe")
    rng = np.random.default_rng(0)
    (root / "img").mkdir()
    records, lines = [], []
    for i in range(N):
        img = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
        path = root / "img" / f"s{i:03d}.png"
        Image.fromarray(img).save(path)
        caption = f"a shape number {i}"
        records.append(Record(f"s{i:03d}", img, (caption,)))
        lines.append(json.dumps({"image": f"img/{path.name}", "captions": [caption], "key": f"s{i:03d}"}))
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    model = tiny_dual_encoder(minilm_path).eval()
    bank = ImageBank(records, 32, model.meta.image_mean, model.meta.image_std, augment=False)
    out = teacher_outputs(model, bank.pixels(list(range(N))), [r.captions[0] for r in records])
    return {"root": root, "data": f"jsonl:{root / 'pairs.jsonl'}", "paths": [str(root / "img" / f"s{i:03d}.png")
                                                                           for i in range(N)],
            "captions": [r.captions[0] for r in records], "keys": [r.key for r in records],
            "img": out["image_embeds"].numpy().astype(np.float16),
            "text": out["text_embeds"].numpy().astype(np.float16), "tokenizer": minilm_path}


def _source(world: dict[str, Any], folder: Path, partitions: int = 2, **change: Any) -> Path:
    """The world's embeddings in clip-retrieval's layout (files input: absolute image paths, each caption read
    from a .txt file with its newline), with any array or column replaced by ``change``."""
    img, text = change.pop("img", world["img"]), change.pop("text", world["text"])
    columns = {"image_path": world["paths"], "caption": [c + "\n" for c in world["captions"]], **change}
    return write_clip_retrieval(folder, img, text, columns, partitions)


STUDENT = NEW_STUDENT_YAML.replace("  projection_dim: 16", "  tokenizer: TOKENIZER\n  projection_dim: 16")


def _config(tmp_path: Path, world: dict[str, Any], cache: Path, objectives: str, augment: bool = False) -> Path:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""
teacher: cache:{cache}
out: {tmp_path / 'run'}
{STUDENT.replace('TOKENIZER', world['tokenizer'])}
data: {{train: "{world['data']}", batch_size: 4, augment: {str(augment).lower()}}}
objectives: {objectives}
train: {{steps: 2, log_every: 1, ckpt_every: 0, warmup_steps: 1, threads: 1}}
""")
    return cfg


def test_import_distill_export_round_trip(world: dict[str, Any], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    src = _source(world, tmp_path / "cr")
    cache = tmp_path / "tc"
    assert main(["cache", "import", "--from", str(src), "--data", world["data"], "--out", str(cache)]) == 0
    assert "rows matched by path" in capsys.readouterr().out
    assert verify_cache(cache).ok
    tc = CachedTeacher.open(cache)
    assert tc.keys == world["keys"] and tc.views == 1 and tc.embed_dim == world["img"].shape[1]
    assert tc.imported is not None and tc.feature_dims == {} and "tokenizer" not in {p.name for p in cache.iterdir()}
    # stored bit-exact (float16 in, float16 kept), each caption's embedding under the data's own caption string
    assert np.array_equal(tc.images(world["keys"])["image_embeds"].numpy().astype(np.float16), world["img"])
    assert np.array_equal(tc.texts(world["captions"])["text_embeds"].numpy().astype(np.float16), world["text"])

    # the same import again leaves the cache as it is; another import into it is refused, naming what differs
    before = {p: p.read_bytes() for p in cache.rglob("*") if p.is_file() and p.name != ".lock"}
    assert main(["cache", "import", "--from", str(src), "--data", world["data"], "--out", str(cache)]) == 0
    assert {p: p.read_bytes() for p in cache.rglob("*") if p.is_file() and p.name != ".lock"} == before
    other = _source(world, tmp_path / "cr-other", img=world["img"][::-1].copy())
    assert main(["cache", "import", "--from", str(other), "--data", world["data"], "--out", str(cache)]) == 2
    assert "other settings" in capsys.readouterr().err

    # distil from it: embeddings, logits and the contrastive loss, with no teacher weights anywhere
    cfg = _config(tmp_path, world, cache, "[{name: clip}, {name: fd_mse_cosine, towers: [image, text]}, {name: kl}]")
    assert main(["distill", str(cfg)]) == 0
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"clip", "fd_mse_cosine/mse_image", "fd_mse_cosine/cosine_text", "kl/i2t"} <= set(last)
    assert all(np.isfinite(v) for k, v in last.items() if k != "step")

    # export back: the same arrays, bit for bit, with keys, image paths and the data's captions
    out = tmp_path / "exported"
    assert main(["cache", "export", str(cache), "--out", str(out), "--data", world["data"]]) == 0
    img = np.concatenate([np.load(p, allow_pickle=False) for p in sorted((out / "img_emb").glob("*.npy"))])
    text = np.concatenate([np.load(p, allow_pickle=False) for p in sorted((out / "text_emb").glob("*.npy"))])
    meta = pq.read_table(sorted((out / "metadata").glob("*.parquet"))[0]).to_pydict()
    assert img.dtype == np.float16 and np.array_equal(img, world["img"]) and np.array_equal(text, world["text"])
    assert meta["key"] == world["keys"] and meta["caption"] == world["captions"]
    assert [str(Path(p).resolve()) for p in meta["image_path"]] == [str(Path(p).resolve()) for p in world["paths"]]

    # and the export imports again (matched by its key column) to the same cache contents
    again = tmp_path / "tc2"
    assert main(["cache", "import", "--from", str(out), "--data", world["data"], "--out", str(again)]) == 0
    assert "rows matched by key" in capsys.readouterr().out
    t2 = CachedTeacher.open(again)
    assert torch.equal(t2.images(world["keys"])["image_embeds"], tc.images(world["keys"])["image_embeds"])
    assert torch.equal(t2.texts(world["captions"])["text_embeds"], tc.texts(world["captions"])["text_embeds"])

    # without the data, the export holds images only (the cache does not pair captions with images), and says so
    assert main(["cache", "export", str(cache), "--out", str(tmp_path / "images-only")]) == 0
    assert "give --data" in capsys.readouterr().out
    assert not (tmp_path / "images-only" / "text_emb").exists()
    # a non-empty --out is never written into
    assert main(["cache", "export", str(cache), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_import_refuses_what_it_cannot_serve(world: dict[str, Any], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Features, augmented views and a student that shrinks the teacher: each refused in one line."""
    cache = tmp_path / "tc"
    assert main(["cache", "import", "--from", str(_source(world, tmp_path / "cr")), "--data", world["data"],
                 "--out", str(cache)]) == 0
    capsys.readouterr()
    features = "[{name: clip}, {name: fd_cosine, towers: [image], params: {level: features}}]"
    assert main(["distill", str(_config(tmp_path, world, cache, features))]) == 2
    err = capsys.readouterr().err
    assert "pooled features" in err and "imported" in err and err.count("\n") == 1
    fd = "[{name: clip}, {name: fd_mse, towers: [image]}]"
    assert main(["distill", str(_config(tmp_path, world, cache, fd, augment=True))]) == 2
    err = capsys.readouterr().err
    assert "view 0 only" in err and "data.augment: false" in err
    assert main(["distill", str(_config(tmp_path, world, cache, fd)), "student.vision.source=teacher"]) == 2
    assert "no teacher weights" in capsys.readouterr().err


def _nan(world: dict[str, Any]) -> np.ndarray:
    img = world["img"].copy()
    img[5, 2] = np.nan
    return img


MISMATCHES = {
    # name: (change to the source, words the error must hold)
    "rows": (lambda w: {}, ["img_emb_1.npy has 5 rows but", "metadata_1.parquet has 6"]),
    "not_in_data": (lambda w: {"image_path": w["paths"][:3] + ["/elsewhere/a.png"] + w["paths"][4:]},
                    ["1 of the 12 imported rows", "not in the data", "metadata_0.parquet", "/elsewhere/a.png"]),
    "absent": (lambda w: {"image_path": w["paths"][:-1], "caption": [c + "\n" for c in w["captions"][:-1]],
                          "img": w["img"][:-1], "text": w["text"][:-1]},
               ["1 of the data's 12 images have no embedding", "'s011'"]),
    "dims": (lambda w: {"text": np.concatenate([w["text"], w["text"][:, :4]], axis=1)},
             ["text_emb_0.npy holds 28-wide", "24-wide", "one embedding space"]),
    "nan": (lambda w: {"img": _nan(w)}, ["img_emb_0.npy: row 5 holds NaN"]),
    "duplicate": (lambda w: {"image_path": w["paths"][:7] + [w["paths"][0]] + w["paths"][8:]},
                  ["row 0 of", "row 1 of", "both name sample 's000'"]),
    "caption": (lambda w: {"caption": ["another caption"] + w["captions"][1:]},
                ["row 0 of", "metadata_0.parquet", "'another caption' is not a caption of sample 's000'"]),
}


@pytest.mark.parametrize("name", sorted(MISMATCHES))
def test_mismatches_fail_in_one_line_naming_the_file(name: str, world: dict[str, Any], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    change, words = MISMATCHES[name]
    src = _source(world, tmp_path / "cr", **change(world))
    if name == "rows":  # one embedding fewer than metadata rows in partition 1
        np.save(src / "img_emb" / "img_emb_1.npy", world["img"][6:11])
    out = tmp_path / "tc"
    assert main(["cache", "import", "--from", str(src), "--data", world["data"], "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    for w in words:
        assert w in err, (w, err)
    assert not out.exists()  # refused before anything was written


def test_unsafe_or_incomplete_files_are_refused(world: dict[str, Any], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    src = _source(world, tmp_path / "cr")
    np.save(src / "img_emb" / "img_emb_1.npy", np.array([{"a": 1}] * 6, dtype=object), allow_pickle=True)
    args = ["cache", "import", "--from", str(src), "--data", world["data"], "--out", str(tmp_path / "tc")]
    assert main(args) == 2
    assert "img_emb_1.npy holds Python objects (pickled)" in capsys.readouterr().err
    src = _source(world, tmp_path / "cr2")
    (src / "metadata" / "metadata_1.parquet").unlink()
    assert main([*args[:3], str(src), *args[4:]]) == 2
    err = capsys.readouterr().err
    assert "img_emb_1.npy has no matching file" in err and "metadata" in err


def test_match_by_key_and_image_only_import(world: dict[str, Any], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """WebDataset input: clip-retrieval writes each sample's __key__ as image_path; without text_emb/ the cache
    holds images only, and objectives on text are refused naming it."""
    src = write_clip_retrieval(tmp_path / "cr", world["img"], None, {"image_path": world["keys"]}, 3)
    cache = tmp_path / "tc"
    assert main(["cache", "import", "--from", str(src), "--data", world["data"], "--out", str(cache),
                 "--dtype", "float32"]) == 0
    assert "rows matched by key" in capsys.readouterr().out
    tc = CachedTeacher.open(cache)
    assert tc.arrays == ["image_embeds"] and tc.n_captions == 0
    # float32 storage of float16 input: renormalised to float32's unit-norm tolerance, so equal to float16 precision
    got = tc.images(world["keys"])["image_embeds"]
    assert torch.allclose(got, torch.from_numpy(world["img"]).float(), atol=2e-3)
    assert torch.allclose(got.norm(dim=-1), torch.ones(N), atol=1e-4)
    assert main(["distill", str(_config(tmp_path, world, cache, "[{name: clip}, {name: fd_mse}]"))]) == 2
    assert "text_emb" in capsys.readouterr().err


def test_missing_pyarrow_is_named(world: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    src = _source(world, tmp_path / "cr")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    assert main(["cache", "import", "--from", str(src), "--data", world["data"], "--out", str(tmp_path / "tc")]) == 2
    assert "pip install 'mmkd[parquet]'" in capsys.readouterr().err
