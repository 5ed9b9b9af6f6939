"""Dataset layouts -> records: one `Record` per (low-light input, reference) pair.

Every layout is one small function registered by name; `load_records(name, root)` lists
`root` once through fsspec (local path, `memory://`, `s3://`, ...) and hands the layout
paths relative to it, so the same code runs on a laptop and on S3. Returned paths keep
the scheme the caller gave (`s3://bucket/...`, or a plain local path).

Layouts (folder names match case-insensitively; hidden files are ignored):

- ``sid``: ``<root>/Sony/{short,long}/<scene5>_<nn>_<exposure>s.<any ext>`` with list files
  ``<root>/Sony_{train,test,val}_list.txt`` (``./Sony/short/a.ARW ./Sony/long/b.ARW ISO200 F8``).
  The first digit of the scene id gives the split (0 train, 1 test, 2 val); ratio =
  min(exposure_gt / exposure_in, 300). Without list files, each short exposure pairs with
  the longest exposure of its scene in ``long/``. The three Sony test scenes whose references
  are misaligned (10034, 10045, 10172) are kept, as SID's, ELD's and PMN's test lists keep them;
  ``drop_misaligned=True`` drops them as DNF's list does. SID's Fuji
  set is X-Trans (6x6 colour filter), which is not packed: it is skipped, and refused when asked for.
- ``eld``: ``<root>/<Camera>/scene-<n>/IMG_<0001..0016>.<ext>``; frames 1, 6, 11, 16 are references,
  and each group of four frames between them holds the x1, x10, x100 and x200 exposures. Frames
  of the ratios in ``eld_ratios`` (default x100 and x200, those ELD's ``test_ELD.py`` evaluates)
  pair with the nearest reference; ratio from EXIF ISO x exposure.
- ``lrd``: ``<root>/LRD/{Clean,Noisy}/`` with ``<root>/LRD_{train,val,test}_list.txt`` as released
  (``./LRD/Clean/00001_00_0.25s.DNG ./LRD/Noisy/00001_01_0.00625s.DNG ISO1600 -1EV``, target first);
  ratio = 100 x exposure_gt / (ISO x exposure_in), as LRD's code computes it (clean frames at ISO 100).
- ``paired``: ``{low,high}`` (or ``input/target``, ``input/gt``, ``low/normal``) folders with
  matching file names, optionally under split folders (``train``, ``val``, ``test``, ``eval`` ...).
- ``lol``: ``our485/{low,high}`` (train) and ``eval15/{low,high}`` (test).
- ``lolv2``: ``Real_captured/{Train,Test}/{Low,Normal}`` (``lowN.png`` <-> ``normalN.png``) and
  ``Synthetic/{Train,Test}/{Low,Normal}`` (same names); camera ``real`` or ``synthetic``.
- ``smid``: SMID as released with SNR-Aware: ``<root>/SMID_LQ_np/<scene>/*.npy`` (inputs) and
  ``<root>/SMID_Long_np/<scene>/`` (the reference: its first file, in name order, that is not a
  RAW file or a ``half*`` rendering, as the released loaders pick it); ``test_list.txt`` at the
  root (or inside ``SMID_Long_np``) names the test scenes, the rest are train.

A layout without split folders (``eld``, a flat ``paired`` folder) labels its records with its
default split, or with the one split the caller asked for.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import posixpath
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, BinaryIO

import fsspec
import tifffile
from fsspec import AbstractFileSystem

from lowlight.config import DatasetConfig

SPLITS = ("train", "val", "test")
RAW_EXTS = frozenset(
    {"arw", "nef", "nrw", "cr2", "cr3", "crw", "raf", "dng", "orf", "rw2", "pef", "srw", "3fr", "iiq", "x3f"}
)
SRGB_EXTS = frozenset({"png", "jpg", "jpeg", "bmp", "tif", "tiff", "webp"})
MAX_LISTED = 20  # how many offending names an error message spells out
ELD_RATIOS = (1, 10, 100, 200)  # the four low-light factors of each ELD frame group
ELD_EVAL_RATIOS = (100, 200)  # the sets ELD's test_ELD.py evaluates (img_ids [4, 9, 14], [5, 10, 15])

log = logging.getLogger(__name__)

EXIF_EXPOSURE_TIME = 33434
EXIF_ISO = 34855
EXIF_IFD = 34665


class LayoutError(ValueError):
    """A dataset root does not have the shape its layout expects."""


@dataclass(frozen=True)
class Record:
    """One low-light input and its reference image."""

    id: str
    input: str
    target: str
    split: str
    dataset: str
    kind: str
    camera: str = ""
    iso: float = 0.0
    exposure_in: float = 0.0
    exposure_gt: float = 0.0
    ratio: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Request:
    """What the caller asked for, as every layout sees it."""

    splits: frozenset[str]
    camera: str | None
    drop_misaligned: bool = False
    eld_ratios: frozenset[int] = frozenset(ELD_EVAL_RATIOS)


class Tree:
    """One recursive listing of a dataset root; layouts address files relative to it."""

    def __init__(self, root: str, fs: AbstractFileSystem | None = None) -> None:
        if fs is None:
            fs, path = fsspec.core.url_to_fs(root)
        else:
            path = fs._strip_protocol(root)
        self.fs = fs
        self.name = root
        self.root = path.rstrip("/")
        self._keep_scheme = "://" in root  # give back URLs in the scheme the caller used
        self.files = frozenset(self._list())
        if not self.files:
            raise LayoutError(f"{root}: no files found (missing or empty folder)")

    def _list(self) -> Iterable[str]:
        prefix = self.root + "/"
        for path in self.fs.find(self.root):
            rel = path[len(prefix) :] if path.startswith(prefix) else ""
            if rel and not any(part.startswith(".") for part in rel.split("/")):
                yield rel

    def url(self, rel: str) -> str:
        full = posixpath.join(self.root, rel) if rel else self.root
        return self.fs.unstrip_protocol(full) if self._keep_scheme else full

    def open(self, rel: str) -> BinaryIO:
        return self.fs.open(posixpath.join(self.root, rel), "rb")

    def read_lines(self, rel: str) -> list[str]:
        with self.open(rel) as fh:
            return fh.read().decode().splitlines()

    def under(self, folder: str) -> list[str]:
        """Sorted files below `folder` (at any depth), relative to the root."""
        prefix = folder + "/" if folder else ""
        return sorted(f for f in self.files if f.startswith(prefix))

    def subdirs(self, folder: str) -> list[str]:
        """Names of the folders directly inside `folder` that hold files."""
        prefix = folder + "/" if folder else ""
        return sorted({f[len(prefix) :].split("/")[0] for f in self.under(folder) if "/" in f[len(prefix) :]})

    def under_path(self, path: str) -> list[str]:
        """`under` for a folder matched case-insensitively; empty when it does not exist."""
        folder = self.resolve(path)
        return self.under(folder) if folder else []

    def resolve(self, path: str) -> str | None:
        """`path` with each part matched case-insensitively to a real folder, or None."""
        found = ""
        for part in path.split("/"):
            names = {name.lower(): name for name in self.subdirs(found)}
            if part.lower() not in names:
                return None
            found = posixpath.join(found, names[part.lower()])
        return found


Layout = Callable[[Tree, Request], list[Record]]


@dataclass(frozen=True)
class LayoutSpec:
    load: Layout
    takes_camera: bool


LAYOUTS: dict[str, LayoutSpec] = {}


def register_layout(name: str, *, takes_camera: bool = False) -> Callable[[Layout], Layout]:
    """Register a layout function under `name` for `load_records`."""

    def add(fn: Layout) -> Layout:
        if name in LAYOUTS:
            raise ValueError(f"layout {name!r} is already registered")
        LAYOUTS[name] = LayoutSpec(fn, takes_camera)
        return fn

    return add


def load_records(
    layout: str,
    root: str | os.PathLike[str],
    *,
    splits: Iterable[str] | None = None,
    fs: AbstractFileSystem | None = None,
    camera: str | None = None,
    drop_misaligned: bool = False,
    eld_ratios: Iterable[int] = ELD_EVAL_RATIOS,
) -> list[Record]:
    """Records of the dataset at `root` in `layout`, sorted by split then id.

    `drop_misaligned` drops SID's three misaligned Sony test scenes; `eld_ratios` chooses
    which of ELD's x1, x10, x100, x200 frames become records.
    """
    spec = _spec(layout, camera)
    request = Request(_splits(splits), camera, drop_misaligned, _eld_ratios(eld_ratios))
    records = [r for r in spec.load(Tree(os.fspath(root), fs), request) if r.split in request.splits]
    return sorted(_unique(records), key=lambda r: (SPLITS.index(r.split), r.id))


def dataset_records(dataset: DatasetConfig, fs: AbstractFileSystem | None = None) -> list[Record]:
    """`load_records` with every option the `dataset:` config section sets."""
    return load_records(dataset.layout, dataset.root, splits=dataset.splits, fs=fs, camera=dataset.camera,
                        drop_misaligned=dataset.drop_misaligned, eld_ratios=dataset.eld_ratios)


def _spec(layout: str, camera: str | None) -> LayoutSpec:
    if layout not in LAYOUTS:
        raise LayoutError(f"unknown layout {layout!r}; valid layouts: {', '.join(sorted(LAYOUTS))}")
    spec = LAYOUTS[layout]
    if camera is not None and not spec.takes_camera:
        raise LayoutError(f"layout {layout!r} has no cameras to select (got camera={camera!r})")
    return spec


def _splits(splits: Iterable[str] | None) -> frozenset[str]:
    if splits is None:
        return frozenset(SPLITS)
    wanted = frozenset([splits] if isinstance(splits, str) else splits)
    unknown = sorted(wanted - set(SPLITS))
    if unknown or not wanted:
        raise LayoutError(f"splits must be a non-empty subset of {SPLITS}; got {sorted(wanted)}")
    return wanted


def _eld_ratios(ratios: Iterable[int]) -> frozenset[int]:
    wanted = frozenset(ratios)
    if not wanted or not wanted <= set(ELD_RATIOS):
        raise LayoutError(f"eld_ratios must be a non-empty subset of {ELD_RATIOS}; got {sorted(wanted)}")
    return wanted


def _unique(records: list[Record]) -> list[Record]:
    # identical duplicates (a pair listed twice) collapse; two different pairs under one id are a bug
    by_id: dict[str, Record] = {}
    for record in records:
        if by_id.setdefault(record.id, record) != record:
            raise LayoutError(f"two different pairs share the id {record.id!r}")
    return list(by_id.values())


def _single_split(request: Request, default: str, layout: str) -> str:
    """Split label for a layout without split folders: `default`, or the one split asked for."""
    if default in request.splits:
        return default
    if len(request.splits) == 1:
        return next(iter(request.splits))
    raise LayoutError(f"{layout} has no split folders; ask for one split, not {sorted(request.splits)}")


def _cameras(asked: str | None, available: list[str], layout: str, tree: Tree) -> list[str]:
    if not available:
        raise LayoutError(f"{tree.name}: no {layout} camera/subset folders found")
    if asked is None:
        return available
    if asked not in available:
        raise LayoutError(f"{tree.name}: {layout} camera {asked!r} not found; found {available}")
    return [asked]


def _listing(names: Iterable[str]) -> str:
    ordered = sorted(names)
    more = f" ... and {len(ordered) - MAX_LISTED} more" if len(ordered) > MAX_LISTED else ""
    return ", ".join(ordered[:MAX_LISTED]) + more


def kind_of(path: str) -> str:
    """'raw' or 'srgb' from a file's extension."""
    ext = posixpath.splitext(path)[1].lower().lstrip(".")
    if ext in RAW_EXTS:
        return "raw"
    if ext in SRGB_EXTS:
        return "srgb"
    raise LayoutError(f"{path}: cannot tell RAW from sRGB by the extension {ext!r}")


