"""``mmkd export``: ONNX graphs of every tower family reproduce PyTorch's embeddings (cosine ≥ 0.9999 on the
built-in world's images and captions), an exported folder scores as its PyTorch student under ``mmkd eval``,
int8 is reported, and what cannot be exported is refused in one line with nothing lost."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import TINY_MEAN, TINY_STD, tiny_dual_encoder
from torch import nn

pytest.importorskip("onnx", reason="onnx is not installed: pip install 'mmkd[export]' (make test installs it)")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: pip install 'mmkd[export]'")

from mmkd.cli import main  # noqa: E402
from mmkd.exporting import ExportOptions, export_student  # noqa: E402
from mmkd.models.dual_encoder import DualEncoder, EncoderMeta, SiglipDualEncoder  # noqa: E402
from mmkd.models.hub import load_tokenizer, save_dual_encoder  # noqa: E402
from mmkd.models.onnx_export import PARITY_MIN, ExportError  # noqa: E402
from mmkd.models.towers import build_tower  # noqa: E402

COMMON = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
N = 12  # check images: enough for several batch shapes, seconds per family


def _meta(vision: str, text: str, **kw: Any) -> EncoderMeta:
    return EncoderMeta(vision_pooling=vision, text_pooling=text, image_size=32, image_mean=TINY_MEAN,
                       image_std=TINY_STD, max_text_length=16, **kw)


def _family(name: str, tok: Any) -> DualEncoder:
    """A tiny randomly initialised student of each tower family mmkd builds (towers.py, student.py)."""
    torch.manual_seed(0)
    vocab = len(tok)
    bert = build_tower("bert", dict(COMMON, vocab_size=vocab, max_position_embeddings=64))
    if name == "clip_vision+bert":
        return tiny_dual_encoder(tok, dropout=False)
    if name == "clip_vision+clip_text":
        return tiny_dual_encoder(tok, text_arch="clip_text")
    if name == "vit+bert":
        vit = build_tower("vit", dict(COMMON, image_size=32, patch_size=8))
        return DualEncoder(vit, bert, 24, _meta("cls", "mean"), tok)
    if name == "resnet+bert":
        resnet = build_tower("resnet", dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))
        return DualEncoder(resnet, bert, 24, _meta("pooler", "mean"), tok)
    if name == "siglip":
        vision = build_tower("siglip_vision", dict(COMMON, image_size=32, patch_size=8))
        text = build_tower("siglip_text", dict(COMMON, vocab_size=vocab, max_position_embeddings=16,
                                               projection_size=32))
        return SiglipDualEncoder(vision, text, _meta("pooler", "pooler", text_padding="max_length"), tok)
    if name == "shared_block":
        from mmkd.models.shared_block import SharedBlockDualEncoder

        vision = build_tower("clip_vision", dict(COMMON, image_size=32, patch_size=8))
        return SharedBlockDualEncoder(vision, bert, 24, _meta("cls", "mean"), tok, width=32, layers=1, heads=2)
    raise ValueError(name)


FAMILIES = ["clip_vision+bert", "clip_vision+clip_text", "vit+bert", "resnet+bert", "siglip", "shared_block"]


def _opts(tmp_path: Path, out: str = "onnx", **kw: Any) -> ExportOptions:
    return ExportOptions(tmp_path / out, data="world:test", limit=N, cache_dir=str(tmp_path / "cache"), **kw)


def _eval(capsys: pytest.CaptureFixture[str], model: Path, task: str, cache: Path) -> dict[str, Any]:
    capsys.readouterr()
    assert main(["eval", task, "--model", str(model), "--data", "world:test", "--limit", str(N),
                 "--cache", str(cache)]) == 0
    return json.loads(capsys.readouterr().out)[task]


def _ops(graph: Path) -> set[str]:
    import onnx

    return {n.op_type for n in onnx.load(str(graph)).graph.node}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_tower_family_exports_and_evaluates_as_its_pytorch_model(
        family: str, tmp_path: Path, minilm_path: str, one_thread: None, capsys: pytest.CaptureFixture[str]) -> None:
    model = _family(family, load_tokenizer(minilm_path)).eval()
    student = save_dual_encoder(model, tmp_path / "student")
    manifest = export_student(str(student), _opts(tmp_path), log=lambda _: None)
    parity = manifest["parity"]["fp32"]
    assert parity["image_cosine"] >= PARITY_MIN and parity["text_cosine"] >= PARITY_MIN
    out = tmp_path / "onnx"
    assert {p.name for p in out.iterdir()} >= {"image.onnx", "text.onnx", "mmkd_export.json", "tokenizer.json"}
    m = json.loads((out / "mmkd_export.json").read_text())
    assert m["image_size"] == 32 and m["image_mean"] == list(TINY_MEAN)
    assert m["context_length"] == model.meta.max_text_length
    assert m["embed_dim"] == manifest["embed_dim"] and m["opset"] == 17 and m["precision"] == "fp32"
    # the same evaluation code scores the exported folder (through onnxruntime) and the PyTorch student
    for task in ("zeroshot", "retrieval"):
        ref, got = _eval(capsys, student, task, tmp_path / "cache"), _eval(capsys, out, task, tmp_path / "cache")
        assert got.keys() == ref.keys()
        for k in ref:  # cosines within 1e-4: a near-tie could flip one image at most
            assert got[k] == pytest.approx(ref[k], abs=1 / N + 1e-9), k


def test_int8_static_with_calibration_dynamic_without_and_reported(tmp_path: Path, minilm_path: str,
                                                                   one_thread: None,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    student = save_dual_encoder(tiny_dual_encoder(minilm_path, dropout=False).eval(), tmp_path / "student")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # onnxruntime's tools can leave scratch files in the working directory: none may stay
    fp32 = export_student(str(student), _opts(tmp_path, "fp32"), log=lambda _: None)
    static = export_student(str(student), _opts(tmp_path, "static", int8=True, calibration="world:val",
                                                calibration_n=16), log=lambda _: None)
    assert static["precision"] == "int8"
    assert static["graphs"]["image"]["int8"] == {"mode": "static", "calibration_images": 16}
    assert static["graphs"]["text"]["int8"]["mode"] == "dynamic"
    # the text graph is mostly MiniLM's token-embedding table: int8 makes it well under half of fp32's bytes
    assert static["graphs"]["text"]["bytes"] < 0.5 * fp32["graphs"]["text"]["bytes"]
    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(tmp_path / "static" / "image.onnx")  # static: QDQ
    assert "DynamicQuantizeLinear" in _ops(tmp_path / "static" / "text.onnx")
    int8 = static["parity"]["int8"]
    assert 0.5 < int8["image_cosine"] <= 1 and 0.5 < int8["text_cosine"] <= 1  # reported, not required
    top1 = static["zeroshot"]["top1"]
    assert set(top1) == {"pytorch", "onnx_fp32", "onnx_int8"}
    assert static["zeroshot"]["int8_minus_pytorch_points"] == pytest.approx(
        100 * (top1["onnx_int8"] - top1["pytorch"]), abs=0.01)
    dynamic = export_student(str(student), _opts(tmp_path, "dynamic", int8=True), log=lambda _: None)
    assert dynamic["graphs"]["image"]["int8"]["mode"] == "dynamic"
    assert "--calibration" in dynamic["graphs"]["image"]["int8"]["why"]
    assert "DynamicQuantizeLinear" in _ops(tmp_path / "dynamic" / "image.onnx")
    assert list(cwd.iterdir()) == []


class _Tower(nn.Module):
    """A vision tower outside mmkd's families: ``op`` runs on its pooled features."""

    def __init__(self, op: Any) -> None:
        super().__init__()
        self.config = SimpleNamespace(hidden_size=12, model_type="odd_tower")
        self.conv = nn.Conv2d(3, 12, 8, stride=8)
        self.op = op

    def forward(self, pixel_values: torch.Tensor) -> Any:
        pooled = self.conv(pixel_values).mean(dim=(2, 3))
        return SimpleNamespace(pooler_output=self.op(pooled), last_hidden_state=None)


