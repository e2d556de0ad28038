"""One optimizer step's forward and backward passes over its micro-batches, normalized per trained token.

The step minimizes (1 - a) * CE + a * KD where CE is the mean over every trained position of the step and KD
the mean of T_i^2 * D over every distilled position of the step: all micro-batches of the gradient
accumulation and all data-parallel ranks together. Each micro-batch's loss is its share of those means (its
sums over the step's global counts), scaled by the world size because DDP and FSDP average gradients over
ranks. So a token weighs the same whether its sequence landed in a long or a short micro-batch, on this rank
or another, and grad-accum 4 equals the same tokens in one micro-batch (tests/test_step.py). What stays per
micro-batch, as in the official AdaKD code: LATF's selection (the hardest floor(r * N) of the micro-batch's N
positions) and IDTS's median.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .adakd import LATFState, selected_count
from .batches import Batch
from .distributed import all_sum
from .errors import TrainError
from .head import final_hidden, output_head
from .kd_loss import LossConfig, kd_loss


class StudentLoss(torch.nn.Module):
    """Wraps the student so DDP/FSDP see one forward: hidden states at trained positions -> loss."""

    def __init__(self, model: torch.nn.Module, cfg: LossConfig):
        super().__init__()
        self.model = model
        self.cfg = cfg

    def forward(self, inputs: dict[str, torch.Tensor], rows, cols, targets, latf_ratio: float,
                denominators: tuple[float, float] | None = None):
        hidden = final_hidden(self.model, **inputs)
        out = kd_loss(hidden[rows, cols], output_head(self.model), targets, self.cfg, LATFState(ratio=latf_ratio),
                      denominators)
        return out.loss, out


def step_counts(micro: list[Batch], cfg: LossConfig, latf_ratio: float) -> tuple[int, int]:
    """(trained positions, distilled positions) of these micro-batches: LATF distills floor(r * N) of each."""
    valid = [int(b.targets.labels.numel()) for b in micro]
    if cfg.kd_weight > 0 and cfg.adakd.enabled and cfg.adakd.latf:
        return sum(valid), sum(selected_count(n, latf_ratio) for n in valid)
    return sum(valid), sum(valid)


@dataclass
class StepResult:
    kd: float  # mean T_i^2 * D over the step's distilled positions (all ranks)
    ce: float  # mean CE over the step's trained positions (all ranks)
    selected: int  # this rank's distilled positions
    valid: int  # this rank's trained positions
    temperatures: torch.Tensor  # this rank's per-position temperatures (cpu)
    tokens: int  # this rank's real tokens
    computed: int  # this rank's computed tokens (rows x width)


def forward_backward(net: torch.nn.Module, micro: list[Batch], cfg: LossConfig, latf_ratio: float, world: int,
                     device: torch.device, autocast, step: int, live=None) -> StepResult:
    """Forward and backward over one optimizer step's micro-batches; gradients accumulate in the parameters."""
    valid, selected = all_sum(list(step_counts(micro, cfg, latf_ratio)), world, device)
    denominators = (max(valid, 1.0), max(selected, 1.0))
    kd_sum = ce_sum = 0.0
    temps, sel, val, tokens, computed = [], 0, 0, 0, 0
    for b in micro:
        b = b.to(device)
        with autocast:
            if live is not None:
                b.targets = live.targets(b)
            loss, o = net(b.model_inputs(), b.rows, b.cols, b.targets, latf_ratio, denominators)
        if not torch.isfinite(loss):
            raise TrainError(f"step {step}: the loss is {loss.item()} (not finite); lower --lr or check "
                             "the cache with `adakd verify`; the last checkpoint is intact")
        (loss * world).backward()  # DDP/FSDP average over ranks; the loss is already this rank's share of the sum
        kd_sum += o.kd_sum
        ce_sum += o.ce_sum
        temps.append(o.temperatures.cpu())
        sel += o.selected
        val += o.valid
        tokens += b.tokens
        computed += b.computed
    kd_sum, ce_sum = all_sum([kd_sum, ce_sum], world, device)
    return StepResult(kd_sum / denominators[1], ce_sum / denominators[0], sel, val,
                      torch.cat(temps) if temps else torch.zeros(0), tokens, computed)
