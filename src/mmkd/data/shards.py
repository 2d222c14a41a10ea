"""Where WebDataset shards live and how a process gets a seekable copy of one, one shard at a time.

A shard spec names shards as open_clip users write them: local tars, folders, brace patterns
(``train-{0000..0099}.tar``), comma lists, ``pipe:COMMAND`` (the command's stdout is the tar, e.g.
``pipe:aws s3 cp s3://b/x.tar -``) and URLs (``s3://``, ``gs://``, ``file://``: any scheme an installed fsspec
backend knows; ``http(s)://`` through the standard library). Plain local tars are read in place; every other
shard (remote, piped or compressed) is fetched whole into a bounded local cache (at most ``max_cached`` shards,
least recently used evicted), so a remote dataset is never held whole on disk or in memory. The shard is then
an ordinary seekable tar file that ``tarfile`` indexes and reads at random.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import http.client
import os
import re
import shutil
import subprocess
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from mmkd.data.records import DataError
from mmkd.fileio import disk_full_error, is_disk_full

URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
COMPRESSED = (".tar.gz", ".tgz", ".gz")


@dataclass(frozen=True)
class ShardRef:
    """One shard: ``name`` as the spec wrote it (errors and fingerprints use it), ``path`` when it is a plain
    local tar that can be read in place, else None (fetched into the cache first)."""

    name: str
    path: Path | None

    @property
    def remote(self) -> bool:
        return self.path is None


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside braces, so ``a.tar,b-{0,1}.tar`` is two patterns."""
    parts, depth, cur = [], 0, []
    for ch in text:
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{0000..0004}`` (zero-padded when written so) and ``{a,b}`` like a shell, left to right."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo_s, hi_s = rng.groups()
        lo, hi = int(lo_s), int(hi_s)
        if hi < lo:
            raise DataError(f"shard pattern {pattern!r}: range {{{body}}} runs backwards")
        padded = (len(lo_s) > 1 and lo_s[0] == "0") or (len(hi_s) > 1 and hi_s[0] == "0")
        width = max(len(lo_s), len(hi_s)) if padded else 0
        items = [str(i).zfill(width) for i in range(lo, hi + 1)]
    else:
        items = body.split(",")
    out: list[str] = []
    for item in items:
        out.extend(expand_braces(pattern[:m.start()] + item + pattern[m.end():]))
    return out


def shard_refs(spec_path: str) -> list[ShardRef]:
    """The shards a spec names, in order; local files must exist (remote ones are checked when fetched).

    A ``pipe:`` command is one shard per brace expansion (``pipe:curl -s https://h/x-{0..3}.tar`` is four);
    its commas are not list separators (commands contain them)."""
    spec_path = spec_path.strip()
    parts = [spec_path] if spec_path.startswith("pipe:") else _split_top_level(spec_path)
    refs: list[ShardRef] = []
    for part in parts:
        for name in expand_braces(part):
            if name.startswith("pipe:") or URL_RE.match(name):
                refs.append(ShardRef(name, None))
                continue
            p = Path(name).expanduser()
            if p.is_dir():
                tars = sorted(p.glob("*.tar")) + sorted(p.glob("*.tar.gz")) + sorted(p.glob("*.tgz"))
                if not tars:
                    raise DataError(f"{p}: folder holds no .tar shards")
                refs.extend(_local(t) for t in tars)
            elif p.is_file():
                refs.append(_local(p))
            else:
                raise DataError(f"shard {p} not found (from {spec_path!r}); check the path and brace range")
    if not refs:
        raise DataError(f"shard spec {spec_path!r} names no files")
    return refs


def _local(p: Path) -> ShardRef:
    return ShardRef(str(p), None if p.name.endswith(COMPRESSED) else p)


def shard_paths(spec_path: str) -> list[Path]:
    """The local tar files of a spec (for formats that only read local shards, e.g. ``classes.txt`` beside them)."""
    return [Path(r.name) for r in shard_refs(spec_path) if not r.name.startswith("pipe:") and not URL_RE.match(r.name)]


FETCH_TRIES = 3  # a fetched copy that is short or differs from the indexed one is fetched again this many times