def _stem(path: str) -> str:
    return posixpath.splitext(path)[0]


# ---------------------------------------------------------------- EXIF


@dataclass(frozen=True)
class Exif:
    exposure: float = 0.0  # seconds, 0 when absent
    iso: float = 0.0

    @property
    def known(self) -> bool:
        return self.exposure > 0 and self.iso > 0


def read_exif(fh: BinaryIO) -> Exif:
    """ExposureTime and ISO of a TIFF-based raw (ARW, NEF, CR2, DNG); zeros for other formats."""
    try:
        with tifffile.TiffFile(fh) as tif:
            tags = tif.pages[0].tags
            exif_ifd = tags[EXIF_IFD].value if EXIF_IFD in tags else {}
            exposure = exif_ifd.get("ExposureTime", _tag(tags, EXIF_EXPOSURE_TIME))
            iso = exif_ifd.get("ISOSpeedRatings", _tag(tags, EXIF_ISO))
    except tifffile.TiffFileError:
        return Exif()
    return Exif(_rational(exposure), _first(iso))


def _tag(tags: tifffile.TiffTags, code: int) -> Any:
    return tags[code].value if code in tags else None


def _rational(value: Any) -> float:
    if isinstance(value, tuple):
        num, den = value[:2]
        return num / den if den else 0.0
    return float(value or 0.0)


