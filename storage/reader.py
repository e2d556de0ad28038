"""Reading a cache: blocks streamed in a deterministic order, split across data-parallel ranks.

The unit of order and of partitioning is a block (a record batch of a shard). The block list, optionally
shuffled by a seed, is cut into `world` contiguous ranges, so each rank decodes only its own blocks and
touches few shard files. A background thread reads, checks (sha256) and decodes ahead into a bounded
queue, so memory depends on the block size and the prefetch depth, never on the cache's size. The thread
ends with its stream (exhausted, closed, collected) or, for a stream still open, at interpreter exit.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import queue
import threading
from contextlib import closing
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np

from .errors import CacheCorruptError, CacheError
from .fs import CacheDir
from .manifest import CacheInfo, CacheManifest, ShardEntry, load_manifest
from .sequence import SequenceTargets
from .shard import DecodedBlock, ShardFile


@dataclass(frozen=True)
class BlockRef:
    """A unit of order and partitioning: rows [lo, hi) of one block of one shard."""

    shard: int  # index into the manifest's shard list
    block: int
    lo: int
    hi: int

    @property
    def rows(self) -> int:
        return self.hi - self.lo


@dataclass(frozen=True)
class Cursor:
    """Where a stream stands: the next unread row of the `unit`-th block of this rank's order."""

    unit: int = 0
    row: int = 0
    rank: int = 0
    world: int = 1
    seed: int | None = None
    cache: str = ""  # fingerprint of the shard list, so a cursor is not applied to another cache

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Cursor":
        return cls(**d)


def load_shard(cache: CacheDir, entry: ShardEntry, info: CacheInfo, verify: bool = True) -> ShardFile:
    """Read a shard whole, check its size and checksum, and open it; errors name the file."""
    full = cache.path(entry.file)
    data = cache.read_bytes(entry.file)
    if len(data) != entry.bytes:
        raise CacheCorruptError(f"{full}: {len(data)} bytes, the manifest says {entry.bytes} (truncated or replaced)")
    if verify and hashlib.sha256(data).hexdigest() != entry.sha256:
        raise CacheCorruptError(f"{full}: sha256 mismatch, the file is corrupted; rebuild this shard")
    shard = ShardFile(full, data, info.encoding)
    meta = shard.meta
    for key in ("rows", "tokens", "positions"):
        if meta.get(key) != getattr(entry, key):
            raise CacheCorruptError(f"{full}: {key} = {meta.get(key)} in the shard, {getattr(entry, key)} in the manifest")
    if shard.block_rows != entry.blocks:
        raise CacheCorruptError(f"{full}: block layout differs from the manifest")
    return shard


