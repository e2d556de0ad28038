"""AdaKD (../shared/reference/adakd.md): which positions are distilled (LATF) and at what temperature (IDTS).

Difficulty, selection and temperatures are treated as constants (no gradient flows through them); the
official code lets gradients reach the temperatures, which changes gradients but not loss values.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass
class AdaKDConfig:
    """The published values are the defaults (../shared/reference/adakd.md)."""

    latf: bool = True
    idts: bool = True
    loss_ratio_eps: float = 0.05  # eps (--latf-eps): relative change of the loss's moving average that moves r
    ratio_step: float = 0.05  # sigma (--latf-step): r is multiplied by 1 -+ sigma
    ema_decay: float = 0.99  # d (--latf-decay): the moving average E = d E + (1 - d) loss
    min_ratio: float = 0.1  # the floor of r (--latf-floor)
    temperature_scale: float = 0.5  # c (--temperature-scale): T_i = T exp(-c u_i); c < 0: the official "soften"

    def __post_init__(self) -> None:
        checks = (("--latf-eps", self.loss_ratio_eps, 0.0 <= self.loss_ratio_eps < 1, "within [0, 1)"),
                  ("--latf-step", self.ratio_step, 0.0 < self.ratio_step < 1, "within (0, 1)"),
                  ("--latf-decay", self.ema_decay, 0.0 <= self.ema_decay < 1, "within [0, 1)"),
                  ("--latf-floor", self.min_ratio, 0.0 < self.min_ratio <= 1, "within (0, 1]"),
                  ("--temperature-scale", self.temperature_scale, math.isfinite(self.temperature_scale)
                   and abs(self.temperature_scale) <= 5, "a number within [-5, 5]"))
        for option, value, ok, what in checks:
            if not ok:
                raise ValueError(f"{option} must be {what}, not {value}")

    @property
    def enabled(self) -> bool:
        return self.latf or self.idts


def past_warmup(step: int, total: int, fraction: float) -> bool:
    """Whether the optimizer step about to be counted is past LATF's warm-up, counted as the official code does.

    `step` is 0-based (the number of optimizer steps already taken). The official loop numbers its
    iterations from 1 (global_step = step + 1) and sets the reference at the first iteration with
    `global_step > warmup_fraction * total`, the product real-valued and in Python floats, as there: the
    reference is set at 1-based iteration floor(fraction * total) + 1 (0.05 * 30 = 1.5: iteration 2; 0.05 * 100
    = 5.0: iteration 6; fraction 0: iteration 1). The LR warm-up (int-rounded, at least one step) is separate.
    """
    return step + 1 > fraction * total


@dataclass
class LATFState:
    """The loss-trend controller's state; saved in checkpoints."""

    ratio: float = 1.0
    ema: float | None = None
    reference: float | None = None


    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "LATFState":
        return cls(**d)


def latf_update(state: LATFState, loss: float, past_warmup: bool, cfg: AdaKDConfig) -> None:
    """One iteration of the controller, with the (data-parallel averaged) distillation loss value.

    Called once per optimizer step, after it, with `past_warmup=past_warmup(step, total, warmup_fraction)`
    (`step` 0-based, before the increment). The first call past the warm-up sets the reference R = E and
    moves nothing; later calls compare E with R.
    """
    state.ema = loss if state.ema is None else cfg.ema_decay * state.ema + (1 - cfg.ema_decay) * loss
    if not past_warmup:
        return
    if state.reference is None:
        state.reference = state.ema
        return
    R, E = state.reference, state.ema
    if (R - E) < -cfg.loss_ratio_eps * R:  # loss rising: widen the focus
        state.ratio = min(state.ratio * (1 + cfg.ratio_step), 1.0)
        state.reference = E
    elif (R - E) > cfg.loss_ratio_eps * R:  # loss falling: narrow to the hardest tokens
        state.ratio = max(state.ratio * (1 - cfg.ratio_step), cfg.min_ratio)
        state.reference = E


def selected_count(N: int, ratio: float) -> int:
    """How many of N positions LATF distills at this ratio: max(1, floor(ratio * N)), 0 when N = 0."""
    return max(1, math.floor(ratio * N)) if N else 0


def select(difficulty: torch.Tensor, ratio: float) -> torch.Tensor:
    """Indices of the n = `selected_count(N, ratio)` hardest positions (sorted ascending)."""
    N = difficulty.numel()
    n = selected_count(N, ratio)
    if n >= N:
        return torch.arange(N, device=difficulty.device)
    return torch.topk(difficulty, n, sorted=False).indices.sort().values


def idts_u(difficulty: torch.Tensor) -> torch.Tensor:
    """u_i = tanh(ln(max(s_i / median, 1e-8))) in (-1, 1): how far a position is above (u > 0, harder) or below the
    median difficulty. The median is torch.median's (the lower middle value for an even count).

    A median of 0 (half the positions or more already matched exactly) gives u = 0 for every position, so
    T_i = T: the official code divides by it and gets NaN temperatures (0/0) or tanh(ln(inf)) = 1, which then
    poison the loss; here such a micro-batch is distilled at the base temperature (docs/train-student.md)."""
    if difficulty.numel() == 0:
        return difficulty.new_empty(0)
    m = difficulty.median()
    ratio = torch.clamp(difficulty / m, min=1e-8) if m > 0 else torch.ones_like(difficulty)
    return torch.tanh(torch.log(ratio))


def idts_temperatures(difficulty: torch.Tensor, base: float, scale: float) -> torch.Tensor:
    """T_i = base * exp(-scale * u_i), u_i = `idts_u`: harder than the median -> colder for scale > 0 (the
    published direction), hotter for scale < 0 (the official code's "soften" direction)."""
    return base * torch.exp(-scale * idts_u(difficulty))


SATURATED = 0.9  # |u| above this: tanh is flat there, the temperature sits at its bound T * exp(-+scale)


def idts_summary(u: torch.Tensor, temps: torch.Tensor) -> dict[str, float]:
    """Sums that describe IDTS over a set of distilled positions (added over micro-batches and ranks, then
    divided): how many sit at saturated temperatures, and the temperatures of the harder and easier halves."""
    hard, easy = u > 0, u < 0
    return {"n": float(u.numel()), "saturated": float((u.abs() > SATURATED).sum()),
            "hard_n": float(hard.sum()), "hard_t": float(temps[hard].sum()),
            "easy_n": float(easy.sum()), "easy_t": float(temps[easy].sum())}