def _first(value: Any) -> float:
    if isinstance(value, (tuple, list)):
        return float(value[0]) if value else 0.0
    return float(value or 0.0)


def exif_ratio(inp: Exif, gt: Exif) -> float | None:
    """Brightness ratio (ISO x exposure) of reference over input; None when a tag is missing."""
    if not (inp.known and gt.known):
        return None
    return (gt.iso * gt.exposure) / (inp.iso * inp.exposure)


def _tree_exif(tree: Tree, rel: str) -> Exif:
    with tree.open(rel) as fh:
        return read_exif(fh)


# ---------------------------------------------------------------- pair lists (SID, LRD)

_ISO_TOKEN = re.compile(r"^ISO(\d+(?:\.\d+)?)$")
_EXPOSURE_NAME = re.compile(r"^(\d{5})_\d+_(\d+(?:\.\d+)?)s$")


@dataclass(frozen=True)
class _ListedPair:
    input: str
    target: str
    iso: float = 0.0  # 0 when the line has no ISO token
    list_name: str = ""  # the list file and line that named the pair (error messages)
    line: int = 0


def _read_pair_list(tree: Tree, name: str, *, target_first: bool) -> list[_ListedPair]:
    """The pairs of a released list file: two paths relative to the root, then tokens such as ISO200."""
    pairs = []
    for number, line in enumerate(tree.read_lines(name), 1):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) < 2:
            order = "target input" if target_first else "input target"
            raise LayoutError(f"{tree.url(name)} line {number}: expected '{order} [ISO..]'")
        first, second = (posixpath.normpath(t) for t in tokens[:2])
        isos = [float(m.group(1)) for m in map(_ISO_TOKEN.match, tokens[2:]) if m]
        inp, target = (second, first) if target_first else (first, second)
        pairs.append(_ListedPair(inp, target, isos[0] if isos else 0.0, name, number))
    return pairs


