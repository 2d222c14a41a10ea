"""Every reader on real data (when present) and on tiny hand-made files whose pixels/labels are known."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tar
from PIL import Image

from mmkd.data.records import DataError, open_image
from mmkd.data.sources import FORMATS, class_names, expand_braces, parse_spec, read_records

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
COCO = SHARED / "coco-mini"
CIFAR = SHARED / "cifar10"

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def _png(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (6, 4)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _png_bytes(colour: tuple[int, int, int], marker: tuple[int, int] | None = None) -> bytes:
    img = Image.new("RGB", (5, 4), colour)
    if marker is not None:
        img.putpixel(marker, WHITE)  # PIL takes (x, y)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    return write_tar(path, members)


# ------------------------------------------------------------------------------------------------ real data


@pytest.mark.skipif(not COCO.is_dir(), reason=f"real data {COCO} absent (it lives outside the repo)")
def test_coco_mini_jsonl_and_coco_json_agree() -> None:
    a = read_records(f"jsonl:{COCO / 'captions.jsonl'}")
    b = read_records(f"coco:{COCO / 'captions_coco_format.json'}")
    by_file_a = {Path(r.image).name: sorted(r.captions) for r in a}
    by_file_b = {Path(r.image).name: sorted(r.captions) for r in b}
    assert len(by_file_a) == len(by_file_b) == 239
    assert sum(map(len, by_file_a.values())) == 1195
    assert by_file_a == by_file_b
    assert {r.key for r in a} == {r.key for r in b}  # both key by COCO image id
    assert all(Path(r.image).is_file() for r in b)
    assert class_names(f"coco:{COCO / 'captions_coco_format.json'}") is None


@pytest.mark.skipif(not (CIFAR / "test-0000.tar").is_file(), reason=f"real data {CIFAR} absent")
def test_cifar10_real_shard() -> None:
    spec = f"cifar10:{CIFAR / 'test-0000.tar'}"
    recs = read_records(spec)
    assert len(recs) == 10_000
    assert {r.label for r in recs} == set(range(10))
    assert len({r.key for r in recs}) == 10_000
    assert open_image(recs[0]).size == (32, 32)
    names = class_names(spec)
    assert names == (CIFAR / "classes.txt").read_text().split()
    assert names[0] == "airplane" and names[9] == "truck"


# ------------------------------------------------------------------------------------------ spec and options


def test_parse_spec_and_errors() -> None:
    assert parse_spec("jsonl:data/captions.jsonl") == ("jsonl", "data/captions.jsonl")
    assert parse_spec("WDS:a:b.tar") == ("wds", "a:b.tar")
    expected = {"jsonl", "csv", "tsv", "coco", "imagefolder", "wds", "cifar10", "cifar100", "stl10"}
    assert expected <= set(FORMATS)
    with pytest.raises(DataError, match="valid formats: .*cifar10.*jsonl"):
        parse_spec("parquet:x.parquet")
    with pytest.raises(DataError, match="FORMAT:PATH"):
        parse_spec("captions.jsonl")


def test_unknown_option_is_named(tmp_path: Path) -> None:
    f = tmp_path / "a.jsonl"
    f.write_text("")
    with pytest.raises(DataError, match="no option.*captionkey.*valid: image_root"):
        read_records(f"jsonl:{f}", captionkey="x")


def test_expand_braces() -> None:
    assert expand_braces("s-{0000..0002}.tar") == ["s-0000.tar", "s-0001.tar", "s-0002.tar"]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]


# ------------------------------------------------------------------------------------------ caption formats


def test_jsonl(tmp_path: Path) -> None:
    _png(tmp_path / "img" / "a.png", RED)
    absolute = _png(tmp_path / "elsewhere" / "b.png", BLUE)
    f = tmp_path / "caps.jsonl"
    f.write_text(json.dumps({"image": "img/a.png", "captions": ["a red box", " red "]}) + "\n\n"
                 + json.dumps({"image": str(absolute), "caption": "blue", "key": "bee", "label": 3}) + "\n")
    a, b = read_records(f"jsonl:{f}")
    assert (a.key, a.captions, a.label) == ("img/a.png", ("a red box", "red"), None)
    assert open_image(a).getpixel((0, 0)) == RED
    assert (b.key, b.captions, b.label, b.image) == ("bee", ("blue",), 3, absolute)
    assert a.origin.endswith("caps.jsonl:1") and b.origin.endswith("caps.jsonl:3")


def test_csv_merges_rows_of_one_image(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", RED)
    _png(tmp_path / "b.png", GREEN)
    f = tmp_path / "train.csv"
    f.write_text('filepath,title\na.png,first\nb.png,"green, square"\na.png,second\n')
    recs = read_records(f"csv:{f}")
    assert [(r.key, r.captions) for r in recs] == [("a.png", ("first", "second")),
                                                   ("b.png", ("green, square",))]
    assert open_image(recs[1]).getpixel((3, 2)) == GREEN


def test_tsv_custom_columns(tmp_path: Path) -> None:
    _png(tmp_path / "pics" / "a.png", RED)
    f = tmp_path / "train.tsv"
    f.write_text("text\tlabel\timg\nred thing\t2\tpics/a.png\n")
    (r,) = read_records(f"tsv:{f}", image_key="img", caption_key="text", label_key="label")
    assert (r.key, r.captions, r.label) == ("pics/a.png", ("red thing",), 2)
    with pytest.raises(DataError, match=r"train.tsv: no column 'filepath'.*columns found: text, label, img"):
        read_records(f"tsv:{f}")


def test_coco_json_image_root(tmp_path: Path) -> None:
    _png(tmp_path / "images" / "x.png", RED)
    _png(tmp_path / "other" / "x.png", BLUE)
    f = tmp_path / "caps.json"
    f.write_text(json.dumps({"images": [{"id": 7, "file_name": "x.png"}],
                             "annotations": [{"image_id": 7, "id": 1, "caption": "one"},
                                             {"image_id": 7, "id": 2, "caption": "two"}]}))
    (r,) = read_records(f"coco:{f}")
    assert (r.key, r.captions) == ("7", ("one", "two"))
    assert open_image(r).getpixel((0, 0)) == RED  # images/ beside the JSON by default
    (r,) = read_records(f"coco:{f}", image_root=str(tmp_path / "other"))
    assert open_image(r).getpixel((0, 0)) == BLUE


# ------------------------------------------------------------------------------------ classification formats


def test_imagefolder(tmp_path: Path) -> None:
    _png(tmp_path / "dog" / "1.png", GREEN)
    _png(tmp_path / "cat" / "b.PNG", RED)
    _png(tmp_path / "cat" / "sub" / "a.png", RED)
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    _png(tmp_path / ".cache" / "x.png", BLUE)
    spec = f"imagefolder:{tmp_path}"
    assert class_names(spec) == ["cat", "dog"]
    recs = read_records(spec)
    assert [(r.key, r.label) for r in recs] == [("cat/b.PNG", 0), ("cat/sub/a.png", 0), ("dog/1.png", 1)]
    assert recs[0].captions == ()
    assert open_image(recs[2]).getpixel((0, 0)) == GREEN


def _cifar_rows(n: int) -> tuple[np.ndarray, np.ndarray]:
    """n HWC images with a distinct colour at (row 5, col 7), and their rows in CIFAR's R|G|B plane layout."""
    imgs = np.zeros((n, 32, 32, 3), np.uint8)
    for i in range(n):
        imgs[i, 5, 7] = (10 + i, 100 + i, 200 + i)
    rows = imgs.transpose(0, 3, 1, 2).reshape(n, 3072)
    return imgs, rows


