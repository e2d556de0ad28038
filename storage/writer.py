"""Writing a cache: sequences in, complete shards and an atomically replaced manifest out.

A shard is published (temporary file, fsync, rename) before the manifest that lists it, so at any
moment the cache is valid up to its last complete shard; an unlisted shard left by a crash is simply
rewritten. Shard boundaries depend only on the sequence stream, so a resumed run that replays the same
records from `progress` writes byte-identical shards.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np

from .errors import CacheError, CacheLockedError, CacheMismatchError
from .fs import CacheDir
from .manifest import CacheInfo, ShardEntry, WorkerManifest, load_manifest, manifest_name
from .sequence import SequenceTargets
from .shard import Encoding, encode_shard

SHARD_DIR = "shards"
AUX_DIRS = ("tokenizer",)
DEFAULT_SHARD_POSITIONS = 65536
DEFAULT_BLOCK_POSITIONS = 16384


def _version() -> str:
    try:
        from importlib.metadata import version

        return f"adakd {version('adakd')}"
    except Exception:
        return "adakd"


class CacheWriter:
    """Writes one worker's part of a cache; resumes that part if it already exists."""

    def __init__(
        self,
        uri: str | os.PathLike,
        info: CacheInfo,
        worker_index: int = 0,
        shard_positions: int = DEFAULT_SHARD_POSITIONS,
        block_positions: int = DEFAULT_BLOCK_POSITIONS,
    ):
        if not 0 <= worker_index < info.num_workers:
            raise CacheError(f"worker index {worker_index} is outside 0..{info.num_workers - 1}")
        self.dir = CacheDir.open(uri)
        self.info = info
        self.worker_index = worker_index
        self.shard_positions = shard_positions
        self.block_positions = min(block_positions, shard_positions)
        self._buffer: list[SequenceTargets] = []
        self._buffered_positions = 0
        self._progress: dict[str, Any] = {}
        self._last_record = -1
        self._lock_fd: int | None = None
        try:
            self.dir.makedirs(SHARD_DIR)
        except OSError as e:
            raise CacheError(f"{self.dir.uri}: cannot create the cache directory ({e}); choose a writable --out") from e
        self._lock()
        self._remove_stale_temporaries()
        self.manifest = self._open_manifest()
        self._progress = dict(self.manifest.progress)
        if self.manifest.shards:
            self._last_record = self.manifest.shards[-1].records[-1]

    # -- opening -------------------------------------------------------------------------------
    def _lock(self) -> None:
        if not self.dir.is_local:
            return
        import fcntl

        path = os.path.join(self.dir.root, f".lock-{self.worker_index:05d}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CacheLockedError(
                f"{self.dir.uri}: worker {self.worker_index} is being written by another live process; "
                "give each process its own --worker-index"
            ) from None
        self._lock_fd = fd

    def _open_manifest(self) -> WorkerManifest:
        mine = manifest_name(self.worker_index)
        if any(n.startswith("manifest-") for n in self.dir.listdir()):
            existing = load_manifest(self.dir)
            diffs = self.info.differences(existing.info)
            if diffs and not existing.shards and set(existing.workers) <= {self.worker_index}:
                diffs = []  # nothing was written under the old settings (e.g. a failed first start): begin anew
                existing.workers.pop(self.worker_index, None)
            if diffs:
                self.close_lock()
                raise CacheMismatchError(
                    f"{self.dir.uri} was made with other settings; use another output path or the same "
                    "settings. Differences: " + "; ".join(diffs)
                )
            if self.worker_index in existing.workers:
                return existing.workers[self.worker_index]
        m = WorkerManifest(info=self.info, worker_index=self.worker_index, created_by=_version())
        self.dir.write_atomic(mine, m.dumps())
        return m

    def _remove_stale_temporaries(self) -> None:
        """Drop the temporary files a crashed writer of this slot left (never visible to readers).

        Auxiliary files belong to worker 0 (`put_file`), so its slot also owns their temporaries.
        """
        mine = (f"{self.worker_index:05d}-", manifest_name(self.worker_index))
        for folder in (None, SHARD_DIR, *(AUX_DIRS if self.worker_index == 0 else ())):
            for name in self.dir.listdir(folder):
                parts = name.split("-", 2)
                if name.startswith(".tmp-") and len(parts) == 3 and (folder in AUX_DIRS or parts[2].startswith(mine)):
                    self.dir.remove(f"{folder}/{name}" if folder else name)

    # -- state ---------------------------------------------------------------------------------
    @property
    def progress(self) -> dict[str, Any]:
        """The caller's resume point as of the last published shard (empty for a new cache)."""
        return dict(self.manifest.progress)

    @property
    def complete(self) -> bool:
        return self.manifest.complete

    # -- writing -------------------------------------------------------------------------------
    def add(self, seq: SequenceTargets, progress: dict[str, Any] | None = None, autoflush: bool = True) -> None:
        """Buffer one sequence; `progress` is the caller's state right after it (saved with its shard).

        With `autoflush=False` the caller decides where shards may end (`flush_if_full`), e.g. only at
        engine-batch boundaries so a resumed run rebuilds the very same batches.
        """
        if self.manifest.complete:
            raise CacheError(f"{self.dir.uri}: worker {self.worker_index} is already complete")
        validate_sequence(seq, self.info.encoding, self._last_record)
        self._buffer.append(seq)
        self._buffered_positions += seq.num_positions
        self._last_record = seq.record
        if progress is not None:
            self._progress = dict(progress)
        if autoflush:
            self.flush_if_full()

    def flush_if_full(self) -> None:
        if self._buffered_positions >= self.shard_positions:
            self.flush()

    def put_file(self, rel: str, data: bytes) -> None:
        """Store an auxiliary file (e.g. `tokenizer/tokenizer.json`) atomically; not listed as a shard.

        Only worker 0 writes them, so one slot owns (and cleans up after) their temporary files.
        """
        if rel.split("/")[0] not in AUX_DIRS:
            raise CacheError(f"auxiliary files go under {AUX_DIRS}, not {rel!r}")
        if self.worker_index != 0:
            raise CacheError(f"auxiliary files are written by worker 0, not by worker {self.worker_index}")
        self.dir.makedirs(rel.rsplit("/", 1)[0])
        self.dir.write_atomic(rel, data)

    def note_progress(self, progress: dict[str, Any]) -> None:
        """Record the caller's state without a sequence (e.g. after skipping a record)."""
        self._progress = dict(progress)

    def flush(self) -> None:
        """Publish the buffered sequences as one shard, then the manifest that lists it."""
        if not self._buffer:
            return
        data, stats = encode_shard(self._buffer, self.info.encoding, self.block_positions)
        name = f"{SHARD_DIR}/{self.worker_index:05d}-{len(self.manifest.shards):06d}.arrow"
        self.dir.write_atomic(name, data)
        self.manifest.shards.append(ShardEntry(
            file=name, rows=stats.rows, tokens=stats.tokens, positions=stats.positions, bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(), blocks=stats.blocks, records=stats.records,
            longest=max(len(q.input_ids) for q in self._buffer),
        ))
        self.manifest.progress = dict(self._progress)
        self._write_manifest()
        self._buffer, self._buffered_positions = [], 0

    def close(self, progress: dict[str, Any] | None = None, complete: bool = True) -> None:
        """Flush, and mark this worker's part complete (or just save progress when `complete` is false)."""
        if progress is not None:
            self._progress = dict(progress)
        self.flush()
        self.manifest.progress = dict(self._progress)
        self.manifest.complete = self.manifest.complete or complete
        self._write_manifest()
        self.close_lock()

    def close_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _write_manifest(self) -> None:
        self.dir.write_atomic(manifest_name(self.worker_index), self.manifest.dumps())

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # keep what is published; the buffered tail is redone on resume
            self.close_lock()