def _check_listed_files(tree: Tree, pairs: list[_ListedPair], hint: str = "") -> None:
    missing = {f"{p.list_name}: {path}" for p in pairs for path in (p.input, p.target)
               if path not in tree.files}
    if missing:
        raise LayoutError(f"{tree.name}: files named in list files are missing{hint}: {_listing(missing)}")


def _exposure_name(path: str) -> tuple[str, float]:
    """(scene id, exposure seconds) from a SID/LRD name like '00001_00_0.04s.ARW'."""
    match = _EXPOSURE_NAME.match(_stem(posixpath.basename(path)))
    if not match or float(match.group(2)) <= 0:
        raise LayoutError(f"{path}: not a name like 00001_00_0.04s.ARW (scene, frame, exposure in seconds)")
    return match.group(1), float(match.group(2))


# ---------------------------------------------------------------- SID

SID_CAMERAS = ("Sony", "Fuji")
SID_XTRANS = "Fuji"  # SID's Fuji X-T2 set: 6x6 X-Trans colour filter, which raw.read_raw does not pack
SID_SPLIT_DIGIT = {"0": "train", "1": "test", "2": "val"}
# Sony test scenes whose long exposures are misaligned with the short ones; DNF's released
# Sony_new_test_list.txt drops them (github.com/Srameo/DNF, README), SID's own test list keeps them.
SID_MISALIGNED = frozenset({"10034", "10045", "10172"})
SID_MAX_RATIO = 300.0


@register_layout("sid", takes_camera=True)
def sid_layout(tree: Tree, request: Request) -> list[Record]:
    present = [c for c in SID_CAMERAS if tree.resolve(c) or _sid_lists(tree, c)]
    if request.camera == SID_XTRANS:
        raise LayoutError(f"{tree.name}: SID's {SID_XTRANS} set is X-Trans (6x6 colour filter, RAF), which "
                          "lowlight does not pack (only 2x2 Bayer); use camera 'Sony'")
    if request.camera is None and SID_XTRANS in present:
        log.warning("%s: skipping SID's %s set: X-Trans (6x6 colour filter) is not packed, only 2x2 Bayer",
                    tree.name, SID_XTRANS)
        present.remove(SID_XTRANS)
    cameras = _cameras(request.camera, present, "sid", tree)
    return [r for camera in cameras for r in _sid_camera(tree, camera, request.drop_misaligned)]


