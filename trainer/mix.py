"""Several caches as one sequence stream: GKD-style on-policy rounds mix an off-policy cache (teacher targets on
the ground-truth text) with one or more on-policy caches (teacher targets on the student's own generations).

Why a stream of sequences, not of batches: batches are packed from whatever sequences come next
(`trainer.batches`), so mixing before packing keeps every batch full and every loss, AdaKD's included,
unchanged. The order is deterministic and resumable:

- each cache is read as today, `CacheReader.stream(rank, world, seed)`: shuffled by the epoch's seed and split
  across data-parallel ranks, with its own `storage.Cursor`;
- the n-th sequence of a rank comes from cache i drawn with probabilities = the weights by a counter-based draw,
  a hash of (seed, rank, n) (`choice`): it depends on nothing but n, so a resumed stream makes the same choices
  without replaying the ones before;
- an epoch ends when the cache drawn next has no sequence left on this rank (the trainer then starts the next
  epoch, every cache reshuffled with seed + epoch); ranks keep equal step counts as with one cache.

A `MixCursor` (each cache's cursor, the draw counter n, the seed and the weights) is JSON-able like a `Cursor`,
and a batch's cursor resumes right after it. With one cache `open_stream` gives the plain `SequenceStream`
and its `Cursor`, so one-cache runs and their checkpoints are exactly what they were.

Compatibility (`check_compatible`, before any work): one tokenizer, one logit width and one target kind for all
caches (a batch's targets have one layout; sampled and hybrid caches also one proposal temperature). Top-k
caches may differ in k: every sequence is cut to the smallest k, the dropped entries' mass moved into the
tail (exact: `narrow_topk`). Hybrid caches must share k (their draws come from the tail outside their head).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from adakd.storage import CacheReader, Cursor, SequenceStream, SequenceTargets, redact

from .errors import TrainError


def parse_weights(weights: str | Sequence[float] | None, n: int) -> list[float]:
    """The mixing weights of n caches, normalized to sum 1: equal when None; else n positive numbers (a list or
    "0.5,0.5")."""
    if weights is None or (isinstance(weights, str) and not weights.strip()):
        return [1.0 / n] * n
    if isinstance(weights, str):
        parts = [p.strip() for p in weights.split(",")]
    elif isinstance(weights, (int, float)):
        parts = [weights]
    else:
        parts = list(weights)
    try:
        values = [float(p) for p in parts]
    except (TypeError, ValueError):
        raise TrainError(f"--cache-weights {weights!r}: expected {n} comma-separated numbers, one per --cache") from None
    if len(values) != n:
        raise TrainError(f"--cache-weights gives {len(values)} weight(s) for {n} cache(s); give one per --cache, "
                         "in the same order")
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise TrainError(f"--cache-weights {weights if isinstance(weights, str) else ','.join(map(str, values))}: "
                         "every weight must be a positive number (drop a cache rather than weighting it 0)")
    total = sum(values)
    return [v / total for v in values]


def choice(cum: Sequence[float], seed: int | None, rank: int, n: int) -> int:
    """The cache of a rank's n-th sequence: u in [0, 1) from a hash of (seed, rank, n), located in the cumulative
    weights. A pure function of its arguments (no generator state), stable across numpy versions."""
    h = hashlib.blake2b(f"adakd-mix:{seed}:{rank}:{n}".encode(), digest_size=8).digest()
    u = int.from_bytes(h, "little") / 2.0**64
    i = int(np.searchsorted(cum, u, side="right"))
    return min(i, len(cum) - 1)


@dataclass(frozen=True)
class MixCursor:
    """Where a mixed stream stands: each cache's cursor and the next draw's index n."""

    caches: tuple[Cursor, ...]
    n: int = 0
    seed: int | None = None
    rank: int = 0
    world: int = 1
    weights: tuple[float, ...] = field(default_factory=tuple)

    def to_json(self) -> dict:
        return {"mix": self.n, "seed": self.seed, "rank": self.rank, "world": self.world, "weights": list(self.weights),
                "caches": [c.to_json() for c in self.caches]}

    @classmethod
    def from_json(cls, d: dict) -> "MixCursor":
        return cls(tuple(Cursor.from_json(c) for c in d["caches"]), d["mix"], d["seed"], d["rank"], d["world"],
                   tuple(d["weights"]))


def cursor_from_json(d: dict | None) -> Cursor | MixCursor | None:
    """A checkpoint's per-rank cursor: a `MixCursor` (several caches) or a `Cursor` (one)."""
    if d is None:
        return None
    return MixCursor.from_json(d) if "mix" in d else Cursor.from_json(d)


def narrow_topk(seq: SequenceTargets, k: int) -> SequenceTargets:
    """A top-k sequence cut to its k most likely ids, the dropped ids' mass added to the tail (log-sum-exp)."""
    if seq.topk_ids.shape[1] <= k:
        return seq
    dropped = seq.topk_logprobs[:, k:].astype(np.float64)
    if seq.tail_logmass is None:
        with np.errstate(divide="ignore"):
            tail = np.log(np.maximum(1 - np.exp(seq.topk_logprobs[:, :k].astype(np.float64)).sum(1), 0))
    else:
        tail = np.logaddexp(seq.tail_logmass.astype(np.float64), np.logaddexp.reduce(dropped, axis=1))
    return SequenceTargets(seq.record, seq.input_ids, seq.loss_mask, seq.topk_ids[:, :k], seq.topk_logprobs[:, :k],
                           seq.target_logprob, tail.astype(np.float32), seq.extras)