def validate_sequence(s: SequenceTargets, enc: Encoding, last_record: int = -1) -> None:
    """Check a sequence against the cache's encoding and normalize it in place (dtypes, order, tail).

    Errors name the record; top-k rows that are not sorted are sorted (ids follow their values).
    """
    where = f"record {s.record}"
    if s.record <= last_record:
        raise CacheError(f"{where}: records must be added in increasing order (last was {last_record})")
    s.input_ids = np.asarray(s.input_ids, dtype=np.int32)
    s.loss_mask = np.asarray(s.loss_mask, dtype=bool)
    L = len(s.input_ids)
    if L == 0 or s.loss_mask.shape != (L,):
        raise CacheError(f"{where}: input_ids and loss_mask must be non-empty and of equal length")
    if s.loss_mask[0]:
        raise CacheError(f"{where}: loss_mask[0] is set, but nothing predicts the first token")
    n = int(np.count_nonzero(s.loss_mask))
    try:
        s.topk_ids = np.asarray(s.topk_ids, dtype=np.int32).reshape(n, enc.k)
        s.topk_logprobs = np.asarray(s.topk_logprobs, dtype=np.float32).reshape(n, enc.k)
        s.target_logprob = np.asarray(s.target_logprob, dtype=np.float32).reshape(n)
    except ValueError as e:
        raise CacheError(f"{where}: per-position arrays must be ({n}, {enc.k}) and ({n},) for {n} trained tokens") from e
    if n and enc.k and (s.topk_ids.min() < 0 or s.topk_ids.max() >= enc.vocab_size):
        raise CacheError(f"{where}: top-k ids outside the vocabulary of {enc.vocab_size}")
    if np.isnan(s.topk_logprobs.sum()) or np.isnan(s.target_logprob.sum()):
        raise CacheError(f"{where}: NaN log-probabilities from the teacher")
    if n and enc.k > 1 and (s.topk_logprobs[:, 1:] > s.topk_logprobs[:, :-1]).any():
        order = np.argsort(-s.topk_logprobs, axis=1, kind="stable")
        s.topk_ids = np.take_along_axis(s.topk_ids, order, 1)
        s.topk_logprobs = np.take_along_axis(s.topk_logprobs, order, 1)
    if enc.sampled:
        _validate_samples(s, enc, n, where)
    elif s.sampled:
        raise CacheError(f"{where}: sampled targets given to a top-k cache")
    if enc.kind == "sampled":
        s.tail_logmass = np.zeros(n, dtype=np.float32)  # every token is outside the (empty) head: log 1
    elif enc.k >= enc.vocab_size:
        s.tail_logmass = np.full(n, -np.inf, dtype=np.float32)
    elif s.tail_logmass is not None:
        s.tail_logmass = np.asarray(s.tail_logmass, dtype=np.float32).reshape(n)
    for f in enc.fields:
        if f not in s.extras:
            raise CacheError(f"{where}: the cache declares field {f!r}, which this sequence lacks")
        s.extras[f] = np.asarray(s.extras[f], dtype=np.float32).reshape(n)