def _sid_camera(tree: Tree, camera: str, drop_misaligned: bool) -> list[Record]:
    lists = _sid_lists(tree, camera)
    if lists:
        pairs = [p for name in lists for p in _read_pair_list(tree, name, target_first=False)]
        _check_listed_files(tree, pairs)
    else:
        pairs = _sid_folder_pairs(tree, camera)
    records = [_sid_record(tree, camera, pair) for pair in pairs]
    if drop_misaligned and camera == "Sony":
        records = [r for r in records if _exposure_name(r.input)[0] not in SID_MISALIGNED]
    return records


def _sid_lists(tree: Tree, camera: str) -> list[str]:
    return [name for name in (f"{camera}_{split}_list.txt" for split in SPLITS) if name in tree.files]


def _sid_folder_pairs(tree: Tree, camera: str) -> list[_ListedPair]:
    shorts, longs = (tree.under_path(f"{camera}/{folder}") for folder in ("short", "long"))
    if not shorts:
        raise LayoutError(f"{tree.name}: no {camera}_*_list.txt and no files in {camera}/short")
    best: dict[str, str] = {}  # scene -> its longest exposure, the cleanest reference
    for rel in sorted(longs, key=lambda p: _exposure_name(p)[1]):
        best[_exposure_name(rel)[0]] = rel
    unpaired = [rel for rel in shorts if _exposure_name(rel)[0] not in best]
    if unpaired:
        raise LayoutError(f"{tree.name}: short exposures without a long one: {_listing(unpaired)}")
    return [_ListedPair(rel, best[_exposure_name(rel)[0]]) for rel in shorts]


def _sid_record(tree: Tree, camera: str, pair: _ListedPair) -> Record:
    scene, exposure_in = _exposure_name(pair.input)
    _, exposure_gt = _exposure_name(pair.target)
    if scene[0] not in SID_SPLIT_DIGIT:
        raise LayoutError(f"{pair.input}: scene id {scene} does not start with 0, 1 or 2")
    return Record(
        id=f"{camera}/{_stem(posixpath.basename(pair.input))}",
        input=tree.url(pair.input),
        target=tree.url(pair.target),
        split=SID_SPLIT_DIGIT[scene[0]],
        dataset="sid",
        kind="raw",
        camera=camera,
        iso=pair.iso,
        exposure_in=exposure_in,
        exposure_gt=exposure_gt,
        ratio=min(exposure_gt / exposure_in, SID_MAX_RATIO),
    )


# ---------------------------------------------------------------- ELD

ELD_REFERENCES = (1, 6, 11, 16)
ELD_FRAMES = 16
_ELD_FILE = re.compile(r"^([^/]+)/(scene-[^/]+)/IMG_(\d+)\.[^/.]+$")


@register_layout("eld", takes_camera=True)
def eld_layout(tree: Tree, request: Request) -> list[Record]:
    split = _single_split(request, "test", "eld")
    scenes = _eld_scenes(tree)
    cameras = _cameras(request.camera, sorted({camera for camera, _ in scenes}), "eld", tree)
    return [
        record
        for (camera, scene), frames in sorted(scenes.items())
        if camera in cameras
        for record in _eld_scene(tree, camera, frames, split, request.eld_ratios)
    ]


def _eld_scenes(tree: Tree) -> dict[tuple[str, str], dict[int, str]]:
    scenes: dict[tuple[str, str], dict[int, str]] = defaultdict(dict)
    for rel in sorted(tree.files):
        match = _ELD_FILE.match(rel)
        if match:
            scenes[match.group(1), match.group(2)][int(match.group(3))] = rel
    return scenes


def eld_reference(index: int) -> int:
    """The reference frame an ELD frame is compared with: the nearest of 1, 6, 11, 16."""
    return min(ELD_REFERENCES, key=lambda ref: abs(ref - index))


def eld_frame_ratio(index: int) -> int | None:
    """The low-light factor of ELD frame `index` (None for a reference frame).

    ELD's README: three ISOs, four factors (x1, x10, x100, x200) each, references 1, 6, 11, 16;
    so frames 2-5, 7-10 and 12-15 are x1, x10, x100, x200 in turn (test_ELD.py evaluates
    [4, 9, 14] and [5, 10, 15], the x100 and x200 sets).
    """
    if not 1 <= index <= ELD_FRAMES:
        raise ValueError(f"ELD frames are numbered 1 to {ELD_FRAMES}, got {index}")
    return None if index in ELD_REFERENCES else ELD_RATIOS[(index - 2) % 5]


