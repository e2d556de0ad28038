"""The training loss from hidden states and the output projection, a chunk of positions at a time.

Never more than one chunk of (positions x vocabulary) float32 logits lives at once: each chunk's logits
are made, turned into the loss and its gradient in place, projected back onto the hidden states and the
output weight, and freed. The gradient with respect to the logits is written analytically: the
divergence only sees the k + 1 bucket log-probabilities, so autograd runs on (chunk, k + 1) tensors and
the vocabulary-wide part is a closed form (softmax terms), a few passes over one buffer.

Sampled and hybrid caches give a weighted support (`Targets.weights`): the divergence is the estimate
sum_b m_b h(p_b, q_b) over the support's entries (no tail bucket), and ids may repeat within a row (padding),
so the gradient's scatter there is duplicate-safe.

With AdaKD a first pass (no gradient) computes the token difficulties. When the whole micro-batch fits
in one chunk its logits are computed once and reused; otherwise the second pass recomputes them, for
the selected positions only when the loss is pure KD.

loss = (1 - a) * mean CE(true tokens) + a * mean over selected positions of T_i^2 * D(p^(T_i), q^(T_i))

The means are over this call's positions unless `denominators` are given: the training loop passes the
counts of the whole optimizer step (every micro-batch, every rank), so that each trained token weighs the
same whatever micro-batch it falls in (docs/train-student.md, "Loss normalization").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .adakd import AdaKDConfig, LATFState, idts_u, select
from .head import OutputHead
from .losses import IMPORTANCE_WEIGHTED, NEG_INF, divergence, hellinger, support_buckets, teacher_buckets, weighted_teacher


SAMPLED_ESTIMATORS = ("auto", "importance", "support")


@dataclass
class LossConfig:
    loss: str = "rkl"
    kd_weight: float = 1.0  # a
    temperature: float = 1.0  # T_base
    jsd_beta: float = 0.1
    skew: float = 0.1
    akl_mu: float = 0.5
    abkd_alpha: float = 0.2
    abkd_beta: float = 0.7
    adakd: AdaKDConfig = field(default_factory=AdaKDConfig)
    chunk_positions: int = 1024  # memory: chunk x vocabulary float32 (x2 while CE and KD mix)
    sampled_estimator: str = "auto"  # sampled/hybrid caches: importance | support | auto (see `importance`)

    def __post_init__(self) -> None:
        divergence(self.loss)  # refuses unknown names early
        if self.sampled_estimator not in SAMPLED_ESTIMATORS:
            raise ValueError(f"--sampled-estimator must be one of {', '.join(SAMPLED_ESTIMATORS)}, not {self.sampled_estimator!r}")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise ValueError(f"--kd-weight must be within [0, 1], not {self.kd_weight}")
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be positive, not {self.temperature}")
        for option, value in (("--jsd-beta", self.jsd_beta), ("--skew", self.skew), ("--akl-mu", self.akl_mu)):
            if not 0.0 <= value <= 1.0:  # mixture weights and a mass: outside [0, 1] the divergence is NaN
                raise ValueError(f"{option} must be within [0, 1], not {value}")
        for option, value in (("--abkd-alpha", self.abkd_alpha), ("--abkd-beta", self.abkd_beta)):
            if not (math.isfinite(value) and value >= 0):  # negative powers of near-zero probabilities overflow
                raise ValueError(f"{option} must be a finite number >= 0, not {value}")

    @property
    def importance(self) -> bool:
        """On sampled and hybrid caches, the importance-weighted estimate (else: the stored support's buckets).
        auto: importance for the divergences whose weighted terms stay bounded (IMPORTANCE_WEIGHTED)."""
        return self.sampled_estimator == "importance" or (self.sampled_estimator == "auto" and self.loss in IMPORTANCE_WEIGHTED)

    def divergence_kwargs(self) -> dict:
        return {"jsd_beta": self.jsd_beta, "skew": self.skew, "akl_mu": self.akl_mu,
                "abkd_alpha": self.abkd_alpha, "abkd_beta": self.abkd_beta}


@dataclass
class Targets:
    """Teacher targets at the valid positions of a batch (all on the training device).

    Top-k caches (`weights` None): the k ids and log-probabilities, plus the tail bucket. Sampled and hybrid
    caches: `topk_ids`/`topk_logprobs` hold a weighted support of W entries per position (the exact head,
    then the drawn ids, by descending log-probability; padding last, repeating the row's first entry) and
    `weights` their multiplicities (1 for the head, importance weights for the draws, 0 for padding).
    """

    topk_ids: torch.Tensor  # (N, k) int64, or (N, W)
    topk_logprobs: torch.Tensor  # (N, k) float32, or (N, W): log-probabilities at T = 1
    tail_logmass: torch.Tensor  # (N,) float32; weighted: the teacher's log-mass outside the stored support
    labels: torch.Tensor  # (N,) int64
    vocab_size: int
    weights: torch.Tensor | None = None  # (N, W) float32 multiplicities; None: top-k buckets

    def index(self, idx: torch.Tensor) -> "Targets":
        return Targets(self.topk_ids[idx], self.topk_logprobs[idx], self.tail_logmass[idx], self.labels[idx], self.vocab_size,
                       self.weights[idx] if self.weights is not None else None)


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, differentiable
    kd: float  # mean T^2 * D over the selected positions
    ce: float  # mean CE over all valid positions (computed when a < 1)
    valid: int
    selected: int
    temperatures: torch.Tensor  # (selected,), detached
    kd_sum: float = 0.0  # sum of T^2 * D over the selected positions
    ce_sum: float = 0.0  # sum of CE over all valid positions (when a < 1)
    difficulties: torch.Tensor | None = None  # (valid,) AdaKD's Hellinger difficulty of every position, detached
    idts_u: torch.Tensor | None = None  # (selected,) IDTS's tanh(ln(s / median)) of the distilled positions
    router_aux: float | None = None  # set by the training step: an MoE student's router loss x this micro-batch's share


def _student_support(e: torch.Tensor, zt_ids: torch.Tensor, m: torch.Tensor):
    """From e = exp(z/T - m) (left unchanged): log-probs of the support's ids (repeats allowed), and sum(e)."""
    s = e.sum(-1, keepdim=True)
    return zt_ids - m - s.log(), s


def _student_stats(e: torch.Tensor, zt_ids: torch.Tensor, m: torch.Tensor, ids: torch.Tensor):
    """From e = exp(z/T - m) (modified in place: zeroed at `ids`): log-probs of the k + 1 buckets, and sums."""
    s = e.sum(-1, keepdim=True)
    e_ids = e.gather(-1, ids)
    e.scatter_(-1, ids, 0.0)
    r = e.sum(-1, keepdim=True)  # the mass outside the top-k, without cancellation
    log_s = s.log()
    head = zt_ids - m - log_s
    tiny = torch.finfo(r.dtype).tiny
    if ids.shape[-1] >= e.shape[-1]:  # k = V: the tail is empty
        tail = torch.where(r > 0, r.clamp_min(tiny).log() - log_s, torch.full_like(r, NEG_INF))
    else:  # never exactly zero for finite logits; an underflow is read as the smallest float
        tail = r.clamp_min(tiny).log() - log_s
    return torch.cat([head, tail], -1), s, r, e_ids


@torch.no_grad()
def _difficulty_from_logits(z: torch.Tensor, t: Targets, sl: slice, rows: int = 128,
                            row_max: list | None = None, importance: bool = False) -> torch.Tensor:
    """Hellinger on the buckets at T = 1. z is left unchanged (it may be reused for the loss); the
    scratch buffer covers `rows` positions at a time, so reuse costs little memory. The row maxima are
    appended to `row_max` for the loss pass (max(z / T) = max(z) / T)."""
    out = []
    for r0 in range(0, z.shape[0], rows):
        zz = z[r0:r0 + rows]
        sub = slice(sl.start + r0, sl.start + r0 + zz.shape[0])
        m = zz.max(-1, keepdim=True).values
        if row_max is not None:
            row_max.append(m)
        e = (zz - m).exp_()
        if t.weights is not None and importance:  # Bhattacharyya coefficient by importance weights
            w = t.weights[sub]
            lq, _ = _student_support(e, zz.gather(-1, t.topk_ids[sub]), m)
            out.append(hellinger(weighted_teacher(t.topk_logprobs[sub], w), lq, w))
            continue
        lq, *_ = _student_stats(e, zz.gather(-1, t.topk_ids[sub]), m, t.topk_ids[sub])
        if t.weights is not None:  # the stored support's buckets: bounded, like a top-k cache's
            lq = _support_student(lq, t.weights[sub])
            lp = support_buckets(t.topk_logprobs[sub], t.weights[sub], t.tail_logmass[sub], t.vocab_size)
        else:
            lp = teacher_buckets(t.topk_logprobs[sub], t.tail_logmass[sub], t.vocab_size)
        out.append(hellinger(lp, lq))
    return torch.cat(out)


@torch.no_grad()
def difficulties(hidden: torch.Tensor, head: OutputHead, t: Targets, chunk: int, importance: bool = False) -> torch.Tensor:
    """Hellinger distance between teacher and student on the coarse support, at temperature 1."""
    out = []
    for c in range(0, hidden.shape[0], chunk):
        sl = slice(c, c + chunk)
        out.append(_difficulty_from_logits(head.logits(hidden[sl]), t, sl, importance=importance))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def _chunk_loss_and_grad(z: torch.Tensor, t: Targets, sl: slice, T: torch.Tensor, w_kd: torch.Tensor,
                         w_ce: torch.Tensor, cfg: LossConfig, use_kd: bool, use_ce: bool,
                         row_max: torch.Tensor | None = None):
    """Loss of one chunk and its gradient w.r.t. the logits z, computed in place in z's buffer.

    Returns (grad (c, V), weighted loss sum, sum of T^2 * D over KD rows, sum of CE).
    """
    zero = z.new_zeros(())
    total, kd_sum, ce_sum = zero, zero, zero
    g_ce = None
    if use_ce:  # CE at T = 1: grad = w * (softmax - onehot); in z's own buffer when there is no KD
        labels = t.labels[sl].unsqueeze(-1)
        m1 = row_max if row_max is not None else z.max(-1, keepdim=True).values
        z_label = z.gather(-1, labels)
        g_ce = z.sub(m1).exp_() if use_kd else z.sub_(m1).exp_()
        s1 = g_ce.sum(-1, keepdim=True)
        ce = (m1 + s1.log() - z_label).squeeze(-1)
        g_ce.mul_((w_ce.unsqueeze(-1) / s1))
        g_ce.scatter_add_(-1, labels, -w_ce.unsqueeze(-1).to(g_ce.dtype))
        total = total + (w_ce * ce).sum()
        ce_sum = ce.sum()
    if not use_kd:
        return g_ce, total, kd_sum, ce_sum
    ids = t.topk_ids[sl]
    Tc = T.to(z.dtype).unsqueeze(-1)
    zt = z.div_(Tc)
    zt_ids = zt.gather(-1, ids)
    m = row_max / Tc if row_max is not None else zt.max(-1, keepdim=True).values
    e = zt.sub_(m).exp_()
    if t.weights is not None and cfg.importance:
        return _weighted_kd(e, zt_ids, m, t, sl, T, Tc, w_kd, cfg, g_ce, total, ce_sum)
    lq, s, r, e_ids = _student_stats(e, zt_ids, m, ids)
    if t.weights is not None:  # the other divergences: exact on the stored support, one bucket for the rest
        lq = _support_student(lq, t.weights[sl])
        lp = support_buckets(t.topk_logprobs[sl], t.weights[sl], t.tail_logmass[sl], t.vocab_size, T)
    else:
        lp = teacher_buckets(t.topk_logprobs[sl], t.tail_logmass[sl], t.vocab_size, T)
    d, G = _divergence_and_grad(lp, lq, w_kd, cfg)
    G_head, G_tail = G[:, :-1], G[:, -1:]
    S = G.sum(-1, keepdim=True)
    # d lq_head[j]/d zt = onehot(ids_j) - q ; d lq_tail/d zt = q * [not in ids] / q_tail - q
    alpha = torch.where(r > 0, G_tail / r.clamp_min(torch.finfo(r.dtype).tiny), torch.zeros_like(r)) - S / s
    g = e.mul_(alpha / Tc)  # e is zero at the ids
    if t.weights is None:
        g.scatter_(-1, ids, (G_head - S * e_ids / s) / Tc)
    else:  # ids repeat (padding): the common -S q part at every id, then each entry's G (0 for padding) added
        g.scatter_(-1, ids, -S * e_ids / (s * Tc))
        g.scatter_add_(-1, ids, G_head / Tc)
    return _with_kd(g, g_ce, d, w_kd, T, total, ce_sum)


def _divergence_and_grad(lp: torch.Tensor, lq: torch.Tensor, w_kd: torch.Tensor, cfg: LossConfig,
                         weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row divergences and the gradient of their w_kd-weighted sum w.r.t. the student's bucket log-probs
    (autograd on (rows, buckets) values only; an empty bucket's NaN gradient is 0)."""
    extra = {} if weights is None else {"weights": weights}
    with torch.enable_grad():
        lq_leaf = lq.detach().requires_grad_(True)
        d = divergence(cfg.loss)(lp, lq_leaf, **extra, **cfg.divergence_kwargs())
        (G,) = torch.autograd.grad((w_kd.to(d.dtype) * d).sum(), lq_leaf)
    return d.detach(), torch.nan_to_num(G, nan=0.0)


def _with_kd(g, g_ce, d, w_kd, T, total, ce_sum):
    """The chunk's gradient with CE's added, and its loss sums."""
    if g_ce is not None:
        g.add_(g_ce)
    total = total + (w_kd * d).sum()
    kd_sum = ((w_kd > 0) * T.pow(2) * d).sum()
    return g, total, kd_sum, ce_sum


def _support_student(lq: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The student's (n, W + 1) buckets on a stored support: padding entries (weight 0) are empty, not a
    second copy of the id they repeat; the last bucket is its mass outside the support."""
    pad = torch.cat([weights <= 0, torch.zeros_like(weights[:, :1], dtype=torch.bool)], dim=-1)
    return lq.masked_fill(pad, NEG_INF)


def _weighted_kd(e, zt_ids, m, t: Targets, sl: slice, T, Tc, w_kd, cfg: LossConfig, g_ce, total, ce_sum):
    """The KD part of `_chunk_loss_and_grad` on a weighted support; e = exp(z/T - m) becomes the gradient."""
    ids, w = t.topk_ids[sl], t.weights[sl]
    lq, s = _student_support(e, zt_ids, m)
    lp = weighted_teacher(t.topk_logprobs[sl], w, T)
    d, G = _divergence_and_grad(lp, lq, w_kd, cfg, w)
    # d lq_b/d zt = onehot(ids_b) - q: the -S q part everywhere (at repeated ids too), then each entry's G_b
    # added at its id (padding entries have G_b = 0)
    g = e.mul_(-G.sum(-1, keepdim=True) / (s * Tc))
    g.scatter_add_(-1, ids, G / Tc)
    return _with_kd(g, g_ce, d, w_kd, T, total, ce_sum)


class _ChunkedLoss(torch.autograd.Function):
    """sum_i w_kd[i] * D_i(T_i) + w_ce[i] * CE_i, with gradients made chunk by chunk in forward.

    The gradient w.r.t. the logits z goes back through the head's post-processing (scale, soft-cap) to
    u = h W^T + b, then onto h, W and b.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, t: Targets, temps, w_kd, w_ce, cfg: LossConfig, sums: dict,
                scale: float, softcap: float | None, logits=None, row_max=None):
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if bias is not None else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        kd_sum = torch.zeros((), dtype=acc, device=hidden.device)
        ce_sum = torch.zeros((), dtype=acc, device=hidden.device)
        use_ce = bool((w_ce != 0).any())
        use_kd = bool((w_kd != 0).any())
        head = OutputHead(weight.to(hidden.dtype), bias, scale, softcap)
        chunk = hidden.shape[0] if logits is not None else cfg.chunk_positions
        for c in range(0, hidden.shape[0], chunk):
            sl = slice(c, c + chunk)
            h = hidden[sl]
            z = logits if logits is not None else head.logits(h)
            slope = head.local_slope(z)  # before z's buffer becomes the gradient
            g, part, kd_c, ce_c = _chunk_loss_and_grad(z, t, sl, temps[sl], w_kd[sl], w_ce[sl], cfg, use_kd, use_ce,
                                                       row_max if logits is not None else None)
            total += part
            kd_sum += kd_c
            ce_sum += ce_c
            g = head.to_linear_grad(g, slope).to(hidden.dtype)
            grad_h[sl] = g @ head.weight
            grad_w.addmm_(g.t().to(acc), h.to(acc))
            if grad_b is not None:
                grad_b += g.sum(0, dtype=acc)
            del g, z, slope
        sums["kd"], sums["ce"] = float(kd_sum), float(ce_sum)
        ctx.has_bias = grad_b is not None
        saved = (grad_h, grad_w.to(weight.dtype)) + ((grad_b.to(bias.dtype),) if grad_b is not None else ())
        ctx.save_for_backward(*saved)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, *rest = ctx.saved_tensors
        grad_b = rest[0] * grad_out if ctx.has_bias else None
        return (grad_h * grad_out, grad_w * grad_out, grad_b) + (None,) * 10


def kd_loss(hidden: torch.Tensor, head: OutputHead | torch.Tensor, t: Targets, cfg: LossConfig,
            latf: LATFState | None = None, denominators: tuple[float, float] | None = None) -> LossOutput:
    """The loss at the N valid positions given their final hidden states (N, H) and the student's output
    layer (an OutputHead, or a bare (V, H) weight).

    denominators: (positions the CE is averaged over, positions the KD is averaged over); default (N, the
    positions selected here). Giving the whole optimizer step's counts makes the loss this call's share of the
    step's per-token mean."""
    if isinstance(head, torch.Tensor):
        head = OutputHead(head)
    weight = head.weight
    N = hidden.shape[0]
    a = cfg.kd_weight
    ada = cfg.adakd
    if N == 0:  # the same fields as a batch with positions, empty (ranks add them up alike)
        zero = hidden.sum() * 0.0 + weight.sum() * 0.0 + (head.bias.sum() * 0.0 if head.bias is not None else 0.0)
        empty = hidden.new_zeros(0, dtype=torch.float32)
        on = a > 0 and ada.enabled
        return LossOutput(zero, 0.0, 0.0, 0, 0, empty, difficulties=empty if on else None,
                          idts_u=empty if on and ada.idts else None)
    dev = hidden.device
    idx = torch.arange(N, device=dev)
    temps_sel = torch.full((N,), cfg.temperature, dtype=torch.float32, device=dev)
    logits = row_max = s = u = None
    if a > 0 and ada.enabled:
        if N <= cfg.chunk_positions:  # one chunk: make the logits once, for both passes
            with torch.no_grad():
                logits = OutputHead(weight.detach(), head.bias.detach() if head.bias is not None else None,
                                    head.scale, head.softcap).logits(hidden.detach())
                maxima: list = []
                s = _difficulty_from_logits(logits, t, slice(0, N), row_max=maxima, importance=cfg.importance)
                row_max = torch.cat(maxima)
        else:
            s = difficulties(hidden.detach(), head, t, cfg.chunk_positions, importance=cfg.importance)
        if ada.latf:
            idx = select(s, latf.ratio if latf is not None else 1.0)
        if ada.idts:
            u = idts_u(s[idx])
            temps_sel = (cfg.temperature * torch.exp(-ada.temperature_scale * u)).float()  # = idts_temperatures
        else:
            temps_sel = temps_sel[: len(idx)]
    n = len(idx)
    ce_den, kd_den = denominators if denominators is not None else (N, n)
    if a < 1:  # CE needs every position: run them all, KD weight only on the selected ones
        pos = torch.arange(N, device=dev)
        temps = torch.full((N,), cfg.temperature, dtype=torch.float32, device=dev)
        temps[idx] = temps_sel
        w_kd = torch.zeros(N, dtype=torch.float32, device=dev)
        if a > 0:
            w_kd[idx] = a * temps_sel.pow(2) / kd_den
        w_ce = torch.full((N,), (1 - a) / ce_den, dtype=torch.float32, device=dev)
    else:
        pos, temps = idx, temps_sel
        w_kd = temps_sel.pow(2) / kd_den
        w_ce = torch.zeros(n, dtype=torch.float32, device=dev)
    sums: dict = {}
    whole = len(pos) == N
    h = hidden if whole else hidden.index_select(0, pos)
    tt = t if whole else t.index(pos)
    if logits is not None and not whole:
        logits, row_max = logits.index_select(0, pos), row_max.index_select(0, pos)
    loss = _ChunkedLoss.apply(h, weight, head.bias, tt, temps, w_kd, w_ce, cfg, sums, head.scale, head.softcap, logits,
                              row_max)
    kd_sum, ce_sum = (sums["kd"] if a > 0 else 0.0), (sums["ce"] if a < 1 else 0.0)
    return LossOutput(loss, kd_sum / n if a > 0 else 0.0, ce_sum / N if a < 1 else 0.0, N, n if a > 0 else 0,
                      temps_sel.detach(), kd_sum, ce_sum, s, u)
