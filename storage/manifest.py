"""The manifest: what a cache holds and how it was made.

Each writer (one per inference worker) owns one manifest file, `manifest-IIIII.json`, and replaces it
atomically after every shard; the cache is the union of all of them. Every manifest repeats the cache's
settings (`CacheInfo`), which must agree, and carries a checksum of its own content so an edit is caught.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow.fs as pafs

from .errors import CacheCorruptError, CacheNotFoundError, CacheVersionError
from .fs import CacheDir, safe_relpath
from .shard import KINDS, READ_VERSIONS, Encoding, format_version_for

FORMAT_NAME = "adakd-teacher-cache"
TARGET_KINDS = KINDS
MANIFEST_RE = re.compile(r"^manifest-(\d{5})\.json$")


def manifest_name(worker_index: int) -> str:
    return f"manifest-{worker_index:05d}.json"


@dataclass(frozen=True)
class CacheInfo:
    """Settings that define a cache; every writer of one cache must share them exactly."""

    teacher: dict[str, Any]  # name_or_path, fingerprint (config + weights, when local), dtype
    tokenizer: dict[str, Any]  # name_or_path, fingerprint, vocab_size
    engine: dict[str, Any]  # name, version
    dataset: dict[str, Any]  # spec (how records were read and mapped), fingerprint
    encoding: Encoding
    prompt_template: str | None = None
    max_length: int | None = None
    num_workers: int = 1
    target_kind: str = "topk"
    extra: dict[str, Any] = field(default_factory=dict)  # stage-specific settings, compared like the rest

    @property
    def k(self) -> int:
        return self.encoding.k

    @property
    def vocab_size(self) -> int:
        return self.encoding.vocab_size

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["encoding"] = self.encoding.to_json()
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "CacheInfo":
        d = dict(d)
        d["encoding"] = Encoding.from_json(d["encoding"])
        return cls(**d)

    def differences(self, other: "CacheInfo") -> list[str]:
        """Human-readable list of what differs, as dotted paths with both values."""
        return _diff(self.to_json(), other.to_json())


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _diff(a.get(key), b.get(key), f"{path}.{key}" if path else key)
        return out
    return [] if a == b else [f"{path}: {a!r} here, {b!r} in the cache"]


@dataclass
class ShardEntry:
    file: str
    rows: int
    tokens: int
    positions: int
    bytes: int
    sha256: str
    blocks: list[int]  # rows per block, so readers can partition without opening shards
    records: list[int]  # first and last record index
    longest: int | None = None  # tokens in the shard's longest sequence (None: written before it was recorded)

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str) -> "ShardEntry":
        try:
            e = cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d or k != "longest"})
        except (KeyError, TypeError) as err:
            raise CacheCorruptError(f"{where}: malformed shard entry {d!r}") from err
        safe_relpath(e.file, f"{where}: shard file")
        counts = [e.rows, e.tokens, e.positions, e.bytes, *e.blocks] if isinstance(e.blocks, list) else None
        if (counts is None or not all(_count(x) for x in counts) or not isinstance(e.sha256, str)
                or not isinstance(e.records, list) or len(e.records) != 2 or not all(_count(x) for x in e.records)):
            raise CacheCorruptError(f"{where}: shard {e.file}: malformed entry (counts must be non-negative integers) {d!r}")
        if e.longest is not None and not _count(e.longest):
            raise CacheCorruptError(f"{where}: shard {e.file}: malformed entry (longest must be a non-negative integer)")
        if sum(e.blocks) != e.rows:
            raise CacheCorruptError(f"{where}: shard {e.file} block rows do not add up to {e.rows}")
        return e


def _count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_info(info: CacheInfo, where: str) -> None:
    """The settings readers compute with must have their types: a re-signed edit passes the checksum."""
    enc = info.encoding
    if info.target_kind not in TARGET_KINDS or enc.kind not in TARGET_KINDS:
        raise CacheVersionError(f"{where}: target kind {info.target_kind!r} is not known to this adakd "
                                f"(it reads {', '.join(TARGET_KINDS)}); upgrade adakd")
    head_ok = enc.k == 0 if enc.kind == "sampled" else enc.k >= 1
    draws_ok = (enc.samples >= 1) == enc.sampled and math.isfinite(enc.sample_temperature) and enc.sample_temperature > 0
    if not (_count(info.num_workers) and info.num_workers >= 1 and head_ok and draws_ok and enc.vocab_size >= 1
            and info.target_kind == enc.kind and all(math.isfinite(x) and x > 0 for x in (enc.lp_step, enc.aux_step))):
        raise CacheCorruptError(
            f"{where}: malformed cache settings (num_workers {info.num_workers!r}, kind {info.target_kind!r}/"
            f"{enc.kind!r}, k {enc.k}, samples {enc.samples}, sample temperature {enc.sample_temperature}, vocab_size "
            f"{enc.vocab_size}, steps {enc.lp_step}, {enc.aux_step})"
        )


@dataclass
class WorkerManifest:
    info: CacheInfo
    worker_index: int
    shards: list[ShardEntry] = field(default_factory=list)
    complete: bool = False
    progress: dict[str, Any] = field(default_factory=dict)  # the writer's resume point, opaque here
    created_by: str = ""

    def to_json(self) -> dict[str, Any]:
        body = {
            "format": FORMAT_NAME,
            "format_version": format_version_for(self.info.encoding.kind),
            "created_by": self.created_by,
            "cache": self.info.to_json(),
            "worker_index": self.worker_index,
            "complete": self.complete,
            "progress": self.progress,
            "shards": [asdict(s) for s in self.shards],
        }
        body["checksum"] = _checksum(body)
        return body

    def dumps(self) -> bytes:
        return (json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def loads(cls, data: bytes, where: str) -> "WorkerManifest":
        try:
            body = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CacheCorruptError(f"{where}: not valid JSON ({e}); the manifest is truncated or corrupted") from e
        if not isinstance(body, dict) or body.get("format") != FORMAT_NAME:
            raise CacheCorruptError(f"{where}: not an adakd cache manifest")
        version = body.get("format_version")
        if version not in READ_VERSIONS:
            raise CacheVersionError(
                f"{where}: cache format version {version!r}, but this adakd reads versions {READ_VERSIONS} only. "
                "Use the adakd version that wrote it, or rebuild the cache."
            )
        stored = body.pop("checksum", None)
        if stored != _checksum(body):
            raise CacheCorruptError(f"{where}: checksum mismatch: the manifest was edited or corrupted")
        try:
            info = CacheInfo.from_json(body["cache"])
            _check_info(info, where)
            if version != format_version_for(info.target_kind):
                raise CacheCorruptError(f"{where}: format version {version} does not hold {info.target_kind} targets")
            shards = [ShardEntry.from_json(s, where) for s in body["shards"]]
            return cls(
                info=info, worker_index=int(body["worker_index"]), shards=shards,
                complete=bool(body["complete"]), progress=dict(body.get("progress") or {}),
                created_by=str(body.get("created_by", "")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CacheCorruptError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from e


def _checksum(body: dict[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@dataclass
class CacheManifest:
    """The union of a cache's worker manifests."""

    info: CacheInfo
    workers: dict[int, WorkerManifest]

    @property
    def shards(self) -> list[ShardEntry]:
        return [s for i in sorted(self.workers) for s in self.workers[i].shards]

    @property
    def complete(self) -> bool:
        return len(self.workers) == self.info.num_workers and all(w.complete for w in self.workers.values())

    def totals(self) -> dict[str, int]:
        s = self.shards
        return {
            "shards": len(s), "sequences": sum(e.rows for e in s), "tokens": sum(e.tokens for e in s),
            "positions": sum(e.positions for e in s), "bytes": sum(e.bytes for e in s),
        }

    def longest_sequence(self) -> int | None:
        """Tokens in the cache's longest sequence; None when a shard predates the record of it."""
        lengths = [e.longest for e in self.shards]
        return None if not lengths or None in lengths else max(lengths)