def _eld_scene(
    tree: Tree, camera: str, frames: dict[int, str], split: str, ratios: frozenset[int]
) -> list[Record]:
    outside = [rel for i, rel in frames.items() if not 1 <= i <= ELD_FRAMES]
    if outside:
        raise LayoutError(f"{tree.name}: ELD frames are IMG_0001 to IMG_{ELD_FRAMES:04d}; "
                          f"found {_listing(outside)}")
    chosen = [i for i in sorted(frames) if eld_frame_ratio(i) in ratios]
    missing = sorted({eld_reference(i) for i in chosen} - frames.keys())
    if missing:
        scene = posixpath.dirname(next(iter(frames.values())))
        raise LayoutError(f"{tree.url(scene)}: reference frames {missing} are missing")
    exif = {i: _eld_exif(tree, frames[i]) for i in {*chosen, *map(eld_reference, chosen)}}
    return [
        _eld_record(tree, camera, frames[i], frames[eld_reference(i)], exif[i], exif[eld_reference(i)], split)
        for i in chosen
    ]


def _eld_exif(tree: Tree, rel: str) -> Exif:
    exif = _tree_exif(tree, rel)
    if not exif.known:
        raise LayoutError(f"{tree.url(rel)}: no ExposureTime/ISO EXIF tags, which ELD needs for the ratio")
    return exif


def _eld_record(tree: Tree, camera: str, inp: str, ref: str, ein: Exif, egt: Exif, split: str) -> Record:
    return Record(
        id=_stem(inp),
        input=tree.url(inp),
        target=tree.url(ref),
        split=split,
        dataset="eld",
        kind="raw",
        camera=camera,
        iso=ein.iso,
        exposure_in=ein.exposure,
        exposure_gt=egt.exposure,
        ratio=exif_ratio(ein, egt) or 1.0,
    )


# ---------------------------------------------------------------- LRD

LRD_LISTS = {split: f"LRD_{split}_list.txt" for split in SPLITS}
LRD_CLEAN_ISO = 100.0  # LRD's code: ratio = (100 * clean_exposure) / (ISO * noisy_exposure)


@register_layout("lrd")
def lrd_layout(tree: Tree, request: Request) -> list[Record]:
    lists = {split: name for split, name in LRD_LISTS.items() if name in tree.files}
    if not lists:
        raise LayoutError(f"{tree.name}: lrd needs {', '.join(LRD_LISTS.values())} at the root, beside the "
                          "LRD/ folder, as LRD is released")
    pairs = {split: _read_pair_list(tree, name, target_first=True) for split, name in lists.items()
             if split in request.splits}
    _check_listed_files(tree, [p for split_pairs in pairs.values() for p in split_pairs],
                        " (list paths are relative to the folder that holds LRD/)")
    return [_lrd_record(tree, pair, split) for split, split_pairs in pairs.items() for pair in split_pairs]


def _lrd_record(tree: Tree, pair: _ListedPair, split: str) -> Record:
    if pair.iso <= 0:
        raise LayoutError(f"{tree.url(pair.list_name)} line {pair.line}: no ISO token (like ISO1600), "
                          "which LRD's ratio needs")
    _, exposure_in = _exposure_name(pair.input)
    _, exposure_gt = _exposure_name(pair.target)
    return Record(
        id=_stem(posixpath.basename(pair.input)),
        input=tree.url(pair.input),
        target=tree.url(pair.target),
        split=split,
        dataset="lrd",
        kind="raw",
        iso=pair.iso,
        exposure_in=exposure_in,
        exposure_gt=exposure_gt,
        ratio=LRD_CLEAN_ISO * exposure_gt / (pair.iso * exposure_in),
    )


# ---------------------------------------------------------------- paired folders (LOL, LOLv2, generic)

PAIR_DIRS = (("low", "high"), ("input", "target"), ("input", "gt"), ("low", "normal"))
SPLIT_DIRS = {
    "train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test", "eval": "test"
}


def _same_name(stem: str) -> str:
    return stem


@dataclass(frozen=True)
class Group:
    """A folder holding one input/target folder pair, and what its records are labelled."""

    folder: str  # relative to the root; '' for the root itself
    split: str
    camera: str = ""
    target_name: Callable[[str], str] = _same_name  # input file stem -> target file stem


