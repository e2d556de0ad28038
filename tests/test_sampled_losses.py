"""Sampled and hybrid targets: the weighted-support estimators against the dense (full-vocabulary) losses.

A `sampled` position holds N draws from the teacher (proposal temperature tau) as distinct ids, counts and
their exact log-probabilities; a `hybrid` one the exact top-k plus N draws from the renormalized tail.
`collate` turns them into a weighted support (docs/train-student.md, "Sampled and hybrid targets: the
estimators"); here the estimates are averaged over many seeded draws and compared with the dense values.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from adakd.storage import SequenceTargets
from test_losses import dense_adakd, dense_div
from adakd.trainer.adakd import AdaKDConfig, LATFState
from adakd.trainer.batches import collate, truncate, weighted_support
from adakd.trainer.evaluate import cached_kl
from adakd.trainer.head import OutputHead
from adakd.trainer.kd_loss import LossConfig, Targets, difficulties, kd_loss
from adakd.trainer.losses import DIVERGENCES, fkl, hellinger, student_support, weighted_teacher
from adakd.trainer.student import target_vocab

V, H, K = 96, 12, 6  # vocabulary, hidden size, hybrid head
PER_TOKEN_SUMS = [n for n in DIVERGENCES if n != "akl"]  # akl's gap weights are ratios: not a per-token sum


# ---- building sampled / hybrid targets ---------------------------------------------------------------------------

def draw(lp: torch.Tensor, kind: str, N: int, R: int = 1, tau: float = 1.0, k: int = K, seed: int = 0,
         quantize: bool = False, sizes_n: list[int] | None = None) -> SequenceTargets:
    """One sequence whose R * P trained positions are R independent draws at each of the P teacher rows `lp`
    (float64 (P, V) log-probabilities), row r * P + p: draw r at position p. `sizes_n`: N per position instead."""
    g = torch.Generator().manual_seed(seed)
    P = lp.shape[0]
    k = 0 if kind == "sampled" else k
    head_lp, head_ids = lp.topk(k, -1) if k else (lp[:, :0], torch.zeros(P, 0, dtype=torch.long))
    tail = lp.scatter(-1, head_ids, -math.inf).logsumexp(-1) if k else torch.zeros(P, dtype=lp.dtype)
    proposal = (lp / tau).scatter(-1, head_ids, -math.inf).softmax(-1)  # the (renormalized tail of the) teacher at tau
    Ns = sizes_n or [N] * P
    counts = torch.zeros(R * P, V, dtype=torch.long)
    for p in range(P):
        if Ns[p] and proposal[p].sum() > 0:
            d = torch.multinomial(proposal[p].expand(R, V), Ns[p], replacement=True, generator=g)
            counts[p::P] = torch.zeros(R, V, dtype=torch.long).scatter_add_(-1, d, torch.ones_like(d))
    stored = (torch.round(lp * 32) / 32) if quantize else lp
    sizes, ids, cnt, lps = [], [], [], []
    for row in range(R * P):
        p = row % P
        order = np.lexsort((np.arange(V), -stored[p].numpy()))  # descending log-probability, ties by id
        c = counts[row].numpy()[order]
        sel = order[c > 0]
        sizes.append(len(sel))
        ids.append(sel)
        cnt.append(c[c > 0])
        lps.append(stored[p].numpy()[sel])
    n = R * P
    rep = lambda x: x.repeat(R, *([1] * (x.dim() - 1))).numpy()  # noqa: E731
    return SequenceTargets(
        record=0, input_ids=np.zeros(n + 1, dtype=np.int32), loss_mask=np.r_[False, np.ones(n, dtype=bool)],
        topk_ids=rep(head_ids).astype(np.int32), topk_logprobs=rep(head_lp).astype(np.float32),
        target_logprob=np.zeros(n, dtype=np.float32), tail_logmass=rep(tail).astype(np.float32),
        sample_sizes=np.array(sizes, dtype=np.int32), sample_ids=np.concatenate(ids).astype(np.int32),
        sample_counts=np.concatenate(cnt).astype(np.int32), sample_logprobs=np.concatenate(lps).astype(np.float32))


def weighted_targets(seq: SequenceTargets, tau: float = 1.0) -> Targets:
    return collate([seq], V, None, sample_temperature=tau).targets


def as64(t: Targets) -> Targets:
    """The targets' log-probabilities and weights in float64 (the dense references are float64)."""
    return Targets(t.topk_ids, t.topk_logprobs.double(), t.tail_logmass.double(), t.labels, t.vocab_size,
                   t.weights.double())


