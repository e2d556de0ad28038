"""Divergences between teacher and student on a cached sparse target: the top-k ids plus one tail bucket.

Both distributions are coarse-grained onto the same k + 1 buckets: the teacher's top-k ids and "every
other token". The teacher's bucket values come from the cache; the student's are its probabilities of
those ids and the rest of its mass. With k = V the tail is empty and every divergence is the dense one.

Sampled and hybrid caches give a weighted support instead (`weights` is not None): each entry b is one token
id with an importance multiplicity m_b (1 for an exact head entry, 0 for padding), and a divergence that is
a per-token sum D = sum_v h(p_v, q_v) is estimated as sum_b m_b h(p_b, q_b) (docs/train-student.md,
"Sampled and hybrid targets: the estimators"). No tail bucket then: lp and lq are the entries' own
log-probabilities.

Temperature: inside the top-k, tempering is exact (p^(T) is proportional to p^(1/T)). The tail's share
at temperature T is estimated by spreading the tail evenly over the other V - k tokens:
weight = (V - k) * (tail / (V - k))^(1/T); exact at T = 1 and when the tail is zero.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")
# On sampled and hybrid caches these divergences use the importance-weighted estimate (unbiased at T = 1): their
# per-token terms are p-dominated (p * m = c / N), so the estimate's terms stay bounded. The others weight
# q-dominated terms by m ~ 1 / (N p): unbiased too, but heavy-tailed enough to derail training from a random
# init (bench.fidelity), so they use the stored support exactly and one bucket for the rest (`support_buckets`).
IMPORTANCE_WEIGHTED = ("fkl", "sfkl")
LOG_FLOOR = -1e30  # stands for log 0 where a finite value is needed
# A teacher's tail is never zero when k < V (softmax has no zeros); a cached tail that rounded to zero
# (top-k sums of float32 values can reach 1) is read as e^-30, so reverse-KL-like losses stay finite.
TEACHER_TAIL_FLOOR = -30.0


def teacher_buckets(topk_logprobs: torch.Tensor, tail_logmass: torch.Tensor, vocab_size: int,
                    temperature: torch.Tensor | float = 1.0) -> torch.Tensor:
    """(n, k + 1) normalized log-probabilities of the teacher at `temperature` (a scalar or (n,))."""
    T = _as_column(temperature, topk_logprobs)
    k = topk_logprobs.shape[-1]
    head = topk_logprobs / T
    rest = vocab_size - k
    if rest > 0:
        log_rest = math.log(rest)
        tail = (log_rest + (tail_logmass.clamp_min(TEACHER_TAIL_FLOOR).unsqueeze(-1) - log_rest) / T)
    else:
        tail = torch.full_like(head[:, :1], NEG_INF)
    return torch.log_softmax(torch.cat([head, tail], dim=-1), dim=-1)


def weighted_teacher(lp: torch.Tensor, weights: torch.Tensor, temperature: torch.Tensor | float = 1.0) -> torch.Tensor:
    """(n, W) log-probabilities of the teacher on a weighted support at `temperature`: lp / T minus the
    self-normalized estimate log sum_b m_b exp(lp_b / T) of the tempered normalizer (exact at T = 1 with
    sum_b m_b p_b = 1). `lp`: the stored log-probabilities at T = 1."""
    x = lp / _as_column(temperature, lp)
    return x - torch.logsumexp(x + weights.to(x.dtype).log(), dim=-1, keepdim=True)


def support_buckets(lp: torch.Tensor, weights: torch.Tensor, rest_logmass: torch.Tensor, vocab_size: int,
                    temperature: torch.Tensor | float = 1.0) -> torch.Tensor:
    """(n, W + 1) teacher buckets on a sampled or hybrid cache's stored support: each stored id (head and drawn,
    weight > 0) exactly, padding empty, and one bucket for the rest of its mass (the cache's `rest_logmass`,
    summed exactly at capture: 1 - the stored probabilities would carry their quantization error), tempered as a
    top-k cache's tail is (spread evenly over the ids not stored); empty when the stored ids are the whole
    vocabulary."""
    valid = weights > 0
    T = _as_column(temperature, lp)
    lp = lp.masked_fill(~valid, NEG_INF)
    rest = rest_logmass.to(lp.dtype).unsqueeze(-1).clamp_min(TEACHER_TAIL_FLOOR)
    others = (vocab_size - valid.sum(-1, keepdim=True)).to(lp.dtype)
    log_others = others.clamp_min(1).log()
    tail = torch.where(others > 0, log_others + (rest - log_others) / T, torch.full_like(rest, NEG_INF))
    return torch.log_softmax(torch.cat([lp / T, tail], dim=-1), dim=-1)


def student_support(logits: torch.Tensor, ids: torch.Tensor, temperature: torch.Tensor | float = 1.0) -> torch.Tensor:
    """(n, W) log-probabilities of the student at `temperature` of the ids (repeats allowed): no tail bucket."""
    z = _at_least_fp32(logits) / _as_column(temperature, logits)
    return z.gather(-1, ids) - torch.logsumexp(z, dim=-1, keepdim=True)


def student_buckets(logits: torch.Tensor, topk_ids: torch.Tensor, temperature: torch.Tensor | float = 1.0) -> torch.Tensor:
    """(n, k + 1) log-probabilities of the student at `temperature` on the teacher's buckets."""
    z = _at_least_fp32(logits) / _as_column(temperature, logits)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    head = z.gather(-1, topk_ids) - lse
    rest = torch.logsumexp(z.scatter(-1, topk_ids, NEG_INF), dim=-1, keepdim=True) - lse
    return torch.cat([head, rest], dim=-1)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _as_column(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
    if isinstance(t, torch.Tensor) and t.dim() == 1:
        return t.to(torch.float64 if like.dtype == torch.float64 else torch.float32).unsqueeze(-1)
    return t


def _sum(terms: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """sum_b terms_b per row, or the weighted-support estimate sum_b m_b terms_b."""
    return terms.sum(-1) if weights is None else (weights.to(terms.dtype) * terms).sum(-1)


def _kl(lp: torch.Tensor, lq: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities; 0 * log 0 = 0, and no NaN from -inf - -inf."""
    p = lp.exp()
    diff = torch.where(p > 0, lp - lq, torch.zeros_like(lp))
    return _sum(p * diff, weights)


def _log_mix(lp: torch.Tensor, lq: torch.Tensor, w: float) -> torch.Tensor:
    """log(w * p + (1 - w) * q); empty buckets (-inf) are floored so no NaN reaches the gradient."""
    if not 0 < w < 1:
        return lp if w >= 1 else lq
    return torch.logaddexp(lp.clamp_min(LOG_FLOOR) + math.log(w), lq.clamp_min(LOG_FLOOR) + math.log1p(-w))


def fkl(lp, lq, weights=None, **_):
    return _kl(lp, lq, weights)


def rkl(lp, lq, weights=None, **_):
    return _kl(lq, lp, weights)


def jsd(lp, lq, jsd_beta: float = 0.1, weights=None, **_):
    """beta * KL(p || m) + (1 - beta) * KL(q || m), m = beta * p + (1 - beta) * q (beta: the teacher's weight)."""
    m = _log_mix(lp, lq, jsd_beta)
    return jsd_beta * _kl(lp, m, weights) + (1 - jsd_beta) * _kl(lq, m, weights)


def sfkl(lp, lq, skew: float = 0.1, weights=None, **_):
    """Skew forward KL: KL(p || skew * p + (1 - skew) * q)."""
    return _kl(lp, _log_mix(lp, lq, skew), weights)


def srkl(lp, lq, skew: float = 0.1, weights=None, **_):
    """Skew reverse KL: KL(q || skew * q + (1 - skew) * p)."""
    return _kl(lq, _log_mix(lq, lp, skew), weights)


def tvd(lp, lq, weights=None, **_):
    return 0.5 * _sum((lp.exp() - lq.exp()).abs(), weights)


def akl(lp, lq, akl_mu: float = 0.5, weights=None, **_):
    """Adaptive KL (Wu et al. 2024): FKL and RKL weighted by the head and tail gaps (weights held constant).

    Head, as the official code's `get_ratio` decides it: the teacher's highest-probability buckets whose
    cumulative mass, their own included, stays within `akl_mu`, and always the most likely one (`cum_sum >
    mu` is the tail, then `mask[..., 0] = False`); so the bucket whose mass crosses mu is tail. The top-k
    buckets are already sorted; the tail bucket is always in the tail. On a weighted support (sorted by
    descending teacher log-probability, padding last) the mass is the estimate m_b p_b and the gaps are
    weighted by m_b.
    """
    p, q = lp.exp(), lq.exp()
    if weights is None:
        head_p = p[:, :-1]
        head = torch.cumsum(head_p, -1) <= akl_mu
        head = torch.cat([head, torch.zeros_like(head[:, :1])], -1)
        gap = (p - q).abs().detach()
    else:
        mass = weights.to(p.dtype) * p.detach()
        head = torch.cumsum(mass, -1) <= akl_mu
        gap = weights.to(p.dtype) * (p - q).abs().detach()
    head[:, 0] = True  # the most likely bucket is head, even when it alone holds more than mu
    g_head = (gap * head).sum(-1)
    g_tail = (gap * ~head).sum(-1)
    denom = (g_head + g_tail).clamp_min(1e-12)
    return (g_head / denom) * _kl(lp, lq, weights) + (g_tail / denom) * _kl(lq, lp, weights)


def abkd(lp, lq, abkd_alpha: float = 0.2, abkd_beta: float = 0.7, weights=None, **_):
    """Alpha-beta divergence D_AB^(a, b)(p || q) (Cichocki, Cruces & Amari, "Generalized Alpha-Beta Divergences
    and Their Application to Robust Nonnegative Matrix Factorization", Entropy 13, 2011), as the ABKD code
    computes it: Wang et al., "ABKD: Pursuing a Proper Allocation of the Probability Mass in Knowledge
    Distillation via alpha-beta-Divergence" (ICML 2025), github.com/ghwang-s/abkd
    `distillation_llm/distillm/losses.py::ab_div`; the official AdaKD code has the same function and formulas
    (github.com/SassyRong/AdaKD `loss/losses.py::ab_div`, used there with a = 0.2, b = 0.7). p: teacher, q: student;
    sums over the buckets:

        a, b, a + b != 0:  -1/(a b) * sum( p^a q^b - a/(a+b) p^(a+b) - b/(a+b) q^(a+b) )
        a = b = 0:         1/2 * sum( (ln q - ln p)^2 )
        a = 0, b != 0:     1/b * sum( q^b ln(q^b / p^b) - q^b + p^b )
        b = 0, a != 0:     1/a * sum( p^a ln(p^a / q^a) - p^a + q^a )
        a + b = 0, a != 0: 1/a * sum( ln(q^a / p^a) + p^a / q^a - 1 )

    a = 1, b = 0 is KL(p || q) (forward KL); a = 0, b = 1 is KL(q || p) (reverse KL). The general case and
    a = b = 0 are Cichocki's; in the three other special cases the official code divides by a (resp. b) where
    Cichocki's limits of the general case divide by a^2 (resp. b^2, a^2): they are a (resp. b, a) times those
    limits, equal to them only at a = 1 (resp. b = 1), so the value jumps when b (resp. a, a + b) reaches
    0 elsewhere. Kept as the official code has it. LossConfig refuses negative a and b (negative powers of
    near-zero probabilities overflow, and with a < 0 the official a + b = 0 case is negative), so a + b = 0 is
    reachable there only as a = b = 0.

    An empty bucket (both probabilities zero: the tail when k = V) contributes nothing, as a masked token
    does in the official code. Powers and ratios are taken in log space (p^a = exp(a ln p)), so underflowed
    powers give no 0/0. With `weights`, the per-token terms are summed with them (a weighted support).
    """
    a, b = float(abkd_alpha), float(abkd_beta)
    empty = torch.isneginf(lp) & torch.isneginf(lq)
    # -inf -> LOG_FLOOR: exp() of it is 0 and differences stay finite, so neither values nor gradients get NaN
    lp, lq = lp.clamp_min(LOG_FLOOR), lq.clamp_min(LOG_FLOOR)
    if a == 0 and b == 0:
        terms = 0.5 * (lq - lp).pow(2)
    elif a == 0:
        q_b = torch.exp(b * lq)
        terms = q_b * (lq - lp) - (q_b - torch.exp(b * lp)) / b
    elif b == 0:
        p_a = torch.exp(a * lp)
        terms = p_a * (lp - lq) - (p_a - torch.exp(a * lq)) / a
    elif a + b == 0:
        terms = (lq - lp) + (torch.exp(a * (lp - lq)) - 1) / a
    else:
        s = a + b
        terms = -(torch.exp(a * lp + b * lq) - (a / s) * torch.exp(s * lp) - (b / s) * torch.exp(s * lq)) / (a * b)
    return _sum(torch.where(empty, torch.zeros_like(terms), terms), weights)


DIVERGENCES: dict[str, Callable[..., torch.Tensor]] = {
    "fkl": fkl, "rkl": rkl, "jsd": jsd, "sfkl": sfkl, "srkl": srkl, "tvd": tvd, "akl": akl, "abkd": abkd,
}


def divergence(name: str) -> Callable[..., torch.Tensor]:
    if name not in DIVERGENCES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(DIVERGENCES)}")
    return DIVERGENCES[name]


def hellinger(lp: torch.Tensor, lq: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Hellinger distance per row, in [0, 1]. On a weighted support: sqrt(clamp(1 - BC, 0, 1)) with the
    Bhattacharyya coefficient estimated as BC = sum_b m_b sqrt(p_b q_b)."""
    if weights is not None:
        bc = _sum(torch.exp(0.5 * (lp + lq)), weights)
        return (1 - bc).clamp(0, 1).sqrt()
    d = (torch.exp(0.5 * lp) - torch.exp(0.5 * lq)).pow(2).sum(-1)
    return (d.clamp_min(0) / 2).sqrt()


def dense_buckets(logits: torch.Tensor, temperature) -> torch.Tensor:
    """Full-vocabulary log-probabilities at temperature: the dense reference of the bucket functions."""
    return F.log_softmax(_at_least_fp32(logits) / _as_column(temperature, logits), dim=-1)
