"""The embedded sample dataset: SID- and LOL-shaped sets synthesised from real photographs.

Each photo is unprocessed into Sony A7S2 sensor space (``unprocess``), mosaicked, and
written as DNGs: a nearly clean 10 s long exposure (noise of the lowest calibrated
gain, "low-ISO-like") and one short exposure per ratio with calibrated ELD-style noise at
the scene's ISO (``noise``). The LOL-shaped set renders the same DNGs through the target
ISP (``raw.render_srgb``): low = a short exposure as shot (dark), high = the long one,
stored as 16-bit PNG so dark values keep their precision.

Layout under ``out_dir`` (a local path or ``s3://`` URL)::

    raw/Sony/long/<id>_00_10s.dng        raw/Sony/short/<id>_<k>_<t>s.dng
    raw/Sony_{train,test,val}_list.txt   ("./Sony/short/.. ./Sony/long/.. ISO800 F8")
    lol/our485/{low,high}/<id>_<k>.png   train scenes
    lol/eval15/{low,high}/<id>_<k>.png   val and test scenes (held out from training)

Scene ids have five digits whose first one is the split (0 train, 1 test, 2 val), as in
SID. Photos come from ``skimage.data`` (the small default), a folder, or the extended set that
``lowlight photos`` extracts, whose manifest states each photo's split. Every file is derived from
its own seed, written atomically, and skipped when already present, so a re-run finishes an
interrupted build with identical bytes; ``samples.json`` records the photos and settings, and a
build into a folder made from other photos or settings is refused (its files would be kept).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path

import numpy as np
import skimage.data
import torch
from skimage.transform import resize
from tqdm import tqdm

from lowlight import storage
from lowlight.config import SamplesConfig
from lowlight.data.images import IMAGE_SUFFIXES, encode_png, read_image
from lowlight.data.noise import NoiseCalibration, add_noise, sample_noise_params
from lowlight.data.photos import read_manifest
from lowlight.data.raw import channel_offsets, pack_mosaic, render_srgb, unpack_mosaic
from lowlight.data.unprocess import CameraProfile, mosaic, unprocess, write_dng

# skimage.data colour photographs; the last two become the val and test scenes.
DEFAULT_PHOTOS = (
    "astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "chelsea", "coffee",
)
LONG_EXPOSURE_S = 10.0
ISO_CHOICES = (400, 800, 1600, 3200, 6400)
F_NUMBERS = (2.8, 4.0, 5.6, 8.0, 11.0)
SPLIT_DIGIT = {"train": "0", "test": "1", "val": "2"}
LOL_FOLDER = {"train": "our485", "val": "eval15", "test": "eval15"}
STAMP = "samples.json"


@dataclass(frozen=True)
class Photo:
    """A photograph to synthesise a scene from: read only when the scene's files are written."""

    name: str
    load: Callable[[], np.ndarray]
    split: str | None = None  # None: build_samples assigns splits itself


@dataclass(frozen=True)
class _Scene:
    index: int
    name: str
    split: str
    id: str
    iso: int
    f_number: float


def default_photos() -> list[Photo]:
    """The colour photographs shipped inside scikit-image."""
    return [Photo(name, getattr(skimage.data, name)) for name in DEFAULT_PHOTOS]


