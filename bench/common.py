"""What several benchmarks share: where ../shared is, the real GPT-2 tokenizer, one-core settings."""

from __future__ import annotations

import json
import os
from pathlib import Path

SHARED = Path(os.environ.get("ADAKD_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def gpt2_tokenizer():
    """The real 50,257-token GPT-2 tokenizer from ../shared/tokenizers/gpt2 (vocab.json + merges.txt)."""
    from transformers import GPT2TokenizerFast

    d = SHARED / "tokenizers" / "gpt2"
    vocab = json.loads((d / "vocab.json").read_text())
    merges = [tuple(line.split()) for line in (d / "merges.txt").read_text().splitlines() if line and not line.startswith("#")]
    return GPT2TokenizerFast(vocab=vocab, merges=merges)


def one_core() -> None:
    import pyarrow as pa
    import torch

    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    torch.set_num_threads(1)
