"""Shared builders for tests: exact teacher distributions and the sequences a writer takes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from adakd.storage import CacheInfo, Encoding, SequenceTargets

SHARED = Path(os.environ.get("ADAKD_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def make_sequence(rng: np.random.Generator, record: int, vocab: int, k: int, length: int | None = None) -> tuple[SequenceTargets, np.ndarray]:
    """A sequence with exact top-k targets from random logits of varied sharpness; returns the full log-probs too."""
    L = int(length or rng.integers(4, 40))
    ids = rng.integers(0, vocab, L).astype(np.int32)
    mask = np.zeros(L, bool)
    mask[rng.integers(1, L - 1):] = True
    n = int(mask.sum())
    sharp = rng.choice([0.5, 2.0, 6.0, 15.0], size=(n, 1))
    full = log_softmax(rng.standard_normal((n, vocab)) * sharp).astype(np.float32)
    order = np.argsort(-full, axis=1, kind="stable")[:, :k]
    topk_lp = np.take_along_axis(full, order, 1)
    labels = ids[mask]
    seq = SequenceTargets(
        record=record, input_ids=ids, loss_mask=mask, topk_ids=order.astype(np.int32), topk_logprobs=topk_lp,
        target_logprob=full[np.arange(n), labels],
    )
    return seq, full


def make_info(vocab: int = 300, k: int = 16, num_workers: int = 1, **over) -> CacheInfo:
    base = dict(
        teacher={"name_or_path": "test-teacher", "fingerprint": "sha256:0", "dtype": "float32"},
        tokenizer={"name_or_path": "test-tok", "fingerprint": "sha256:1", "vocab_size": vocab},
        engine={"name": "test", "version": "0"},
        dataset={"spec": {"path": "synthetic"}, "fingerprint": "sha256:2"},
        encoding=Encoding(k=k, vocab_size=vocab), prompt_template=None, max_length=64, num_workers=num_workers,
    )
    base.update(over)
    return CacheInfo(**base)


def draw_by_hand(z: np.ndarray, u: float, temperature: float, top_p: float) -> tuple[int, float]:
    """The student sampler's documented rule (adakd.common.sampler) in numpy, the one reference `adakd generate`
    and `eval --generate` are both checked against: (id, log-probability under the distribution sampled from)."""
    if temperature == 0:
        lp = z - z.max() - np.log(np.exp(z - z.max()).sum())
        t = int(np.argmax(z))
        return t, float(lp[t])
    x = z / temperature
    q = np.exp(x - x.max())
    q /= q.sum()
    order = np.argsort(-q, kind="stable")
    qs = q[order]
    if top_p < 1:
        qs = np.where(np.cumsum(qs) - qs < top_p, qs, 0.0)
    cum = np.cumsum(qs)
    t = int(order[min(int(np.searchsorted(cum, u * cum[-1], side="right")), len(q) - 1)])
    return t, float(np.log(q[t] / cum[-1]))
