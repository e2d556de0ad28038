"""Cache sequences -> padded token-budget batches with the targets of their trained positions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from storage import Cursor, SequenceStream, SequenceTargets

from .kd_loss import Targets


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) int64, right-padded with 0
    attention_mask: torch.Tensor  # (B, T) int64
    rows: torch.Tensor  # (N,) batch row of each trained position
    cols: torch.Tensor  # (N,) model position whose output predicts the label
    targets: Targets
    tokens: int  # real (unpadded) tokens
    cursor: Cursor  # the stream position after this batch's last sequence

    def to(self, device: torch.device | str) -> "Batch":
        t = self.targets
        return Batch(
            self.input_ids.to(device), self.attention_mask.to(device), self.rows.to(device), self.cols.to(device),
            Targets(t.topk_ids.to(device), t.topk_logprobs.to(device), t.tail_logmass.to(device), t.labels.to(device),
                    t.vocab_size, t.weights.to(device) if t.weights is not None else None),
            self.tokens, self.cursor,
        )


def weighted_support(topk_ids: np.ndarray, topk_logprobs: np.ndarray, tail_logmass: np.ndarray | None,
                     sizes: np.ndarray, ids: np.ndarray, counts: np.ndarray, logprobs: np.ndarray,
                     sample_temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The (n, W) support ids, log-probabilities and multiplicities of n positions of a sampled or hybrid cache,
    W = k + the most distinct ids drawn at one position.

    Entries: the k head ids (multiplicity 1), then each position's distinct drawn ids j with the
    self-normalized importance weight m_j = tail * c_j * exp(-lp_j / tau) / sum_i c_i * exp(lp_i * (1 - 1/tau))
    (tau: the proposal temperature; tail: 1 when k = 0, else exp(tail_logmass)), so sum_j m_j p_j = tail;
    then padding (multiplicity 0) repeating the row's first entry. Computed in float64, stored float32.
    """
    n, k = topk_ids.shape
    sizes = np.asarray(sizes, dtype=np.int64)
    W = k + (int(sizes.max()) if n else 0)
    pos = np.repeat(np.arange(n), sizes)  # the position of each drawn entry
    start = np.concatenate([[0], np.cumsum(sizes)[:-1]]) if n else sizes
    col = k + np.arange(len(pos)) - np.repeat(start, sizes)
    lp = logprobs.astype(np.float64)
    inv = 1.0 / float(sample_temperature)
    log_tail = np.zeros(n) if k == 0 or tail_logmass is None else np.asarray(tail_logmass, dtype=np.float64)
    log_c = np.log(counts.astype(np.float64))
    a = log_c + lp * (1.0 - inv)  # the normalizer's terms, in log space: a logsumexp per position
    top = np.full(n, -np.inf)
    np.maximum.at(top, pos, a)
    norm = np.log(np.bincount(pos, weights=np.exp(a - top[pos]), minlength=n)[pos]) + top[pos]
    with np.errstate(over="ignore"):
        m = np.exp(log_tail[pos] + log_c - lp * inv - norm)
    m = np.minimum(m, np.finfo(np.float32).max)
    first = topk_ids[:, 0] if k else np.zeros(n, dtype=ids.dtype)
    first_lp = topk_logprobs[:, 0] if k else np.zeros(n, dtype=np.float32)
    if not k and len(pos):  # sampled: the row's first drawn id (a position with no draw keeps id 0, weight 0)
        has = sizes > 0
        first, first_lp = first.copy(), first_lp.copy()
        first[has], first_lp[has] = ids[start[has]], logprobs[start[has]]
    out_ids = np.repeat(first.astype(np.int64)[:, None], W, axis=1)
    out_lp = np.repeat(first_lp.astype(np.float32)[:, None], W, axis=1)
    out_w = np.zeros((n, W), dtype=np.float32)
    out_ids[:, :k], out_lp[:, :k], out_w[:, :k] = topk_ids, topk_logprobs, 1.0
    out_ids[pos, col], out_lp[pos, col], out_w[pos, col] = ids, logprobs, m
    return out_ids, out_lp, out_w


