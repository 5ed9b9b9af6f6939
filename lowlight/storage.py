"""One way to open, list and atomically write local paths and ``s3://`` URLs.

Local writes go to a temporary name in the same folder and are renamed into place, so a
reader never sees half a file. An S3 PUT (or a completed multipart upload) is already
all-or-nothing, so S3 writes go straight to the final key.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def endpoint(endpoint_url: str | None = None) -> str | None:
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None


def filesystem(url: str, endpoint_url: str | None = None) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem for ``url``; S3 honours an endpoint override (moto, MinIO, ...)."""
    if url.startswith("s3://"):
        import s3fs

        ep = endpoint(endpoint_url)
        # s3fs rejects region_name inside client_kwargs; the endpoint alone is enough.
        return s3fs.S3FileSystem(client_kwargs={"endpoint_url": ep} if ep else {}, skip_instance_cache=True)
    fs, _ = fsspec.core.url_to_fs(url)
    return fs


def join(url: str, *parts: str) -> str:
    if is_remote(url):
        return posixpath.join(url.rstrip("/"), *parts)
    return str(Path(url, *parts))


def exists(url: str, endpoint_url: str | None = None) -> bool:
    return filesystem(url, endpoint_url).exists(url)


def read_bytes(url: str, endpoint_url: str | None = None) -> bytes:
    with filesystem(url, endpoint_url).open(url, "rb") as f:
        return f.read()


def read_text(url: str, endpoint_url: str | None = None) -> str:
    return read_bytes(url, endpoint_url).decode()


def listdir(url: str, pattern: str = "*", endpoint_url: str | None = None) -> list[str]:
    """Sorted URLs of the entries under ``url`` matching a glob ``pattern`` (same scheme as ``url``)."""
    fs = filesystem(url, endpoint_url)
    found = fs.glob(posixpath.join(url.rstrip("/"), pattern) if is_remote(url) else str(Path(url, pattern)))
    if url.startswith("s3://"):
        found = ["s3://" + p if not p.startswith("s3://") else p for p in found]
    return sorted(found)


def makedirs(url: str, endpoint_url: str | None = None) -> None:
    if not is_remote(url):
        Path(url).mkdir(parents=True, exist_ok=True)


def atomic_write_bytes(url: str, data: bytes, endpoint_url: str | None = None) -> None:
    fs = filesystem(url, endpoint_url)
    if isinstance(fs, LocalFileSystem):
        path = Path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return
    with fs.open(url, "wb") as f:
        f.write(data)


def atomic_write_text(url: str, text: str, endpoint_url: str | None = None) -> None:
    atomic_write_bytes(url, text.encode(), endpoint_url)


def remove(url: str, endpoint_url: str | None = None) -> None:
    fs = filesystem(url, endpoint_url)
    if fs.exists(url):
        fs.rm(url, recursive=True)


def arrow_filesystem(url: str, endpoint_url: str | None = None):
    """(pyarrow filesystem, path) for Ray Data readers/writers; S3 goes through s3fs so the endpoint applies."""
    import pyarrow.fs as pafs

    if url.startswith("s3://"):
        return pafs.PyFileSystem(pafs.FSSpecHandler(filesystem(url, endpoint_url))), url[len("s3://"):]
    return pafs.LocalFileSystem(), str(Path(url).resolve())


def move(src: str, dst: str, endpoint_url: str | None = None) -> None:
    """Rename within one store: a local rename is atomic; an S3 copy makes the object appear whole."""
    if not is_remote(src):
        os.replace(src, dst)
        return
    filesystem(src, endpoint_url).mv(src, dst)