class CacheReader:
    """A cache opened for reading. `stream()` gives sequences; `blocks()` gives decoded blocks."""

    def __init__(self, uri: str | os.PathLike, verify_checksums: bool = True):
        self.dir = CacheDir.open(uri)
        self.manifest: CacheManifest = load_manifest(self.dir)
        self.verify_checksums = verify_checksums
        self.shards = self.manifest.shards
        self.fingerprint = hashlib.sha256("".join(f"{s.file}:{s.sha256};" for s in self.shards).encode()).hexdigest()[:16]

    @property
    def info(self) -> CacheInfo:
        return self.manifest.info

    def tokenizer_files(self) -> dict[str, bytes]:
        """The teacher tokenizer's files saved with the cache ({} for caches made without them)."""
        return {name: self.dir.read_bytes(f"tokenizer/{name}") for name in self.dir.listdir("tokenizer")
                if not name.startswith(".")}

    def units(self, rank: int = 0, world: int = 1, seed: int | None = None) -> list[BlockRef]:
        """This rank's blocks, in order; ranks' lists are disjoint and together cover the cache."""
        if world < 1 or not 0 <= rank < world:
            raise CacheError(f"rank {rank} is outside a world of {world}")
        blocks = [(i, b, rows) for i, s in enumerate(self.shards) for b, rows in enumerate(s.blocks)]
        # small caches: cut blocks into row ranges so every rank gets about 4 units or more
        parts = max(1, -(-4 * world // len(blocks))) if blocks else 1
        refs = [BlockRef(i, b, rows * j // parts, rows * (j + 1) // parts)
                for i, b, rows in blocks for j in range(parts) if rows * (j + 1) // parts > rows * j // parts]
        if seed is not None:
            refs = [refs[j] for j in np.random.default_rng(seed).permutation(len(refs))]
        lo, hi = rank * len(refs) // world, (rank + 1) * len(refs) // world
        return refs[lo:hi]

    def blocks(
        self, rank: int = 0, world: int = 1, seed: int | None = None, start: int = 0, prefetch: int = 2
    ) -> Iterator[tuple[int, tuple[BlockRef, DecodedBlock]]]:
        """(unit index, (unit, its decoded block)) for this rank from unit `start`, decoded ahead in a thread."""
        units = self.units(rank, world, seed)[start:]
        if prefetch <= 0:
            yield from zip(range(start, start + len(units)), self._decode_all(units))
            return
        with closing(_prefetched(self._decode_all(units), prefetch)) as ahead:  # closed here, not left to the GC
            yield from zip(range(start, start + len(units)), ahead)

    def _decode_all(self, units: list[BlockRef]) -> Iterator[tuple[BlockRef, DecodedBlock]]:
        current: tuple[int, ShardFile] | None = None
        decoded: tuple[tuple[int, int], DecodedBlock] | None = None
        for ref in units:
            if current is None or current[0] != ref.shard:
                current = (ref.shard, load_shard(self.dir, self.shards[ref.shard], self.info, self.verify_checksums))
            if decoded is None or decoded[0] != (ref.shard, ref.block):
                decoded = ((ref.shard, ref.block), current[1].decode(ref.block))
            yield ref, decoded[1]

    def stream(
        self, rank: int = 0, world: int = 1, seed: int | None = None, cursor: Cursor | None = None, prefetch: int = 2
    ) -> "SequenceStream":
        return SequenceStream(self, rank, world, seed, cursor, prefetch)


class SequenceStream:
    """Iterates sequences; `cursor` is always the position right after the last one yielded."""

    def __init__(self, reader: CacheReader, rank: int, world: int, seed: int | None, cursor: Cursor | None, prefetch: int):
        self.reader = reader
        if cursor is not None:
            expected = (rank, world, seed, reader.fingerprint)
            got = (cursor.rank, cursor.world, cursor.seed, cursor.cache)
            if got != expected:
                raise CacheError(
                    f"cannot resume: the cursor was saved for (rank, world, seed, cache) = {got}, "
                    f"this stream is {expected}"
                )
        self.cursor = cursor or Cursor(0, 0, rank, world, seed, reader.fingerprint)
        self._prefetch = prefetch

    def __iter__(self) -> Iterator[SequenceTargets]:
        c = self.cursor
        n_units = len(self.reader.units(c.rank, c.world, c.seed))
        with closing(self.reader.blocks(c.rank, c.world, c.seed, start=c.unit, prefetch=self._prefetch)) as blocks:
            for unit, (ref, block) in blocks:
                first = c.row if unit == c.unit else 0
                if first > ref.rows:
                    raise CacheError(f"cursor row {first} is past the end of unit {unit} ({ref.rows} rows)")
                for i in range(first, ref.rows):
                    last = i + 1 == ref.rows
                    self.cursor = Cursor(unit + 1 if last else unit, 0 if last else i + 1, c.rank, c.world, c.seed, c.cache)
                    yield block.sequence(ref.lo + i)
        self.cursor = Cursor(n_units, 0, c.rank, c.world, c.seed, c.cache)


_DONE = object()


class _Prefetcher:
    """A daemon thread running `it` at most `depth` items ahead of its consumer, through a bounded queue.

    It is stopped and joined when its consumer closes and, for streams still open then, at interpreter exit
    (`atexit` runs before daemon threads are torn down). A daemon thread that wants the GIL back while the
    interpreter finalizes is ended by pthread_exit; inside C++ code (pyarrow freeing a shard reader, even
    just after a stream's last block) that aborts the process: "terminate called without an active exception".
    """

    live: set["_Prefetcher"] = set()  # started and not yet joined

    def __init__(self, it: Iterator, depth: int):
        self._it = it
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="adakd-prefetch", daemon=True)

    def start(self) -> None:
        self._thread.start()
        _Prefetcher.live.add(self)

    def get(self) -> object:
        return self._q.get()

    def _put(self, item: object) -> bool:
        """Wait for room in the queue, giving up once stopped (the consumer is gone)."""
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        try:
            for item in self._it:
                if not self._put(item):
                    return
            self._put(_DONE)
        except BaseException as e:  # handed to the consumer
            self._put(e)
        finally:
            close = getattr(self._it, "close", None)
            if close is not None:  # in this thread: the source is suspended here, not running elsewhere
                close()

    def stop(self) -> None:
        """Ask the thread to end after its current item; emptying the queue wakes a blocked put at once."""
        self._stop.set()
        try:
            while True:
                self._q.get_nowait()
        except queue.Empty:
            pass

    def join(self) -> None:
        if self._thread is threading.current_thread():  # closed by a garbage collection run in this thread
            return
        self._thread.join()
        _Prefetcher.live.discard(self)


@atexit.register
def _stop_all_prefetchers() -> None:
    """Stop every prefetch thread still running (streams abandoned or referenced at exit), then wait for them."""
    running = list(_Prefetcher.live)
    for p in running:
        p.stop()
    for p in running:
        p.join()


def _prefetched(it: Iterator[DecodedBlock], depth: int) -> Iterator[DecodedBlock]:
    """Run `it` in a thread, `depth` items ahead; errors surface in the consumer; closing stops the thread."""
    p = _Prefetcher(it, depth)
    p.start()
    try:
        while True:
            item = p.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        p.stop()
        p.join()
