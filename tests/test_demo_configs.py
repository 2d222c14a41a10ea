"""The demo's run configs load as they are and with --quick, and the two config keys they rely on work."""

from __future__ import annotations

from pathlib import Path

from mmkd.config import StudentConfig, TowerSpec, load_config
from mmkd.demo import RUNS, config_key, demo_configs
from mmkd.models.student import build_student
from mmkd.report.demo_report import seeds_table

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "demo"


def test_demo_configs_load_and_point_at_the_demo_folders(tmp_path: Path) -> None:
    for quick in (False, True):
        cfgs = demo_configs(CONFIGS, tmp_path / "out", tmp_path / "cache", quick)
        assert list(cfgs) == list(RUNS)
        teacher = cfgs["teacher"]
        assert teacher.teacher == "" and teacher.out == str(tmp_path / "cache" / f"teacher-{config_key(teacher)}")
        for name in ("student", "scratch"):
            assert cfgs[name].teacher == str(Path(teacher.out) / "student")
            assert cfgs[name].out == str(tmp_path / "out" / "train" / name)
        assert cfgs["student_cached"].teacher.startswith("cache:")
        for c in cfgs.values():
            assert c.cache_dir == str(tmp_path / "cache")
            assert 0 < c.train.ckpt_every < c.train.steps  # the killed run needs a checkpoint before its end
    full = demo_configs(CONFIGS, tmp_path, tmp_path, False)["teacher"]
    quick = demo_configs(CONFIGS, tmp_path, tmp_path, True)["teacher"]
    assert config_key(full) != config_key(quick) and full.train.steps > quick.train.steps


def test_a_pretrained_tower_can_be_shrunk_with_keep_layers(minilm_path: str) -> None:
    vision = TowerSpec(source="new", arch="clip_vision", config=dict(image_size=32, patch_size=8, hidden_size=32,
                                                                     num_hidden_layers=1, num_attention_heads=2,
                                                                     intermediate_size=64))
    whole = build_student(None, StudentConfig(vision=vision, text=TowerSpec(source=minilm_path, pooling="mean"),
                                              projection_dim=16))
    shrunk = build_student(None, StudentConfig(vision=vision, text=TowerSpec(source=minilm_path, keep_layers=[0, 2, 4],
                                                                             pooling="mean"), projection_dim=16))
    assert len(whole.text_model.encoder.layer) == 6 and len(shrunk.text_model.encoder.layer) == 3
    w, s = whole.text_model.encoder.layer, shrunk.text_model.encoder.layer
    for i, j in ((0, 0), (2, 1), (4, 2)):  # the kept layers carry their pretrained weights
        assert all((a == b).all() for a, b in zip(w[i].parameters(), s[j].parameters()))


def test_augment_paired_false_augments_only_the_uncaptioned_images(tmp_path: Path, minilm_path: str) -> None:
    from mmkd.dist import DistInfo
    from mmkd.run_setup import prepare

    overrides = [f"cache_dir={tmp_path}", "data.world_size_train=16", "data.world_size_unpaired=16",
                 "data.unpaired_batch_size=4", "data.batch_size=4", "data.augment=true",
                 "student.vision.config={image_size: 32, patch_size: 8, hidden_size: 32, num_hidden_layers: 1, "
                 "num_attention_heads: 2, intermediate_size: 64}"]
    base = load_config(CONFIGS / "teacher.yaml", [*overrides, "data.unpaired=world:train"])
    data = prepare(base, DistInfo(), print).data
    assert data.paired.augment and data.unpaired.augment
    cfg = load_config(CONFIGS / "teacher.yaml", [*overrides, "data.unpaired=world:train", "data.augment_paired=false"])
    data = prepare(cfg, DistInfo(), print).data
    assert not data.paired.augment and data.unpaired.augment
    batch = data.batch(3)
    assert batch.views[:batch.n_paired] == [0] * batch.n_paired  # captioned images keep the plain view