class FetchError(DataError):
    """A fetched copy that is not the shard (cut short, or other bytes than indexed): deleted and fetched again."""


class _Counted:
    """A readable that counts the bytes read through it (a body's length, checked against Content-Length)."""

    def __init__(self, src: IO[bytes]) -> None:
        self.src, self.n = src, 0

    def read(self, size: int = -1) -> bytes:
        data = self.src.read(size)
        self.n += len(data)
        return data


def _declared_length(src: object) -> int | None:
    """The body length the server declared (HTTP Content-Length; fsspec's size), None where unknown."""
    headers = getattr(src, "headers", None)
    if headers is not None and headers.get("Content-Length", "").isdigit():
        return int(headers["Content-Length"])
    size = getattr(src, "size", None)
    return size if isinstance(size, int) and size >= 0 else None


def _copy_checked(src: IO[bytes], dst: IO[bytes], name: str) -> None:
    """Copy, then refuse a body shorter (or longer) than declared: a connection cut mid-download ends the stream
    like a whole file would."""
    counted = _Counted(src)
    _copy(counted, dst, name)  # type: ignore[arg-type]
    want = _declared_length(src)
    if want is not None and counted.n != want:
        raise FetchError(f"shard {name}: the download was cut short ({counted.n} of {want} bytes received)")