def problem(P: int = 4, seed: int = 1):
    """Student hidden states and head, and teacher log-probabilities near the student's (as after some
    training: the ratio q/p stays within a few e-folds, so 1/p-weighted terms keep a finite variance);
    rows alternate flat and sharp."""
    g = torch.Generator().manual_seed(seed)
    sharp = torch.tensor([0.5, 2.5] * (P // 2), dtype=torch.float64).unsqueeze(-1)  # flat, sharp, ...
    hidden = torch.randn(P, H, generator=g, dtype=torch.float64) * sharp
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    teacher = hidden @ weight.t() + 0.7 * torch.randn(P, V, generator=g, dtype=torch.float64)
    return hidden, weight, teacher.log_softmax(-1)


def dense_loss_and_grad(name: str, teacher_lp, z, T):
    """Per-position dense divergences at T and their gradients w.r.t. the logits."""
    z = z.clone().requires_grad_(True)
    Tc = T.unsqueeze(-1) if isinstance(T, torch.Tensor) else T
    d = dense_div(name, (teacher_lp / Tc).log_softmax(-1), (z / Tc).log_softmax(-1))
    (g,) = torch.autograd.grad(d.sum(), z)
    return d.detach(), g


def estimates(name: str, t: Targets, z_rows: torch.Tensor, T: float):
    """Per-row weighted estimates and their gradients w.r.t. the logits (autograd through the support)."""
    z = z_rows.clone().requires_grad_(True)
    d = DIVERGENCES[name](weighted_teacher(t.topk_logprobs, t.weights, T), student_support(z, t.topk_ids, T),
                          weights=t.weights)
    (g,) = torch.autograd.grad(d.sum(), z)
    return d.detach(), g


def no_adakd(name: str, T: float = 1.0, a: float = 1.0, chunk: int = 4096, estimator: str = "importance") -> LossConfig:
    return LossConfig(loss=name, kd_weight=a, temperature=T, adakd=AdaKDConfig(latf=False, idts=False),
                      chunk_positions=chunk, sampled_estimator=estimator)


def kd_hidden_grads(name: str, t: Targets, hidden_rows, weight, T: float):
    """kd_loss's per-row gradients w.r.t. the hidden states, undone of the mean's 1/n and the T^2 factor."""
    h = hidden_rows.clone().requires_grad_(True)
    out = kd_loss(h, weight, t, no_adakd(name, T, chunk=300))  # several chunks
    out.loss.backward()
    return h.grad * len(h) / T ** 2, out


def mean_se(x: torch.Tensor, P: int):
    """(P, ...) mean and standard error over the R draws of row-major (R * P, ...) estimates."""
    x = x.reshape(-1, P, *x.shape[1:])
    return x.mean(0), x.std(0) / math.sqrt(x.shape[0])


# ---- unbiased: per-token sums at T = tau = 1 ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sampled", "hybrid"])
@pytest.mark.parametrize("name", PER_TOKEN_SUMS)
def test_unbiased_at_temperature_one_and_error_shrinks_like_one_over_sqrt_n(name, kind):
    """Value and gradient (logits; hidden states through kd_loss) averaged over R draws: within a few standard
    errors of the dense ones at N = 16 and N = 1024, and the standard error shrinks like 1 / sqrt(N)."""
    hidden, weight, lp = problem()
    P, R = lp.shape[0], 256
    z = hidden @ weight.t()
    dense, dense_g = dense_loss_and_grad(name, lp, z, 1.0)
    dense_gh = dense_g @ weight
    spread = {}
    for N in (16, 1024):
        t = weighted_targets(draw(lp, kind, N, R, seed=N))
        d, g = estimates(name, t, z.repeat(R, 1), 1.0)
        gh, out = kd_hidden_grads(name, t, hidden.repeat(R, 1), weight, 1.0)
        torch.testing.assert_close(out.loss, d.mean())  # kd_loss's value is the same estimate
        torch.testing.assert_close(gh, g @ weight)  # and its hand-written gradient autograd's
        for est, ref, what in ((d, dense, "value"), (g, dense_g, "logit gradient"), (gh, dense_gh, "hidden gradient")):
            m, se = mean_se(est, P)
            if what == "value":  # each position's error within 5 standard errors
                err = (m - ref).abs()
                assert (err <= 5 * se + 1e-9).all(), (what, N, err / se)
            else:  # a gradient's error norm within 4 times its expected size sqrt(sum of squared standard errors)
                err, se = (m - ref).norm(dim=-1), se.norm(dim=-1)  # (tokens never drawn have se = 0)
                assert (err <= 4 * se + 1e-9).all(), (what, N, err / se)
            spread[what, N] = (se.norm(), err.norm())
    for what in ("value", "logit gradient", "hidden gradient"):
        (se16, err16), (se1k, err1k) = spread[what, 16], spread[what, 1024]
        assert 4 < se16 / se1k < 16, (what, se16 / se1k)  # sqrt(1024 / 16) = 8
        if what != "value":  # the error itself (a gradient's: many coordinates) shrinks too
            assert err16 / err1k > 2, (what, err16, err1k)


# ---- self-normalized / consistent: tempering, tau != 1, akl ------------------------------------------------------

CONSISTENT = [(name, T, tau) for name in DIVERGENCES for T, tau in [(1.0, 1.0), (1.6, 1.0), (0.7, 1.0), (1.0, 0.7), (1.3, 1.5)]
              if (T, tau) != (1.0, 1.0) or name == "akl"]  # T = tau = 1: the per-token sums are unbiased (above)


@pytest.mark.parametrize("kind", ["sampled", "hybrid"])
@pytest.mark.parametrize("name,T,tau", CONSISTENT)
def test_self_normalized_estimates_converge(name, kind, T, tau):
    """Tempering at T != 1, a proposal at tau != 1 and akl are consistent, not unbiased: the R-draw mean's error
    at N = 4096 is within noise plus a bias that shrinks like 1 / sqrt(N) relative to the spread, and below
    the error at N = 16."""
    hidden, weight, lp = problem()
    P, R = lp.shape[0], 48
    z = hidden @ weight.t()
    dense, dense_g = dense_loss_and_grad(name, lp, z, T)
    errs = {}
    for N in (16, 4096):
        t = weighted_targets(draw(lp, kind, N, R, tau=tau, seed=N), tau)
        d, g = estimates(name, t, z.repeat(R, 1), T)
        for est, ref, what in ((d, dense, "value"), (g, dense_g, "gradient")):
            m, se = mean_se(est, P)
            if what == "value":
                err = (m - ref).abs()
            else:  # per position, the error's norm against sqrt(sum of squared standard errors)
                err, se = (m - ref).norm(dim=-1), se.norm(dim=-1)
            sd = se * math.sqrt(R)  # one draw's spread at this N
            if N == 4096:  # noise, plus a bias of O(1/N) = O(sd / sqrt(N))
                tol = 5 * se + 8 * sd / math.sqrt(N) + 1e-9
                assert (err <= tol).all(), (what, err / tol)
            errs[what, N] = err.norm()
    for what in ("value", "gradient"):
        assert errs[what, 4096] < errs[what, 16] or errs[what, 4096] < 1e-6, (what, errs[what, 16], errs[what, 4096])


# ---- exact properties ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sampled", "hybrid"])
@pytest.mark.parametrize("tau", [1.0, 0.8])
def test_fkl_gradient_is_student_minus_counts_over_n_exactly(kind, tau):
    """The forward-KL (CE) gradient w.r.t. the logits is q - c/N (Sparse Logit Sampling), even with log-probs
    quantized to 1/32 nat and at tau != 1 (the draws' weights then make it q - c p^(1 - 1/tau) / sum(...));
    hybrid: q - (exact head p, tail * that on the draws)."""
    hidden, weight, lp = problem(P=6)
    P, N = lp.shape[0], 50
    seq = draw(lp, kind, N, quantize=True, seed=3, tau=tau)
    t = weighted_targets(seq, tau)
    z = hidden @ weight.t()
    h = z.clone().requires_grad_(True)  # identity head: the hidden states are the logits
    out = kd_loss(h, torch.eye(V, dtype=torch.float64), t, no_adakd("fkl"))
    out.loss.backward()
    target = torch.zeros(P, V, dtype=torch.float64)
    pos = np.repeat(np.arange(P), seq.sample_sizes)
    c = torch.from_numpy(seq.sample_counts).double()
    lps = torch.from_numpy(seq.sample_logprobs).double()
    share = c * torch.exp(lps * (1 - 1 / tau))  # at tau = 1: the counts
    share = share / torch.zeros(P, dtype=torch.float64).index_add_(0, torch.from_numpy(pos), share)[pos]
    tail = torch.from_numpy(seq.tail_logmass).double().exp() if kind == "hybrid" else torch.ones(P, dtype=torch.float64)
    target[pos, torch.from_numpy(seq.sample_ids).long()] = tail[pos] * share
    if kind == "hybrid":
        target.scatter_(-1, torch.from_numpy(seq.topk_ids).long(), torch.from_numpy(seq.topk_logprobs).double().exp())
    else:
        assert tau != 1 or torch.equal(target * N, target.mul(N).round())  # c / N
    torch.testing.assert_close(h.grad * P, z.softmax(-1) - target, rtol=0, atol=2e-6)


@pytest.mark.parametrize("name", list(DIVERGENCES))
@pytest.mark.parametrize("temp", [1.0, 2.0, "per-token"])
def test_hybrid_with_k_equal_to_the_vocabulary_is_dense(name, temp):
    """No tail, no draws: the support is the whole vocabulary with weight 1 and every divergence, gradient and
    difficulty is the dense one."""
    hidden, weight, lp = problem(P=6)
    seq = draw(lp, "hybrid", 64, k=V)
    assert seq.sample_sizes.sum() == 0
    t = as64(weighted_targets(seq))
    assert t.weights.shape == (6, V) and (t.weights == 1).all()
    lp32 = torch.from_numpy(seq.topk_logprobs).double()
    teacher = torch.full_like(lp, 0.0).scatter_(-1, torch.from_numpy(seq.topk_ids).long(), lp32)  # as stored
    T = torch.linspace(0.6, 1.8, 6, dtype=torch.float64) if temp == "per-token" else temp
    z = hidden @ weight.t()
    d, g = estimates(name, t, z, T)
    ref, ref_g = dense_loss_and_grad(name, teacher, z, T)
    torch.testing.assert_close(d, ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g, ref_g, rtol=1e-9, atol=1e-12)
    if temp != "per-token":  # through kd_loss, CE mixed in, several chunks
        h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        kd_loss(h1, w1, t, no_adakd(name, temp, a=0.7, chunk=4)).loss.backward()
        h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        z2 = h2 @ w2.t()
        dd = dense_div(name, (teacher / temp).log_softmax(-1), (z2 / temp).log_softmax(-1))
        (0.3 * torch.nn.functional.cross_entropy(z2, t.labels) + 0.7 * (temp ** 2 * dd).mean()).backward()
        torch.testing.assert_close(h1.grad, h2.grad)
        torch.testing.assert_close(w1.grad, w2.grad)
    torch.testing.assert_close(difficulties(hidden, OutputHead(weight), t, 4, importance=True),
                               hellinger(teacher.log_softmax(-1), z.log_softmax(-1)))


@pytest.mark.parametrize("kind", ["sampled", "hybrid"])
@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_padded_rows_give_each_position_its_own_loss(name, kind):
    """Positions with different numbers of distinct ids (hence padding, repeating the row's first id) in one
    batch: each position's loss, gradient and difficulty equal those of the position alone."""
    hidden, weight, lp = problem(P=4)
    seqs = [draw(lp[p:p + 1], kind, N, seed=p) for p, N in enumerate([1, 7, 60, 900])]
    if kind == "hybrid":  # and one position with no draw at all
        seqs[0] = draw(lp[:1], kind, 0, sizes_n=[0])
    alone = [as64(weighted_targets(s)) for s in seqs]
    together = as64(collate(seqs, V, None).targets)
    widths = [a.weights.shape[1] for a in alone]
    assert together.weights.shape[1] == max(widths) and len(set(widths)) > 1
    assert (together.weights[0, widths[0]:] == 0).all() and (together.topk_ids[0, widths[0]:] == together.topk_ids[0, 0]).all()
    z = hidden @ weight.t()
    for T in (1.0, 1.7):
        d, g = estimates(name, together, z, T)
        gh, _ = kd_hidden_grads(name, together, hidden, weight, T)
        for p, a in enumerate(alone):
            d1, g1 = estimates(name, a, z[p:p + 1], T)
            gh1, _ = kd_hidden_grads(name, a, hidden[p:p + 1], weight, T)
            torch.testing.assert_close(d[p:p + 1], d1, rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(g[p:p + 1], g1, rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(gh[p:p + 1], gh1, rtol=1e-6, atol=1e-9)
    s = difficulties(hidden, OutputHead(weight), together, 2, importance=True)
    torch.testing.assert_close(s, torch.cat([difficulties(hidden[p:p + 1], OutputHead(weight), a, 2, importance=True)
                                             for p, a in enumerate(alone)]))


# ---- AdaKD on weighted targets ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sampled", "hybrid"])
@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_adakd_on_weighted_targets_converges_to_dense(name, kind):
    """LATF + IDTS on weighted targets: the same positions are selected as with the dense distributions, and the
    difficulties (Hellinger distances), loss and gradients converge to dense AdaKD's as N grows."""
    P, R = 8, 12
    hidden, weight, lp = problem(P=P, seed=3)
    s_dense = hellinger(lp, (hidden @ weight.t()).log_softmax(-1))
    top = s_dense.sort(descending=True).values
    assert top[3] - top[4] > 0.05  # a clear selection boundary at ratio 0.5
    dense_loss, sel, T = dense_adakd(hidden, weight, lp, name, 0.5, 1.0, 0.5)
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()  # selection, temperatures constant
    z2, Tc = h2 @ w2.t(), T.unsqueeze(-1)
    (T ** 2 * dense_div(name, (lp[sel] / Tc).log_softmax(-1), (z2[sel] / Tc).log_softmax(-1))).mean().backward()
    cfg = LossConfig(loss=name, temperature=1.0, adakd=AdaKDConfig(latf=True, idts=True, temperature_scale=0.5),
                     sampled_estimator="importance")
    dense_grad = torch.cat([h2.grad.flatten(), w2.grad.flatten()])
    errs = {}
    for N in (64, 4096):
        ss, losses, grads = [], [], []
        for r in range(R):
            t = weighted_targets(draw(lp, kind, N, seed=1000 * r + N))
            ss.append(difficulties(hidden, OutputHead(weight), t, 3, importance=True))
            h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            out = kd_loss(h1, w1, t, cfg, LATFState(ratio=0.5))
            out.loss.backward()
            assert out.selected == len(sel)
            losses.append(out.loss.detach())
            grads.append(torch.cat([h1.grad.flatten(), w1.grad.flatten()]))
        for what, est, ref in (("difficulty", torch.stack(ss), s_dense), ("loss", torch.stack(losses), dense_loss),
                               ("gradient", torch.stack(grads), dense_grad)):
            m, se = est.mean(0), est.std(0) / math.sqrt(R)
            err, se = (m - ref).norm(), se.norm()  # the difficulties' and gradient's errors as norms
            sd = se * math.sqrt(R)
            if N == 4096:  # noise, plus a bias of O(1/N) = O(sd / sqrt(N))
                assert err <= 5 * se + 8 * sd / math.sqrt(N) + 1e-9, (what, err, se)
            errs[what, N] = err
    for what in ("difficulty", "loss", "gradient"):
        assert errs[what, 4096] < errs[what, 64], (what, errs)
    assert errs["difficulty", 4096] < 0.01 * math.sqrt(P)


# ---- collate, truncate, eval ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sampled", "hybrid"])
@pytest.mark.parametrize("tau", [1.0, 0.6, 2.0])
def test_collate_weights_are_the_self_normalized_importance_weights(kind, tau):
    _, _, lp = problem(P=4)
    seq = draw(lp, kind, 40, R=2, tau=tau, quantize=True)
    t = weighted_targets(seq, tau)
    assert torch.equal(collate([seq], V, None, tau).to("cpu").targets.weights, t.weights)  # Batch.to carries them
    k = seq.topk_ids.shape[1]
    n = seq.num_positions
    assert t.weights.shape == (n, k + seq.sample_sizes.max()) and t.weights.dtype == torch.float32
    assert (t.weights[:, :k] == 1).all() and torch.equal(t.topk_ids[:, :k], torch.from_numpy(seq.topk_ids).long())
    tail = np.exp(seq.tail_logmass.astype(np.float64)) if kind == "hybrid" else np.ones(n)
    mass = (t.weights.double() * t.topk_logprobs.double().exp())[:, k:].sum(-1)
    torch.testing.assert_close(mass, torch.from_numpy(tail), rtol=1e-6, atol=0)  # sum_j m_j p_j = tail
    if tau == 1.0:  # inverse inclusion probabilities: m_j p_j = tail * c_j / N
        start = 0
        for i, size in enumerate(seq.sample_sizes):
            c = seq.sample_counts[start:start + size]
            mp = t.weights[i, k:k + size].double() * t.topk_logprobs[i, k:k + size].double().exp()
            torch.testing.assert_close(mp, torch.from_numpy(tail[i] * c / 40.0), rtol=1e-6, atol=0)
            start += size
    lps = t.topk_logprobs
    real = t.weights > 0
    assert all((lps[i][real[i]].diff() <= 0).all() for i in range(n))  # sorted by descending log-probability


def test_weighted_support_of_nothing():
    ids, lp, w = weighted_support(np.zeros((0, 0), np.int32), np.zeros((0, 0), np.float32), np.zeros(0, np.float32),
                                  np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int32),
                                  np.zeros(0, np.float32))
    assert ids.shape == lp.shape == w.shape == (0, 0)


@pytest.mark.parametrize("kind", ["sampled", "hybrid"])
def test_truncate_cuts_the_draws_of_the_positions_it_drops(kind):
    _, _, lp = problem(P=4)
    seq = draw(lp, kind, 30, R=2)  # 8 trained positions: tokens 1..8
    short = truncate(seq, 4)  # tokens 0..3: positions 1..3
    assert short.num_positions == 3 and short.sampled
    S = int(seq.sample_sizes[:3].sum())
    assert np.array_equal(short.sample_sizes, seq.sample_sizes[:3])
    for f in ("sample_ids", "sample_counts", "sample_logprobs"):
        assert np.array_equal(getattr(short, f), getattr(seq, f)[:S])
    full, cut = weighted_targets(seq), weighted_targets(short)
    w = cut.weights.shape[1]
    torch.testing.assert_close(cut.weights, full.weights[:3, :w])
    assert (full.weights[:3, w:] == 0).all()


def test_a_sampled_cache_trains_against_the_whole_vocabulary():
    assert target_vocab(0, 151_936, 151_665) == 151_936
    assert target_vocab(0, 100, 100) == 100


@pytest.mark.parametrize("kind", ["sampled", "hybrid"])
def test_eval_kl_is_the_weighted_forward_kl_estimate(kind):
    hidden, weight, lp = problem(P=4)
    z = hidden @ weight.t()
    t = weighted_targets(draw(lp, kind, 20000, seed=9))
    kl = cached_kl(z, t)
    torch.testing.assert_close(kl, fkl(weighted_teacher(t.topk_logprobs, t.weights), student_support(z, t.topk_ids),
                                       weights=t.weights))
    dense = dense_div("fkl", lp, z.log_softmax(-1))
    assert ((kl - dense).abs() < 0.05 * dense + 0.01).all(), (kl, dense)
    assert torch.equal(t.topk_ids[:, 0], lp.argmax(-1))  # agreement is against the most likely drawn/head id


# ---- the stored support's buckets (`--sampled-estimator support`, auto for all but fkl/sfkl) ------------------------

def as_topk(t: Targets, row: int) -> Targets:
    """One row of weighted targets as a top-k target over exactly its stored ids, the rest of the teacher's mass
    as the tail: what the support estimator must compute."""
    keep = t.weights[row] > 0
    ids, lp = t.topk_ids[row][keep], t.topk_logprobs[row][keep].double()
    return Targets(ids[None], lp[None], t.tail_logmass[row:row + 1], t.labels[row:row + 1], t.vocab_size)


@pytest.mark.parametrize("kind", ["sampled", "hybrid"])
@pytest.mark.parametrize("name", list(DIVERGENCES))
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_support_estimator_is_the_top_k_computation_on_the_stored_ids(name, kind, T):
    hidden, weight, lp = problem()
    t = as64(weighted_targets(draw(lp, kind, 24, seed=3)))
    for row in range(hidden.shape[0]):
        one = t.index(torch.tensor([row]))
        one = Targets(one.topk_ids[:, : int((one.weights > 0).sum())], one.topk_logprobs[:, : int((one.weights > 0).sum())],
                      one.tail_logmass, one.labels, one.vocab_size, one.weights[:, : int((one.weights > 0).sum())])
        h1 = hidden[row:row + 1].clone().requires_grad_(True)
        a = kd_loss(h1, weight, one, no_adakd(name, T, estimator="support"))
        a.loss.backward()
        h2 = hidden[row:row + 1].clone().requires_grad_(True)
        b = kd_loss(h2, weight, as_topk(t, row), no_adakd(name, T))
        b.loss.backward()
        torch.testing.assert_close(a.loss, b.loss)
        torch.testing.assert_close(h1.grad, h2.grad)


@pytest.mark.parametrize("kind", ["sampled", "hybrid"])
@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_support_estimator_padding_changes_nothing(name, kind):
    """Rows with different numbers of stored ids, batched (padded), give each row's own loss and gradient."""
    hidden, weight, lp = problem()
    seq = draw(lp, kind, 24, seed=5, sizes_n=[4, 24, 64, 24])
    t = as64(weighted_targets(seq))
    assert (t.weights == 0).any()  # there is padding
    h = hidden.clone().requires_grad_(True)
    together = kd_loss(h, weight, t, no_adakd(name, estimator="support"))
    (together.loss * len(h)).backward()
    for row in range(len(h)):
        hr = hidden[row:row + 1].clone().requires_grad_(True)
        alone = kd_loss(hr, weight, as_topk(t, row), no_adakd(name))
        alone.loss.backward()
        torch.testing.assert_close(h.grad[row:row + 1], hr.grad)


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_support_estimator_converges_as_the_draws_cover_the_vocabulary(name):
    """Biased like a top-k cache (the unstored mass is one bucket), but the bucket empties as N grows."""
    hidden, weight, lp = problem()
    z = hidden @ weight.t()
    dense, _ = dense_loss_and_grad(name, lp, z, 1.0)
    errors = []
    for N in (16, 16384):
        t = as64(weighted_targets(draw(lp, "sampled", N, seed=N)))
        out = kd_loss(hidden, weight, t, no_adakd(name, estimator="support"))
        errors.append(abs(out.loss.item() - dense.mean().item()))
    assert errors[1] < errors[0] and errors[1] < 0.02 * max(dense.mean().item(), 1e-3) + 1e-4, errors


def test_auto_estimator_is_importance_for_fkl_and_sfkl_only():
    chosen = {name: LossConfig(loss=name).importance for name in DIVERGENCES}
    assert chosen == {name: name in ("fkl", "sfkl") for name in DIVERGENCES}
    assert LossConfig(loss="rkl", sampled_estimator="importance").importance
    assert not LossConfig(loss="fkl", sampled_estimator="support").importance
    with pytest.raises(ValueError, match="--sampled-estimator must be one of"):
        LossConfig(sampled_estimator="exact")
