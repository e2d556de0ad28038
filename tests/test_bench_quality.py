"""bench.quality's own logic: teacher batches, the summary over seeds, the generated block of docs/results.md."""

from __future__ import annotations

import numpy as np
import pytest

from bench.quality import BEGIN, END, length_batches, summarize, write_docs
from adakd.common.tokens import Tokenized


def test_length_batches_cover_every_sequence_once_within_the_budget():
    rng = np.random.default_rng(0)
    seqs = [Tokenized(i, np.zeros(int(n), np.int32), np.ones(int(n), bool)) for i, n in enumerate(rng.integers(5, 300, 3000))]
    out = length_batches(seqs, 2048, np.random.default_rng(1))
    seen = sorted(s.record for b in out for s in b)
    assert seen == list(range(3000))
    assert all(max(len(s.input_ids) for s in b) * len(b) <= 2048 for b in out)
    # similar lengths batch together: far less padding than a random order would give
    pad = sum(max(len(s.input_ids) for s in b) * len(b) - sum(len(s.input_ids) for s in b) for b in out)
    assert pad < 0.1 * sum(len(s.input_ids) for s in seqs)


def test_summary_gives_mean_and_sample_std_over_seeds():
    rows = [{"method": "A", "rougeL": x, "nll": 2 * x, "kl": 0.1, "top1": 0.5, "train_seconds": 1.0} for x in (1.0, 2.0, 3.0)]
    t = summarize(rows, ("A",))["A"]
    assert t["rougeL"] == pytest.approx((2.0, 1.0)) and t["nll"] == pytest.approx((4.0, 2.0)) and t["seeds"] == 3


def test_docs_block_is_replaced_and_hand_written_text_kept(tmp_path):
    p = tmp_path / "results.md"
    write_docs("first", p)
    p.write_text("# Results\n\nintro\n\n" + p.read_text().split("\n", 2)[2] + "\n## Findings\n\nkept\n")
    write_docs("second", p)
    text = p.read_text()
    assert "intro" in text and "## Findings\n\nkept" in text and "second" in text and "first" not in text
    assert text.count(BEGIN) == 1 and text.count(END) == 1
