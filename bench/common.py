"""What several benchmarks share: where ../shared is, the real GPT-2 tokenizer, one-core settings."""

from __future__ import annotations

import json
import math
import os
import statistics
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


def step_memory(step, device) -> dict:
    """Peak memory of one call of `step` (run it once before, so that lasting allocations such as the optimizer
    state are made): on GPU max allocated; on CPU the RSS sampled every 0.5 ms after malloc_trim. `step_bytes` is the
    peak minus what was held just before the call. Run it in a process of its own: the RSS is the whole process's."""
    import ctypes
    import gc
    import threading
    import time

    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return {"peak_bytes": torch.cuda.max_memory_allocated(), "step_bytes": torch.cuda.max_memory_allocated() - base}
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed memory back, so RSS growth is the step's own
    base = rss()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.0005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    step()
    done.set()
    t.join()
    peak[0] = max(peak[0], rss())
    return {"peak_bytes": peak[0], "step_bytes": peak[0] - base}


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def t_cdf(x: float, df: int) -> float:
    """Student's t distribution function (Simpson's rule on the density; |error| < 1e-9 for the quantiles used)."""
    if x < 0:
        return 1.0 - t_cdf(-x, df)
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    f = lambda t: c * (1 + t * t / df) ** (-(df + 1) / 2)  # noqa: E731
    n = 4000
    h = x / n
    s = f(0) + f(x) + sum((4 if i % 2 else 2) * f(i * h) for i in range(1, n))
    return 0.5 + s * h / 3


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 0.5) of Student's t with df degrees of freedom, by bisection."""
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def paired(cache: list[float], live: list[float]) -> dict:
    """Mean of the per-seed differences a - b (paired by seed) and its 95% t-interval over seeds (None with one seed)."""
    if len(cache) != len(live) or not cache:
        raise ValueError("paired differences need the same seeds on both sides")
    d = [a - b for a, b in zip(cache, live)]
    mean = statistics.fmean(d)
    if len(d) < 2:
        return {"mean": mean, "ci95": None, "diffs": d}
    half = t_quantile(0.975, len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    return {"mean": mean, "ci95": [mean - half, mean + half], "diffs": d}


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
