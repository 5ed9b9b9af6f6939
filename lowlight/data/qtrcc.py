"""Read files out of Qt binary resource bundles (``.rcc``, made by ``rcc --binary``).

The format, as Qt's ``rcc`` writes it and ``QResource`` reads it (all numbers big-endian):

- header: ``qres``, version (u32, 1-3), tree offset, data offset, names offset (u32 each),
  and from version 3 the bundle's overall flags (u32);
- tree: one node per file or directory, node 0 the root; each holds a name offset (u32)
  and flags (u16: 1 zlib, 2 directory, 4 zstd), then for a directory its child count and
  the node index of its first child (u32, u32), for a file its territory and language
  (u16, u16) and data offset (u32); from version 2 a last-modified time (u64, ms) follows;
- names: length in UTF-16 units (u16), hash (u32), UTF-16BE characters;
- data: length (u32) and the bytes; zlib entries are ``qCompress`` output (the
  uncompressed length as u32, then a zlib stream), zstd entries one zstd frame.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import pyarrow as pa

MAGIC = b"qres"
ZLIB, DIRECTORY, ZSTD = 0x01, 0x02, 0x04


@dataclass(frozen=True)
class RccFile:
    path: str  # "/prefix/dir/name.ext", as Qt resolves ":/prefix/dir/name.ext"
    flags: int
    data_offset: int

    @property
    def compression(self) -> str:
        return "zstd" if self.flags & ZSTD else "zlib" if self.flags & ZLIB else "none"


class RccBundle:
    """The files of one bundle by path; ``read`` returns a file's uncompressed bytes."""

    def __init__(self, data: bytes, name: str = "<bytes>"):
        self.name = name
        self._data = data
        if len(data) < 20 or data[:4] != MAGIC:
            raise ValueError(f"{name} is not a Qt resource bundle (no 'qres' header)")
        self.version, self._tree, self._payload, self._names = struct.unpack_from(">4I", data, 4)
        if not 1 <= self.version <= 3:
            raise ValueError(f"{name}: unsupported rcc format version {self.version} (1-3 are known)")
        self._node_size = 14 if self.version == 1 else 22
        self.files: dict[str, RccFile] = {}
        self._walk(0, "", depth=0)

    def _unpack(self, fmt: str, offset: int) -> tuple:
        try:
            return struct.unpack_from(fmt, self._data, offset)
        except struct.error:
            raise ValueError(f"{self.name}: truncated (offset {offset} is past the end)") from None

    def _name(self, offset: int) -> str:
        (length,) = self._unpack(">H", self._names + offset)
        start = self._names + offset + 6  # skip the length and the name's hash
        return self._data[start:start + 2 * length].decode("utf-16-be")

    def _walk(self, node: int, path: str, depth: int) -> None:
        if depth > 64:
            raise ValueError(f"{self.name}: directory tree deeper than 64 levels (corrupt tree)")
        offset = self._tree + node * self._node_size
        name_offset, flags = self._unpack(">IH", offset)
        here = f"{path}/{self._name(name_offset)}" if node else ""
        if flags & DIRECTORY:
            count, first = self._unpack(">II", offset + 6)
            for child in range(first, first + count):
                self._walk(child, here, depth + 1)
        else:
            (data_offset,) = self._unpack(">I", offset + 10)
            self.files[here] = RccFile(here, flags, data_offset)

    def read(self, path: str) -> bytes:
        entry = self.files.get(path)
        if entry is None:
            raise KeyError(f"{path} is not in {self.name}")
        start = self._payload + entry.data_offset
        (length,) = self._unpack(">I", start)
        blob = self._data[start + 4:start + 4 + length]
        if len(blob) != length:
            raise ValueError(f"{self.name}: {path} is truncated ({len(blob)} of {length} bytes)")
        if entry.flags & ZSTD:
            return pa.CompressedInputStream(pa.BufferReader(blob), "zstd").read()
        if entry.flags & ZLIB:
            (expected,) = struct.unpack_from(">I", blob)
            out = zlib.decompress(blob[4:])
            if len(out) != expected:
                raise ValueError(f"{self.name}: {path} inflates to {len(out)} bytes, the header says {expected}")
            return out
        return blob
