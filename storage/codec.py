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
