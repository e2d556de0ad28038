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
                    t.vocab_size),
            self.tokens, self.cursor,
        )


def collate(seqs: list[SequenceTargets], vocab_size: int, cursor: Cursor) -> Batch:
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
    return SequenceTargets(seq.record, seq.input_ids[:max_length], mask, seq.topk_ids[:n], seq.topk_logprobs[:n],
                           seq.target_logprob[:n], tail, extras)


def batches(stream: SequenceStream, batch_tokens: int, vocab_size: int, max_length: int | None = None) -> Iterator[Batch]:
    """Greedy token-budget batches (rows x longest <= batch_tokens; a longer sequence goes alone), sequences cut
    to `max_length` tokens when given."""
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
            yield collate(cur, vocab_size, last_cursor)
            cur, longest = [], 0
        cur.append(seq)
        longest = max(longest, n)
        last_cursor = stream.cursor
    if cur:
        yield collate(cur, vocab_size, last_cursor)
