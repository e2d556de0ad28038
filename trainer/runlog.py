"""What a training run tells its user as it goes: `OUT/train_log.jsonl` (one line per step, every step once across
resumes), the progress line, TensorBoard, and at the end `--plot` (trainer/plots.py) and `temperatures.json`."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import TrainError


def open_log(path: Path, start: int):
    """The step log for appending, without the steps after `start` that an interrupted run logged past its
    last checkpoint (they are run again), so every step appears once."""
    if path.exists():
        keep = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= start:
                    keep.append(line + "\n")
            except (json.JSONDecodeError, AttributeError):
                continue  # a line torn by a kill
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, path)
    return open(path, "a")


def _basename(location: str) -> str:
    """The last part of a path or URI (before a URI's query), for a plot's title."""
    return location.partition("?")[0].rstrip("/").rsplit("/", 1)[-1]


def temperature_range(base: float, scale: float) -> tuple[float, float]:
    """The histogram's range: IDTS temperatures lie within base * exp(-+|scale|)."""
    c = max(abs(scale), 0.1)
    return base * math.exp(-c) * 0.95, base * math.exp(c) * 1.05


def progress_line(rec: dict[str, Any]) -> str:
    """loss, LATF's ratio, IDTS's harder/easier temperatures and saturated share (when on), tokens/s."""
    parts = [f"loss {rec['loss']:.4f}", f"latf {rec['latf_ratio']:.2f}"]
    if rec.get("temp_hard") is not None:
        parts.append(f"T hard/easy {rec['temp_hard']:.2f}/{rec['temp_easy']:.2f}")
    if rec.get("temp_saturated") is not None:
        parts.append(f"sat {rec['temp_saturated']:.0%}")
    parts.append(f"{rec['tokens_per_s']:,.0f} tok/s")
    return ", ".join(parts)


class RunLog:
    """JSONL per step (rank 0), a progress bar, optional TensorBoard, and data for --plot."""

    BINS = 60

    def __init__(self, out: Path, rank: int, cfg, total: int, start: int, name: str | None = None):
        self.rank, self.cfg, self.out = rank, cfg, out
        self.name = name or str(out)  # --out as the user gave it (out may be a store's local staging directory)
        self.last: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self.temp_range = temperature_range(cfg.loss.temperature, cfg.loss.adakd.temperature_scale)
        self.temp_hist = np.zeros(self.BINS)
        self.file = self.bar = self.tb = None
        if rank != 0:
            return
        out.mkdir(parents=True, exist_ok=True)
        self.file = open_log(out / "train_log.jsonl", start)
        if cfg.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", desc="train-student", dynamic_ncols=True)
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise TrainError("--tensorboard needs the tensorboard package: pip install tensorboard") from e
            self.tb = SummaryWriter(str(out / "tensorboard"))

    def step(self, rec: dict[str, Any], temps: torch.Tensor) -> None:
        self.last = rec
        if self.rank != 0:
            return
        self.history.append(rec)
        if len(temps):
            self.temp_hist += np.histogram(temps.numpy(), bins=self.BINS, range=self.temp_range)[0]
        if rec["step"] % self.cfg.log_every == 0:
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(progress_line(rec), refresh=False)
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, rec["step"])

    def close(self) -> None:
        if self.rank != 0:
            return
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.cfg.plot and self.history:
            from .plots import plot_training

            cfg = self.cfg
            T = cfg.loss.temperature
            title = (f"{_basename(self.name)}: {cfg.loss.loss}" + (" + AdaKD" if cfg.loss.adakd.enabled else "")
                     + f", a = {cfg.loss.kd_weight:g}, T = {T:g}, student {Path(cfg.student).name}")
            edges = np.linspace(*self.temp_range, self.BINS + 1)
            plot_training(self.history, self.temp_hist, edges, str(self.out / "train_plot.png"), title, cfg.loss.kd_weight)
            hist = {"edges": edges.tolist(), "counts": self.temp_hist.tolist()}
            (self.out / "temperatures.json").write_text(json.dumps(hist))  # this run's steps, for comparisons across runs
