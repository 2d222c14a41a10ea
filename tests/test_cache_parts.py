"""The teacher cache package in parts (issue 22 item 2): ``meta.json`` parsed once into a typed, frozen
``CacheInfo``; a build's settings as one typed, frozen ``BuildSpec`` refused when made; and no import circle
between the package's modules, function-level imports included (what pyproject's import-linter contract
"teacher.cache modules point down" also holds)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import tiny_dual_encoder

from mmkd.data.records import Record
from mmkd.teacher.cache import BuildSpec, CachedTeacher, CacheError, CacheInfo, build_cache

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


def _records(n: int = 6) -> list[Record]:
    imgs = np.random.default_rng(0).integers(0, 256, size=(n, 36, 40, 3), dtype=np.uint8)
    return [Record(f"k{i}", imgs[i], (f"caption {i}",), shard=f"/data/part-{i // 3}.tar") for i in range(n)]


@pytest.fixture(scope="module")
def cache_dir(minilm_path: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("parts") / "tc"
    build_cache(tiny_dual_encoder(minilm_path), _records(), out,
                BuildSpec(views=2, dtype="int8", features=True, seed=5, chunk_rows=2, batch_size=4, precision="fp32"))
    return out


def test_cache_info_is_meta_json_typed_and_frozen(cache_dir: Path) -> None:
    raw = json.loads((cache_dir / "meta.json").read_text())
    f = raw["fingerprint"]
    cache = CachedTeacher.open(cache_dir)
    info = cache.info
    assert isinstance(info, CacheInfo) and not hasattr(cache, "meta")  # no raw dict left on the reader
    assert (info.views, info.view_seed, info.dtype, info.features, info.precision) == (2, 5, "int8", True, "fp32")
    assert info.chunk_rows == raw["layout"]["chunk_rows"] == 2
    assert {k: list(v) for k, v in info.arrays.items()} == raw["layout"]["arrays"]
    assert dict(info.augmentation) == f["transform"]["augmentation"]
    assert info.transform_version == f["transform"]["version"] and info.decoder == f["transform"]["decoder"]
    t = f["teacher"]
    assert (info.teacher.projection_dim, info.teacher.weights_sha256, info.teacher.logit_bias) == (
        t["projection_dim"], t["weights_sha256"], None)
    assert info.teacher.logit_scale == pytest.approx(t["logit_scale"], rel=1e-12)
    assert dict(info.teacher.feature_dims) == t["feature_dims"]
    assert info.captioner is None and info.imported is None
    # what a run records to name the targets it trained on: the whole fingerprint, canonical JSON
    assert info.fingerprint_sha256 == hashlib.sha256(json.dumps(f, sort_keys=True).encode()).hexdigest()
    assert CacheInfo.read(cache_dir) == info
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.views = 3  # type: ignore[misc]


def test_cache_info_names_the_missing_key(cache_dir: Path, tmp_path: Path) -> None:
    raw = json.loads((cache_dir / "meta.json").read_text())
    del raw["fingerprint"]["teacher"]["logit_scale"]
    (tmp_path / "meta.json").write_text(json.dumps(raw))
    with pytest.raises(CacheError, match=r"meta\.json has no key 'fingerprint\.teacher\.logit_scale'"):
        CacheInfo.read(tmp_path)


@pytest.mark.parametrize(("setting", "message"), [
    ({"views": 0}, r"views must be ≥ 1 \(view 0 is the plain eval transform\), got 0"),
    ({"dtype": "float8"}, r"dtype 'float8' unknown; valid: "),
    ({"chunk_rows": 0}, r"batch_size and chunk_rows must be ≥ 1, got 64 and 0"),
    ({"augmentation": {"bins": 3}}, r"augmentation: unknown setting\(s\) \['bins'\]"),
    ({"precision": "fp64"}, r"precision 'fp64' unknown; valid: auto, bf16, fp32"),
])
def test_build_spec_refuses_a_bad_setting_naming_it(setting: dict[str, Any], message: str) -> None:
    with pytest.raises(CacheError, match=message):
        BuildSpec(**setting)


def test_build_spec_is_frozen_and_resolves_auto_precision() -> None:
    spec = BuildSpec(views=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.views = 3  # type: ignore[misc]
    assert spec.resolved("cpu").precision in ("bf16", "fp32") and spec.precision == "auto"
    assert BuildSpec(precision="fp32").resolved("cpu") == BuildSpec(precision="fp32")


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the directed graph ``edges`` (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(edges.get(m, ())):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        state[m] = 2
        path.pop()
        return None

    for m in sorted(edges):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_cycle_finder_finds_a_circle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_teacher_cache_modules_import_no_circle() -> None:
    """Function-level imports count: they hid build ↔ synthetic ↔ meta before the package was split."""
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("mmkd", cache_dir=None)
    package = "mmkd.teacher.cache"
    mods = {m for m in graph.modules if m.startswith(package + ".")}
    edges = {m: graph.find_modules_directly_imported_by(m) & mods for m in mods}
    assert _cycle(edges) is None, f"import circle inside {package}: {' -> '.join(_cycle(edges) or [])}"