def load_manifest(cache: CacheDir) -> CacheManifest:
    if not cache.is_dir():
        if cache.fs.get_file_info(cache.root).type != pafs.FileType.NotFound:
            raise CacheNotFoundError(f"{cache.uri}: a file, not a cache directory; give the directory cache-teacher "
                                     "wrote (its --out)")
        raise CacheNotFoundError(f"{cache.uri}: no such cache directory")
    names = [n for n in cache.listdir() if MANIFEST_RE.match(n)]
    if not names:
        raise CacheNotFoundError(
            f"{cache.uri}: no manifest-*.json here, so it is not an adakd cache (or no shard was completed yet)"
        )
    workers: dict[int, WorkerManifest] = {}
    for name in names:
        w = WorkerManifest.loads(cache.read_bytes(name), cache.path(name))
        if manifest_name(w.worker_index) != name:
            raise CacheCorruptError(f"{cache.path(name)}: holds worker {w.worker_index}, not the one its name says")
        workers[w.worker_index] = w
    first = workers[min(workers)]
    for i, w in workers.items():
        diffs = w.info.differences(first.info)
        if diffs:
            raise CacheCorruptError(
                f"{cache.path(manifest_name(i))} disagrees with {manifest_name(first.worker_index)}: "
                + "; ".join(diffs)
            )
        if not 0 <= i < w.info.num_workers:
            raise CacheCorruptError(f"{cache.path(manifest_name(i))}: worker {i} of {w.info.num_workers}")
    files = [s.file for w in workers.values() for s in w.shards]
    twice = sorted(f for f, n in Counter(files).items() if n > 1)
    if twice:
        raise CacheCorruptError(f"{cache.uri}: shard file {twice[0]} is listed twice across the manifests")
    return CacheManifest(info=first.info, workers=workers)
