"""Dataset layouts -> records: one `Record` per (low-light input, reference) pair.

Every layout is one small function registered by name; `load_records(name, root)` lists
`root` once through fsspec (local path, `memory://`, `s3://`, ...) and hands the layout
paths relative to it, so the same code runs on a laptop and on S3. Returned paths keep
the scheme the caller gave (`s3://bucket/...`, or a plain local path).

Layouts (folder names match case-insensitively; hidden files are ignored):

- ``sid``: ``<root>/<Sony|Fuji>/{short,long}/<scene5>_<nn>_<exposure>s.<any ext>`` with list files
  ``<root>/<Camera>_{train,test,val}_list.txt`` (``./Sony/short/a.ARW ./Sony/long/b.ARW ISO200 F8``).
  The first digit of the scene id gives the split (0 train, 1 test, 2 val); ratio =
  min(exposure_gt / exposure_in, 300). Without list files, each short exposure pairs with
  the longest exposure of its scene in ``long/``.
- ``eld``: ``<root>/<Camera>/scene-<n>/IMG_<0001..0016>.<ext>``; frames 1, 6, 11, 16 are references,
  every other frame pairs with the nearest of them; ratio from EXIF ISO x exposure.
- ``lrd``, ``paired``: ``{low,high}`` (or ``input/target``, ``input/gt``, ``low/normal``) folders with
  matching file names, optionally under split folders (``train``, ``val``, ``test``, ``eval`` ...).
- ``lol``: ``our485/{low,high}`` (train) and ``eval15/{low,high}`` (test).
- ``lolv2``: ``Real_captured/{Train,Test}/{Low,Normal}`` (``lowN.png`` <-> ``normalN.png``) and
  ``Synthetic/{Train,Test}/{Low,Normal}`` (same names); camera ``real`` or ``synthetic``.
- ``smid``: ``<root>/{input,gt}/<scene>/<file>``: every input frame of a scene pairs with the
  scene's single gt image; ``<root>/test_list.txt`` names the test scenes, the rest are train.

A layout without split folders (``eld``, a flat ``paired`` folder) labels its records with its
default split, or with the one split the caller asked for.
"""

from __future__ import annotations

import dataclasses
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

SPLITS = ("train", "val", "test")
RAW_EXTS = frozenset(
    {"arw", "nef", "nrw", "cr2", "cr3", "crw", "raf", "dng", "orf", "rw2", "pef", "srw", "3fr", "iiq", "x3f"}
)
SRGB_EXTS = frozenset({"png", "jpg", "jpeg", "bmp", "tif", "tiff", "webp"})
MAX_LISTED = 20  # how many offending names an error message spells out

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
    for_eval: bool


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
    for_eval: bool = False,
) -> list[Record]:
    """Records of the dataset at `root` in `layout`, sorted by split then id."""
    spec = _spec(layout, camera)
    request = Request(_splits(splits), camera, for_eval)
    records = [r for r in spec.load(Tree(os.fspath(root), fs), request) if r.split in request.splits]
    return sorted(_unique(records), key=lambda r: (SPLITS.index(r.split), r.id))


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


# ---------------------------------------------------------------- SID

SID_CAMERAS = ("Sony", "Fuji")
SID_SPLIT_DIGIT = {"0": "train", "1": "test", "2": "val"}
SID_MISALIGNED = frozenset({"10034", "10045", "10172"})  # Sony test scenes whose references move
SID_MAX_RATIO = 300.0
_SID_NAME = re.compile(r"^(\d{5})_\d+_(\d+(?:\.\d+)?)s$")
_ISO_TOKEN = re.compile(r"^ISO(\d+(?:\.\d+)?)$")


@dataclass(frozen=True)
class _SidPair:
    input: str
    target: str
    iso: float = 0.0


@register_layout("sid", takes_camera=True)
def sid_layout(tree: Tree, request: Request) -> list[Record]:
    present = [c for c in SID_CAMERAS if tree.resolve(c) or _sid_lists(tree, c)]
    cameras = _cameras(request.camera, present, "sid", tree)
    return [r for camera in cameras for r in _sid_camera(tree, camera, request.for_eval)]


def _sid_camera(tree: Tree, camera: str, for_eval: bool) -> list[Record]:
    lists = _sid_lists(tree, camera)
    pairs = _sid_list_pairs(tree, lists) if lists else _sid_folder_pairs(tree, camera)
    records = [_sid_record(tree, camera, pair) for pair in pairs]
    if for_eval and camera == "Sony":
        records = [r for r in records if _sid_name(r.input)[0] not in SID_MISALIGNED]
    return records


def _sid_lists(tree: Tree, camera: str) -> list[str]:
    return [name for name in (f"{camera}_{split}_list.txt" for split in SPLITS) if name in tree.files]


