"""The unit of a cache: one tokenized sequence and the teacher's sparse targets at its trained positions.

Alignment: token j of `input_ids` is a trained label when `loss_mask[j]` is true; the i-th trained
label's teacher distribution (row i of the per-position arrays) was computed from `input_ids[:j]`, i.e.
at model position j - 1. `loss_mask[0]` is always false (nothing predicts the first token).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class SequenceTargets:
    record: int  # index of the source record in the dataset: unique across a cache
    input_ids: np.ndarray  # (L,) int32, exactly the tokens the teacher scored
    loss_mask: np.ndarray  # (L,) bool, which tokens are trained labels
    topk_ids: np.ndarray  # (n, k) int32, n = loss_mask.sum(), sorted by descending log-probability
    topk_logprobs: np.ndarray  # (n, k) float32, log_softmax at temperature 1
    target_logprob: np.ndarray  # (n,) float32, log-probability of the actual label token
    tail_logmass: np.ndarray | None = None  # (n,) float32, log(1 - top-k mass); -inf when zero
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # optional (n,) float32 fields
    # Sampled and hybrid caches (None in top-k caches): the teacher's N draws at each trained position, as the
    # distinct ids drawn with their counts. Flat over the positions (position-major); within a position by
    # descending log-probability, ties by ascending id. In a `sampled` cache k = 0 (topk_* are (n, 0)) and the
    # draws come from the whole distribution; in a `hybrid` cache they come from the renormalized tail
    # outside the top-k (none where the tail is empty).
    sample_sizes: np.ndarray | None = None  # (n,) int32, distinct ids drawn at each position
    sample_ids: np.ndarray | None = None  # (S,) int32, S = sample_sizes.sum()
    sample_counts: np.ndarray | None = None  # (S,) int32 >= 1; a position's counts sum to N
    sample_logprobs: np.ndarray | None = None  # (S,) float32, the teacher's log-probability (T = 1) of each id
    rest_logmass: np.ndarray | None = None  # (n,) float32, log of the teacher's mass outside the stored ids (head and
    # drawn), computed exactly at capture; -inf when they are the whole vocabulary

    @property
    def num_positions(self) -> int:
        return int(self.topk_ids.shape[0])

    @property
    def sampled(self) -> bool:
        return self.sample_sizes is not None

    def rest(self) -> np.ndarray:
        """`rest_logmass`, or where it was not given (hand-made targets) log(1 - the stored ids' mass) in float64."""
        if self.rest_logmass is not None:
            return self.rest_logmass
        pos = np.repeat(np.arange(self.num_positions), self.sample_sizes)
        stored = np.exp(self.topk_logprobs.astype(np.float64)).sum(1) + np.bincount(
            pos, weights=np.exp(self.sample_logprobs.astype(np.float64)), minlength=self.num_positions)
        with np.errstate(divide="ignore"):
            return np.where(stored < 1, np.log(np.maximum(1 - stored, 1e-300)), -np.inf).astype(np.float32)

    @property
    def positions(self) -> np.ndarray:
        """Model positions (0-based) whose outputs the per-position rows describe."""
        return np.flatnonzero(self.loss_mask) - 1

    @property
    def labels(self) -> np.ndarray:
        """The actual next token at each trained position."""
        return self.input_ids[self.loss_mask]
