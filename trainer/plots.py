"""`train-student --plot`: what the run did, one quantity per axis (KD and CE are different quantities, a ratio
and a temperature too), so that a user sees LATF narrow and widen and IDTS heat or cool positions."""

from __future__ import annotations

from typing import Any

import numpy as np


def _series(history: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in history if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_training(history: list[dict[str, Any]], temp_hist: np.ndarray, edges: np.ndarray, path: str, title: str = "",
                  kd_weight: float = 1.0) -> None:
    """KD loss with LATF's moving average and reference; CE (when mixed); LATF's ratio; the difficulty quantiles;
    IDTS's mean temperature of the harder and easier halves; its saturated share; all the temperatures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(20, 8.4))
    ax = list(axes.flat)
    steps = [r["step"] for r in history]
    a = ax.pop(0)
    a.plot(steps, [r["kd"] for r in history], color="#3366aa", lw=1, label="KD loss of the step")
    for key, style, label in (("latf_ema", "-", "LATF's moving average E"), ("latf_reference", "--", "LATF's reference R")):
        x, y = _series(history, key)
        if x:
            a.plot(x, y, style, color="#aa3366", lw=1.2, label=label)
    a.set(title="KD loss (distilled positions)", xlabel="optimizer step", ylabel="mean T_i² · D (nats)")
    a.legend(fontsize=8)
    if kd_weight < 1:
        a = ax.pop(0)
        a.plot(steps, [r["ce"] for r in history], color="#444444")
        a.set(title="cross-entropy of the true tokens", xlabel="optimizer step", ylabel="nats per position")
    a = ax.pop(0)
    a.plot(steps, [r["latf_ratio"] for r in history], color="#aa3366")
    a.set(title="LATF: share of positions distilled", xlabel="optimizer step", ylabel="ratio r", ylim=(0, 1.05))
    a = ax.pop(0)
    for key, color in (("difficulty_p10", "#99bbdd"), ("difficulty_p50", "#3366aa"), ("difficulty_p90", "#99bbdd")):
        x, y = _series(history, key)
        if x:
            a.plot(x, y, color=color, lw=1, label=key.split("_")[1])
    a.set(title="difficulty (Hellinger) of the trained positions", xlabel="optimizer step", ylabel="quantile",
          ylim=(0, 1.02))
    a.legend(fontsize=8)
    a = ax.pop(0)
    for key, color, label in (("temp_hard", "#3366aa", "harder than the median"),
                              ("temp_easy", "#dd8833", "easier than the median")):
        x, y = _series(history, key)
        if x:
            a.plot(x, y, color=color, lw=1, label=label)
    a.set(title="IDTS: mean temperature", xlabel="optimizer step", ylabel="T_i")
    a.legend(fontsize=8)
    a = ax.pop(0)
    x, y = _series(history, "temp_saturated")
    if x:
        a.plot(x, y, color="#444444", lw=1)
    a.set(title="IDTS: share at saturated temperatures (|tanh| > 0.9)", xlabel="optimizer step", ylabel="share",
          ylim=(-0.02, 1.02))
    a = ax.pop(0)
    a.bar(edges[:-1], temp_hist, width=np.diff(edges), align="edge", color="#3366aa")
    a.set(title="IDTS per-token temperatures, all steps", xlabel="temperature T_i", ylabel="distilled positions")
    for rest in ax:
        rest.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