def check_compatible(readers: Sequence[CacheReader], names: Sequence[str]) -> int:
    """Refuse caches that cannot share a batch (a TrainError naming both); returns the k every batch gets."""
    first, a = readers[0].info, names[0]
    for r, b in zip(readers[1:], names[1:]):
        info = r.info
        fa, fb = first.tokenizer.get("fingerprint"), info.tokenizer.get("fingerprint")
        if fa != fb:
            raise TrainError(f"--cache {a} and --cache {b} were made with different tokenizers ({fa} / {fb}); caches "
                             "trained together need the same token ids: cache the on-policy data with the same teacher "
                             "tokenizer")
        if first.vocab_size != info.vocab_size:
            raise TrainError(f"--cache {a} and --cache {b} have different teacher logit widths ({first.vocab_size} / "
                             f"{info.vocab_size}); caches trained together need the same teacher vocabulary")
        if first.encoding.kind != info.encoding.kind:
            raise TrainError(f"--cache {a} ({first.encoding.kind} targets) and --cache {b} ({info.encoding.kind}) hold "
                             "different target kinds, which cannot share a batch; cache every round with the same "
                             "--targets")
        if first.encoding.sampled and first.encoding.sample_temperature != info.encoding.sample_temperature:
            raise TrainError(f"--cache {a} and --cache {b} drew their samples at different temperatures "
                             f"({first.encoding.sample_temperature} / {info.encoding.sample_temperature}); cache every "
                             "round with the same --sample-temperature")
        if first.encoding.kind == "hybrid" and first.k != info.k:
            raise TrainError(f"--cache {a} and --cache {b} are hybrid caches with different --top-k ({first.k} / "
                             f"{info.k}); their draws come from different tails, so they cannot share a batch")
    return min(r.info.k for r in readers)


class MixedStream:
    """Sequences of several caches interleaved by `choice`; `cursor` is always the position right after the last
    one yielded (as `SequenceStream.cursor`). Ends when the cache drawn next has nothing left on this rank."""

    def __init__(self, readers: Sequence[CacheReader], weights: Sequence[float], rank: int = 0, world: int = 1,
                 seed: int | None = None, cursor: MixCursor | None = None, prefetch: int = 2):
        self.weights = tuple(float(w) for w in weights)
        if len(self.weights) != len(readers):
            raise ValueError(f"{len(self.weights)} weights for {len(readers)} caches")
        if cursor is not None:
            if len(cursor.caches) != len(readers) or not np.allclose(cursor.weights, self.weights, rtol=1e-12, atol=0):
                raise TrainError(
                    f"cannot resume: the checkpoint mixed {len(cursor.caches)} cache(s) with weights "
                    f"{list(cursor.weights)}, this run {len(readers)} with {list(self.weights)}; resume with the same "
                    "--cache list (same order) and --cache-weights, or --out a new directory")
            if (cursor.rank, cursor.world, cursor.seed) != (rank, world, seed):
                raise TrainError(f"cannot resume: the mixed cursor was saved for (rank, world, seed) = "
                                 f"{(cursor.rank, cursor.world, cursor.seed)}, this stream is {(rank, world, seed)}")
        self.streams = [r.stream(rank=rank, world=world, seed=seed, cursor=cursor.caches[i] if cursor else None,
                                 prefetch=prefetch) for i, r in enumerate(readers)]
        self.k = min(r.info.k for r in readers)
        self.narrow = [r.info.k > self.k and r.info.encoding.kind == "topk" for r in readers]
        self.cum = np.cumsum(self.weights)
        self.rank, self.world, self.seed = rank, world, seed
        self.cursor = cursor or MixCursor(tuple(s.cursor for s in self.streams), 0, seed, rank, world, self.weights)

    def __iter__(self) -> Iterator[SequenceTargets]:
        its = [iter(s) for s in self.streams]
        try:
            n = self.cursor.n
            while True:
                i = choice(self.cum, self.seed, self.rank, n)
                seq = next(its[i], None)
                if seq is None:  # this rank's share of cache i is used up: the epoch ends
                    return
                n += 1
                self.cursor = MixCursor(tuple(s.cursor for s in self.streams), n, self.seed, self.rank, self.world,
                                        self.weights)
                yield narrow_topk(seq, self.k) if self.narrow[i] else seq
        finally:
            for it in its:
                close = getattr(it, "close", None)
                if close is not None:
                    close()


def open_stream(readers: Sequence[CacheReader], weights: Sequence[float], rank: int = 0, world: int = 1,
                seed: int | None = None, cursor: Cursor | MixCursor | None = None,
                prefetch: int = 2) -> SequenceStream | MixedStream:
    """One cache: its own `SequenceStream` (exactly as before mixing existed); several: a `MixedStream`."""
    if len(readers) == 1:
        if isinstance(cursor, MixCursor):
            raise TrainError("cannot resume: the checkpoint mixed several caches and this run has one --cache; resume "
                             "with the same --cache list, or --out a new directory")
        return readers[0].stream(rank=rank, world=world, seed=seed, cursor=cursor, prefetch=prefetch)
    if cursor is not None and not isinstance(cursor, MixCursor):
        raise TrainError(f"cannot resume: the checkpoint was trained on one cache and this run mixes {len(readers)}; "
                         "resume with the same --cache list, or --out a new directory")
    return MixedStream(readers, weights, rank, world, seed, cursor, prefetch)


def describe(names: Sequence[str], weights: Sequence[float]) -> str:
    """"A (0.5) + B (0.5)": how a mixed run names its data in messages."""
    if len(names) == 1:
        return names[0]
    return " + ".join(f"{redact(n)} ({w:.3g})" for n, w in zip(names, weights))


__all__ = ["MixCursor", "MixedStream", "check_compatible", "choice", "cursor_from_json", "describe", "narrow_topk",
           "open_stream", "parse_weights"]
