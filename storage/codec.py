"""Numeric coding of sparse teacher targets: small integers in byte planes, so zstd sees low entropy.

- Top-k log-probabilities are quantized to multiples of `lp_step` nats and stored as rank-to-rank
  gaps (the first entry holds the top-1 value itself). Every error is within +-lp_step/2, so by
  Hoeffding's lemma the KL divergence between the exact and the decoded top-k distribution is at most
  lp_step**2 / 8 (1.2e-4 nats at the default 1/32), for any distribution.
- The actual-token log-probability and the tail log-mass are quantized to `aux_step` (error <= 0.002
  nats at 1/256); the all-ones code means minus infinity (zero mass).
- Token ids are renumbered per shard by descending frequency (the shard stores the table), so the
  frequent ids get small codes whose high byte planes are almost all zero.
"""

from __future__ import annotations

import numpy as np

LP_STEP = 1.0 / 32
AUX_STEP = 1.0 / 256
SAMPLE_LP_STEP = 1.0 / 8  # drawn ids' log-probabilities: within 1/16 nat (their Monte Carlo noise is far larger)
Q_MAX = np.iinfo(np.uint16).max


def id_planes_for(vocab_size: int) -> int:
    """Byte planes needed for codes below `vocab_size`."""
    return max(1, (int(vocab_size - 1).bit_length() + 7) // 8)


def to_planes(a: np.ndarray, nplanes: int) -> list[np.ndarray]:
    a = np.ascontiguousarray(a).reshape(-1)
    return [((a >> (8 * p)) & 0xFF).astype(np.uint8) for p in range(nplanes)]


def from_planes(planes: list[np.ndarray]) -> np.ndarray:
    if len(planes) == 1:
        return planes[0].astype(np.int32)
    if len(planes) == 2:
        out = planes[1].astype(np.uint16)
        out <<= 8
        out |= planes[0]
        return out
    out = planes[0].astype(np.int32)
    for p, plane in enumerate(planes[1:], start=1):
        out |= plane.astype(np.int32) << (8 * p)
    return out


def quantize_topk(logprobs: np.ndarray, step: float = LP_STEP) -> np.ndarray:
    """(n, k) log-probabilities sorted descending -> (n, k) uint16 gaps between quantized ranks.

    Rounding is monotonic, so sorted input gives non-decreasing codes and non-negative gaps.
    """
    q = np.multiply(logprobs, np.float32(-1.0 / step), dtype=np.float32)
    np.rint(q, out=q)
    np.clip(q, 0, Q_MAX, out=q)
    codes = q.astype(np.uint16)
    gaps = np.empty_like(codes)
    gaps[:, :1] = codes[:, :1]
    np.subtract(codes[:, 1:], codes[:, :-1], out=gaps[:, 1:])
    return gaps


def dequantize_topk(gaps: np.ndarray, step: float = LP_STEP) -> np.ndarray:
    q = np.cumsum(gaps, axis=1, dtype=np.uint16)
    out = q.astype(np.float32)
    out *= np.float32(-step)
    return out


def quantize_neglog(x: np.ndarray, step: float = AUX_STEP) -> np.ndarray:
    """Log-values <= 0 -> uint16; -inf (and anything below -(Q_MAX-1)*step) -> Q_MAX."""
    q = np.rint(-np.asarray(x, dtype=np.float64) / step)
    q = np.where(q >= Q_MAX, Q_MAX, np.clip(q, 0, Q_MAX - 1))
    return q.astype(np.uint16)


def dequantize_neglog(q: np.ndarray, step: float = AUX_STEP) -> np.ndarray:
    out = q.astype(np.float32) * np.float32(-step)
    out[q == Q_MAX] = -np.inf
    return out


def tail_logmass(topk_logprobs: np.ndarray) -> np.ndarray:
    """log(1 - sum(exp(top-k))) in float64; -inf where the top-k hold all the mass."""
    mass = np.exp(topk_logprobs.astype(np.float64)).sum(axis=1)
    rest = 1.0 - mass
    with np.errstate(divide="ignore"):
        return np.where(rest > 0, np.log(np.maximum(rest, 1e-300)), -np.inf)


def frequency_table(ids: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(code -> id table of the ids present, id -> code map) ordered by descending frequency."""
    counts = np.bincount(ids.reshape(-1), minlength=vocab_size)
    order = np.argsort(-counts, kind="stable")
    table = order[: int(np.count_nonzero(counts))].astype(np.int32)
    inverse = np.zeros(vocab_size, dtype=np.int32)
    inverse[table] = np.arange(len(table), dtype=np.int32)
    return table, inverse


def quantize_sorted_runs(logprobs: np.ndarray, sizes: np.ndarray, step: float = LP_STEP) -> np.ndarray:
    """Flat log-probabilities, descending within each run of `sizes` -> uint16 gaps (a run's first: absolute).

    The variable-length form of `quantize_topk`, for the distinct ids drawn at each position.
    """
    q = np.multiply(logprobs, np.float32(-1.0 / step), dtype=np.float32)
    np.rint(q, out=q)
    np.clip(q, 0, Q_MAX, out=q)
    codes = q.astype(np.uint16)
    gaps = codes.copy()
    if codes.size > 1:
        np.subtract(codes[1:], codes[:-1], out=gaps[1:])
        starts = run_starts(sizes)
        gaps[starts] = codes[starts]
    return gaps


def dequantize_sorted_runs(gaps: np.ndarray, sizes: np.ndarray, step: float = LP_STEP) -> np.ndarray:
    if gaps.size == 0:
        return np.zeros(0, np.float32)
    total = np.cumsum(gaps, dtype=np.int64)  # running sum across runs, then remove each run's offset
    starts = run_starts(sizes)
    offset = np.zeros(len(gaps), np.int64)
    offset[starts] = total[starts] - gaps[starts]
    np.maximum.accumulate(offset, out=offset)
    out = (total - offset).astype(np.float32)
    out *= np.float32(-step)
    return out


def run_starts(sizes: np.ndarray) -> np.ndarray:
    """Indices where the non-empty runs of `sizes` begin in the flat array."""
    sizes = np.asarray(sizes, dtype=np.int64)
    starts = np.cumsum(sizes) - sizes
    return starts[sizes > 0]


def predicted_counts(lp_codes: np.ndarray, tail_codes: np.ndarray | None, samples: int, lp_step: float,
                     aux_step: float, temperature: float) -> np.ndarray:
    """Expected count of each drawn id, N * p / tail, from the quantized codes alone (so the decoder gets the same
    numbers): counts are stored as their difference from it. Code * step is exact in float64 (the steps are
    powers of two). At a proposal temperature other than 1 the proposal's normalizer is unknown here: 1."""
    if temperature != 1.0:
        return np.ones(len(lp_codes), dtype=np.int64)
    x = -lp_codes.astype(np.float64) * lp_step
    if tail_codes is not None:
        x += tail_codes.astype(np.float64) * aux_step
    return np.maximum(1, np.floor(samples * np.exp(np.minimum(x, 0.0)) + 0.5)).astype(np.int64)


def zigzag(x: np.ndarray) -> np.ndarray:
    """Signed -> unsigned, small magnitudes to small codes: 0, -1, 1, -2, ... -> 0, 1, 2, 3, ..."""
    x = x.astype(np.int64)
    return np.where(x >= 0, 2 * x, -2 * x - 1)


def unzigzag(u: np.ndarray) -> np.ndarray:
    u = u.astype(np.int64)
    return np.where(u % 2 == 0, u // 2, -(u + 1) // 2)
