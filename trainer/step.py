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

from .adakd import LATFState, idts_summary, selected_count
from .batches import Batch
from .distributed import all_sum
from .errors import TrainError
from .head import base_outputs, final_hidden, output_head
from .kd_loss import LossConfig, kd_loss
from .router import aux_mask, router_loss


class StudentLoss(torch.nn.Module):
    """Wraps the student so DDP/FSDP see one forward: hidden states at trained positions -> loss.

    A mixture-of-experts student whose family trains with a router load-balancing loss (`trainer.router`)
    gets it added, unless `router_aux_loss` is False: coef * aux of the micro-batch's router logits, weighted
    by the micro-batch's share of the step's trained positions (its rows / the step's, all ranks), so that a
    step of one micro-batch on one rank adds coef * aux exactly as the family's own training does, and
    gradient accumulation and data parallelism average it over the step's micro-batches by trained tokens,
    as they average CE and KD. The output's `router_aux` is aux x that share (summed over the step: the logged
    "router_aux", before the coefficient)."""

    def __init__(self, model: torch.nn.Module, cfg: LossConfig, router_aux_loss: bool = True):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.router = router_loss(model) if router_aux_loss else None

    def forward(self, inputs: dict[str, torch.Tensor], rows, cols, targets, latf_ratio: float,
                denominators: tuple[float, float] | None = None, real_mask: torch.Tensor | None = None):
        """`inputs`: the batch's `model_inputs()`; `real_mask`: a packed batch's real tokens (the router loss's
        mask); `denominators`: the step's counts (`forward_backward`), default this micro-batch's own."""
        if self.router is None:
            hidden = final_hidden(self.model, **inputs)
        else:
            base = base_outputs(self.model, **inputs, output_router_logits=True)
            hidden = base.last_hidden_state
            aux = self.router(base.router_logits, aux_mask(inputs, real_mask))
        out = kd_loss(hidden[rows, cols], output_head(self.model), targets, self.cfg, LATFState(ratio=latf_ratio),
                      denominators)
        loss = out.loss
        if self.router is not None:
            share = rows.numel() / denominators[0] if denominators is not None else 1.0
            loss = loss + (self.router.coef * share) * aux.to(loss.dtype)
            out.router_aux = float(aux.detach()) * share
        return loss, out


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
    router_aux: float | None = None  # an MoE student's router loss over the step (all ranks), before its coefficient
    idts: dict[str, float] | None = None  # `idts_summary` sums over the step (all ranks); None without IDTS
    difficulty: torch.Tensor | None = None  # this rank's difficulties of every trained position (AdaKD on), cpu

    def diagnostics(self) -> dict[str, float | None]:
        """What AdaKD did in this step, for the log: IDTS's saturated share and the mean temperatures of the
        positions harder and easier than the median; the difficulty quantiles (this rank's positions)."""
        out: dict[str, float | None] = dict.fromkeys(("temp_saturated", "temp_hard", "temp_easy", "difficulty_p10",
                                                       "difficulty_p50", "difficulty_p90"))
        s = self.idts
        if s is not None and s["n"]:
            out["temp_saturated"] = s["saturated"] / s["n"]
            out["temp_hard"] = s["hard_t"] / s["hard_n"] if s["hard_n"] else None
            out["temp_easy"] = s["easy_t"] / s["easy_n"] if s["easy_n"] else None
        if self.difficulty is not None and self.difficulty.numel():
            q = torch.quantile(self.difficulty.float(), torch.tensor([0.1, 0.5, 0.9])).tolist()
            out["difficulty_p10"], out["difficulty_p50"], out["difficulty_p90"] = q
        return out


def forward_backward(net: torch.nn.Module, micro: list[Batch], cfg: LossConfig, latf_ratio: float, world: int,
                     device: torch.device, autocast, step: int, live=None) -> StepResult:
    """Forward and backward over one optimizer step's micro-batches; gradients accumulate in the parameters."""
    valid, selected = all_sum(list(step_counts(micro, cfg, latf_ratio)), world, device)
    denominators = (max(valid, 1.0), max(selected, 1.0))
    kd_sum = ce_sum = aux_sum = 0.0
    temps, sel, val, tokens, computed, has_aux = [], 0, 0, 0, 0, False
    idts: dict[str, float] | None = None
    difficulty = []
    for b in micro:
        b = b.to(device)
        with autocast:
            if live is not None:
                b.targets = live.targets(b)
            loss, o = net(b.model_inputs(), b.rows, b.cols, b.targets, latf_ratio, denominators, b.real_mask)
        if not torch.isfinite(loss):
            raise TrainError(f"step {step}: the loss is {loss.item()} (not finite); lower --lr or check "
                             "the cache with `adakd verify`; the last checkpoint is intact")
        (loss * world).backward()  # DDP/FSDP average over ranks; the loss is already this rank's share of the sum
        kd_sum += o.kd_sum
        ce_sum += o.ce_sum
        if o.router_aux is not None:
            aux_sum += o.router_aux
            has_aux = True
        if o.idts_u is not None:
            part = idts_summary(o.idts_u, o.temperatures)
            idts = part if idts is None else {k: idts[k] + v for k, v in part.items()}
        if o.difficulties is not None:
            difficulty.append(o.difficulties.detach().cpu())
        temps.append(o.temperatures.cpu())
        sel += o.selected
        val += o.valid
        tokens += b.tokens
        computed += b.computed
    keys = sorted(idts) if idts is not None else []
    kd_sum, ce_sum, aux_sum, *idts_sums = all_sum([kd_sum, ce_sum, aux_sum, *(idts[k] for k in keys)], world, device)
    return StepResult(kd_sum / denominators[1], ce_sum / denominators[0], sel, val,
                      torch.cat(temps) if temps else torch.zeros(0), tokens, computed, aux_sum if has_aux else None,
                      dict(zip(keys, idts_sums)) if idts is not None else None,
                      torch.cat(difficulty) if difficulty else None)
