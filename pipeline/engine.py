"""What a teacher engine gives back, and how one is chosen."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
from adakd.common.tokens import Tokenized

from .sampling import Draws


class EngineError(Exception):
    """The teacher could not be loaded or run; the message says what to change."""


@dataclass
class Scored:
    """The teacher's sparse targets at one sequence's trained positions (rows follow the loss mask)."""

    record: int
    topk_ids: np.ndarray  # (n, k) int32, descending log-probability
    topk_logprobs: np.ndarray  # (n, k) float32
    target_logprob: np.ndarray  # (n,) float32
    draws: Draws | None = None  # sampled and hybrid caches: the teacher's draws at the same rows


class TeacherEngine(Protocol):
    name: str
    version: str
    vocab_size: int  # width of the teacher's logits (padded ids included)
    real_vocab: int  # ids below it are real tokens; the rest are padding, never stored in the top-k
    batch_tokens: int  # how many tokens one `score` call should get (rows x width)
    row_tokens: object  # packed rows (an int or common.packing.Rows); None: padded rows, one sequence each

    def score(self, batch: list[Tokenized]) -> list[Scored]: ...

    def close(self) -> None: ...


def vllm_available() -> bool:
    try:
        import importlib.util

        return importlib.util.find_spec("vllm") is not None
    except Exception:
        return False


def check_vocab(k: int, width: int, real_vocab: int | None) -> int:
    """The number of real ids: `width` logits, of which ids >= `real_vocab` (the tokenizer's size) are padding
    that the cache never stores. Refuses a tokenizer larger than the logits and a k larger than the real ids."""
    real = width if real_vocab is None else int(real_vocab)
    if not 1 <= real <= width:
        raise EngineError(f"the tokenizer has {real} tokens but the teacher only {width} outputs: they do not "
                          "belong together; pass the teacher's own tokenizer (--tokenizer)")
    if k > real:
        padded = f" ({width - real} more outputs are padding)" if real < width else ""
        raise EngineError(f"--top-k {k} is larger than the teacher's vocabulary ({real}){padded}")
    return real


def trained_rows(seq: Tokenized) -> np.ndarray:
    """Rows of a (L - 1)-row per-position array that predict the trained labels."""
    return np.flatnonzero(seq.loss_mask) - 1
