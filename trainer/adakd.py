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
    latf: bool = True
    idts: bool = True
    loss_ratio_eps: float = 0.05  # eps: relative loss change that moves the ratio
    ratio_step: float = 0.05  # sigma
    ema_decay: float = 0.99  # d
    min_ratio: float = 0.1
    temperature_scale: float = 0.5  # c

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


def idts_temperatures(difficulty: torch.Tensor, base: float, scale: float) -> torch.Tensor:
    """T_i = base * exp(-scale * tanh(ln(max(s_i / median, 1e-8)))): harder than the median -> colder.

    The median is torch.median's (the lower middle value for an even count).
    """
    if difficulty.numel() == 0:
        return difficulty.new_empty(0)
    m = difficulty.median()
    ratio = torch.clamp(difficulty / m, min=1e-8) if m > 0 else torch.ones_like(difficulty)
    u = torch.tanh(torch.log(ratio))
    return base * torch.exp(-scale * u)