def photos_from_dir(directory: str | os.PathLike) -> list[Photo]:
    """Every image file directly inside ``directory`` (sorted by name), named by its stem."""
    paths = sorted(p for p in Path(directory).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {directory}")
    return [Photo(p.stem, partial(read_image, str(p))) for p in paths]


def photos_from_manifest(folder: str | os.PathLike) -> list[Photo]:
    """The photos a ``lowlight photos`` manifest lists, with the manifest's splits."""
    rows = read_manifest(folder)
    missing = [r.output_file for r in rows if not (Path(folder) / r.output_file).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {len(missing)} photos of its manifest ({', '.join(missing[:3])}): "
                                "run `lowlight photos` again")
    return [Photo(r.output_file, partial(read_image, str(Path(folder) / r.output_file)), r.split) for r in rows]


def configured_photos(cfg: SamplesConfig, from_dir: str | None = None) -> list[Photo] | None:
    """The photos the samples config asks for (None: the default skimage.data set)."""
    source = from_dir or cfg.from_dir
    if source and cfg.photos == "extended":
        raise ValueError("samples.from_dir (--from) and samples.photos=extended exclude each other")
    if source:
        return photos_from_dir(source)
    return photos_from_manifest(cfg.photos_dir) if cfg.photos == "extended" else None


def prepare_photo(photo: np.ndarray, max_side: int) -> np.ndarray:
    """HWC float32 RGB in [0, 1], long side <= ``max_side``, even height and width."""
    img = np.asarray(photo)
    if np.issubdtype(img.dtype, np.integer):
        img = img.astype(np.float32) / np.iinfo(img.dtype).max
    img = np.clip(img.astype(np.float32), 0.0, 1.0)
    if img.ndim == 2:
        img = img[:, :, None]
    img = np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img[:, :, :3]
    scale = max_side / max(img.shape[:2])
    if scale < 1:
        shape = (max(2, round(img.shape[0] * scale)), max(2, round(img.shape[1] * scale)))
        img = resize(img, shape, order=1, anti_aliasing=True).astype(np.float32)
    return img[: img.shape[0] // 2 * 2, : img.shape[1] // 2 * 2]


def assign_splits(count: int) -> list[str]:
    """Deterministic splits: about 1/7 each for val and test (at least one), the rest train."""
    if count < 3:
        raise ValueError(f"the sample dataset needs at least 3 photos (train, val, test), got {count}")
    held_out = max(1, count // 7)
    return ["train"] * (count - 2 * held_out) + ["val"] * held_out + ["test"] * held_out


def exposure_label(seconds: float) -> str:
    """SID's file-name spelling of an exposure time: two significant digits (1/30 s -> '0.033')."""
    return f"{float(f'{seconds:.2g}'):g}"


def _seed(*keys: int) -> int:
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def _splits(photos: Sequence[Photo]) -> list[str]:
    """The photos' own splits when they all have one, else ``assign_splits``."""
    given = [p.split for p in photos]
    if all(s is None for s in given):
        return assign_splits(len(photos))
    if any(s not in SPLIT_DIGIT for s in given):
        bad = next(p for p in photos if p.split not in SPLIT_DIGIT)
        raise ValueError(f"photo '{bad.name}' has split {bad.split!r}: all photos need one of {tuple(SPLIT_DIGIT)}")
    lacking = [s for s in SPLIT_DIGIT if s not in given]
    if lacking:
        raise ValueError(f"the photos' splits leave {', '.join(lacking)} empty; the sample set needs all three")
    return given


def _scenes(photos: Sequence[Photo], seed: int) -> list[_Scene]:
    counters = dict.fromkeys(SPLIT_DIGIT, 0)
    scenes = []
    names = [p.name for p in photos]
    for index, (name, split) in enumerate(zip(names, _splits(photos), strict=True)):
        counters[split] += 1
        rng = np.random.default_rng(_seed(seed, index))
        scenes.append(_Scene(
            index=index,
            name=name,
            split=split,
            id=f"{SPLIT_DIGIT[split]}{counters[split]:04d}",
            iso=int(rng.choice(ISO_CHOICES)),
            f_number=float(rng.choice(F_NUMBERS)),
        ))
    return scenes


@dataclass(frozen=True)
class _Build:
    """Everything a scene needs that is the same for all scenes."""

    raw_root: str
    lol_root: str
    profile: CameraProfile
    calib: NoiseCalibration
    seed: int
    ratios: tuple[float, ...]
    max_side: int

    @property
    def white_minus_black(self) -> float:
        return self.profile.white_level - float(np.max(self.profile.black_cells))


class _Writer:
    """Atomic writes that skip existing files and count what they did."""

    def __init__(self) -> None:
        self.written = 0
        self.skipped = 0

    def ensure(self, url: str, make: Callable[[], bytes]) -> bytes | None:
        """Write ``make()`` to ``url`` unless it exists; returns the bytes when written."""
        if storage.exists(url):
            self.skipped += 1
            return None
        data = make()
        storage.atomic_write_bytes(url, data)
        self.written += 1
        return data


def _clean_adu(photo: np.ndarray, build: _Build) -> torch.Tensor:
    """Packed (4, h, w) noise-free long exposure in ADU above black."""
    linear = unprocess(prepare_photo(photo, build.max_side), build.profile)
    packed = pack_mosaic(mosaic(linear, build.profile.pattern), build.profile.pattern)
    return torch.from_numpy(packed * np.float32(build.white_minus_black))


def _dng_bytes(
    build: _Build, clean_adu: torch.Tensor, k: float, seed: int, iso: int, exposure_time: float
) -> bytes:
    """ELD-noised DNG of a packed clean signal in ADU above black.

    Rounding to whole ADUs adds 1/12 ADU^2 on top of ELD's own quantisation term,
    negligible next to read noise of several ADU.
    """
    generator = torch.Generator().manual_seed(seed)
    params = sample_noise_params(build.calib, 1, generator, k=k)
    noisy = add_noise(clean_adu[None], params, "eld", generator)[0].numpy()
    profile = build.profile
    black = build.profile.black_cells[[2 * dy + dx for dy, dx in channel_offsets(profile.pattern)]]
    adu = np.clip(np.rint(noisy + black[:, None, None]), 0, profile.white_level).astype(np.uint16)
    buf = io.BytesIO()
    write_dng(buf, unpack_mosaic(adu, profile.pattern), profile, iso=iso, exposure_time=exposure_time)
    return buf.getvalue()


def _srgb_png(dng: bytes) -> bytes:
    return encode_png(render_srgb(dng), bits=16)


def _build_scene(build: _Build, scene: _Scene, photo: Photo, writer: _Writer) -> list[str]:
    """Write one scene's DNGs and PNGs (those missing); returns its list-file lines."""
    clean = cache(lambda: _clean_adu(photo.load(), build))
    long_name = f"{scene.id}_00_{exposure_label(LONG_EXPOSURE_S)}s.dng"
    long_url = storage.join(build.raw_root, "Sony", "long", long_name)
    # The long exposure gets the lowest calibrated gain's noise whatever the scene's ISO.
    long_bytes = writer.ensure(long_url, lambda: _dng_bytes(
        build, clean(), build.calib.k_min, _seed(build.seed, scene.index, 0), scene.iso, LONG_EXPOSURE_S))
    high_png = cache(lambda: _srgb_png(long_bytes or storage.read_bytes(long_url)))
    return [
        _build_short(build, scene, k, clean, high_png, writer) + f" ./Sony/long/{long_name}"
        f" ISO{scene.iso} F{scene.f_number:g}"
        for k in range(len(build.ratios))
    ]


def _build_short(
    build: _Build, scene: _Scene, k: int, clean: Callable[[], torch.Tensor],
    high_png: Callable[[], bytes], writer: _Writer,
) -> str:
    """Write the k-th short exposure and its LOL pair; returns its path relative to raw/."""
    ratio = build.ratios[k]
    seconds = LONG_EXPOSURE_S / ratio
    short_rel = f"Sony/short/{scene.id}_{k:02d}_{exposure_label(seconds)}s.dng"
    short_url = storage.join(build.raw_root, *short_rel.split("/"))
    short_bytes = writer.ensure(short_url, lambda: _dng_bytes(
        build, clean() / ratio, build.calib.k_for_iso(scene.iso), _seed(build.seed, scene.index, k + 1),
        scene.iso, seconds))
    lol_dir = storage.join(build.lol_root, LOL_FOLDER[scene.split])
    png = f"{scene.id}_{k:02d}.png"
    writer.ensure(storage.join(lol_dir, "low", png),
                  lambda: _srgb_png(short_bytes or storage.read_bytes(short_url)))
    writer.ensure(storage.join(lol_dir, "high", png), high_png)
    return f"./{short_rel}"


def _claim(out: str, settings: dict) -> None:
    """Record what the folder is built from; refuse a folder built from other photos or settings,
    since existing files are kept and would mix two sets."""
    url = storage.join(out, STAMP)
    text = json.dumps(settings, indent=1) + "\n"
    if storage.exists(url):
        if json.loads(storage.read_text(url)) != json.loads(text):
            raise ValueError(f"{out} holds a sample set built from other photos or settings ({STAMP}); "
                             "set samples.out to another folder or delete it")
        return
    storage.atomic_write_text(url, text)


def build_samples(
    out_dir: str | os.PathLike,
    *,
    photos: Sequence[Photo] | None = None,
    seed: int = 0,
    ratios: Sequence[float] = (100, 250, 300),
    max_side: int = 512,
    camera: str = "sony_a7s2",
    progress: bool = True,
) -> dict:
    """Build (or finish building) the sample dataset under ``out_dir``; returns a summary."""
    if not ratios or any(r <= 1 for r in ratios) or len(set(ratios)) != len(ratios):
        raise ValueError(f"ratios must be distinct and > 1, got {ratios}")
    photos = default_photos() if photos is None else list(photos)
    out = str(out_dir)
    build = _Build(
        raw_root=storage.join(out, "raw"),
        lol_root=storage.join(out, "lol"),
        profile=CameraProfile.load(camera),
        calib=NoiseCalibration.load(camera),
        seed=seed,
        ratios=tuple(ratios),
        max_side=max_side,
    )
    scenes = _scenes(photos, seed)
    _claim(out, {"scenes": {s.id: s.name for s in scenes}, "seed": seed, "ratios": [float(r) for r in ratios],
                 "max_side": max_side, "camera": camera})
    writer = _Writer()
    lists: dict[str, list[str]] = {split: [] for split in SPLIT_DIGIT}
    for scene, photo in tqdm(list(zip(scenes, photos, strict=True)), desc="samples", disable=not progress):
        lists[scene.split] += _build_scene(build, scene, photo, writer)
    for split, lines in lists.items():
        text = "".join(f"{line}\n" for line in lines)
        storage.atomic_write_text(storage.join(build.raw_root, f"Sony_{split}_list.txt"), text)

    counts = {split: sum(s.split == split for s in scenes) for split in SPLIT_DIGIT}
    return {
        "out": out,
        "scenes": {s.id: s.name for s in scenes},
        "splits": counts,
        "raw": {"root": build.raw_root, "long": len(scenes), "short": len(scenes) * len(ratios)},
        "lol": {
            "root": build.lol_root,
            "our485": counts["train"] * len(ratios),
            "eval15": (counts["val"] + counts["test"]) * len(ratios),
            "png_bits": 16,
        },
        "written": writer.written,
        "skipped": writer.skipped,
    }