def _odd_student(op: Any, tok: Any) -> DualEncoder:
    torch.manual_seed(0)
    bert = build_tower("bert", dict(COMMON, vocab_size=len(tok), max_position_embeddings=64))
    return DualEncoder(_Tower(op), bert, 24, _meta("pooler", "mean"), tok).eval()


def test_a_tower_that_does_not_export_is_named_and_nothing_is_lost(tmp_path: Path, minilm_path: str,
                                                                   capfd: pytest.CaptureFixture[str]) -> None:
    tok = load_tokenizer(minilm_path)
    earlier = tmp_path / "onnx"
    good = str(save_dual_encoder(tiny_dual_encoder(tok), tmp_path / "s"))
    export_student(good, _opts(tmp_path), log=lambda _: None)
    before = {p.name: p.read_bytes() for p in earlier.iterdir()}
    capfd.readouterr()
    # an op with no ONNX conversion: refused naming the tower; the exporter's graph dump is not shown
    with pytest.raises(ExportError, match=r"the image encoder \(_Tower, model_type odd_tower\) does not export.*"
                                          r"cummax"):
        export_student(_odd_student(lambda x: torch.cummax(x, -1)[0], tok), _opts(tmp_path), log=lambda _: None)
    assert "Torch IR graph" not in "".join(capfd.readouterr())
    # a branch on the batch size, baked in by the tracer: the parity check refuses it
    with pytest.raises(ExportError, match=r"image graph.*least cosine"):
        export_student(_odd_student(lambda x: x * 2 if x.shape[0] == 2 else -x, tok), _opts(tmp_path),
                       log=lambda _: None)
    assert {p.name: p.read_bytes() for p in earlier.iterdir()} == before  # the earlier export is intact
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
    (earlier / "image.onnx").write_bytes(b"damaged")  # a good export replaces an earlier one whole
    export_student(good, _opts(tmp_path), log=lambda _: None)
    assert (earlier / "image.onnx").read_bytes() == before["image.onnx"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".") or p.name.endswith(".old")] == []