def walk_pairs(tree: Tree, groups: Iterable[Group], dataset: str) -> list[Record]:
    """Records of input/target files matched by name inside each group's folder pair."""
    return [record for group in groups for record in _group_pairs(tree, group, dataset)]


def _group_pairs(tree: Tree, group: Group, dataset: str) -> list[Record]:
    low, high = _pair_dirs(tree, group.folder)
    inputs, targets = _by_stem(tree, low), _by_stem(tree, high)
    partner = {key: _rename(key, group.target_name) for key in inputs}
    unmatched = [inputs[k] for k, t in partner.items() if t not in targets]
    unmatched += [targets[t] for t in targets.keys() - set(partner.values())]
    if unmatched:
        raise LayoutError(f"{tree.url(group.folder)}: files without a partner: {_listing(unmatched)}")
    return [
        _pair_record(tree, group, dataset, key, inputs[key], targets[partner[key]]) for key in sorted(inputs)
    ]


def _rename(key: str, target_name: Callable[[str], str]) -> str:
    folder, name = posixpath.split(key)
    return posixpath.join(folder, target_name(name))


def _pair_dirs(tree: Tree, folder: str) -> tuple[str, str]:
    names = {name.lower(): name for name in tree.subdirs(folder)}
    for low, high in PAIR_DIRS:
        if low in names and high in names:
            return posixpath.join(folder, names[low]), posixpath.join(folder, names[high])
    expected = " or ".join(f"{low}/{high}" for low, high in PAIR_DIRS)
    raise LayoutError(f"{tree.url(folder)}: expected folders {expected}; found {sorted(names.values())}")


def _by_stem(tree: Tree, folder: str) -> dict[str, str]:
    """Files below `folder` keyed by their path inside it without extension."""
    found: dict[str, str] = {}
    for rel in tree.under(folder):
        key = _stem(rel[len(folder) + 1 :])
        if key in found:
            raise LayoutError(f"{tree.url(folder)}: {found[key]} and {rel} differ only in extension")
        found[key] = rel
    return found


def _pair_record(tree: Tree, group: Group, dataset: str, key: str, inp: str, target: str) -> Record:
    kind = kind_of(inp)
    # only RAW files carry the exposure EXIF that sets a ratio; sRGB pairs are already exposed
    ein, egt = (_tree_exif(tree, inp), _tree_exif(tree, target)) if kind == "raw" else (Exif(), Exif())
    return Record(
        id=posixpath.join(group.folder, key),
        input=tree.url(inp),
        target=tree.url(target),
        split=group.split,
        dataset=dataset,
        kind=kind,
        camera=group.camera,
        iso=ein.iso,
        exposure_in=ein.exposure,
        exposure_gt=egt.exposure,
        ratio=exif_ratio(ein, egt) or 1.0,
    )


def _split_folder_pairs(tree: Tree, request: Request, dataset: str) -> list[Record]:
    """Pairs under split folders (train/, Test/, eval/ ...) or, without any, in the root itself."""
    splits = {name: SPLIT_DIRS[name.lower()] for name in tree.subdirs("") if name.lower() in SPLIT_DIRS}
    if not splits:
        return walk_pairs(tree, [Group("", _single_split(request, "train", dataset))], dataset)
    return walk_pairs(tree, [Group(n, s) for n, s in sorted(splits.items()) if s in request.splits], dataset)


def _present_groups(tree: Tree, request: Request, candidates: Iterable[Group], layout: str) -> list[Group]:
    """The candidate groups whose folder exists (matched case-insensitively) and whose split is asked for."""
    candidates = list(candidates)
    found = [(g, tree.resolve(g.folder)) for g in candidates]
    if not any(folder for _, folder in found):
        expected = ", ".join(g.folder for g in candidates)
        raise LayoutError(f"{tree.name}: none of the {layout} folders {expected} found")
    return [dataclasses.replace(g, folder=f) for g, f in found if f and g.split in request.splits]


@register_layout("paired")
def paired_layout(tree: Tree, request: Request) -> list[Record]:
    return _split_folder_pairs(tree, request, "paired")


LOL_GROUPS = (Group("our485", "train"), Group("eval15", "test"))


@register_layout("lol")
def lol_layout(tree: Tree, request: Request) -> list[Record]:
    return walk_pairs(tree, _present_groups(tree, request, LOL_GROUPS, "lol"), "lol")


def _low_to_normal(stem: str) -> str:
    return "normal" + stem[3:] if stem.startswith("low") else stem