def _validate_samples(s: SequenceTargets, enc: Encoding, n: int, where: str) -> None:
    """Draws: sizes per position, counts summing to N, distinct ids per position (outside the head in a hybrid
    cache), finite log-probabilities; normalized in place to descending log-probability, ties by ascending id."""
    if not s.sampled:
        raise CacheError(f"{where}: a {enc.kind} cache needs the teacher's draws (sample_sizes, sample_ids, ...)")
    try:
        sizes = np.asarray(s.sample_sizes, dtype=np.int64).reshape(n)
        S = int(sizes.sum())
        ids = np.asarray(s.sample_ids, dtype=np.int64).reshape(S)
        counts = np.asarray(s.sample_counts, dtype=np.int64).reshape(S)
        lps = np.asarray(s.sample_logprobs, dtype=np.float32).reshape(S)
    except ValueError as e:
        raise CacheError(f"{where}: draw arrays must hold sample_sizes.sum() entries, sample_sizes one per trained "
                         f"token ({n})") from e
    if n and sizes.min() < (1 if enc.kind == "sampled" else 0):
        raise CacheError(f"{where}: a position without draws in a sampled cache")
    pos = np.repeat(np.arange(n), sizes)
    if S:
        if ids.min() < 0 or ids.max() >= enc.vocab_size:
            raise CacheError(f"{where}: drawn ids outside the vocabulary of {enc.vocab_size}")
        if counts.min() < 1:
            raise CacheError(f"{where}: a drawn id with a count below 1")
        if not np.all(np.isfinite(lps)) or lps.max() > 1e-3:
            raise CacheError(f"{where}: drawn ids' log-probabilities must be finite and <= 0")
        order = np.lexsort((ids, -lps, pos))
        if not np.array_equal(order, np.arange(S)):
            ids, counts, lps = ids[order], counts[order], lps[order]
        if ((pos[1:] == pos[:-1]) & (ids[1:] == ids[:-1])).any():
            raise CacheError(f"{where}: an id appears twice among one position's draws (store it once with its count)")
        if enc.k and (ids[:, None] == s.topk_ids[pos]).any():
            raise CacheError(f"{where}: a drawn id is in the top-k head; hybrid draws come from the tail only")
        per_pos = np.bincount(pos, weights=counts, minlength=n)
        if not np.all(per_pos[sizes > 0] == enc.samples):
            raise CacheError(f"{where}: counts must sum to the cache's {enc.samples} draws at every position")
    s.sample_sizes = sizes.astype(np.int32)
    s.sample_ids, s.sample_counts, s.sample_logprobs = ids.astype(np.int32), counts.astype(np.int32), lps
    s.rest_logmass = s.rest()
    try:
        s.rest_logmass = np.asarray(s.rest_logmass, dtype=np.float32).reshape(n)
    except ValueError as e:
        raise CacheError(f"{where}: rest_logmass must hold one value per trained token ({n})") from e
    if np.isnan(s.rest_logmass).any() or (s.rest_logmass > 1e-3).any():
        raise CacheError(f"{where}: rest_logmass must be a log-mass <= 0")
