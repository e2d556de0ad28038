"""The training loss from hidden states and the output projection, a chunk of positions at a time.

Never more than one chunk of (positions x vocabulary) float32 logits lives at once: each chunk's logits
are made, turned into the loss and its gradient (local autograd on the chunk), then projected back onto
the hidden states and the output weight, and freed. With AdaKD a first pass (no gradient) computes the
token difficulties; the second pass runs only over the selected positions when the loss is pure KD.

loss = (1 - a) * mean CE(true tokens) + a * mean over selected positions of T_i^2 * D(p^(T_i), q^(T_i))
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .adakd import AdaKDConfig, LATFState, idts_temperatures, select
from .losses import divergence, hellinger, student_buckets, teacher_buckets


@dataclass
class LossConfig:
    loss: str = "rkl"
    kd_weight: float = 1.0  # a
    temperature: float = 1.0  # T_base
    jsd_beta: float = 0.1
    skew: float = 0.1
    akl_mu: float = 0.5
    adakd: AdaKDConfig = field(default_factory=AdaKDConfig)
    chunk_positions: int = 1024

    def __post_init__(self) -> None:
        divergence(self.loss)  # refuses unknown names early
        if not 0.0 <= self.kd_weight <= 1.0:
            raise ValueError(f"--kd-weight must be within [0, 1], not {self.kd_weight}")
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be positive, not {self.temperature}")

    def divergence_kwargs(self) -> dict:
        return {"jsd_beta": self.jsd_beta, "skew": self.skew, "akl_mu": self.akl_mu}


@dataclass
class Targets:
    """Teacher targets at the valid positions of a batch (all on the training device)."""

    topk_ids: torch.Tensor  # (N, k) int64
    topk_logprobs: torch.Tensor  # (N, k) float32
    tail_logmass: torch.Tensor  # (N,) float32
    labels: torch.Tensor  # (N,) int64
    vocab_size: int

    def index(self, idx: torch.Tensor) -> "Targets":
        return Targets(self.topk_ids[idx], self.topk_logprobs[idx], self.tail_logmass[idx], self.labels[idx], self.vocab_size)


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, differentiable
    kd: float  # mean T^2 * D over the selected positions
    ce: float  # mean CE over all valid positions (computed when a < 1)
    valid: int
    selected: int
    temperatures: torch.Tensor  # (selected,), detached


def _logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    z = h @ weight.to(h.dtype).t()
    return z if z.dtype == torch.float64 else z.float()


@torch.no_grad()
def difficulties(hidden: torch.Tensor, weight: torch.Tensor, t: Targets, chunk: int) -> torch.Tensor:
    """Hellinger distance between teacher and student on the coarse support, at temperature 1."""
    out = []
    for c in range(0, hidden.shape[0], chunk):
        sl = slice(c, c + chunk)
        lq = student_buckets(_logits(hidden[sl], weight), t.topk_ids[sl])
        lp = teacher_buckets(t.topk_logprobs[sl], t.tail_logmass[sl], t.vocab_size)
        out.append(hellinger(lp, lq))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


class _ChunkedLoss(torch.autograd.Function):
    """sum_i w_kd[i] * D_i(T_i) + w_ce[i] * CE_i, with gradients made chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, t: Targets, temps, w_kd, w_ce, cfg: LossConfig, sums: dict):
        D = divergence(cfg.loss)
        kwargs = cfg.divergence_kwargs()
        grad_h = torch.zeros_like(hidden)
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        kd_sum = torch.zeros((), dtype=acc, device=hidden.device)
        ce_sum = torch.zeros((), dtype=acc, device=hidden.device)
        use_ce = bool((w_ce != 0).any())
        use_kd = bool((w_kd != 0).any())
        w_compute = weight.to(hidden.dtype)
        for c in range(0, hidden.shape[0], cfg.chunk_positions):
            sl = slice(c, c + cfg.chunk_positions)
            h = hidden[sl]
            z = _logits(h, w_compute).requires_grad_(True)
            with torch.enable_grad():
                part = torch.zeros((), dtype=acc, device=hidden.device)
                if use_kd:
                    T = temps[sl]
                    d = D(teacher_buckets(t.topk_logprobs[sl], t.tail_logmass[sl], t.vocab_size, T),
                          student_buckets(z, t.topk_ids[sl], T), **kwargs)
                    part = part + (w_kd[sl] * d).sum()
                    kd_sum += ((w_kd[sl] > 0) * T.pow(2) * d).detach().sum()
                if use_ce:
                    ce = torch.nn.functional.cross_entropy(z, t.labels[sl], reduction="none")
                    part = part + (w_ce[sl] * ce).sum()
                    ce_sum += ce.detach().sum()
                (g,) = torch.autograd.grad(part, z)
            total += part.detach()
            g = g.to(hidden.dtype)
            grad_h[sl] = g @ w_compute
            grad_w += (g.t() @ h).to(acc)
        sums["kd"], sums["ce"] = float(kd_sum), float(ce_sum)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None, None, None, None, None


def kd_loss(hidden: torch.Tensor, weight: torch.Tensor, t: Targets, cfg: LossConfig,
            latf: LATFState | None = None) -> LossOutput:
    """The loss at the N valid positions given their final hidden states (N, H) and the output weight (V, H)."""
    N = hidden.shape[0]
    a = cfg.kd_weight
    if N == 0:
        zero = hidden.sum() * 0.0 + weight.sum() * 0.0
        return LossOutput(zero, 0.0, 0.0, 0, 0, hidden.new_zeros(0, dtype=torch.float32))
    ada = cfg.adakd
    idx = torch.arange(N, device=hidden.device)
    temps_sel = torch.full((N,), cfg.temperature, dtype=torch.float32, device=hidden.device)
    if a > 0 and ada.enabled:
        s = difficulties(hidden.detach(), weight.detach(), t, cfg.chunk_positions)
        if ada.latf:
            idx = select(s, latf.ratio if latf is not None else 1.0)
        if ada.idts:
            temps_sel = idts_temperatures(s[idx], cfg.temperature, ada.temperature_scale)
        else:
            temps_sel = temps_sel[: len(idx)]
    n = len(idx)
    if a < 1:  # CE needs every position: run them all, KD weight only on the selected ones
        pos = torch.arange(N, device=hidden.device)
        temps = torch.full((N,), cfg.temperature, dtype=torch.float32, device=hidden.device)
        temps[idx] = temps_sel
        w_kd = torch.zeros(N, dtype=torch.float32, device=hidden.device)
        w_kd[idx] = a * temps_sel.pow(2) / n if a > 0 else 0.0
        w_ce = torch.full((N,), (1 - a) / N, dtype=torch.float32, device=hidden.device)
    else:
        pos, temps = idx, temps_sel
        w_kd = temps_sel.pow(2) / n
        w_ce = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    sums: dict = {}
    h = hidden if len(pos) == N else hidden.index_select(0, pos)
    tt = t if len(pos) == N else t.index(pos)
    loss = _ChunkedLoss.apply(h, weight, tt, temps, w_kd, w_ce, cfg, sums)
    return LossOutput(loss, sums["kd"] / n if a > 0 else 0.0, sums["ce"] / N if a < 1 else 0.0, N, n if a > 0 else 0,
                      temps_sel.detach())