def test_refusals_are_one_line(tmp_path: Path, tiny_teacher_dir: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    def refused(*argv: str) -> str:
        capsys.readouterr()
        assert main(list(argv)) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("mmkd: error: ") and "\n" not in err
        return err

    not_a_model = tmp_path / "notes"
    not_a_model.mkdir()
    (not_a_model / "readme.txt").write_text("not a model")
    assert "has no config.json; it is not a model folder" in refused("export", str(not_a_model), "--out",
                                                                     str(tmp_path / "o"))
    run = tmp_path / "run"
    (run / "student").mkdir(parents=True)
    (run / "student" / "config.json").write_text("{}")
    assert f"it is a run folder: its model is {run / 'student'}" in refused("export", str(run), "--out",
                                                                           str(tmp_path / "o"))
    # --out holding something else is never overwritten
    assert "is not an earlier mmkd export" in refused("export", str(tiny_teacher_dir), "--out", str(not_a_model))
    assert (not_a_model / "readme.txt").read_text() == "not a model"
    assert "add --int8" in refused("export", str(tiny_teacher_dir), "--out", str(tmp_path / "o"),
                                   "--calibration", "world:val")
    # an exported folder is not a student: export, train or distil from it is refused naming what it is
    capsys.readouterr()
    assert main(["export", str(tiny_teacher_dir), "--out", str(tmp_path / "done"), "--limit", str(N),
                 "--cache", str(tmp_path / "cache")]) == 0
    summary = json.loads(capsys.readouterr().out)  # the command prints the checks it made
    assert summary["precision"] == "fp32" and summary["parity"]["fp32"]["image_cosine"] >= PARITY_MIN
    assert "is an ONNX export (mmkd export)" in refused("export", str(tmp_path / "done"), "--out",
                                                        str(tmp_path / "o"))
    assert "is an ONNX export (mmkd export)" in refused("eval", "efficiency", "--model", str(tmp_path / "done"))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the extra were not installed
    assert "pip install 'mmkd[export]'" in refused("export", str(tiny_teacher_dir), "--out", str(tmp_path / "o"))
    assert "pip install 'mmkd[export]'" in refused("eval", "zeroshot", "--model", str(tmp_path / "done"),
                                                   "--data", "world:test", "--limit", "4",
                                                   "--cache", str(tmp_path / "cache"))
    assert not (tmp_path / "o").exists()


def test_parity_on_real_photos_and_captions_without_labels(tmp_path: Path, minilm_path: str, shared_data: Path,
                                                           one_thread: None) -> None:
    """COCO photos and their human captions: parity is checked on them; zero-shot needs labels, so it says why not."""
    student = save_dual_encoder(tiny_dual_encoder(minilm_path, dropout=False).eval(), tmp_path / "student")
    spec = f"jsonl:{shared_data / 'coco-mini' / 'captions.jsonl'}"
    opts = ExportOptions(tmp_path / "onnx", data=spec, limit=N, cache_dir=str(tmp_path / "cache"))
    manifest = export_student(str(student), opts, log=lambda _: None)
    assert manifest["parity"]["images"] == N and manifest["parity"]["texts"] == N
    assert min(manifest["parity"]["fp32"].values()) >= PARITY_MIN
    assert manifest["zeroshot"]["top1"] is None and manifest["zeroshot"]["not_measured"]
