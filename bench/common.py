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


def replace_block(path: Path, begin: str, end: str, body: str, heading: str = "") -> None:
    """Replace a benchmark's generated block of a docs page (appended, under `heading`, when absent), keeping the
    hand-written text around it."""
    text = path.read_text() if path.exists() else "# Results\n"
    if begin not in text:
        text = text.rstrip("\n") + "\n\n" + (f"{heading}\n\n" if heading else "") + f"{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1] if end in rest else ""
    path.write_text(f"{head}{begin}\n{body}\n{end}{tail}")


def save_figure(fig, path: Path) -> str:
    """Write a matplotlib figure (folders made as needed) and close it; returns the path."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return str(path)
