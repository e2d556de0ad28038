"""What a teacher engine gives back, and how one is chosen."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .tokens import Tokenized


class EngineError(Exception):
    """The teacher could not be loaded or run; the message says what to change."""


@dataclass
class Scored:
    """The teacher's sparse targets at one sequence's trained positions (rows follow the loss mask)."""

    record: int
    topk_ids: np.ndarray  # (n, k) int32, descending log-probability
    topk_logprobs: np.ndarray  # (n, k) float32
    target_logprob: np.ndarray  # (n,) float32


class TeacherEngine(Protocol):
    name: str
    version: str
    vocab_size: int  # size of the teacher's output distribution
    batch_tokens: int  # how many tokens one `score` call should get

    def score(self, batch: list[Tokenized]) -> list[Scored]: ...

    def close(self) -> None: ...


def vllm_available() -> bool:
    try:
        import importlib.util

        return importlib.util.find_spec("vllm") is not None
    except Exception:
        return False


def trained_rows(seq: Tokenized) -> np.ndarray:
    """Rows of a (L - 1)-row per-position array that predict the trained labels."""
    return np.flatnonzero(seq.loss_mask) - 1