def test_cifar10_python_batches(tmp_path: Path) -> None:
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    imgs, rows = _cifar_rows(3)
    with (root / "test_batch").open("wb") as f:
        pickle.dump({b"batch_label": b"testing batch 1 of 1", b"labels": [2, 0, 9], b"data": rows,
                     b"filenames": [b"a.png", b"b.png", b"c.png"]}, f)
    with (root / "batches.meta").open("wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)], b"num_vis": 3072}, f)
    recs = read_records(f"cifar10:{tmp_path}", split="test")  # the parent folder works too
    assert [r.label for r in recs] == [2, 0, 9]
    assert [r.key for r in recs] == ["test_batch_00000", "test_batch_00001", "test_batch_00002"]
    img = open_image(recs[1])
    assert img.getpixel((7, 5)) == (11, 101, 201) and img.getpixel((5, 7)) == (0, 0, 0)
    assert np.array_equal(recs[2].image, imgs[2])
    assert class_names(f"cifar10:{root}", split="test")[9] == "c9"
    with pytest.raises(DataError, match="data_batch_2"):  # train needs all five batches
        (root / "data_batch_1").write_bytes((root / "test_batch").read_bytes())
        read_records(f"cifar10:{root}")


def test_cifar10_wds_folder_picks_split(tmp_path: Path) -> None:
    _tar(tmp_path / "train-0000.tar", {"tr0.png": _png_bytes(RED), "tr0.cls": b"4"})
    _tar(tmp_path / "test-0000.tar", {"te0.png": _png_bytes(BLUE), "te0.cls": b"7",
                                      "te1.png": _png_bytes(GREEN), "te1.cls": b"1"})
    (tmp_path / "classes.txt").write_text("\n".join(f"k{i}" for i in range(10)) + "\n")
    assert [(r.key, r.label) for r in read_records(f"cifar10:{tmp_path}")] == [("tr0", 4)]
    assert [r.label for r in read_records(f"cifar10:{tmp_path}", split="test")] == [7, 1]
    assert class_names(f"cifar10:{tmp_path}")[3] == "k3"


def test_cifar100(tmp_path: Path) -> None:
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    _, rows = _cifar_rows(2)
    # As written by numpy 1.x under protocol 2 (the official files are that old).
    blob = pickle.dumps({b"data": rows, b"fine_labels": [99, 5], b"coarse_labels": [19, 1]}, protocol=2)
    (root / "train").write_bytes(blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    with (root / "meta").open("wb") as f:
        pickle.dump({b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                     b"coarse_label_names": [f"c{i}".encode() for i in range(20)]}, f)
    recs = read_records(f"cifar100:{tmp_path}")
    assert [r.label for r in recs] == [99, 5]
    assert open_image(recs[0]).getpixel((7, 5)) == (10, 100, 200)
    names = class_names(f"cifar100:{root}")
    assert len(names) == 100 and names[99] == "f99"


def test_stl10_column_major(tmp_path: Path) -> None:
    root = tmp_path / "stl10_binary"
    root.mkdir()
    imgs = np.zeros((2, 96, 96, 3), np.uint8)
    imgs[0, 10, 20] = (255, 128, 1)  # row 10, column 20: a transposition bug would move it to (20, 10)
    imgs[1, 95, 0] = (3, 4, 5)
    imgs.transpose(0, 3, 2, 1).tofile(root / "test_X.bin")  # on disk: [n, channel, column, row]
    np.array([1, 10], np.uint8).tofile(root / "test_y.bin")
    (root / "class_names.txt").write_text("\n".join(f"s{i}" for i in range(10)) + "\n")
    recs = read_records(f"stl10:{tmp_path}", split="test")
    assert [r.label for r in recs] == [0, 9]
    img = open_image(recs[0])
    assert img.getpixel((20, 10)) == (255, 128, 1) and img.getpixel((10, 20)) == (0, 0, 0)
    assert open_image(recs[1]).getpixel((0, 95)) == (3, 4, 5)
    assert class_names(f"stl10:{root}")[9] == "s9"
    with pytest.raises(DataError, match="train_X.bin"):
        read_records(f"stl10:{root}")


# ---------------------------------------------------------------------------------------------- WebDataset


def test_wds_tar_with_txt_and_json_captions(tmp_path: Path) -> None:
    _tar(tmp_path / "s-0000.tar", {
        "a.png": _png_bytes(RED, marker=(3, 1)), "a.txt": b"a red image\n\nwith a white dot\n", "a.cls": b"1",
        "b.png": _png_bytes(BLUE), "b.json": json.dumps({"caption": "blue"}).encode(),
    })
    _tar(tmp_path / "s-0001.tar", {"sub/c.jpg": _png_bytes(GREEN), "sub/c.txt": b"green"})
    recs = read_records(f"wds:{tmp_path}/s-{{0000..0001}}.tar")
    assert [(r.key, r.captions, r.label) for r in recs] == [
        ("a", ("a red image", "with a white dot"), 1), ("b", ("blue",), None), ("sub/c", ("green",), None)]
    img = open_image(recs[0])
    assert img.getpixel((3, 1)) == WHITE and img.getpixel((0, 0)) == RED  # (x=3, y=1)
    assert isinstance(recs[0].image, bytes)
    same = [r.key for r in read_records(f"wds:{tmp_path}")]  # a folder of tars
    assert same == [r.key for r in read_records(f"wds:{tmp_path}/s-0000.tar,{tmp_path}/s-0001.tar")]
    assert same == ["a", "b", "sub/c"]
    assert class_names(f"wds:{tmp_path}") is None


def test_wds_wrong_caption_key_fails_fast_listing_extensions(tmp_path: Path) -> None:
    tar = _tar(tmp_path / "s.tar", {"a.png": _png_bytes(RED), "a.txt": b"x", "a.cls": b"0"})
    with pytest.raises(DataError, match=r"s.tar:a: no .caption caption.*extensions found: cls, png, txt"):
        read_records(f"wds:{tar}", caption_key="caption")


def test_wds_bad_samples(tmp_path: Path) -> None:
    tar = _tar(tmp_path / "e.tar", {"a.png": _png_bytes(RED), "a.txt": b"  \n"})
    with pytest.raises(DataError, match=r"e.tar:a.txt: empty caption"):
        read_records(f"wds:{tar}")
    tar = _tar(tmp_path / "n.tar", {"a.txt": b"caption only"})
    with pytest.raises(DataError, match=r"n.tar:a: no image member.*extensions found: txt"):
        read_records(f"wds:{tar}")
    with pytest.raises(DataError, match=r"shard .*missing-0002.tar not found"):
        read_records(f"wds:{tmp_path}/missing-{{0002..0003}}.tar")


# ------------------------------------------------------------------------------------------------ bad input


def test_missing_files_and_folders(tmp_path: Path) -> None:
    for spec in ("jsonl", "csv", "tsv", "coco"):
        with pytest.raises(DataError, match=r"nope\.x not found"):
            read_records(f"{spec}:{tmp_path / 'nope.x'}")
    with pytest.raises(DataError, match=r"nodir not found"):
        read_records(f"imagefolder:{tmp_path / 'nodir'}")


def test_jsonl_bad_lines(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", RED)
    f = tmp_path / "bad.jsonl"
    good = json.dumps({"image": "a.png", "caption": "ok"})
    cases = {
        '{"image": "a.png", "caption": "ok"': r"bad.jsonl:2: not valid JSON",
        json.dumps({"captions": ["x"]}): r"bad.jsonl:2: missing 'image' field",
        json.dumps({"image": "a.png", "captions": ["fine", " "]}):
            r"bad.jsonl:2 .*empty caption; remove it or fill",
        json.dumps({"image": "gone.png", "caption": "x"}):
            r"bad.jsonl:2: image file .*gone.png does not exist",
        good: r"duplicate record keys 'a.png'.*bad.jsonl:1 and .*bad.jsonl:2",
    }
    for line, message in cases.items():
        f.write_text(good + "\n" + line + "\n")
        with pytest.raises(DataError, match=message):
            read_records(f"jsonl:{f}")


def test_csv_bad_rows(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", RED)
    f = tmp_path / "bad.csv"
    f.write_text("filepath,title\na.png,ok\na.png,\n")
    with pytest.raises(DataError, match=r"bad.csv:3 column 'title': empty caption"):
        read_records(f"csv:{f}")
    f.write_text("filepath,title\na.png,ok\nmissing.png,x\n")
    with pytest.raises(DataError, match=r"bad.csv:3: image file .*missing.png does not exist"):
        read_records(f"csv:{f}")
    assert len(read_records(f"csv:{f}", check_files=False)) == 2


def test_coco_bad_annotations(tmp_path: Path) -> None:
    _png(tmp_path / "x.png", RED)
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"images": [{"id": 1, "file_name": "x.png"}],
                             "annotations": [{"image_id": 1, "id": 5, "caption": ""}]}))
    with pytest.raises(DataError, match=r"c.json annotations\[0\] \(id 5\).*empty caption"):
        read_records(f"coco:{f}")
    f.write_text(json.dumps({"images": [{"id": 1, "file_name": "y.png"}], "annotations": []}))
    with pytest.raises(DataError, match=r"c.json image id 1: image file .*y.png does not exist"):
        read_records(f"coco:{f}")
    f.write_text(json.dumps({"info": {}}))
    with pytest.raises(DataError, match=r"c.json: expected a COCO captions file"):
        read_records(f"coco:{f}")


def test_wrong_layout_folders_say_what_was_expected(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"expected cifar-10-batches-py \(data_batch_1..5, test_batch\)"):
        read_records(f"cifar10:{tmp_path}")
    with pytest.raises(DataError, match=r"expected the cifar-100-python folder"):
        read_records(f"cifar100:{tmp_path}")
    with pytest.raises(DataError, match=r"expected the stl10_binary folder"):
        read_records(f"stl10:{tmp_path}")
    with pytest.raises(DataError, match=r"no class folders"):
        read_records(f"imagefolder:{tmp_path}")
    with pytest.raises(DataError, match=r"unknown split 'val'"):
        read_records(f"cifar10:{tmp_path}", split="val")


def test_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    (root / "meta").write_bytes(pickle.dumps({b"fine_label_names": []}))
    (root / "train").write_bytes(pickle.dumps(print))  # a global outside numpy
    with pytest.raises(DataError, match=r"train: not a readable CIFAR pickle.*refusing"):
        read_records(f"cifar100:{root}")
