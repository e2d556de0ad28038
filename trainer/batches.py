"""Cache sequences -> token-budget batches (packed rows by default, `common.packing`) with the targets of their
trained positions, in stream order whatever the layout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from adakd.common.packing import DEFAULT_ROW_TOKENS, Layout, PaddedPlanner, grouped, planner
from adakd.storage import Cursor, SequenceStream, SequenceTargets

from .kd_loss import Targets


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) int64, padded with 0
    attention_mask: torch.Tensor | None  # (B, T) int64: padded rows, one sequence each; None when packed
    rows: torch.Tensor  # (N,) batch row of each trained position
    cols: torch.Tensor  # (N,) model position whose output predicts the label
    targets: Targets
    tokens: int  # real (unpadded) tokens
    cursor: Cursor  # the stream position after this batch's last sequence
    position_ids: torch.Tensor | None = None  # (B, T) int64: packed rows, restarting at each sequence; else None
    sequences: int = 0  # sequences in the batch
    real_mask: torch.Tensor | None = None  # (B, T) bool: packed rows, true on real tokens (the router loss's mask)

    @property
    def computed(self) -> int:
        """Tokens the model computes (rows x width, padding included)."""
        return int(self.input_ids.numel())

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """What the model's forward takes: input_ids and attention_mask (padded) or position_ids (packed)."""
        out = {"input_ids": self.input_ids}
        if self.position_ids is not None:
            out["position_ids"] = self.position_ids
        else:
            out["attention_mask"] = self.attention_mask
        return out

    def to(self, device: torch.device | str) -> "Batch":
        t = self.targets
        move = lambda x: None if x is None else x.to(device)  # noqa: E731
        return Batch(
            self.input_ids.to(device), move(self.attention_mask), self.rows.to(device), self.cols.to(device),
            Targets(t.topk_ids.to(device), t.topk_logprobs.to(device), t.tail_logmass.to(device), t.labels.to(device),
                    t.vocab_size, move(t.weights)),
            self.tokens, self.cursor, move(self.position_ids), self.sequences, move(self.real_mask),
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


def padded_layout(seqs: list[SequenceTargets]) -> Layout:
    """One sequence per row, right-padded (the layout of --no-packing)."""
    p = PaddedPlanner(1)
    p.lengths = [len(s.input_ids) for s in seqs]
    return p.layout()


def collate(seqs: list[SequenceTargets], vocab_size: int, cursor: Cursor, sample_temperature: float = 1.0,
            layout: Layout | None = None) -> Batch:
    """One batch of sequences laid out as `layout` says (default: padded rows); the targets follow the
    sequences' order whatever the layout. A sampled or hybrid cache's targets as weighted supports
    (`weighted_support`, `sample_temperature`: the cache's proposal temperature tau)."""
    layout = layout or padded_layout(seqs)
    block = layout.block([s.input_ids for s in seqs])
    rows, cols = [], []
    for i, s in enumerate(seqs):
        r, c = layout.place(i, s.positions)
        rows.append(r)
        cols.append(c)
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
    return Batch(block["input_ids"], block.get("attention_mask"), cat(rows, np.int64), cat(cols, np.int64), targets,
                 layout.tokens, cursor, block.get("position_ids"), len(seqs), layout.real_mask() if layout.packed else None)


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
            sample_temperature: float = 1.0, row_tokens: int | None = DEFAULT_ROW_TOKENS) -> Iterator[Batch]:
    """Consecutive sequences of the stream in batches of at most `batch_tokens` computed tokens (rows x width; a
    longer sequence goes alone): packed into rows of `row_tokens` (None: padded rows, one sequence each),
    sequences cut to `max_length` tokens when given. `sample_temperature`: a sampled or hybrid cache's proposal
    temperature (its `encoding.sample_temperature`), for the draws' importance weights.

    A batch holds whole consecutive sequences and its cursor is the stream position after its last one, so
    resuming from it continues with exactly the next batch."""

    def with_cursors() -> Iterator[tuple[SequenceTargets | None, Cursor]]:
        for seq in stream:
            if max_length is not None:
                seq = truncate(seq, max_length)  # None when no trained position is left: skipped, cursor moves on
            yield seq, stream.cursor

    for items, layout in grouped(with_cursors(), lambda item: len(item[0].input_ids) if item[0] is not None else 0,
                                 planner(batch_tokens, row_tokens)):
        seqs = [seq for seq, _ in items if seq is not None]
        if seqs:
            yield collate(seqs, vocab_size, items[-1][1], sample_temperature, layout)