LOLV2_SUBSETS = {"real": ("Real_captured", _low_to_normal), "synthetic": ("Synthetic", _same_name)}
LOLV2_SPLITS = (("Train", "train"), ("Test", "test"))


@register_layout("lolv2", takes_camera=True)
def lolv2_layout(tree: Tree, request: Request) -> list[Record]:
    present = [name for name, (folder, _) in LOLV2_SUBSETS.items() if tree.resolve(folder)]
    groups = [
        Group(f"{LOLV2_SUBSETS[c][0]}/{d}", split, camera=c, target_name=LOLV2_SUBSETS[c][1])
        for c in _cameras(request.camera, present, "lolv2", tree)
        for d, split in LOLV2_SPLITS
    ]
    return walk_pairs(tree, _present_groups(tree, request, groups, "lolv2"), "lolv2")


# ---------------------------------------------------------------- SMID (as released with SNR-Aware)

SMID_INPUTS, SMID_REFERENCES = "SMID_LQ_np", "SMID_Long_np"
SMID_TEST_LIST = "test_list.txt"
# SNR-Aware's and Retinexformer's loaders skip these in SMID_Long_np/<scene>: the long RAW and its
# half-size rendering ('.ARW' in path or 'half' in path); the first remaining file is the reference.
_SMID_NOT_REFERENCE = re.compile(r"\.arw$|half", re.IGNORECASE)


@register_layout("smid")
def smid_layout(tree: Tree, request: Request) -> list[Record]:
    inputs, refs = (tree.resolve(name) for name in (SMID_INPUTS, SMID_REFERENCES))
    if not (inputs and refs):
        raise LayoutError(f"{tree.name}: smid needs {SMID_INPUTS}/<scene>/ and {SMID_REFERENCES}/<scene>/ "
                          "(SMID as released with SNR-Aware)")
    test_list = _smid_test_list(tree, refs)
    frames, references = _scene_files(tree, inputs, set()), _scene_files(tree, refs, {test_list})
    without = sorted(set(frames) - set(references))
    if without:
        raise LayoutError(f"{tree.url(refs)}: no reference folder for scenes {_listing(without)}")
    gts = {scene: _smid_reference(tree, refs, scene, references[scene]) for scene in frames}
    test = _smid_test_scenes(tree, test_list, set(frames))
    return [
        _smid_record(tree, _stem(frame[len(inputs) + 1 :]), frame, gts[scene], scene in test)
        for scene in sorted(frames)
        for frame in frames[scene]
    ]


def _smid_test_list(tree: Tree, refs: str) -> str:
    candidates = (SMID_TEST_LIST, posixpath.join(refs, SMID_TEST_LIST))
    found = next((name for name in candidates if name in tree.files), None)
    if found is None:
        raise LayoutError(f"{tree.name}: smid needs {' or '.join(candidates)} "
                          "(SNR-Aware's list of test scenes)")
    return found


def _scene_files(tree: Tree, folder: str, skip: set[str]) -> dict[str, list[str]]:
    scenes: dict[str, list[str]] = defaultdict(list)
    for rel in tree.under(folder):
        parts = rel[len(folder) + 1 :].split("/")
        if rel in skip:
            continue
        if len(parts) < 2:
            raise LayoutError(f"{tree.url(rel)}: SMID files must sit in a scene folder")
        scenes[parts[0]].append(rel)
    return scenes


def _smid_reference(tree: Tree, refs: str, scene: str, files: list[str]) -> str:
    candidates = [rel for rel in files if not _SMID_NOT_REFERENCE.search(posixpath.basename(rel))]
    if not candidates:
        raise LayoutError(f"{tree.url(posixpath.join(refs, scene))}: no reference file "
                          "(only RAW or 'half' files)")
    return candidates[0]


def _smid_test_scenes(tree: Tree, test_list: str, scenes: set[str]) -> set[str]:
    test = {line.strip() for line in tree.read_lines(test_list) if line.strip()}
    unknown = test - scenes
    if unknown:
        raise LayoutError(f"{tree.url(test_list)} names scenes that have no input: {_listing(unknown)}")
    return test


def _smid_record(tree: Tree, record_id: str, frame: str, gt: str, is_test: bool) -> Record:
    # SMID's .npy frames are sRGB renderings of the RAW captures (SNR-Aware's README)
    return Record(
        id=record_id,
        input=tree.url(frame),
        target=tree.url(gt),
        split="test" if is_test else "train",
        dataset="smid",
        kind="srgb",
    )
