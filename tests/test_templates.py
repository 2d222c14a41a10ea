"""Zero-shot prompt templates: CLIP_benchmark's ensembles as data files, chosen by data format, overridable."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from PIL import Image

from mmkd.data.resolve import zeroshot_classes
from mmkd.data.sources import DataError
from mmkd.data.templates import builtin_template_names, load_templates, parse_templates, templates_for_format


def test_builtin_ensembles_have_clip_benchmark_sizes() -> None:
    assert set(builtin_template_names()) >= {"cifar10", "cifar100", "stl10", "imagenet"}
    sizes = {name: len(load_templates(name)) for name in ("cifar10", "cifar100", "stl10", "imagenet")}
    assert sizes == {"cifar10": 18, "cifar100": 18, "stl10": 2, "imagenet": 80}
    for name in sizes:
        templates = load_templates(name)
        assert len(set(templates)) == len(templates), f"{name} has a repeated template"
        assert all(t.count("{c}") == 1 for t in templates)
    assert load_templates("cifar10")[0] == "a photo of a {c}." and "itap of a {c}." in load_templates("imagenet")


def test_templates_follow_the_format() -> None:
    assert templates_for_format("cifar10") == load_templates("cifar10")
    assert templates_for_format("stl10") == ["a photo of a {c}.", "a photo of the {c}."]
    assert templates_for_format("imagefolder") == templates_for_format("wds") == load_templates("imagenet")


def _imagefolder(root: Path) -> Path:
    for cls in ("golden_retriever", "tabby_cat"):
        (root / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / cls / "0.png")
    return root


def test_zeroshot_classes_by_format_and_override(tmp_path: Path) -> None:
    spec = f"imagefolder:{_imagefolder(tmp_path / 'pets')}"
    names, templates = zeroshot_classes(spec)
    assert names == ["golden retriever", "tabby cat"]  # underscores become spaces, as in CLIP_benchmark
    assert len(templates) == 80
    mine = tmp_path / "mine.txt"
    mine.write_text("# my prompts\n\na photo of my {c}.\n{} in the wild\n")
    assert zeroshot_classes(spec, templates=str(mine))[1] == ["a photo of my {c}.", "{} in the wild"]
    assert zeroshot_classes(spec, templates="stl10")[1] == load_templates("stl10")
    # the world keeps its own templates unless overridden
    assert zeroshot_classes("world:test", "shape", templates=str(mine))[1] == ["a photo of my {c}.", "{} in the wild"]

    root = tmp_path / "cifar-100-python"
    root.mkdir()
    with (root / "meta").open("wb") as f:
        pickle.dump({b"fine_label_names": [b"maple_tree"] + [f"f{i}".encode() for i in range(99)]}, f)
    names, templates = zeroshot_classes(f"cifar100:{tmp_path}")
    assert names[0] == "maple tree" and len(templates) == 18


def test_bad_template_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"t.txt:2: template 'a photo' must contain"):
        parse_templates("a {c}\na photo\n", "t.txt")
    with pytest.raises(ValueError, match=r"t.txt: no templates"):
        parse_templates("# nothing\n", "t.txt")
    with pytest.raises(ValueError, match=r"x.txt.*must contain.*exactly once"):
        bad = tmp_path / "x.txt"
        bad.write_text("{c} and {c}\n")
        load_templates(bad)
    with pytest.raises(ValueError, match=r"nope.*built-in: cifar10, cifar100, imagenet, stl10"):
        load_templates("nope")
    with pytest.raises(DataError, match="no class folders"):
        (tmp_path / "empty").mkdir()
        zeroshot_classes(f"imagefolder:{tmp_path / 'empty'}")


def test_cifar10_shards_folder_with_only_a_test_split(tmp_path: Path) -> None:
    import io
    import tarfile

    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="PNG")
    with tarfile.open(tmp_path / "test-0000.tar", "w") as tar:
        for name, data in (("a.png", buf.getvalue()), ("a.cls", b"3")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "classes.txt").write_text("\n".join(f"k_{i}" for i in range(10)) + "\n")
    names, templates = zeroshot_classes(f"cifar10:{tmp_path}", split="test")
    assert names[3] == "k 3" and len(templates) == 18
    with pytest.raises(DataError, match=r"train-\*.tar"):
        zeroshot_classes(f"cifar10:{tmp_path}", split="train")