def _sid_list_pairs(tree: Tree, lists: list[str]) -> list[_SidPair]:
    pairs, missing = [], []
    for name in lists:
        for number, line in enumerate(tree.read_lines(name), 1):
            tokens = line.split()
            if not tokens:
                continue
            if len(tokens) < 2:
                raise LayoutError(f"{tree.url(name)} line {number}: expected 'input target [ISO..]'")
            inp, target = (posixpath.normpath(t) for t in tokens[:2])
            missing += [f"{name}: {p}" for p in (inp, target) if p not in tree.files]
            isos = [float(m.group(1)) for m in map(_ISO_TOKEN.match, tokens[2:]) if m]
            pairs.append(_SidPair(inp, target, isos[0] if isos else 0.0))
    if missing:
        raise LayoutError(f"{tree.name}: files named in list files are missing: {_listing(missing)}")
    return pairs


def _sid_folder_pairs(tree: Tree, camera: str) -> list[_SidPair]:
    shorts, longs = (tree.under_path(f"{camera}/{folder}") for folder in ("short", "long"))
    if not shorts:
        raise LayoutError(f"{tree.name}: no {camera}_*_list.txt and no files in {camera}/short")
    best: dict[str, str] = {}  # scene -> its longest exposure, the cleanest reference
    for rel in sorted(longs, key=lambda p: _sid_name(p)[1]):
        best[_sid_name(rel)[0]] = rel
    unpaired = [rel for rel in shorts if _sid_name(rel)[0] not in best]
    if unpaired:
        raise LayoutError(f"{tree.name}: short exposures without a long one: {_listing(unpaired)}")
    return [_SidPair(rel, best[_sid_name(rel)[0]]) for rel in shorts]


def _sid_name(path: str) -> tuple[str, float]:
    """(scene id, exposure seconds) from a name like '00001_00_0.04s.ARW'."""
    match = _SID_NAME.match(_stem(posixpath.basename(path)))
    if not match or float(match.group(2)) <= 0:
        raise LayoutError(f"{path}: not a SID name like 00001_00_0.04s.ARW")
    return match.group(1), float(match.group(2))


def _sid_record(tree: Tree, camera: str, pair: _SidPair) -> Record:
    scene, exposure_in = _sid_name(pair.input)
    _, exposure_gt = _sid_name(pair.target)
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
        for record in _eld_scene(tree, camera, frames, split)
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


def _eld_scene(tree: Tree, camera: str, frames: dict[int, str], split: str) -> list[Record]:
    missing = sorted({eld_reference(i) for i in frames} - frames.keys())
    if missing:
        scene = posixpath.dirname(next(iter(frames.values())))
        raise LayoutError(f"{tree.url(scene)}: reference frames {missing} are missing")
    exif = {index: _eld_exif(tree, rel) for index, rel in frames.items()}
    return [
        _eld_record(tree, camera, frames[i], frames[eld_reference(i)], exif[i], exif[eld_reference(i)], split)
        for i in sorted(frames)
        if i not in ELD_REFERENCES
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


# ---------------------------------------------------------------- paired folders (LRD, LOL, LOLv2, generic)

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


@register_layout("lrd")
def lrd_layout(tree: Tree, request: Request) -> list[Record]:
    return _split_folder_pairs(tree, request, "lrd")


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


# ---------------------------------------------------------------- SMID (sRGB re-release)

SMID_TEST_LIST = "test_list.txt"


@register_layout("smid")
def smid_layout(tree: Tree, request: Request) -> list[Record]:
    inputs, refs = (tree.resolve(name) for name in ("input", "gt"))
    if not (inputs and refs and SMID_TEST_LIST in tree.files):
        raise LayoutError(f"{tree.name}: smid needs input/<scene>/, gt/<scene>/ and {SMID_TEST_LIST}")
    frames, gts = _scene_files(tree, inputs), _scene_files(tree, refs)
    bad = [scene for scene in frames if len(gts.get(scene, [])) != 1]
    if bad:
        raise LayoutError(f"{tree.url(refs)}: scenes without exactly one gt image: {_listing(bad)}")
    test = _smid_test_scenes(tree, set(frames))
    return [
        _smid_record(tree, _stem(frame[len(inputs) + 1 :]), frame, gts[scene][0], scene in test)
        for scene in sorted(frames)
        for frame in frames[scene]
    ]


def _scene_files(tree: Tree, folder: str) -> dict[str, list[str]]:
    scenes: dict[str, list[str]] = defaultdict(list)
    for rel in tree.under(folder):
        parts = rel[len(folder) + 1 :].split("/")
        if len(parts) < 2:
            raise LayoutError(f"{tree.url(rel)}: SMID files must sit in a scene folder")
        scenes[parts[0]].append(rel)
    return scenes


def _smid_test_scenes(tree: Tree, scenes: set[str]) -> set[str]:
    test = {line.strip() for line in tree.read_lines(SMID_TEST_LIST) if line.strip()}
    unknown = test - scenes
    if unknown:
        raise LayoutError(f"{tree.url(SMID_TEST_LIST)} names scenes that have no input: {_listing(unknown)}")
    return test


def _smid_record(tree: Tree, record_id: str, frame: str, gt: str, is_test: bool) -> Record:
    return Record(
        id=record_id,
        input=tree.url(frame),
        target=tree.url(gt),
        split="test" if is_test else "train",
        dataset="smid",
        kind=kind_of(frame),
    )
