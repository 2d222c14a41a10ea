"""Classification benchmarks in their distributed layouts (CIFAR-10/100 pickles, STL-10 binaries, CIFAR-10 as
WebDataset shards): decoded to uint8 arrays, with pickles restricted so a data file cannot run code."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from mmkd.data.records import BadSamples, DataError, Record
from mmkd.data.sources.checks import existing_file
from mmkd.data.sources.registry import register_format
from mmkd.data.sources.webdataset import read_wds, wds_class_names

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


# ------------------------------------------------------------------------------------ CIFAR-10 / CIFAR-100


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR ships as pickles; allow only numpy array reconstruction so a data file cannot run code."""

    _ALLOWED = {"_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer"}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):  # protocol-2 pickles of bytes written by Python 3
            return super().find_class(module, name)
        if module.split(".")[0] == "numpy" and name in self._ALLOWED:
            if module.startswith("numpy.core"):  # pickles written by numpy 1.x
                module = "numpy._core" + module[len("numpy.core"):]
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data pickle")


def _load_pickle(file: Path) -> dict:
    try:
        with file.open("rb") as f:
            obj = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as e:
        raise DataError(f"{file}: not a readable CIFAR pickle ({e}); re-download the python version") \
            from None
    if not isinstance(obj, dict):
        raise DataError(f"{file}: expected a pickled dict, got {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_arrays(file: Path, label_field: str) -> tuple[np.ndarray, list[int]]:
    """Decode one batch: rows are R(1024) G(1024) B(1024), row-major 32x32 → N x 32 x 32 x 3."""
    d = _load_pickle(file)
    if "data" not in d or label_field not in d:
        raise DataError(f"{file}: missing 'data' or '{label_field}' (found {', '.join(map(str, d))})")
    data = np.asarray(d["data"], dtype=np.uint8)
    labels = [int(x) for x in d[label_field]]
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != data.shape[0]:
        raise DataError(f"{file}: expected data [N, 3072] with N labels, got {data.shape} and {len(labels)}")
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, labels


def _find_layout(path: str, subdir: str, marker: str) -> Path | None:
    """The folder holding `marker`: PATH itself or PATH/subdir (users pass either)."""
    root = Path(path).expanduser()
    for cand in (root, root / subdir):
        if (cand / marker).exists():
            return cand
    return None


def _check_exists(path: str, fmt: str, expected: str) -> None:
    """A dataset path that does not exist at all gets its own message (not "wrong layout")."""
    if any(c in path for c in "{,"):  # brace patterns and comma lists are checked shard by shard
        return
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{fmt}:{path}: {p} not found; give the path of {expected}")


def _check_split(split: str, valid: tuple[str, ...], fmt: str) -> None:
    if split not in valid:
        raise DataError(f"{fmt}: unknown split {split!r}; valid: {', '.join(valid)}")


def _cifar10_shards(path: str, split: str) -> str | None:
    """Shard spec for WebDataset CIFAR-10, or None when PATH is the python-pickle layout."""
    _check_exists(path, "cifar10", "the cifar-10-batches-py folder (or its parent) or CIFAR-10 WebDataset shards")
    root = Path(path).expanduser()
    if root.is_dir():
        if _find_layout(path, "cifar-10-batches-py", "batches.meta") or \
                _find_layout(path, "cifar-10-batches-py", "test_batch") or \
                _find_layout(path, "cifar-10-batches-py", "data_batch_1"):
            return None
        tars = sorted(root.glob(f"{split}-*.tar")) or sorted(root.glob(f"{split}*.tar"))
        if tars:
            return ",".join(str(t) for t in tars)
        raise DataError(f"cifar10:{root}: expected cifar-10-batches-py (data_batch_1..5, test_batch) or "
                        f"WebDataset shards {split}-*.tar; found neither")
    return path  # a tar or a brace pattern: used as is, whatever the split


def _cifar10_class_names(path: str, split: str = "train") -> list[str]:
    shards = _cifar10_shards(path, split)
    if shards is not None:
        return wds_class_names(shards) or list(CIFAR10_CLASSES)
    root = _find_layout(path, "cifar-10-batches-py", "batches.meta")
    if root is None:
        return list(CIFAR10_CLASSES)
    names = _load_pickle(root / "batches.meta").get("label_names", CIFAR10_CLASSES)
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


@register_format("cifar10", class_names=_cifar10_class_names)
def _read_cifar10(path: str, split: str = "train", bad: BadSamples | None = None) -> list[Record]:
    """CIFAR-10 from the python pickles or from WebDataset shards (``.jpg`` + ``.cls``)."""
    _check_split(split, ("train", "test"), "cifar10")
    shards = _cifar10_shards(path, split)
    if shards is not None:
        records = read_wds(shards, bad=bad)
        unlabeled = next((r for r in records if r.label is None), None)
        if unlabeled is not None:
            raise DataError(f"{unlabeled.origin}: CIFAR-10 shard sample has no .cls label")
        return records
    names = ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
    root = _find_layout(path, "cifar-10-batches-py", names[0])
    if root is None:
        raise DataError(f"cifar10:{path}: no {names[0]}; expected the cifar-10-batches-py folder "
                        "(data_batch_1..5, test_batch, batches.meta)")
    records = []
    for name in names:
        file = existing_file(root / name, "CIFAR-10 batch")
        images, labels = _cifar_arrays(file, "labels")
        records.extend(Record(key=f"{name}_{i:05d}", image=images[i], label=labels[i], origin=f"{file}[{i}]")
                       for i in range(len(labels)))
    return records


def _cifar100_root(path: str) -> Path:
    _check_exists(path, "cifar100", "the cifar-100-python folder (or its parent)")
    root = _find_layout(path, "cifar-100-python", "meta")
    if root is None:
        raise DataError(f"cifar100:{path}: no 'meta' file; expected the cifar-100-python folder "
                        "(train, test, meta)")
    return root


def _cifar100_class_names(path: str) -> list[str]:
    meta = _load_pickle(_cifar100_root(path) / "meta")
    if "fine_label_names" not in meta:
        raise DataError(f"{path}/meta: no 'fine_label_names'")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in meta["fine_label_names"]]