def collate(seqs: list[SequenceTargets], vocab_size: int, cursor: Cursor, sample_temperature: float = 1.0) -> Batch:
    """One batch of sequences; a sampled or hybrid cache's targets as weighted supports (`weighted_support`,
    `sample_temperature`: the cache's proposal temperature tau)."""
    T = max(len(s.input_ids) for s in seqs)
    ids = np.zeros((len(seqs), T), dtype=np.int64)
    mask = np.zeros((len(seqs), T), dtype=np.int64)
    rows, cols = [], []
    for b, s in enumerate(seqs):
        ids[b, : len(s.input_ids)] = s.input_ids
        mask[b, : len(s.input_ids)] = 1
        pos = s.positions
        rows.append(np.full(len(pos), b))
        cols.append(pos)
    cat = lambda xs, dt: torch.from_numpy(np.concatenate(xs).astype(dt, copy=False))  # noqa: E731
    targets = Targets(
        topk_ids=cat([s.topk_ids for s in seqs], np.int64),
        topk_logprobs=cat([s.topk_logprobs for s in seqs], np.float32),
        tail_logmass=cat([s.tail_logmass for s in seqs], np.float32),
        labels=cat([s.labels for s in seqs], np.int64),
        vocab_size=vocab_size,
    )
    if seqs[0].sampled:
        if not all(s.sampled for s in seqs):
            raise ValueError("a batch mixes sampled and top-k sequences")
        npcat = lambda name: np.concatenate([getattr(s, name) for s in seqs])  # noqa: E731
        ids_w, lp_w, w = weighted_support(targets.topk_ids.numpy(), targets.topk_logprobs.numpy(),
                                          targets.tail_logmass.numpy(), npcat("sample_sizes"), npcat("sample_ids"),
                                          npcat("sample_counts"), npcat("sample_logprobs"), sample_temperature)
        targets.topk_ids, targets.topk_logprobs = torch.from_numpy(ids_w), torch.from_numpy(lp_w)
        targets.weights = torch.from_numpy(w)
        targets.tail_logmass = cat([s.rest() for s in seqs], np.float32)  # from here on: the mass outside the support
    return Batch(torch.from_numpy(ids), torch.from_numpy(mask), cat(rows, np.int64), cat(cols, np.int64), targets,
                 int(mask.sum()), cursor)


def truncate(seq: SequenceTargets, max_length: int) -> SequenceTargets | None:
    """The first `max_length` tokens and the targets of the trained positions among them; None if none is left."""
    if len(seq.input_ids) <= max_length:
        return seq
    mask = seq.loss_mask[:max_length]
    n = int(mask.sum())
    if n == 0:
        return None
    extras = {k: v[:n] for k, v in seq.extras.items()}
    tail = seq.tail_logmass[:n] if seq.tail_logmass is not None else None
    samples = {}
    if seq.sampled:  # the first n positions' draws: the first sample_sizes[:n].sum() entries
        S = int(seq.sample_sizes[:n].sum())
        samples = {"sample_sizes": seq.sample_sizes[:n], "sample_ids": seq.sample_ids[:S],
                   "sample_counts": seq.sample_counts[:S], "sample_logprobs": seq.sample_logprobs[:S],
                   "rest_logmass": seq.rest()[:n]}
    return SequenceTargets(seq.record, seq.input_ids[:max_length], mask, seq.topk_ids[:n], seq.topk_logprobs[:n],
                           seq.target_logprob[:n], tail, extras, **samples)


def batches(stream: SequenceStream, batch_tokens: int, vocab_size: int, max_length: int | None = None,
            sample_temperature: float = 1.0) -> Iterator[Batch]:
    """Greedy token-budget batches (rows x longest <= batch_tokens; a longer sequence goes alone), sequences cut
    to `max_length` tokens when given. `sample_temperature`: a sampled or hybrid cache's proposal temperature
    (its `encoding.sample_temperature`), for the draws' importance weights."""
    cur: list[SequenceTargets] = []
    longest = 0
    last_cursor = stream.cursor
    for seq in stream:
        if max_length is not None:
            seq = truncate(seq, max_length)
            if seq is None:
                last_cursor = stream.cursor
                continue
        n = len(seq.input_ids)
        if cur and max(longest, n) * (len(cur) + 1) > batch_tokens:
            yield collate(cur, vocab_size, last_cursor, sample_temperature)
            cur, longest = [], 0
        cur.append(seq)
        longest = max(longest, n)
        last_cursor = stream.cursor
    if cur:
        yield collate(cur, vocab_size, last_cursor, sample_temperature)