def _copy_remote(name: str, dst: IO[bytes]) -> None:
    """Write shard ``name`` (``pipe:`` command or fsspec URL, maybe gzipped) into ``dst``, or DataError naming it."""
    if name.startswith("pipe:"):
        proc = subprocess.Popen(name[5:], shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # noqa: S602
        assert proc.stdout is not None and proc.stderr is not None
        _copy(proc.stdout, dst, name)
        err = proc.stderr.read().decode(errors="replace").strip().splitlines()
        if proc.wait() != 0:
            raise DataError(f"shard {name}: the command exited with status {proc.returncode}"
                            f"{': ' + err[-1][:200] if err else ''}; check the command (run it in a shell)")
        return
    try:
        if name.split("://", 1)[0].lower() in ("http", "https"):
            # the standard library streams HTTP(S) without fsspec's aiohttp backend (one dependency fewer)
            with urllib.request.urlopen(name, timeout=60) as src:  # noqa: S310 (the user's own shard URL)
                _copy_checked(src, dst, name)
            return
        import fsspec

        with fsspec.open(name, "rb") as src:
            _copy_checked(src, dst, name)
    except DataError:
        raise
    except http.client.IncompleteRead as e:  # the body ended early, as the server closed the connection
        raise FetchError(f"shard {name}: the download was cut short ({len(e.partial)} bytes received)") from None
    except (OSError, ValueError, ImportError) as e:  # FileNotFoundError, HTTPError (an OSError), unknown protocol
        where = str(getattr(dst, "name", ""))
        if where and is_disk_full(e, Path(where).parent):
            raise disk_full_error(where, "the shard's partial copy is deleted") from None
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        web = name.split("://", 1)[0].lower() in ("http", "https")  # no fsspec backend or credentials involved
        hint = ("check the URL and that the server serves it" if web else "check the URL, your credentials and that "
                "the fsspec backend for its scheme is installed (s3fs, gcsfs)")
        raise DataError(f"shard {name}: cannot fetch it ({type(e).__name__}: {first}); {hint}") from None


def _copy(src: IO[bytes], dst: IO[bytes], name: str) -> None:
    base = name.split("?")[0]
    if base.endswith(COMPRESSED):
        try:
            with gzip.GzipFile(fileobj=src) as g:
                shutil.copyfileobj(g, dst, 1 << 20)
        except (OSError, EOFError) as e:
            raise DataError(f"shard {name}: not a readable gzip stream ({e}); re-download or re-create it") from None
    else:
        shutil.copyfileobj(src, dst, 1 << 20)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks (a freshly scanned or fetched shard: its pages are cached)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


class ShardStore:
    """Seekable local files for shards: local tars in place, the rest fetched into ``folder`` (a bounded LRU).

    Several DataLoader workers and torchrun ranks share ``folder``: a per-shard ``flock`` makes one process fetch
    while the others wait, and files are renamed into place whole. Eviction unlinks the least recently used
    files beyond ``max_cached``; a process still reading an evicted shard keeps its open descriptor (POSIX), and
    one that needs it again fetches it again. Open handles are per process (a forked worker opens its own).
    """

    def __init__(self, refs: list[ShardRef], folder: Path | None, max_cached: int = 16, max_open: int = 8) -> None:
        self.refs, self.folder = refs, folder
        self.max_cached, self.max_open = max(1, max_cached), max(1, max_open)
        self.digests: dict[int, str] = {}  # SHA-256 of the shards as indexed: fetched copies are checked against it
        self._open: OrderedDict[int, IO[bytes]] = OrderedDict()
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()  # handles never cross a process boundary
        return state

    def cached_path(self, i: int) -> Path:
        assert self.folder is not None
        digest = hashlib.sha256(self.refs[i].name.encode()).hexdigest()[:24]
        return self.folder / f"{digest}.tar"

    def local_path(self, i: int) -> Path:
        """A seekable plain-tar copy of shard ``i`` (the file itself when local), fetching it if needed."""
        ref = self.refs[i]
        if ref.path is not None:
            return ref.path
        if self.folder is None:
            raise DataError(f"shard {ref.name}: remote and compressed shards need a cache folder (cache_dir)")
        self.folder.mkdir(parents=True, exist_ok=True)
        dst = self.cached_path(i)
        with open(dst.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when closed, or when the holder dies
            if not dst.is_file():
                self._fetch(i, dst)
            else:
                os.utime(dst)  # most recently used
        self._evict(keep=dst)
        return dst

    def _fetch(self, i: int, dst: Path) -> None:
        """Fetch shard ``i`` into ``dst`` whole: a copy cut short, or (once the shard is indexed) whose SHA-256
        is not the indexed one, is deleted and fetched again, at most ``FETCH_TRIES`` times; only a verified copy
        is renamed into place, so no later run reads a partial shard as whole."""
        name, want = self.refs[i].name, self.digests.get(i)
        tmp = dst.with_suffix(f".part-{os.getpid()}")
        problem = ""
        try:
            for _ in range(FETCH_TRIES):
                try:
                    with open(tmp, "wb") as f:
                        _copy_remote(name, f)
                    if want is not None and (got := file_sha256(tmp)) != want:
                        raise FetchError(f"shard {name}: the fetched copy's SHA-256 {got[:12]}… is not the "
                                         f"{want[:12]}… its index recorded")
                except FetchError as e:
                    problem = str(e)
                    tmp.unlink(missing_ok=True)
                    continue
                os.replace(tmp, dst)
                return
        finally:
            tmp.unlink(missing_ok=True)
        raise DataError(f"{problem}; fetched {FETCH_TRIES} times, never whole, and nothing was kept: check the "
                        "connection and the server and rerun (if the shard was replaced on purpose, delete the shard "
                        "index under cache_dir/shards so that it is indexed again)")

    def _evict(self, keep: Path) -> None:
        assert self.folder is not None
        files = []
        for p in self.folder.glob("*.tar"):
            try:
                files.append((p.stat().st_mtime_ns, p))
            except FileNotFoundError:  # another process evicted it meanwhile
                continue
        for _, p in sorted(files, reverse=True)[self.max_cached:]:
            if p != keep:
                p.unlink(missing_ok=True)

    def read(self, i: int, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of shard ``i`` (a sample's members, as the index located them)."""
        if os.getpid() != self._pid:
            self._open, self._pid = OrderedDict(), os.getpid()
        f = self._open.get(i)
        if f is None:
            path = self.local_path(i)
            try:
                f = open(path, "rb")
            except FileNotFoundError:  # evicted between fetch and open by another process: fetch again
                f = open(self.local_path(i), "rb")
            self._open[i] = f
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)[1].close()
        self._open.move_to_end(i)
        f.seek(start)
        data = f.read(end - start)
        if len(data) != end - start:
            raise DataError(f"shard {self.refs[i].name}: ends at byte {start + len(data)}, before the sample the "
                            f"index places at {start}..{end}; the shard changed since it was indexed: delete the "
                            "shard index under cache_dir/shards (or re-create the shard)")
        return data

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()
