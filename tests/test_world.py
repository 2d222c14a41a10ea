"""Tests for the built-in world (mmkd.data.world): determinism, splits, labels vs captions, cache."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from mmkd.data import world
from mmkd.data.records import open_image
from mmkd.data.world import COLOURS, SHAPES, SIZES, WorldConfig, class_sets, generate, load_split, templates

_WORD = {w: re.compile(rf"\b{w}\b") for w in (*COLOURS, *SHAPES, *SIZES)}
_OBJ = rf"(?:small |large )?({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
_REL = re.compile(rf"a {_OBJ} (to the left of|to the right of|above|below) a {_OBJ}")


@pytest.fixture(scope="module")
def sample() -> world.WorldSplit:
    return generate(2000, seed=0)


def _same(a: world.WorldSplit, b: world.WorldSplit) -> bool:
    return (
        a.images.tobytes() == b.images.tobytes()
        and a.captions == b.captions
        and a.keys == b.keys
        and a.labels.keys() == b.labels.keys()
        and all(np.array_equal(a.labels[k], b.labels[k]) for k in a.labels)
    )


def test_deterministic_and_independent_of_call_order() -> None:
    a = generate(300, seed=5, split="train")
    generate(100, seed=5, split="val")  # other work in between must not matter
    b = generate(300, seed=5, split="train")
    assert _same(a, b)
    # A smaller n is a prefix of a larger one, so key i always means the same image.
    assert _same(generate(100, seed=5, split="train"), a.subset(slice(0, 100)))
    c = generate(300, seed=6, split="train")
    assert not np.array_equal(a.images, c.images)


@pytest.mark.parametrize("size", [32, 48, 64])
def test_image_dtype_shape_and_keys(size: int) -> None:
    d = generate(40, seed=1, config=WorldConfig(image_size=size), split="pool")
    assert len(d) == 40
    assert d.images.dtype == np.uint8 and d.images.shape == (40, size, size, 3)
    assert d.keys == [f"pool-{i:07d}" for i in range(40)]
    assert set(d.labels) >= {"shape", "colour", "colour_shape", "size"}
    assert all(v.dtype == np.int64 and v.shape == (40,) for v in d.labels.values())
    assert d.images.std() > 10  # not blank
    assert len(generate(0, seed=1).keys) == 0


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        WorldConfig(max_objects=3)
    with pytest.raises(ValueError):
        WorldConfig(two_object_fraction=1.5)
    with pytest.raises(ValueError):
        generate(10, seed=-1)


def test_single_object_captions_match_labels(sample: world.WorldSplit) -> None:
    n_sh = len(SHAPES)
    single = sample.labels["shape"] >= 0
    assert 0.55 < single.mean() < 0.85  # default two_object_fraction 0.3
    for i in np.flatnonzero(single)[:600]:
        c, s, z = (int(sample.labels[k][i]) for k in ("colour", "shape", "size"))
        assert sample.labels["colour_shape"][i] == c * n_sh + s
        caps = sample.captions[i]
        assert 3 <= len(caps) <= 5 and len(set(caps)) == len(caps)
        for cap in caps:
            words = {w for w, rx in _WORD.items() if rx.search(cap)}
            assert COLOURS[c] in words and SHAPES[s] in words, cap
            assert words - {COLOURS[c], SHAPES[s], SIZES[z]} == set(), cap  # no wrong colour/shape/size
            assert not re.search(r"\ba [aeiou]", cap), cap


def test_two_object_images_have_no_labels_and_true_relations(sample: world.WorldSplit) -> None:
    two = np.flatnonzero(sample.labels["shape"] < 0)
    assert two.size > 300
    for k in ("shape", "colour", "colour_shape", "size"):
        assert (sample.labels[k][two] == -1).all()
    palette = np.asarray(world._COLOUR_RGB) * 255.0
    checked = 0
    for i in two[:200]:
        caps = sample.captions[i]
        assert 3 <= len(caps) <= 5 and len(set(caps)) == len(caps)
        objs = {m for cap in caps for m in re.findall(_OBJ, cap)}
        assert len(objs) == 2, caps  # two objects, differing in colour or shape
        img = sample.images[i].astype(np.float64)
        for cap in caps:
            m = _REL.search(cap)
            if m is None or m.group(1) == m.group(4):
                continue  # no relation in this caption, or same colour: can't tell them apart by colour
            cen = []
            for colour in (m.group(1), m.group(4)):
                dist = np.linalg.norm(img - palette[COLOURS.index(colour)], axis=-1)
                ys, xs = np.nonzero(dist < 50)
                assert ys.size > 20, (cap, colour)
                cen.append((ys.mean(), xs.mean()))
            (ya, xa), (yb, xb) = cen
            truth = {"to the left of": xa < xb, "to the right of": xa > xb, "above": ya < yb,
                     "below": ya > yb}
            assert truth[m.group(3)], (cap, cen)
            checked += 1
    assert checked > 100


def test_position_labels_match_pixels(sample: world.WorldSplit) -> None:
    size = sample.images.shape[1]
    palette = np.asarray(world._COLOUR_RGB) * 255.0
    for i in np.flatnonzero(sample.labels["shape"] >= 0)[:150]:
        img = sample.images[i].astype(np.float64)
        dist = np.linalg.norm(img - palette[sample.labels["colour"][i]], axis=-1)
        xs = np.nonzero(dist < 50)[1]
        col = sample.labels["position"][i] % 3
        cx = xs.mean() + 0.5
        assert {0: cx < size / 2 - 2, 1: abs(cx - size / 2) < 3, 2: cx > size / 2 + 2}[col], (i, col, cx)


def test_all_colour_shape_classes_appear(sample: world.WorldSplit) -> None:
    seen = set(sample.labels["colour_shape"][sample.labels["colour_shape"] >= 0].tolist())
    assert seen == set(range(len(COLOURS) * len(SHAPES)))
    assert set(sample.labels["size"][sample.labels["size"] >= 0].tolist()) == {0, 1}
    assert set(sample.labels["position"][sample.labels["position"] >= 0].tolist()) == set(range(9))


def test_class_sets_and_templates() -> None:
    sets = class_sets()
    assert sets["shape"] == list(SHAPES) and sets["colour"] == list(COLOURS)
    assert len(SHAPES) >= 6 and len(COLOURS) == 8
    for ci, c in enumerate(COLOURS):
        for si, s in enumerate(SHAPES):
            assert sets["colour_shape"][ci * len(SHAPES) + si] == f"{c} {s}"
    for name, classes in sets.items():
        tpl = templates(name)
        assert len(tpl) >= 3 and all(t.count("{}") == 1 for t in tpl)
        for t in tpl:
            for cls in classes:
                assert not re.search(r"\ba [aeiou]", t.format(cls))
    with pytest.raises(KeyError):
        templates("texture")


def test_prompts_read_like_captions(sample: world.WorldSplit) -> None:
    """Every zero-shot prompt (class filled in) occurs verbatim inside some caption of that class."""
    all_caps = [c for caps in sample.captions for c in caps]
    for t in templates("colour_shape"):
        assert any(t.format("red circle") in c for c in all_caps), t


def test_splits_are_disjoint(tmp_path: Path) -> None:
    splits = {s: load_split(s, 120, tmp_path, seed=0) for s in world.SPLITS}
    keys = [set(d.keys) for d in splits.values()]
    assert len(set().union(*keys)) == sum(len(k) for k in keys)
    hashes = [{img.tobytes() for img in d.images} for d in splits.values()]
    assert len(set().union(*hashes)) == sum(len(h) for h in hashes)
    for s in ("val", "test"):
        assert (splits[s].labels["colour_shape"] >= 0).all()
    assert (splits["train"].labels["colour_shape"] < 0).any()
    with pytest.raises(ValueError):
        load_split("holdout", 10, tmp_path)


def test_cache_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = load_split("train", 64, tmp_path, seed=2)
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1 and "train" in files[0].name

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("should have been read from the cache")

    monkeypatch.setattr(world, "generate", fail)
    b = load_split("train", 64, tmp_path, seed=2)
    assert _same(a, b)
    monkeypatch.undo()
    # Different settings -> a different file, never a stale hit.
    load_split("train", 64, tmp_path, seed=2, config=WorldConfig(noise=0.0))
    assert len(list(tmp_path.glob("*.npz"))) == 2


def test_corrupt_cache_is_regenerated(tmp_path: Path) -> None:
    a = load_split("val", 50, tmp_path)
    (path,) = tmp_path.glob("*.npz")
    path.write_bytes(path.read_bytes()[:500])  # truncated
    b = load_split("val", 50, tmp_path)
    assert _same(a, b)
    with np.load(path) as z:  # rewritten as a valid file
        assert z["images"].shape == (50, 32, 32, 3)
    assert not list(tmp_path.glob("*.tmp"))


def test_cache_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = load_split("test", 30, tmp_path)
    (path,) = tmp_path.glob("*.npz")
    before = path.read_bytes()
    path.write_bytes(b"garbage")

    def crash(f: object, **arrays: object) -> None:
        f.write(b"partial")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(world.np, "savez", crash)
    with pytest.raises(OSError):
        load_split("test", 30, tmp_path)
    assert path.read_bytes() == b"garbage"  # old file untouched, no partial file in its place
    assert not list(tmp_path.glob("*.tmp"))
    monkeypatch.undo()
    assert _same(load_split("test", 30, tmp_path), a)
    assert path.read_bytes() == before


def test_subset_and_records(sample: world.WorldSplit) -> None:
    sub = sample.subset([5, 1, 7])
    assert sub.keys == [sample.keys[5], sample.keys[1], sample.keys[7]]
    assert np.array_equal(sub.images[1], sample.images[1])
    mask = np.zeros(len(sample), dtype=bool)
    mask[:10] = True
    assert sample.subset(mask).keys == sample.keys[:10]
    recs = world.to_records(sample.subset(slice(0, 50)))
    assert [r.key for r in recs] == sample.keys[:50]
    for i, r in enumerate(recs):
        cs = int(sample.labels["colour_shape"][i])
        assert r.label == (cs if cs >= 0 else None)
        assert r.captions == tuple(sample.captions[i]) and r.origin == r.key
    assert open_image(recs[0]).size == (32, 32)
