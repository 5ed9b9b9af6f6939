"""Dataset layouts -> records, each checked on a small tree in the layout's exact shape."""

from __future__ import annotations

import json
import logging
import re
import struct
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
import tifffile

from lowlight.config import DatasetConfig
from lowlight.data import layouts
from lowlight.data.images import decode_image
from lowlight.data.layouts import (
    LayoutError,
    Record,
    dataset_records,
    eld_frame_ratio,
    eld_reference,
    load_records,
    read_exif,
)
from lowlight.data.raw import read_raw
from lowlight.data.unprocess import CameraProfile, write_dng


def touch(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def write_exif_tiff(path: Path, exposure: tuple[int, int], iso: int) -> None:
    """A tiny TIFF carrying ExposureTime and ISO in IFD0, as DNG writers may put them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tags = [(33434, 5, 1, exposure, True), (34855, 3, 1, iso, True)]
    tifffile.imwrite(path, np.zeros((4, 4), np.uint16), photometric="minisblack", extratags=tags)


def exif_ifd_tiff(exposure: tuple[int, int], iso: int) -> bytes:
    """A minimal TIFF whose tags sit in an EXIF sub-IFD, as in ARW/NEF/CR2 files."""
    header = b"II*\x00" + struct.pack("<I", 8)
    ifd0 = struct.pack("<H", 1) + struct.pack("<HHII", 34665, 4, 1, 26) + struct.pack("<I", 0)
    exif = struct.pack("<H", 2) + struct.pack("<HHII", 33434, 5, 1, 56)
    exif += struct.pack("<HHIHH", 34855, 3, 1, iso, 0) + struct.pack("<I", 0)
    return header + ifd0 + exif + struct.pack("<II", *exposure)


# ---------------------------------------------------------------- API


def test_record_to_dict_is_plain_and_json_ready():
    record = Record("a", "in.ARW", "gt.ARW", "train", "sid", "raw", camera="Sony", ratio=100.0)
    as_dict = record.to_dict()
    assert as_dict == {
        "id": "a", "input": "in.ARW", "target": "gt.ARW", "split": "train", "dataset": "sid", "kind": "raw",
        "camera": "Sony", "iso": 0.0, "exposure_in": 0.0, "exposure_gt": 0.0, "ratio": 100.0,
    }
    assert Record(**json.loads(json.dumps(as_dict))) == record


def test_unknown_layout_lists_valid_names(tmp_path):
    with pytest.raises(LayoutError) as err:
        load_records("nope", str(tmp_path))
    for name in ("sid", "eld", "lrd", "lol", "lolv2", "smid", "paired"):
        assert name in str(err.value)


def test_missing_root_is_named(tmp_path):
    root = str(tmp_path / "absent")
    with pytest.raises(LayoutError, match="absent"):
        load_records("lol", root)


def test_camera_for_a_layout_without_cameras_is_refused(tmp_path):
    touch(tmp_path, "our485/low/1.png", "our485/high/1.png")
    with pytest.raises(LayoutError, match="camera"):
        load_records("lol", str(tmp_path), camera="Sony")


def test_unknown_split_is_refused(tmp_path):
    touch(tmp_path, "our485/low/1.png", "our485/high/1.png")
    with pytest.raises(LayoutError, match="splits"):
        load_records("lol", str(tmp_path), splits=["training"])


def test_registered_layout_is_dispatched(tmp_path, monkeypatch):
    monkeypatch.setattr(layouts, "LAYOUTS", dict(layouts.LAYOUTS))
    touch(tmp_path, "x.png")

    @layouts.register_layout("one_file")
    def one_file(tree, request):
        return [Record("x", tree.url("x.png"), tree.url("x.png"), "val", "paired", "srgb")]

    assert [r.id for r in load_records("one_file", str(tmp_path))] == ["x"]
    assert load_records("one_file", str(tmp_path), splits=["train"]) == []
    with pytest.raises(ValueError, match="already registered"):
        layouts.register_layout("one_file")(one_file)


# ---------------------------------------------------------------- SID

SID_FILES = (
    "Sony/short/00001_00_0.04s.ARW", "Sony/short/00001_01_0.1s.ARW", "Sony/long/00001_00_10s.ARW",
    "Sony/short/10003_00_0.033s.ARW", "Sony/long/10003_00_10s.ARW",
    "Sony/short/20005_00_0.1s.ARW", "Sony/long/20005_00_30s.ARW",
)


@pytest.fixture
def sid_root(tmp_path):
    touch(tmp_path, *SID_FILES)
    (tmp_path / "Sony_train_list.txt").write_text(
        "./Sony/short/00001_00_0.04s.ARW ./Sony/long/00001_00_10s.ARW ISO200 F8\n"
        "./Sony/short/00001_01_0.1s.ARW ./Sony/long/00001_00_10s.ARW ISO200 F8\n"
        # listed as train, but scene 2xxxx is val: the scene id decides
        "./Sony/short/20005_00_0.1s.ARW ./Sony/long/20005_00_30s.ARW ISO400 F4\n"
    )
    (tmp_path / "Sony_test_list.txt").write_text(
        "./Sony/short/10003_00_0.033s.ARW ./Sony/long/10003_00_10s.ARW ISO6400 F5.6\n\n"
    )
    return tmp_path


def test_sid_pairs_from_list_files(sid_root):
    records = load_records("sid", str(sid_root))
    assert [(r.id, r.split) for r in records] == [
        ("Sony/00001_00_0.04s", "train"), ("Sony/00001_01_0.1s", "train"),
        ("Sony/20005_00_0.1s", "val"), ("Sony/10003_00_0.033s", "test"),
    ]
    first, test = records[0], records[-1]
    assert first.input == str(sid_root / "Sony/short/00001_00_0.04s.ARW")
    assert first.target == str(sid_root / "Sony/long/00001_00_10s.ARW")
    assert (first.dataset, first.kind, first.camera, first.iso) == ("sid", "raw", "Sony", 200.0)
    assert (first.exposure_in, first.exposure_gt, first.ratio) == (0.04, 10.0, pytest.approx(250.0))
    assert test.iso == 6400.0
    assert test.ratio == 300.0  # 10 / 0.033 = 303, capped


def test_sid_splits_filter(sid_root):
    assert [r.id for r in load_records("sid", str(sid_root), splits=["test"])] == ["Sony/10003_00_0.033s"]
    assert [r.id for r in load_records("sid", str(sid_root), splits="val")] == ["Sony/20005_00_0.1s"]


def test_sid_missing_listed_files_are_all_named(sid_root):
    (sid_root / "Sony/short/00001_00_0.04s.ARW").unlink()
    (sid_root / "Sony/long/10003_00_10s.ARW").unlink()
    with pytest.raises(LayoutError) as err:
        load_records("sid", str(sid_root))
    message = str(err.value)
    assert "Sony_train_list.txt: Sony/short/00001_00_0.04s.ARW" in message
    assert "Sony_test_list.txt: Sony/long/10003_00_10s.ARW" in message


def test_sid_without_lists_pairs_by_scene_and_accepts_any_extension(tmp_path):
    touch(tmp_path, "Sony/short/00001_00_0.1s.dng", "Sony/long/00001_00_10s.dng",
          "Sony/long/00001_00_30s.dng", "Sony/short/10002_00_0.04s.dng", "Sony/long/10002_00_10s.dng")
    records = load_records("sid", str(tmp_path))
    assert [(r.id, r.split) for r in records] == [
        ("Sony/00001_00_0.1s", "train"), ("Sony/10002_00_0.04s", "test"),
    ]
    assert records[0].target.endswith("Sony/long/00001_00_30s.dng")  # the longest exposure of the scene
    assert records[0].ratio == 300.0 and records[0].iso == 0.0
    assert records[1].ratio == pytest.approx(250.0)


def test_sid_without_lists_short_without_long_is_an_error(tmp_path):
    touch(tmp_path, "Sony/short/00001_00_0.1s.ARW", "Sony/short/00002_00_0.1s.ARW",
          "Sony/long/00001_00_10s.ARW")
    with pytest.raises(LayoutError, match=re.escape("short/00002_00_0.1s.ARW")):
        load_records("sid", str(tmp_path))


# Lines of SID's released dataset/Sony_test_list.txt (github.com/cchen156/Learning-to-See-in-the-Dark):
# 10034 and 10172 are misaligned scenes, 10035 is not.
SID_TEST_LINES = (
    "./Sony/short/10034_00_0.04s.ARW ./Sony/long/10034_00_10s.ARW ISO200 F9",
    "./Sony/short/10034_01_0.1s.ARW ./Sony/long/10034_00_10s.ARW ISO200 F9",
    "./Sony/short/10035_00_0.04s.ARW ./Sony/long/10035_00_10s.ARW ISO200 F9",
    "./Sony/short/10172_00_0.1s.ARW ./Sony/long/10172_00_30s.ARW ISO500 F8",
)


@pytest.fixture
def sid_misaligned_root(tmp_path):
    touch(tmp_path, *(path[2:] for line in SID_TEST_LINES for path in line.split()[:2]))
    (tmp_path / "Sony_test_list.txt").write_text("\n".join(SID_TEST_LINES) + "\n")
    return tmp_path


def test_sid_keeps_the_misaligned_sony_scenes_by_default_and_drops_them_on_request(sid_misaligned_root):
    dropped = load_records("sid", str(sid_misaligned_root), drop_misaligned=True)
    assert [r.id for r in dropped] == ["Sony/10035_00_0.04s"]
    kept = load_records("sid", str(sid_misaligned_root))
    assert [r.id for r in kept] == [
        "Sony/10034_00_0.04s", "Sony/10034_01_0.1s", "Sony/10035_00_0.04s", "Sony/10172_00_0.1s",
    ]
    assert [(r.split, r.iso, r.ratio) for r in kept] == [
        ("test", 200.0, 250.0), ("test", 200.0, 100.0), ("test", 200.0, 250.0), ("test", 500.0, 300.0),
    ]


def test_sid_misaligned_flag_comes_from_the_dataset_config(sid_misaligned_root):
    cfg = DatasetConfig(layout="sid", root=str(sid_misaligned_root), camera="Sony")
    assert cfg.drop_misaligned is False
    assert len(dataset_records(cfg)) == 4
    assert len(dataset_records(cfg.model_copy(update={"drop_misaligned": True}))) == 1


def test_sid_drops_misaligned_scenes_without_list_files_too(tmp_path):
    touch(tmp_path, "Sony/short/10035_00_0.1s.ARW", "Sony/long/10035_00_10s.ARW",
          "Sony/short/10045_00_0.1s.ARW", "Sony/long/10045_00_10s.ARW")
    assert [r.id for r in load_records("sid", str(tmp_path), drop_misaligned=True)] == ["Sony/10035_00_0.1s"]
    assert len(load_records("sid", str(tmp_path))) == 2


@pytest.fixture
def sid_with_fuji(sid_root):
    touch(sid_root, "Fuji/short/00001_00_0.1s.RAF", "Fuji/long/00001_00_10s.RAF")
    (sid_root / "Fuji_train_list.txt").write_text(
        "./Fuji/short/00001_00_0.1s.RAF ./Fuji/long/00001_00_10s.RAF ISO1000 F3.6\n"
    )
    return sid_root


def test_sid_fuji_x_trans_is_refused_when_asked_for(sid_with_fuji):
    with pytest.raises(LayoutError, match="X-Trans"):
        load_records("sid", str(sid_with_fuji), camera="Fuji")


def test_sid_fuji_is_skipped_with_a_warning(sid_with_fuji, caplog):
    with caplog.at_level(logging.WARNING, logger="lowlight.data.layouts"):
        records = load_records("sid", str(sid_with_fuji))
    assert {r.camera for r in records} == {"Sony"} and len(records) == 4
    assert "Fuji" in caplog.text and "X-Trans" in caplog.text
    with pytest.raises(LayoutError, match="Canon"):
        load_records("sid", str(sid_with_fuji), camera="Canon")


def test_sid_with_only_fuji_has_nothing_to_load(tmp_path):
    touch(tmp_path, "Fuji/short/00001_00_0.1s.RAF", "Fuji/long/00001_00_10s.RAF")
    with pytest.raises(LayoutError, match="no sid camera"):
        load_records("sid", str(tmp_path))


def test_sid_bad_file_name_is_named(tmp_path):
    touch(tmp_path, "Sony/short/dark.ARW", "Sony/long/00001_00_10s.ARW")
    with pytest.raises(LayoutError, match=re.escape("dark.ARW")):
        load_records("sid", str(tmp_path))


# ---------------------------------------------------------------- ELD


def write_eld_scene(scene: Path, ext: str = "ARW") -> None:
    for index in range(1, 17):
        if index in (1, 6, 11, 16):
            write_exif_tiff(scene / f"IMG_{index:04d}.{ext}", (1, 1), 100)
        else:
            write_exif_tiff(scene / f"IMG_{index:04d}.{ext}", (1, 100), 100 * index)


def test_eld_reference_is_the_nearest_of_1_6_11_16():
    nearest = [1, 1, 1, 6, 6, 6, 6, 6, 11, 11, 11, 11, 11, 16, 16, 16]
    assert [eld_reference(i) for i in range(1, 17)] == nearest


def test_eld_frame_ratios_follow_the_release():
    # ELD's test_ELD.py evaluates img_ids [4, 9, 14] and [5, 10, 15]; its README: four factors
    # x1, x10, x100, x200 per ISO between the references 1, 6, 11, 16 (PMN's ratio_list [1, 1, 10, 100, 200]).
    by_ratio = {r: [i for i in range(1, 17) if eld_frame_ratio(i) == r] for r in (1, 10, 100, 200)}
    assert by_ratio == {1: [2, 7, 12], 10: [3, 8, 13], 100: [4, 9, 14], 200: [5, 10, 15]}
    assert [eld_frame_ratio(i) for i in (1, 6, 11, 16)] == [None] * 4
    with pytest.raises(ValueError, match="1 to 16"):
        eld_frame_ratio(17)


def test_eld_evaluates_the_x100_and_x200_frames_by_default(tmp_path):
    write_eld_scene(tmp_path / "SonyA7S2/scene-1")
    records = load_records("eld", str(tmp_path))
    frames = [f"SonyA7S2/scene-1/IMG_{i:04d}" for i in (4, 5, 9, 10, 14, 15)]
    assert sorted(r.id for r in records) == frames
    assert {r.split for r in records} == {"test"}
    by_id = {r.id: r for r in records}
    fourth, ninth = by_id["SonyA7S2/scene-1/IMG_0004"], by_id["SonyA7S2/scene-1/IMG_0009"]
    assert fourth.target.endswith("scene-1/IMG_0006.ARW")  # ELD's argmin |id - [1, 6, 11, 16]|
    assert ninth.target.endswith("scene-1/IMG_0011.ARW")
    assert by_id["SonyA7S2/scene-1/IMG_0015"].target.endswith("scene-1/IMG_0016.ARW")
    assert (fourth.iso, fourth.exposure_in, fourth.exposure_gt) == (400.0, 0.01, 1.0)
    assert fourth.ratio == pytest.approx((100 * 1.0) / (400 * 0.01))
    assert (fourth.camera, fourth.dataset, fourth.kind) == ("SonyA7S2", "eld", "raw")


def test_eld_ratios_choose_the_frames(tmp_path):
    write_eld_scene(tmp_path / "SonyA7S2/scene-1")
    every = load_records("eld", str(tmp_path), eld_ratios=(1, 10, 100, 200))
    assert len(every) == 12
    x1 = load_records("eld", str(tmp_path), eld_ratios=[1])
    assert [r.id[-8:] for r in x1] == ["IMG_0002", "IMG_0007", "IMG_0012"]
    cfg = DatasetConfig(layout="eld", root=str(tmp_path), splits=["test"], eld_ratios=[200])
    assert [r.id[-8:] for r in dataset_records(cfg)] == ["IMG_0005", "IMG_0010", "IMG_0015"]
    with pytest.raises(LayoutError, match="eld_ratios"):
        load_records("eld", str(tmp_path), eld_ratios=[50])


def test_eld_camera_and_requested_split(tmp_path):
    write_eld_scene(tmp_path / "SonyA7S2/scene-1")
    write_eld_scene(tmp_path / "NikonD850/scene-2", ext="nef")
    assert {r.camera for r in load_records("eld", str(tmp_path))} == {"SonyA7S2", "NikonD850"}
    nikon = load_records("eld", str(tmp_path), camera="NikonD850", splits=["train"])
    assert len(nikon) == 6 and {(r.camera, r.split) for r in nikon} == {("NikonD850", "train")}
    with pytest.raises(LayoutError, match="one split"):
        load_records("eld", str(tmp_path), splits=["train", "val"])


def test_eld_without_exif_is_an_error(tmp_path):
    touch(tmp_path, *(f"SonyA7S2/scene-1/IMG_{i:04d}.ARW" for i in range(1, 7)))
    with pytest.raises(LayoutError, match="EXIF"):
        load_records("eld", str(tmp_path))


def test_eld_missing_reference_is_named(tmp_path):
    write_exif_tiff(tmp_path / "SonyA7S2/scene-1/IMG_0004.ARW", (1, 100), 100)
    with pytest.raises(LayoutError, match=r"reference frames \[6\]"):
        load_records("eld", str(tmp_path))


def test_eld_frame_outside_1_to_16_is_named(tmp_path):
    write_eld_scene(tmp_path / "SonyA7S2/scene-1")
    write_exif_tiff(tmp_path / "SonyA7S2/scene-1/IMG_0017.ARW", (1, 100), 100)
    with pytest.raises(LayoutError, match="IMG_0017"):
        load_records("eld", str(tmp_path))


def test_read_exif_from_ifd0_exif_ifd_and_non_tiff(tmp_path):
    write_exif_tiff(tmp_path / "a.dng", (1, 50), 800)
    with open(tmp_path / "a.dng", "rb") as fh:
        assert read_exif(fh) == layouts.Exif(0.02, 800.0)
    (tmp_path / "b.ARW").write_bytes(exif_ifd_tiff((1, 30), 3200))
    with open(tmp_path / "b.ARW", "rb") as fh:
        exif = read_exif(fh)
    assert exif.exposure == pytest.approx(1 / 30) and exif.iso == 3200.0
    (tmp_path / "c.RAF").write_bytes(b"FUJIFILMCCD-RAW 0201")
    with open(tmp_path / "c.RAF", "rb") as fh:
        assert read_exif(fh) == layouts.Exif()


# ---------------------------------------------------------------- paired folders: LRD and generic


def test_paired_split_folders_and_kinds(tmp_path):
    touch(tmp_path, "Train/low/a.png", "Train/high/a.png", "Train/low/sub/b.jpg", "Train/high/sub/b.png",
          "eval/input/c.png", "eval/target/c.png", "val/low/d.png", "val/high/d.png", "train.txt",
          "Train/low/.DS_Store")
    records = load_records("paired", str(tmp_path))
    assert [(r.id, r.split) for r in records] == [
        ("Train/a", "train"), ("Train/sub/b", "train"), ("val/d", "val"), ("eval/c", "test"),
    ]
    assert {(r.dataset, r.kind, r.ratio) for r in records} == {("paired", "srgb", 1.0)}
    assert records[1].target == str(tmp_path / "Train/high/sub/b.png")
    assert [r.id for r in load_records("paired", str(tmp_path), splits=["test"])] == ["eval/c"]


def test_paired_unmatched_files_are_all_named(tmp_path):
    touch(tmp_path, "low/a.png", "high/a.png", "low/b.png", "high/c.png")
    with pytest.raises(LayoutError) as err:
        load_records("paired", str(tmp_path))
    assert "low/b.png" in str(err.value) and "high/c.png" in str(err.value)
    assert "low/a.png" not in str(err.value)


def test_paired_flat_folder_takes_default_or_asked_split(tmp_path):
    touch(tmp_path, "input/a.png", "gt/a.png")
    assert [r.split for r in load_records("paired", str(tmp_path))] == ["train"]
    assert [r.split for r in load_records("paired", str(tmp_path), splits=["test"])] == ["test"]


def test_paired_without_pair_folders_names_what_it_expected(tmp_path):
    touch(tmp_path, "dark/a.png", "bright/a.png")
    with pytest.raises(LayoutError, match="low/high"):
        load_records("paired", str(tmp_path))


def test_paired_unknown_extension_is_an_error(tmp_path):
    touch(tmp_path, "low/a.npy", "high/a.npy")
    with pytest.raises(LayoutError, match=re.escape("a.npy")):
        load_records("paired", str(tmp_path))


def test_paired_raw_files_take_ratio_from_exif(tmp_path):
    write_exif_tiff(tmp_path / "test/low/s1.dng", (1, 100), 1600)
    write_exif_tiff(tmp_path / "test/high/s1.dng", (1, 2), 100)
    touch(tmp_path, "test/low/s2.ARW", "test/high/s2.ARW")  # no EXIF: ratio 1
    one, two = load_records("paired", str(tmp_path))
    assert (one.id, one.split, one.dataset, one.kind) == ("test/s1", "test", "paired", "raw")
    assert (one.iso, one.exposure_in, one.exposure_gt) == (1600.0, 0.01, 0.5)
    assert one.ratio == pytest.approx((100 * 0.5) / (1600 * 0.01))
    assert (two.id, two.ratio, two.exposure_in) == ("test/s2", 1.0, 0.0)


# The first lines of LRD's released datalist/LRD_{train,val,test}_list.txt (github.com/fengzhang427/LRD):
# target (Clean) first, then the input (Noisy), ISO and exposure bias.
LRD_LINES = {
    "train": ("./LRD/Clean/00001_00_0.25s.DNG ./LRD/Noisy/00001_01_0.00625s.DNG ISO1600 -1EV",
              "./LRD/Clean/00001_00_0.25s.DNG ./LRD/Noisy/00001_02_0.00313s.DNG ISO1600 -2EV",
              "./LRD/Clean/00002_00_0.25s.DNG ./LRD/Noisy/00002_01_0.05s.DNG ISO200 -1EV"),
    "val": ("./LRD/Clean/00308_00_0.2s.DNG ./LRD/Noisy/00308_01_0.05s.DNG ISO200 -1EV",),
    "test": ("./LRD/Clean/00541_00_0.05s.DNG ./LRD/Noisy/00541_03_0.0025s.DNG ISO200 -3EV",),
}


def lrd_tree(root: Path, lines: dict[str, tuple[str, ...]] = LRD_LINES) -> None:
    touch(root, *{path[2:] for listed in lines.values() for line in listed for path in line.split()[:2]})
    for split, split_lines in lines.items():
        (root / f"LRD_{split}_list.txt").write_text("\n".join(split_lines) + "\n")


def test_lrd_as_released(tmp_path):
    lrd_tree(tmp_path)
    records = load_records("lrd", str(tmp_path))
    assert [(r.id, r.split) for r in records] == [
        ("00001_01_0.00625s", "train"), ("00001_02_0.00313s", "train"), ("00002_01_0.05s", "train"),
        ("00308_01_0.05s", "val"), ("00541_03_0.0025s", "test"),
    ]
    first = records[0]
    assert first.input == str(tmp_path / "LRD/Noisy/00001_01_0.00625s.DNG")
    assert first.target == str(tmp_path / "LRD/Clean/00001_00_0.25s.DNG")
    assert (first.dataset, first.kind, first.iso) == ("lrd", "raw", 1600.0)
    assert (first.exposure_in, first.exposure_gt) == (0.00625, 0.25)
    # LRD's code: ratio = (100 * clean_exposure) / (ISO * noisy_exposure)
    assert [r.ratio for r in records] == pytest.approx([
        100 * 0.25 / (1600 * 0.00625), 100 * 0.25 / (1600 * 0.00313), 100 * 0.25 / (200 * 0.05),
        100 * 0.2 / (200 * 0.05), 100 * 0.05 / (200 * 0.0025),
    ])
    assert [r.id for r in load_records("lrd", str(tmp_path), splits=["val"])] == ["00308_01_0.05s"]


def test_lrd_reads_the_listed_dngs(tmp_path):
    lines = {"test": ("./LRD/Clean/00541_00_0.05s.DNG ./LRD/Noisy/00541_03_0.0025s.DNG ISO200 -3EV",)}
    lrd_tree(tmp_path, lines)
    profile = CameraProfile.load()
    for name, adu in (("LRD/Clean/00541_00_0.05s.DNG", 4000), ("LRD/Noisy/00541_03_0.0025s.DNG", 600)):
        write_dng(tmp_path / name, np.full((32, 32), adu, np.uint16), profile)
    (record,) = load_records("lrd", str(tmp_path))
    assert read_raw(record.target).bayer.mean() == 4000 and read_raw(record.input).bayer.mean() == 600


def test_lrd_list_with_an_extra_column_still_reads(tmp_path):
    # LRD's LDR_KLD_test_list.txt adds a scene-type column after the exposure bias
    line = "./LRD/Clean/00516_00_0.05s.DNG ./LRD/Noisy/00516_01_0.01s.DNG ISO200 -1EV Outdoor"
    lrd_tree(tmp_path, {"test": (line,)})
    (record,) = load_records("lrd", str(tmp_path))
    assert (record.id, record.iso) == ("00516_01_0.01s", 200.0)
    assert record.ratio == pytest.approx(100 * 0.05 / (200 * 0.01))


def test_lrd_missing_files_iso_and_lists_are_named(tmp_path):
    touch(tmp_path, "LRD/Clean/00001_00_0.25s.DNG")
    with pytest.raises(LayoutError, match="LRD_train_list.txt"):
        load_records("lrd", str(tmp_path))
    lrd_tree(tmp_path)
    (tmp_path / "LRD/Noisy/00002_01_0.05s.DNG").unlink()
    with pytest.raises(LayoutError, match=re.escape("LRD_train_list.txt: LRD/Noisy/00002_01_0.05s.DNG")):
        load_records("lrd", str(tmp_path))
    (tmp_path / "LRD_train_list.txt").write_text(LRD_LINES["train"][0].rsplit(" ISO", 1)[0] + "\n")
    with pytest.raises(LayoutError, match="line 1: no ISO"):
        load_records("lrd", str(tmp_path))


# ---------------------------------------------------------------- LOL, LOLv2


def test_lol_train_and_test(tmp_path):
    touch(tmp_path, "our485/low/2.png", "our485/high/2.png", "our485/low/10.png", "our485/high/10.png",
          "eval15/low/1.png", "eval15/high/1.png")
    records = load_records("lol", str(tmp_path))
    assert [(r.id, r.split) for r in records] == [
        ("our485/10", "train"), ("our485/2", "train"), ("eval15/1", "test"),
    ]
    assert records[2].input == str(tmp_path / "eval15/low/1.png")
    assert records[2].target == str(tmp_path / "eval15/high/1.png")
    assert {r.dataset for r in records} == {"lol"}


def test_lol_wrong_root_names_expected_folders(tmp_path):
    touch(tmp_path, "images/1.png")
    with pytest.raises(LayoutError, match="our485"):
        load_records("lol", str(tmp_path))


@pytest.fixture
def lolv2_root(tmp_path):
    touch(tmp_path, "Real_captured/Train/Low/low00001.png", "Real_captured/Train/Normal/normal00001.png",
          "Real_captured/Test/Low/low00690.png", "Real_captured/Test/Normal/normal00690.png",
          "Synthetic/Train/Low/r000da54ft.png", "Synthetic/Train/Normal/r000da54ft.png")
    return tmp_path


def test_lolv2_real_names_pair_and_subsets_are_cameras(lolv2_root):
    records = load_records("lolv2", str(lolv2_root))
    assert [(r.id, r.split, r.camera) for r in records] == [
        ("Real_captured/Train/low00001", "train", "real"),
        ("Synthetic/Train/r000da54ft", "train", "synthetic"),
        ("Real_captured/Test/low00690", "test", "real"),
    ]
    assert records[0].target == str(lolv2_root / "Real_captured/Train/Normal/normal00001.png")
    synthetic = load_records("lolv2", str(lolv2_root), camera="synthetic")
    assert [r.camera for r in synthetic] == ["synthetic"]


def test_lolv2_real_unpaired_name_is_an_error(lolv2_root):
    touch(lolv2_root, "Real_captured/Test/Normal/normal00700.png")
    with pytest.raises(LayoutError, match="normal00700"):
        load_records("lolv2", str(lolv2_root), camera="real")


# ---------------------------------------------------------------- SMID


def save_npy(path: Path, bgr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, bgr)


def frame(value: int, height: int = 4, width: int = 6) -> np.ndarray:
    """An H x W x 3 uint8 frame whose B, G, R channels (OpenCV order) hold value, value + 1, value + 2."""
    return np.broadcast_to(np.array([value, value + 1, value + 2], np.uint8), (height, width, 3)).copy()


@pytest.fixture
def smid_root(tmp_path):
    """SMID as SNR-Aware releases it: .npy frames per scene, the long exposure's folder also holding the
    RAW file and a 'half' rendering that the released loaders skip."""
    for scene, count in (("0001", 2), ("0009", 1), ("0013", 1)):
        for k in range(count):
            save_npy(tmp_path / f"SMID_LQ_np/{scene}/{k + 1:04d}.npy", frame(10 * k))
        save_npy(tmp_path / f"SMID_Long_np/{scene}/{scene}.npy", frame(200))
        touch(tmp_path, f"SMID_Long_np/{scene}/{scene}.ARW", f"SMID_Long_np/{scene}/half0001.png")
    (tmp_path / "test_list.txt").write_text("0013\n0009\n")  # SNR-Aware's test_list.txt begins 0013, 0009
    return tmp_path


def test_smid_as_released(smid_root):
    records = load_records("smid", str(smid_root))
    assert [(r.id, r.split) for r in records] == [
        ("0001/0001", "train"), ("0001/0002", "train"), ("0009/0001", "test"), ("0013/0001", "test"),
    ]
    assert records[0].input == str(smid_root / "SMID_LQ_np/0001/0001.npy")
    assert {r.target for r in records[:2]} == {str(smid_root / "SMID_Long_np/0001/0001.npy")}
    assert {(r.dataset, r.kind, r.ratio) for r in records} == {("smid", "srgb", 1.0)}
    assert [r.id for r in load_records("smid", str(smid_root), splits=["test"])] == ["0009/0001", "0013/0001"]


def test_smid_frames_decode_as_the_released_loaders_read_them(smid_root):
    record = load_records("smid", str(smid_root))[1]
    with open(record.input, "rb") as fh:
        image = decode_image(fh.read(), record.input)
    # read_img2 + read_img_seq2: / 255, then channels [2, 1, 0] (BGR -> RGB)
    assert image.shape == (4, 6, 3) and image.dtype == np.float32
    np.testing.assert_allclose(image[0, 0], np.array([12, 11, 10]) / 255, rtol=1e-6)


def test_smid_npy_that_is_not_an_image_is_named(tmp_path):
    path = tmp_path / "0001.npy"
    np.save(path, np.zeros((4, 6), np.float32))
    with pytest.raises(ValueError, match=re.escape(str(path))):
        decode_image(path.read_bytes(), str(path))
    with pytest.raises(ValueError, match="not a readable .npy"):
        decode_image(path.read_bytes()[:-8], "cut.npy")


def test_smid_test_list_inside_smid_long_np(smid_root):
    # Retinexformer's README asks for the list inside SMID_Long_np
    (smid_root / "test_list.txt").rename(smid_root / "SMID_Long_np/test_list.txt")
    assert [r.split for r in load_records("smid", str(smid_root))] == ["train", "train", "test", "test"]


def test_smid_scene_without_a_reference_is_named(smid_root):
    for name in ("0009.npy", "0009.ARW", "half0001.png"):
        (smid_root / "SMID_Long_np/0009" / name).unlink()
    with pytest.raises(LayoutError, match="0009"):
        load_records("smid", str(smid_root))


def test_smid_scene_with_only_raw_and_half_files_is_named(smid_root):
    (smid_root / "SMID_Long_np/0001/0001.npy").unlink()
    with pytest.raises(LayoutError, match=re.escape("SMID_Long_np/0001")):
        load_records("smid", str(smid_root))


def test_smid_needs_its_test_list_and_folders(smid_root):
    (smid_root / "test_list.txt").unlink()
    with pytest.raises(LayoutError, match=re.escape("test_list.txt")):
        load_records("smid", str(smid_root))
    with pytest.raises(LayoutError, match="SMID_LQ_np"):
        load_records("smid", str(smid_root / "SMID_Long_np"))


def test_smid_test_list_naming_a_missing_scene_is_an_error(smid_root):
    (smid_root / "test_list.txt").write_text("0013\n0020\n")
    with pytest.raises(LayoutError, match="0020"):
        load_records("smid", str(smid_root))


# ---------------------------------------------------------------- the fsspec route


def test_relative_local_path_gives_plain_paths_that_exist(tmp_path, monkeypatch):
    touch(tmp_path, "data/lol/our485/low/1.png", "data/lol/our485/high/1.png")
    monkeypatch.chdir(tmp_path)
    (record,) = load_records("lol", "data/lol")
    assert load_records("lol", Path("data/lol")) == [record]
    assert "://" not in record.input
    assert Path(record.input).is_file() and Path(record.target).is_file()


@pytest.fixture
def memory_root():
    root = f"memory://layouts-{uuid.uuid4().hex}"
    yield root
    fs, path = fsspec.core.url_to_fs(root)
    fs.rm(path, recursive=True)


def test_memory_filesystem_keeps_the_scheme_and_reads_list_files(memory_root):
    fs, path = fsspec.core.url_to_fs(memory_root)
    for name in ("Sony/short/00001_00_0.1s.ARW", "Sony/long/00001_00_10s.ARW", ".hidden/x"):
        fs.pipe(f"{path}/{name}", b"raw")
    line = b"./Sony/short/00001_00_0.1s.ARW ./Sony/long/00001_00_10s.ARW ISO100\n"
    fs.pipe(f"{path}/Sony_train_list.txt", line)
    (record,) = load_records("sid", memory_root)
    assert record.input.startswith("memory://") and record.input.endswith("/Sony/short/00001_00_0.1s.ARW")
    assert record.iso == 100.0
    with fsspec.open(record.target, "rb") as fh:
        assert fh.read() == b"raw"
    assert load_records("sid", path, fs=fs)[0].input == f"{path}/Sony/short/00001_00_0.1s.ARW"


def test_memory_filesystem_reads_exif(memory_root):
    fs, path = fsspec.core.url_to_fs(memory_root)
    fs.pipe(f"{path}/low/a.ARW", exif_ifd_tiff((1, 10), 800))
    fs.pipe(f"{path}/high/a.ARW", exif_ifd_tiff((1, 1), 100))
    (record,) = load_records("paired", memory_root, splits=["val"])
    assert record.split == "val"
    assert record.ratio == pytest.approx((100 * 1.0) / (800 * 0.1))
