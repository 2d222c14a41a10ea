"""A new user's first hour (issue 20): a finished run keeps its record, JSON is always valid, quiet
misconfigurations are named, and the messages a user reaches are ours."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import tiny_dual_encoder, write_run_config

from mmkd.cli import main


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> Path:
    """A two-layer tiny teacher (conftest's run config keeps its layer 1)."""
    from mmkd.models.hub import save_dual_encoder

    return save_dual_encoder(tiny_dual_encoder(minilm_path, layers=2), tmp_path_factory.mktemp("t") / "teacher")


def _strict(text: str) -> object:
    """json.loads that refuses NaN/Infinity, as JSON itself (and every other reader) does."""
    def refuse(name: str) -> object:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_a_finished_run_resumed_keeps_its_record(teacher_dir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_run_config(tmp_path, teacher_dir)
    assert main(["distill", str(cfg)]) == 0
    record = tmp_path / "run" / "metrics.json"
    before = record.read_text()
    capsys.readouterr()
    assert main(["distill", str(cfg), "--resume"]) == 0
    assert record.read_text() == before  # not "final_loss": NaN, not the resume's own seconds
    assert "had already finished its 4 steps; its metrics.json is kept" in capsys.readouterr().out
    assert math.isfinite(_strict(before)["train"]["final_loss"])  # type: ignore[index]
    # resumed with a new eval: list (a resumable key): evaluated anew, the training record still the real one
    assert main(["distill", str(cfg), "--resume", "eval=[{kind: retrieval, data: 'world:test', limit: 8}]"]) == 0
    again = _strict(record.read_text())
    assert again["train"] == _strict(before)["train"] and set(again["eval"]) == {"retrieval:world:test"}  # type: ignore


def test_json_files_never_hold_nan(tmp_path: Path) -> None:
    from mmkd.fileio import atomic_write_json

    atomic_write_json(tmp_path / "m.json", {"a": float("nan"), "b": [1.5, float("inf")], "c": {"d": -float("inf")}})
    assert _strict((tmp_path / "m.json").read_text()) == {"a": None, "b": [1.5, None], "c": {"d": None}}


def test_sigterm_stops_distill_like_ctrl_c_and_the_run_resumes(teacher_dir: Path, tmp_path: Path) -> None:
    """What a scheduler sends (SIGTERM) to a real `mmkd distill`: one line, exit 143, a whole checkpoint, and
    `--resume` continues from it (before, the process died silently with 143 in the middle of whatever it did)."""
    import re
    import signal

    from tiny_runs import signal_after_first_checkpoint

    from mmkd.train.checkpoint import CheckpointManager

    cfg = write_run_config(tmp_path, teacher_dir, train="steps: 100000, ckpt_every: 2, log_every: 1, warmup_steps: 1")
    folder = tmp_path / "run" / "checkpoints"
    code, err = signal_after_first_checkpoint(cfg, folder, signal.SIGTERM)
    assert code == 143, err
    match = re.search(r"^mmkd: terminated \(SIGTERM\) at step (\d+); resume with --resume$", err, re.M)
    assert match and "Traceback" not in err, err
    # stderr is not a terminal here: no progress bar in it (a log of carriage returns), so the line stands alone
    assert err.splitlines() == [match.group(0)] and "\r" not in err, err
    state = CheckpointManager(folder).load_latest()
    assert state is not None and 2 <= int(state["step"]) <= int(match.group(1))
    steps = int(state["step"]) + 1
    assert main(["distill", str(cfg), "--resume", f"train.steps={steps}"]) == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["train"]["resumed_from"] == steps - 1


def test_an_error_line_is_never_glued_to_a_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse
    import re
    import sys

    from tqdm import tqdm

    from mmkd.commands.errors import run_command
    from mmkd.errors import MmkdError

    def fails(_: argparse.Namespace) -> int:
        bar = tqdm(total=10, desc="distill", file=sys.stderr, disable=False, leave=False)
        bar.update(3)
        raise MmkdError("boom")

    assert run_command(argparse.Namespace(func=fails, command="distill")) == 2
    err = capsys.readouterr().err
    assert re.split(r"[\r\n]+", err.strip())[-1] == "mmkd: error: boom", err


def test_a_pickled_weights_file_is_refused_in_one_line_of_ours(teacher_dir: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """torch's own refusal is ~700 characters with an ANSI escape, advises weights_only=False (the opposite of
    what to do) and follows a UserWarning about the pickle protocol; ours is one line naming the file."""
    import shutil

    import torch

    folder = tmp_path / "model"
    shutil.copytree(teacher_dir, folder)
    state = {"weights": torch.zeros(2), "code": print}  # unpickling it would import and call code
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin", pickle_protocol=4)
    capsys.readouterr()
    assert main(["eval", "retrieval", "--model", str(folder), "--data", "world:test", "--limit", "8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mmkd: error: {folder / 'pytorch_model.bin'}: holds pickled objects"), err
    assert len(err.splitlines()) == 1 and "\x1b" not in err and "weights_only" not in err and "Warning" not in err


def test_warmup_as_long_as_the_run_is_named(teacher_dir: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_run_config(tmp_path, teacher_dir)
    assert main(["distill", str(cfg), "train.steps=1", "train.warmup_steps=1"]) == 0
    err = capsys.readouterr().err
    assert "mmkd: warning: train.warmup_steps (1) ≥ train.steps (1): the learning rate never reaches" in err


@pytest.mark.slow
def test_a_sweep_says_when_it_has_no_zero_shot_entry_and_keeps_only_what_is_asked(
        teacher_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    def sweep(name: str, keep: bool | None) -> Path:
        section: dict = {"out": str(tmp_path / name), "sets": {"clip": [{"name": "clip"}]}, "grid": {"task": ["clip"]}}
        if keep is not None:
            section["keep_checkpoints"] = keep
        cfg = {"teacher": str(teacher_dir), "cache_dir": str(tmp_path / "cache"),
               "student": {"vision": {"source": "teacher", "keep_layers": [1]}, "text": {"source": "teacher"}},
               "data": {"train": "world:train", "world_size_train": 16, "batch_size": 8},
               "train": {"steps": 2, "warmup_steps": 0, "ckpt_every": 1},
               "eval": [{"kind": "retrieval", "data": "world:test", "limit": 16}], "sweep": section}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        assert main(["sweep", str(path)]) == 0
        return tmp_path / name / "runs" / "task-clip"

    run = sweep("default", None)
    assert "mmkd: warning: the sweep's runs have no zeroshot entry in eval:" in capsys.readouterr().err
    assert (run / "metrics.json").is_file() and (run / "student" / "model.safetensors").is_file()
    assert not (run / "checkpoints").exists()  # a finished run's checkpoints go unless asked for
    assert any((sweep("kept", True) / "checkpoints").glob("step-*.pt"))


def test_an_unreadable_or_empty_image_is_named_without_an_object_repr(tmp_path: Path) -> None:
    from mmkd.data.records import DataError, open_image
    from mmkd.data.sources import read_records

    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_bytes(b"not an image at all")
    (tmp_path / "pairs.jsonl").write_text('{"image": "empty.jpg", "caption": "a"}\n'
                                          '{"image": "text.jpg", "caption": "b"}\n')
    empty, text = read_records(f"jsonl:{tmp_path / 'pairs.jsonl'}")
    for record, reason in ((empty, "the file is empty (0 bytes)"), (text, "cannot identify image file;")):
        with pytest.raises(DataError, match="cannot read image") as e:
            open_image(record)
        assert reason in str(e.value) and "object at 0x" not in str(e.value), str(e.value)


def test_an_http_shard_error_gives_no_object_store_advice(tmp_path: Path) -> None:
    import socket

    from mmkd.data.records import DataError
    from mmkd.data.sharded import open_shards

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DataError, match=rf"shard http://127.0.0.1:{port}/x.tar: cannot fetch it") as e:
        open_shards(f"http://127.0.0.1:{port}/x.tar", tmp_path / "cache")
    assert "s3fs" not in str(e.value) and "credentials" not in str(e.value)
    assert "check the URL and that the server serves it" in str(e.value)


def test_indexing_shards_says_so_and_how_long_it_took(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import io

    from conftest import write_tar
    from PIL import Image

    from mmkd.data.sharded import open_shards

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG")
    for s in range(2):
        write_tar(tmp_path / f"s-{s}.tar", {f"k{s}{i}.{ext}": data for i in range(3)
                                            for ext, data in (("png", buf.getvalue()), ("txt", b"a red square"))})
    capsys.readouterr()
    assert len(open_shards(f"{tmp_path}/s-{{0..1}}.tar", tmp_path / "cache")) == 6
    err = capsys.readouterr().err
    assert "mmkd: indexing 2 shard(s)" in err and "mmkd: indexed 6 samples in 2 shard(s) in " in err, err
    open_shards(f"{tmp_path}/s-{{0..1}}.tar", tmp_path / "cache")  # the kept index: nothing to say
    assert "indexing" not in capsys.readouterr().err


def test_evaluation_data_that_is_training_data_is_counted_and_recorded(teacher_dir: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's run: trained on COCO-mini's JSONL, evaluated on its COCO JSON (the same photos under other
    keys): the student's retrieval score beat the teacher's 20-fold, unannounced."""
    from PIL import Image

    for i in range(6):
        Image.new("RGB", (16, 16), (40 * i, 10, 200 - 30 * i)).save(tmp_path / f"{i}.png")
    (tmp_path / "train.jsonl").write_text("".join(f'{{"image": "{i}.png", "captions": ["photo number {i}"]}}\n'
                                                  for i in range(5)))
    coco = {"images": [{"id": i, "file_name": f"{i}.png"} for i in (3, 4, 5)],
            "annotations": [{"id": i, "image_id": i, "caption": f"another caption {i}"} for i in (3, 4, 5)]}
    (tmp_path / "val.json").write_text(json.dumps(coco))
    cfg = write_run_config(tmp_path, teacher_dir, data=f"jsonl:{tmp_path / 'train.jsonl'}", batch_size=4,
                           train="steps: 1, warmup_steps: 0",
                           extra=f"eval: [{{kind: retrieval, data: 'coco:{tmp_path / 'val.json'}'}}]")
    assert main(["distill", str(cfg)]) == 0
    err = capsys.readouterr().err
    assert f"mmkd: warning: eval[0] (coco:{tmp_path / 'val.json'}): 2 of 3 images and 0 of 3 captions are also " \
           "training data" in err, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["eval_overlap"] == {f"retrieval:coco:{tmp_path / 'val.json'}": {
        "images": 2, "of_images": 3, "captions": 0, "of_captions": 3}}


def test_remote_labelled_shards_take_classes_txt_from_their_url_before_any_shard_is_fetched(
        tmp_path: Path, teacher_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import functools
    import http.server
    import io
    import threading

    from conftest import write_tar
    from PIL import Image

    from mmkd.data.resolve import zeroshot_classes

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 10)).save(buf, format="PNG")
    for s in range(2):
        write_tar(tmp_path / f"s-{s}.tar", {f"k{s}{i}.{ext}": data for i in range(2)
                                            for ext, data in (("png", buf.getvalue()), ("cls", str(i).encode()))})
    asked: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # (once per request, twice for an error)
            asked.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    spec = f"wds:http://127.0.0.1:{server.server_port}/s-{{0..1}}.tar"
    try:
        cfg = write_run_config(tmp_path, teacher_dir, data=spec, batch_size=2, train="steps: 1, warmup_steps: 0",
                               data_extra=", label_captions: 'a photo of a {}.'")
        assert main(["distill", str(cfg)]) == 2
        assert "data.label_captions: data spec" in capsys.readouterr().err and set(asked) == {"/classes.txt"}
        (tmp_path / "classes.txt").write_text("zero\none\n")
        asked.clear()
        assert zeroshot_classes(spec)[0] == ["zero", "one"] and set(asked) == {"/classes.txt"}  # no shard fetched
    finally:
        server.shutdown()
        server.server_close()


def test_a_teacher_near_chance_on_an_eval_set_is_noted(teacher_dir: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """An untrained (random) teacher scores near chance on the world's 64 classes: `eval all` says so."""
    suite = tmp_path / "s.yaml"
    suite.write_text(f"cache_dir: {tmp_path / 'cache'}\nworld_n: 128\n"
                     "tasks:\n  - {kind: zeroshot, data: 'world:test', class_set: colour_shape}\n")
    assert main(["eval", "all", "--teacher", str(teacher_dir), "--model", str(teacher_dir), "--suite", str(suite),
                 "--out", str(tmp_path / "ev")]) == 0
    err = capsys.readouterr().err
    top1 = json.loads((tmp_path / "ev" / "metrics.json").read_text())["models"]["teacher"]["zeroshot"]
    assert top1["colour_shape"]["top1"] < 2 / 64
    assert "note: the teacher is near chance on colour_shape: top-1" in err and "(chance 1.6%)" in err, err
    assert err.count("near chance") == 1  # the teacher only, not the student beside it


def test_a_sigterm_during_a_checkpoint_write_waits_for_the_write(tmp_path: Path) -> None:
    """The write is finished whole, then the SIGTERM ends the command as Ctrl-C does."""
    import os
    import signal

    from mmkd.commands.errors import Terminated, sigterm_as_interrupt
    from mmkd.fileio import atomic_write_text, ctrl_c_deferred

    with sigterm_as_interrupt(), pytest.raises(Terminated):
        with ctrl_c_deferred():
            os.kill(os.getpid(), signal.SIGTERM)  # delivered here, held until the block ends
            atomic_write_text(tmp_path / "ckpt", "whole")
    assert (tmp_path / "ckpt").read_text() == "whole"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the command's handler is gone again