def test_students_differ_only_in_what_the_teacher_gives(tmp_path: Path) -> None:
    """Fairness (issue 21): the distilled students inherit the teacher's ViT layers and read its targets; the
    scratch student has the same shape, freshly drawn, and no targets; the table says which got what."""
    from mmkd.demo import teacher_gave

    cfgs = demo_configs(CONFIGS, tmp_path / "out", tmp_path / "cache", False)
    teacher_model = str(Path(cfgs["teacher"].out) / "student")
    student, cached, scratch = cfgs["student"], cfgs["student_cached"], cfgs["scratch"]
    assert student.student.vision.source == "teacher" and cached.student.vision.source == teacher_model
    assert student.student.vision.keep_layers == cached.student.vision.keep_layers
    # the same MiniLM layers for all three (the cached one reads MiniLM's own folder: no teacher weights)
    assert student.student.text.keep_layers == cached.student.text.keep_layers == scratch.student.text.keep_layers
    keep = student.student.vision.keep_layers
    t_vision = cfgs["teacher"].student.vision.config
    assert scratch.student.vision.source == "new" and scratch.student.vision.config == {
        **t_vision, "num_hidden_layers": len(keep)}
    assert teacher_gave(student, teacher_model) == "targets + inherited ViT layers"
    assert teacher_gave(cached, teacher_model) == "cached targets + inherited ViT layers"
    assert teacher_gave(scratch, teacher_model) == "nothing (captions only)"
    for key in ("train", "world_size_train", "batch_size"):  # the same captioned images; only targets differ
        assert getattr(student.data, key) == getattr(scratch.data, key) == getattr(cached.data, key)
    assert student.train == scratch.train == cached.train


def test_a_finished_run_must_have_as_many_steps(tmp_path: Path) -> None:
    """train.steps is a resumable key, left out of the config hash: a 600-step teacher on disk must not pass for
    the 800-step one the configs now ask for (it did: the demo reused it)."""
    import json
    from dataclasses import replace

    from mmkd.demo import finished
    from mmkd.train import runfolder

    cfg = demo_configs(CONFIGS, tmp_path / "out", tmp_path / "cache", False)["teacher"]
    shorter = replace(cfg, train=replace(cfg.train, steps=cfg.train.steps - 200))
    assert config_key(shorter) != config_key(cfg)  # its own folder: training one never wipes the other
    Path(cfg.out).mkdir(parents=True)
    sha = runfolder.config_sha256(runfolder.run_config(shorter))
    (Path(cfg.out) / "metrics.json").write_text(json.dumps({"run": {"config_sha256": sha},
                                                            "train": {"steps": shorter.train.steps}}))
    assert finished(shorter) and not finished(cfg)


