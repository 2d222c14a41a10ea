"""The folder layout clip-retrieval's ``inference`` writes (and autofaiss indexes), read and written here:

    img_emb/img_emb_N.npy             [rows, D] L2-normalised image embeddings (float16 from clip-retrieval)
    text_emb/text_emb_N.npy           [rows, D] the embedding of each row's caption (absent with --enable_text False)
    metadata/metadata_N.parquet       one row per embedding row: ``image_path`` (the image file's path, or the
                                      sample's ``__key__`` for WebDataset input), ``caption`` where text was
                                      embedded, and the flattened per-sample JSON (e.g. ``key``, ``url``) with
                                      --enable_metadata

N is a partition number (zero-padded to the width of the partition count); rows of the three files of one N are
aligned. Numpy files are read with ``allow_pickle=False`` only (no file we read can run code); parquet goes
through pyarrow (the optional extra ``mmkd[parquet]``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmkd.fileio import atomic_write
from mmkd.teacher.cache.format import CacheError, write_npy

IMG, TEXT, META = "img_emb", "text_emb", "metadata"
PATTERNS = {IMG: re.compile(r"^img_emb_(\d+)\.npy$"), TEXT: re.compile(r"^text_emb_(\d+)\.npy$"),
            META: re.compile(r"^metadata_(\d+)\.parquet$")}


def pyarrow_parquet() -> Any:
    """``pyarrow.parquet``, or a one-line error saying how to install it (it is an optional extra)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CacheError("importing or exporting clip-retrieval embeddings reads/writes parquet metadata, which needs "
                         "pyarrow: pip install 'mmkd[parquet]' (or pip install pyarrow)") from None
    return pq


@dataclass(frozen=True)
class Partition:
    number: int
    img: Path
    text: Path | None
    metadata: Path


def list_partitions(root: Path) -> list[Partition]:
    """The partitions of a clip-retrieval folder in number order; a number one folder lacks is named."""
    if not root.is_dir():
        raise CacheError(f"{root} not found: --from needs a folder with img_emb/, text_emb/ and metadata/ as "
                         "clip-retrieval inference writes them")
    found: dict[str, dict[int, Path]] = {}
    for sub, pattern in PATTERNS.items():
        folder = root / sub
        files: dict[int, Path] = {}
        for p in sorted(folder.iterdir()) if folder.is_dir() else []:
            m = pattern.match(p.name)
            if m:
                n = int(m.group(1))
                if n in files:
                    raise CacheError(f"{p} and {files[n]} are both partition {n}; keep one")
                files[n] = p
        found[sub] = files
    if not found[IMG]:
        raise CacheError(f"{root / IMG} holds no img_emb_N.npy: --from needs clip-retrieval's layout (img_emb/, "
                         "text_emb/, metadata/); image embeddings are required")
    numbers = sorted(found[IMG])
    for sub in (META, *([TEXT] if found[TEXT] else [])):
        extra = sorted(set(found[sub]) - set(numbers))
        lacking = sorted(set(numbers) - set(found[sub]))
        if lacking:
            n = lacking[0]
            raise CacheError(f"{found[IMG][n]} has no matching file in {root / sub} (partition {n}; {len(lacking)} "
                             "partition(s) lack one): every partition needs its image embeddings, metadata (and text "
                             "embeddings, if any) alike")
        if extra:
            raise CacheError(f"{found[sub][extra[0]]} has no matching {IMG}/img_emb_N.npy ({len(extra)} such file(s))")
    return [Partition(n, found[IMG][n], found[TEXT].get(n), found[META][n]) for n in numbers]


def load_embeddings(path: Path) -> np.ndarray:
    """A [rows, D] float array, memory-mapped, read without pickle; a bad file is one line naming it."""
    pickled = CacheError(f"{path} holds Python objects (pickled), not a numeric array: refused (a file we read must "
                         "not run code); write the embeddings as a float array")
    try:
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError:  # an empty array, or objects: neither can be mapped
            arr = np.load(path, allow_pickle=False)
    except ValueError as e:
        if "pickle" in str(e).lower() or "object" in str(e).lower():
            raise pickled from None
        raise CacheError(f"{path} is not a readable .npy array ({e})") from None
    except (OSError, EOFError) as e:
        raise CacheError(f"{path} is not a readable .npy array ({e})") from None
    if arr.ndim != 2 or arr.dtype.kind != "f":
        raise CacheError(f"{path} holds a {arr.shape} {arr.dtype} array; expected [rows, dim] floats (one embedding "
                         "per row)")
    return arr


def read_metadata(path: Path) -> dict[str, list[Any]]:
    """The metadata columns mmkd uses (``image_path``, ``caption``, ``key``), each as a list of row values."""
    pq = pyarrow_parquet()
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for an unreadable file; named and re-raised
        raise CacheError(f"{path} is not a readable parquet file ({type(e).__name__}: {e})") from None
    if "image_path" not in table.column_names and "key" not in table.column_names:
        raise CacheError(f"{path} has no image_path (or key) column (columns: {', '.join(table.column_names)}); "
                         "each row must name its image as clip-retrieval's metadata does")
    return {c: table.column(c).to_pylist() for c in ("image_path", "caption", "key") if c in table.column_names}


def write_partition(root: Path, number: int, digits: int, img: np.ndarray, text: np.ndarray | None,
                    columns: dict[str, list[str]]) -> None:
    """One partition in clip-retrieval's layout, each file written atomically."""
    pa, pq = _pyarrow()
    name = f"{number:0{digits}d}"
    write_npy(root / IMG / f"img_emb_{name}.npy", img)
    if text is not None:
        write_npy(root / TEXT / f"text_emb_{name}.npy", text)
    table = pa.table({k: pa.array(v, pa.string()) for k, v in columns.items()})
    atomic_write(root / META / f"metadata_{name}.parquet", lambda f: pq.write_table(table, f))


def _pyarrow() -> tuple[Any, Any]:
    pq = pyarrow_parquet()
    import pyarrow as pa

    return pa, pq


def partition_digits(count: int) -> int:
    """The zero-padding clip-retrieval uses for ``count`` partitions."""
    return len(str(max(count, 1)))