@register_format("cifar100", class_names=_cifar100_class_names)
def _read_cifar100(path: str, split: str = "train") -> list[Record]:
    """CIFAR-100 python pickles; labels are the 100 fine classes."""
    _check_split(split, ("train", "test"), "cifar100")
    file = existing_file(_cifar100_root(path) / split, "CIFAR-100 split file")
    images, labels = _cifar_arrays(file, "fine_labels")
    return [Record(key=f"{split}_{i:05d}", image=images[i], label=labels[i], origin=f"{file}[{i}]")
            for i in range(len(labels))]


# ------------------------------------------------------------------------------------------------- STL-10

_STL_PIXELS = 3 * 96 * 96


def _stl10_root(path: str) -> Path:
    _check_exists(path, "stl10", "the stl10_binary folder (or its parent)")
    root = _find_layout(path, "stl10_binary", "class_names.txt") or _find_layout(path, "stl10_binary",
                                                                                 "train_X.bin")
    if root is None:
        raise DataError(f"stl10:{path}: expected the stl10_binary folder (train_X.bin, train_y.bin, "
                        "test_X.bin, test_y.bin, class_names.txt)")
    return root


def _stl10_class_names(path: str) -> list[str]:
    file = existing_file(_stl10_root(path) / "class_names.txt", "STL-10 class names")
    return [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]


@register_format("stl10", class_names=_stl10_class_names)
def _read_stl10(path: str, split: str = "train") -> list[Record]:
    """STL-10 binaries, memory-mapped; each image is stored channel-major and *column*-major (3x96x96).

    Labels on disk are 1..10 and become 0..9; the unlabeled split has label None.
    """
    _check_split(split, ("train", "test", "unlabeled"), "stl10")
    root = _stl10_root(path)
    xfile = existing_file(root / f"{split}_X.bin", "STL-10 image file")
    size = xfile.stat().st_size
    if size == 0 or size % _STL_PIXELS:
        raise DataError(f"{xfile}: size {size} is not a multiple of 3*96*96; the file is truncated")
    n = size // _STL_PIXELS
    # [n, channel, column, row] on disk → [n, row, column, channel] views, no copy.
    images = np.memmap(xfile, dtype=np.uint8, mode="r", shape=(n, 3, 96, 96)).transpose(0, 3, 2, 1)
    labels: list[int | None] = [None] * n
    if split != "unlabeled":
        yfile = existing_file(root / f"{split}_y.bin", "STL-10 label file")
        y = np.fromfile(yfile, dtype=np.uint8)
        if len(y) != n:
            raise DataError(f"{yfile}: {len(y)} labels for {n} images in {xfile.name}")
        if n and (y.min() < 1 or y.max() > 10):
            raise DataError(f"{yfile}: labels must be 1..10, found {y.min()}..{y.max()}")
        labels = [int(v) - 1 for v in y]
    return [Record(key=f"{split}_{i:05d}", image=images[i], label=labels[i], origin=f"{xfile}[{i}]")
            for i in range(n)]
