"""Where a cache lives: a local directory or any URI pyarrow's filesystems understand.

Local writes go through a temporary file, fsync and an atomic rename, so a crash never leaves a
half-written file under its final name. Object stores (s3://, gs://, ...) publish an object only when
its upload completes, so there the final name is written directly.
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass

import pyarrow.fs as pafs

from .errors import CacheCorruptError, CacheError

_SAFE_PART = re.compile(r"^[A-Za-z0-9._-]+$")


def safe_relpath(rel: str, what: str = "path") -> str:
    """Refuse a manifest path that could leave the cache directory."""
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel:
        raise CacheCorruptError(f"{what} {rel!r} is not a relative path inside the cache")
    parts = rel.split("/")
    if any(p in ("", ".", "..") or not _SAFE_PART.match(p) for p in parts):
        raise CacheCorruptError(f"{what} {rel!r} is not a plain relative path inside the cache")
    return rel


@dataclass(frozen=True)
class CacheDir:
    """A cache root; all paths it takes are relative to it and checked by `safe_relpath`."""

    uri: str
    fs: pafs.FileSystem
    root: str

    @classmethod
    def open(cls, uri: str | os.PathLike) -> "CacheDir":
        uri = os.fspath(uri)
        if "://" in uri and not uri.startswith("file://"):
            try:
                fs, root = pafs.FileSystem.from_uri(uri)
            except Exception as e:  # pyarrow raises several types here
                raise CacheError(f"cannot open cache location {uri!r}: {e}") from e
            return cls(uri, fs, root.rstrip("/"))
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        return cls(uri, pafs.LocalFileSystem(), os.path.abspath(path))

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, rel: str) -> str:
        return f"{self.root}/{safe_relpath(rel)}"

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self.fs.get_file_info(self.root).type == pafs.FileType.Directory

    def makedirs(self, rel: str | None = None) -> None:
        self.fs.create_dir(self.path(rel) if rel else self.root, recursive=True)

    def listdir(self, rel: str | None = None) -> list[str]:
        base = self.path(rel) if rel else self.root
        info = self.fs.get_file_info(base)
        if info.type != pafs.FileType.Directory:
            return []
        sel = pafs.FileSelector(base, recursive=False)
        return sorted(i.base_name for i in self.fs.get_file_info(sel))

    def size(self, rel: str) -> int:
        return self.fs.get_file_info(self.path(rel)).size

    def read_bytes(self, rel: str) -> bytes:
        full = self.path(rel)
        kind = self.fs.get_file_info(full).type
        if kind not in (pafs.FileType.File, pafs.FileType.NotFound):  # a FIFO or a device would block or never end
            raise CacheCorruptError(f"{full}: not a regular file ({kind.name}); restore it from the writer's output")
        try:
            with self.fs.open_input_stream(full) as f:
                return f.read()
        except FileNotFoundError as e:
            raise CacheCorruptError(f"{full}: listed in the manifest but missing") from e
        except OSError as e:
            raise CacheError(f"{full}: cannot be read: {e}") from e

    def write_atomic(self, rel: str, data: bytes) -> None:
        """Publish `data` under `rel` all at once, or not at all; a full disk is a CacheError naming the file."""
        full = self.path(rel)
        try:
            self._write_atomic(full, data)
        except OSError as e:
            raise CacheError(
                f"{full}: cannot be written ({e.strerror or e}); nothing under this name changed and the cache is "
                "valid up to its last listed shard: free space (or fix permissions) and re-run to resume"
            ) from e

    def _write_atomic(self, full: str, data: bytes) -> None:
        if not self.is_local:
            with self.fs.open_output_stream(full) as f:
                f.write(data)
            return
        d = os.path.dirname(full)
        tmp = os.path.join(d, f".tmp-{uuid.uuid4().hex}-{os.path.basename(full)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            _unlink_quiet(tmp)
            raise
        os.close(fd)
        try:
            os.replace(tmp, full)
        except BaseException:
            _unlink_quiet(tmp)
            raise
        _fsync_dir(d)

    def remove(self, rel: str) -> None:
        self.fs.delete_file(self.path(rel))


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _fsync_dir(d: str) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
