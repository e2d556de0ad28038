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

# credentials a URI can carry: user info (s3://KEY:SECRET@bucket/...) and query parameters; the parameter
# names are pyarrow's (S3, GCS) plus the usual ones of other stores, so that any of them is safe to print
_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s?#:]*:[^/@\s?#]*@")  # user:password@ (a bare
# user@, such as abfs://container@account or hdfs://user@namenode, names no secret and stays)
_SECRET_PARAMS = ("access_key", "secret_key", "session_token", "access_token", "token", "password", "sas_token",
                  "account_key", "credentials", "credential")
_SECRET_PARAM = re.compile(r"(?i)((?:^|[?&;\s'\"(])(?:" + "|".join(_SECRET_PARAMS) + r")=)[^&\s'\")]*")
REDACTED = "***"


def redact(text: str | os.PathLike) -> str:
    """`text` (a URI, or a message that contains URIs) with every credential in a URI replaced by ***.

    Users put keys into store URIs (`s3://KEY:SECRET@bucket/x`, `?secret_key=...`); messages, logs and saved
    configurations name those URIs, and terminals, CI logs and issue reports are not places for secrets.
    """
    text = os.fspath(text)
    return _SECRET_PARAM.sub(lambda m: m.group(1) + REDACTED, _USERINFO.sub(lambda m: m.group(1) + REDACTED + "@", text))


def is_uri(location: str | os.PathLike) -> bool:
    """True for a store URI (s3://, gs://, hdfs://, ...); local paths and file:// URIs are local."""
    location = os.fspath(location)
    return "://" in location and not location.startswith("file://")


def join_uri(location: str | os.PathLike, rel: str) -> str:
    """`rel` under a local path or a URI; a URI's query string (endpoint, region) stays at the end."""
    location = os.fspath(location)
    if not rel:
        return location
    if not is_uri(location):
        return os.path.join(location, rel)
    base, sep, query = location.partition("?")
    return f"{base.rstrip('/')}/{rel}{sep}{query}"


def split_uri(target: str) -> tuple[str, str]:
    """(folder URI, file name) of a store URI naming a file, the query string (endpoint, region) kept on the folder:
    the inverse of `join_uri`. The name is whatever follows the last '/', checked by the caller."""
    base, sep, query = target.partition("?")
    folder, _, name = base.rstrip("/").rpartition("/")
    return f"{folder}{sep}{query}", name


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
    """A cache root (or any folder on a store: train-student's --out); all paths it takes are relative to it
    and checked by `safe_relpath`. `uri` is for messages: its credentials are redacted."""

    uri: str
    fs: pafs.FileSystem
    root: str

    @classmethod
    def open(cls, uri: str | os.PathLike) -> "CacheDir":
        uri = os.fspath(uri)
        if is_uri(uri):
            try:
                fs, root = pafs.FileSystem.from_uri(uri)
            except Exception as e:  # pyarrow raises several types here
                raise CacheError(f"cannot open cache location {redact(uri)!r}: {redact(str(e))}") from e
            return cls(redact(uri), fs, root.rstrip("/"))
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

    # -- whole files and folders (train-student's --out on a store) -------------------------------
    def files(self, rel: str | None = None) -> list[str]:
        """Every file under the folder `rel` (the root if None), as paths relative to it (sorted); [] if none."""
        base = self.path(rel) if rel else self.root
        if self.fs.get_file_info(base).type != pafs.FileType.Directory:
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True))
        return sorted(i.path[len(base) + 1:] for i in infos if i.type == pafs.FileType.File)

    def upload(self, local: str | os.PathLike, rel: str) -> None:
        """Copy a local file to `rel`; on an object store it appears only once complete."""
        with open(local, "rb") as f:
            data = f.read()
        if "/" in rel:
            self.makedirs(rel.rsplit("/", 1)[0])
        self.write_atomic(rel, data)

    def download(self, rel: str, local: str | os.PathLike) -> None:
        """Copy `rel` to a local file (its folder is made)."""
        local = os.fspath(local)
        os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
        with open(local, "wb") as f:
            f.write(self.read_bytes(rel))

    def remove_tree(self, rel: str) -> None:
        """Delete the folder `rel` and everything under it (nothing if it is not there)."""
        if self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound:
            self.fs.delete_dir(self.path(rel))


def put_file(local: str | os.PathLike, target: str) -> None:
    """Copy a finished local file to `target`, a store URI naming the file (for outputs such as plots)."""
    folder, name = split_uri(target)
    CacheDir.open(folder).upload(local, name)


def get_folder(uri: str, local: str | os.PathLike) -> int:
    """Copy every file of the store folder `uri` into the local folder `local`; returns how many."""
    d = CacheDir.open(uri)
    files = d.files()
    for rel in files:
        d.download(rel, os.path.join(local, rel))
    return len(files)


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