def test_a_tower_inherited_from_a_saved_dual_encoder_folder(tiny_teacher_dir: Path) -> None:
    """The cached student has no teacher in memory: its ViT layers come from the teacher's saved folder, and
    they are the teacher's own weights (as ``source: teacher`` gives the online student)."""
    from mmkd.models.hub import load_dual_encoder

    teacher = load_dual_encoder(tiny_teacher_dir)
    text = TowerSpec(source="new", arch="bert", config=dict(hidden_size=16, num_hidden_layers=1,
                                                               num_attention_heads=2, intermediate_size=32))
    spec = StudentConfig(vision=TowerSpec(source=str(tiny_teacher_dir), keep_layers=[0]), text=text,
                         projection_dim=8, tokenizer=str(tiny_teacher_dir))
    from_folder = build_student(None, spec)
    online = build_student(teacher, StudentConfig(vision=TowerSpec(source="teacher", keep_layers=[0]), text=text,
                                                  projection_dim=8))
    a, b = from_folder.vision_model.state_dict(), online.vision_model.state_dict()
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_demo_seeds_reseed_every_run_and_report_mean_and_sd(tmp_path: Path, monkeypatch, capsys) -> None:
    """`mmkd demo --seeds N`: N whole demos, every run's train.seed offset by 0..N-1 (the teacher too, so each seed
    trains its own), and the headline figures as mean ± sd over them in OUT/seeds.json."""
    import json

    from mmkd import demo
    from mmkd.cli import main

    base = demo_configs(CONFIGS, tmp_path, tmp_path, False)
    shifted = demo_configs(CONFIGS, tmp_path, tmp_path, False, seed_offset=2)
    for name in RUNS:
        assert shifted[name].train.seed == base[name].train.seed + 2
    assert config_key(shifted["teacher"]) != config_key(base["teacher"])

    figures = {0: (0.50, 0.46, 0.45, 0.36), 1: (0.52, 0.47, 0.47, 0.38)}  # teacher, student, cached, scratch
    seen = []

    def fake_run_demo(out, quick, cache_dir, config_dir, log, seed_offset):  # noqa: ANN001, ANN202
        seen.append((Path(out).name, seed_offset))
        top1 = dict(zip(("teacher", "student", "student_cached", "scratch"), figures[seed_offset]))
        models = {k: {"zeroshot": {"colour_shape": {"top1": v}}} for k, v in top1.items()}
        models["student"]["speedup_b1"] = {"median": 3.0 + seed_offset}
        return {"models": models}

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    assert main(["demo", "--seeds", "2", "--out", str(tmp_path / "seeds"), "--configs", str(CONFIGS)]) == 0
    assert seen == [("seed-0", 0), ("seed-1", 1)]
    result = json.loads((tmp_path / "seeds" / "seeds.json").read_text())
    s = result["summary"]
    assert abs(s["teacher_top1"]["mean"] - 0.51) < 1e-9 and abs(s["kd_minus_scratch"]["mean"] - 0.095) < 1e-9
    assert abs(s["kept"]["mean"] - (0.46 / 0.50 + 0.47 / 0.52) / 2) < 1e-9
    assert abs(s["cached_minus_online"]["sd"] - (0.01 ** 2 / 2) ** 0.5) < 1e-9  # sample sd of -0.01 and 0.0
    printed = capsys.readouterr().out
    assert "| KD − scratch | 9.5 ± 0.7 points | 10.0, 9.0 |" in printed and "`mmkd demo --seeds 2`" in printed
    assert "| cached − online | -0.5 ± 0.7 points | -1.0, 0.0 |" in printed  # each seed's, beside the mean
    tiny = {"seeds": 2, "command": "c", "per_seed": [{"cached_minus_online": -0.0002}, {"cached_minus_online": 0.0}],
            "summary": {"cached_minus_online": {"mean": -0.0001, "sd": 0.0001}}}
    assert "| cached − online | 0.0 ± 0.0 points | 0.0, 0.0 |" in seeds_table(tiny)  # no "-0.0"
    assert main(["demo", "--seeds", "1", "--out", str(tmp_path / "one")]) == 2  # one seed has no spread
    # the command recorded is the one to rerun: with the shared cache it was given
    assert main(["demo", "--seeds", "2", "--out", str(tmp_path / "s2"), "--configs", str(CONFIGS), "--cache",
                 str(tmp_path / "c")]) == 0
    assert json.loads((tmp_path / "s2" / "seeds.json").read_text())["command"] == \
        f"mmkd demo --seeds 2 --cache {tmp_path / 'c'}"


def test_a_run_folder_another_process_writes_is_refused_not_cleared(tmp_path: Path) -> None:
    """A second `mmkd demo` on the same folders must not delete a run under the process writing it (it did:
    two demos on one OUT trained the same run at once, each clearing the other's folder)."""
    import subprocess
    import sys

    import pytest

    from mmkd.demo import fresh_folder
    from mmkd.locking import FolderLockedError

    cfg = demo_configs(CONFIGS, tmp_path / "out", tmp_path / "cache", True)["scratch"]
    run = Path(cfg.out)
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 10}\n')
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from mmkd.locking import FolderLock; "
                               "FolderLock(sys.argv[1], 'run folder').acquire(); print('held', flush=True); "
                               "time.sleep(60)", str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderLockedError, match=f"PID {holder.pid}"):
            fresh_folder(cfg)
        assert (run / "metrics.jsonl").read_text() == '{"step": 10}\n' and (run / "checkpoints").is_dir()
    finally:
        holder.kill()
        holder.wait()
    fresh_folder(cfg)  # the holder is gone (the kernel dropped its lock): the demo's own folder is cleared
    assert sorted(p.name for p in run.iterdir()) == [".lock"]


def test_a_failed_child_run_is_one_line_naming_the_run_and_its_error(tmp_path: Path) -> None:
    import pytest

    from mmkd.demo import ChildRunFailed, kill_and_resume
    from mmkd.errors import MmkdError

    cfg = demo_configs(CONFIGS, tmp_path / "out", tmp_path / "cache", True)["student_cached"]
    bad = tmp_path / "student_cached.yaml"
    bad.write_text("no_such_key: 1\n")
    with pytest.raises(ChildRunFailed) as e:
        kill_and_resume(cfg, bad, log=lambda *a: None)
    assert isinstance(e.value, MmkdError) and "\n" not in str(e.value)
    assert str(e.value).startswith(f"{cfg.out}: the child run exited with 2") and "no_such_key" in str(e.value)
