"""The teacher cache: per-sample, per-view teacher embeddings computed once, then read by key during training.

Why: a teacher forward pass per training step costs several times the student's own step (the
embeddings-as-teachers study). Running the teacher once and reading its answers by sample key makes every later
training and sweep cost the student alone.
Unlike per-class means, the cache stores each sample's own embedding for K views: view 0 is the plain eval
transform, view v > 0 the augmentation that is a pure function of (seed, key, v) (``transforms.view_rng``), so
the student replays exactly the augmented image whose teacher embedding it reads.

One module per job, each importing only those listed before it (pyproject's import-linter contract "teacher.cache
modules point down" holds the order): ``format`` (the folder's layout, storage dtypes, chunk commits, errors),
``index`` (row lookup by key through a memory-mapped hash index), ``folder`` (claiming a folder for a build,
starting segments, publishing the manifest), ``info`` (``CacheInfo``: ``meta.json`` parsed once), ``expect`` (what
a consumer needs of a cache), ``synthetic`` (synthetic captions: ``--captioner``), ``spec`` (``BuildSpec``: a
build's settings), ``meta`` (writing ``meta.json``: fingerprint and layout), ``reader`` (memory maps and lookups
by key), ``checks`` (whether a cache is whole and fits a training), ``read`` (``CachedTeacher``), ``build``
(running the teacher, one segment per data shard), ``size`` (bytes per sample), ``verify`` (``mmkd cache
--verify``), and the clip-retrieval ``import``/``export``. The names below are what the rest of mmkd imports.
"""

from mmkd.teacher.cache.build import BuildResult, build_cache
from mmkd.teacher.cache.expect import CacheExpectation, arrays_needed
from mmkd.teacher.cache.format import CacheError, CacheFingerprintError
from mmkd.teacher.cache.info import CacheInfo
from mmkd.teacher.cache.read import CachedTeacher
from mmkd.teacher.cache.size import CacheSize, cache_size
from mmkd.teacher.cache.spec import BuildSpec, resolve_precision
from mmkd.teacher.cache.verify import VerifyReport, verify_cache

__all__ = ["BuildResult", "BuildSpec", "CacheError", "CacheExpectation", "CacheFingerprintError", "CacheInfo",
           "CacheSize", "CachedTeacher", "VerifyReport", "arrays_needed", "build_cache", "cache_size",
           "resolve_precision", "verify_cache"]
