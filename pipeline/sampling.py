"""Teacher draws for `sampled` and `hybrid` caches: N tokens per trained position from the exact distribution.

The uniforms come from one generator per sequence, seeded by (seed, record), so a position's draws do not
depend on which batch, chunk, worker or resumed run scored it: shards stay byte-identical. Tokens are drawn
by inverse CDF over the full width (the real ids only; a hybrid cache's head ids excluded) at the proposal
temperature, and stored as the distinct ids with their counts and their log-probabilities at T = 1.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Sampler:
    samples: int  # N draws per position
    temperature: float = 1.0  # proposal: softmax(logits / temperature)
    seed: int = 0
    hybrid: bool = False  # draw from the tail outside the top-k head

    def uniforms(self, records: list[int], positions: list[int], device: torch.device | str) -> torch.Tensor:
        """(sum(positions), N) uniforms in [0, 1): each sequence's rows from its own seeded generator."""
        parts = []
        for record, n in zip(records, positions):
            g = torch.Generator().manual_seed(sequence_seed(self.seed, record))
            parts.append(torch.rand((n, self.samples), generator=g, dtype=torch.float64))
        u = torch.cat(parts) if parts else torch.zeros(0, self.samples, dtype=torch.float64)
        return u.to(device)


def sequence_seed(seed: int, record: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{record}".encode(), digest_size=8).digest(), "little") >> 1


@dataclass
class Draws:
    """Flat, position-major; within a position by descending log-probability, ties by ascending id."""

    sizes: np.ndarray  # (n,) int32
    ids: np.ndarray  # (S,) int32
    counts: np.ndarray  # (S,) int32
    logprobs: np.ndarray  # (S,) float32, T = 1
    rest: np.ndarray  # (n,) float32, log of the mass outside the head and the drawn ids (padded ids included)

    def rows(self, lo: int, hi: int) -> "Draws":
        """The draws of positions lo..hi-1."""
        off = np.concatenate([[0], np.cumsum(self.sizes, dtype=np.int64)])
        s0, s1 = off[lo], off[hi]
        return Draws(self.sizes[lo:hi], self.ids[s0:s1], self.counts[s0:s1], self.logprobs[s0:s1], self.rest[lo:hi])

    @staticmethod
    def concat(parts: list["Draws"]) -> "Draws":
        return Draws(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("sizes", "ids", "counts", "logprobs", "rest")))


@torch.no_grad()
def draw(logprobs: torch.Tensor, u: torch.Tensor, sampler: Sampler, real_vocab: int,
         head_ids: torch.Tensor | None = None) -> Draws:
    """N draws per row of (n, V) log-probabilities (log_softmax over the full width), with uniforms u (n, N).

    Padded ids (>= real_vocab) are never drawn; with `head_ids` (hybrid) neither are those, and a row whose
    remaining mass is zero gets no draws.
    """
    n, V = logprobs.shape
    picked, live, rest = [], [], []
    step = max(1, (1 << 24) // V)  # float64 CDFs of this many rows at a time (128 MiB)
    for r0 in range(0, n, step):
        i, ok = _inverse_cdf(logprobs[r0:r0 + step], u[r0:r0 + step], sampler, real_vocab,
                             None if head_ids is None else head_ids[r0:r0 + step])
        picked.append(i)
        live.append(ok)
        rest.append(_rest_logmass(logprobs[r0:r0 + step], i, None if head_ids is None else head_ids[r0:r0 + step]))
    idx = torch.cat(picked) if picked else torch.zeros(0, sampler.samples, dtype=torch.long, device=logprobs.device)
    live_rows = torch.cat(live) if live else torch.zeros(0, dtype=torch.bool, device=logprobs.device)
    idx = idx[live_rows]
    rows = torch.arange(n, device=logprobs.device)[live_rows].unsqueeze(1).expand_as(idx)
    keys, counts = torch.unique((rows * V + idx).reshape(-1), return_counts=True)
    r, ids = keys // V, keys % V
    lps = logprobs[r, ids].float()
    r, ids, counts, lps = (x.cpu().numpy() for x in (r, ids, counts, lps))
    order = np.lexsort((ids, -lps, r))
    rest_lm = torch.cat(rest).cpu().numpy() if rest else np.zeros(0, np.float32)
    return Draws(np.bincount(r, minlength=n).astype(np.int32), ids[order].astype(np.int32),
                 counts[order].astype(np.int32), lps[order].astype(np.float32), rest_lm.astype(np.float32))


def _rest_logmass(logprobs: torch.Tensor, drawn: torch.Tensor, head_ids: torch.Tensor | None) -> torch.Tensor:
    """log of the teacher's mass outside the head and the drawn ids, summed in float64 over the ids themselves
    (not 1 - the stored mass, which cancels when the rest is small)."""
    p = logprobs.double().exp()
    if head_ids is not None and head_ids.shape[1]:
        p.scatter_(1, head_ids.long(), 0.0)
    p.scatter_(1, drawn.long(), 0.0)  # a row without draws (empty tail) points at its last id with mass: no mass left
    return p.sum(1).log().float()


def _inverse_cdf(logprobs: torch.Tensor, u: torch.Tensor, sampler: Sampler, real_vocab: int,
                 head_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, N) drawn ids, and which rows have mass left to draw from. The CDF is summed in float64 so a
    rare token's interval is not lost to rounding over a large vocabulary."""
    V = logprobs.shape[1]
    z = logprobs.double()
    if sampler.temperature != 1.0:
        z = z / sampler.temperature
    if real_vocab < V:
        z[:, real_vocab:] = float("-inf")
    if head_ids is not None and head_ids.shape[1]:
        z.scatter_(1, head_ids.long(), float("-inf"))
    m = z.max(dim=1, keepdim=True).values
    live = torch.isfinite(m[:, 0])
    cdf = (z - torch.where(live[:, None], m, 0.0)).exp_().cumsum_(dim=1)  # exp(-inf) = 0: excluded ids add nothing
    total = cdf[:, -1:]
    idx = torch.searchsorted(cdf, (u * total).contiguous(), right=True)
    last = (cdf < total).sum(dim=1, keepdim=True)  # the last id with mass: where rounding lands past the end
    return torch.minimum(idx, last), live
