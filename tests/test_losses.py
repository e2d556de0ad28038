"""Sparse-target losses and AdaKD against dense references written from the definitions."""

from __future__ import annotations

import math

import pytest
import torch

from adakd.trainer.adakd import AdaKDConfig, LATFState, idts_temperatures, latf_update, past_warmup, select
from adakd.trainer.kd_loss import LossConfig, Targets, kd_loss
from adakd.trainer.losses import DIVERGENCES, hellinger, student_buckets, teacher_buckets

V = 11


def dense_div(name: str, lp: torch.Tensor, lq: torch.Tensor, beta=0.1, skew=0.1, mu=0.5, ab=(0.2, 0.7)) -> torch.Tensor:
    """Each divergence written directly on full distributions."""
    p, q = lp.exp(), lq.exp()
    if name == "abkd":  # the ABKD / AdaKD code's ab_div, case by case, on probabilities (no zeros here)
        a, b = ab
        if a == 0 and b == 0:
            return 0.5 * ((q.log() - p.log()) ** 2).sum(-1)
        if a == 0:
            return (1 / b) * (q ** b * torch.log(q ** b / p ** b) - q ** b + p ** b).sum(-1)
        if b == 0:
            return (1 / a) * (p ** a * torch.log(p ** a / q ** a) - p ** a + q ** a).sum(-1)
        if a + b == 0:
            return ((1 / a) * (torch.log(q ** a / p ** a) + p ** a / q ** a - 1)).sum(-1)
        return -(p ** a * q ** b - a / (a + b) * p ** (a + b) - b / (a + b) * q ** (a + b)).sum(-1) / (a * b)
    kl = lambda a, b: (a * (a.log() - b.log())).sum(-1)  # noqa: E731
    if name == "fkl":
        return kl(p, q)
    if name == "rkl":
        return kl(q, p)
    if name == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if name == "sfkl":
        return kl(p, skew * p + (1 - skew) * q)
    if name == "srkl":
        return kl(q, skew * q + (1 - skew) * p)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "akl":
        ps, order = p.sort(-1, descending=True)
        qs = q.gather(-1, order)
        head = ps.cumsum(-1) <= mu  # the official get_ratio: cum_sum > mu is the tail, the first is head
        head[..., 0] = True
        gap = (ps - qs).abs().detach()  # AKL's weights are held constant (documented choice)
        gh = (gap * head).sum(-1)
        gt = (gap * ~head).sum(-1)
        return gh / (gh + gt) * kl(p, q) + gt / (gh + gt) * kl(q, p)
    raise KeyError(name)


def full_targets(teacher_logits: torch.Tensor, labels: torch.Tensor, k: int = V) -> Targets:
    lp = teacher_logits.log_softmax(-1)
    v, i = lp.topk(k, -1)
    rest = 1 - v.exp().sum(-1)
    tail = torch.where(rest > 0, rest.clamp_min(1e-300).log(), torch.full_like(rest, -math.inf)) if k < V else torch.full_like(rest, -math.inf)
    return Targets(i, v, tail, labels, V)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    N, H = 9, 6
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    teacher = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, teacher, labels


@pytest.mark.parametrize("name", list(DIVERGENCES))
@pytest.mark.parametrize("temp", [1.0, 2.0, "per-token"])
def test_sparse_equals_dense_when_k_is_vocabulary(data, name, temp):
    assert_sparse_equals_dense(data, name, temp)


def assert_sparse_equals_dense(data, name: str, temp, **kwargs) -> torch.Tensor:
    """The bucketed divergence at k = V against its dense form (`kwargs`: the divergence's parameters, and
    `ab` for dense_div's abkd); returns the bucketed values."""
    hidden, weight, teacher, labels = data
    z = hidden @ weight.t()
    T = torch.linspace(0.6, 1.8, len(z), dtype=torch.float64) if temp == "per-token" else temp
    t = full_targets(teacher, labels)
    options = {k: v for k, v in kwargs.items() if k != "ab"}
    sparse = DIVERGENCES[name](teacher_buckets(t.topk_logprobs, t.tail_logmass, V, T), student_buckets(z, t.topk_ids, T),
                               **options)
    Tc = T.unsqueeze(-1) if isinstance(T, torch.Tensor) else T
    dense = dense_div(name, (teacher / Tc).log_softmax(-1), (z / Tc).log_softmax(-1),
                      **({"ab": kwargs["ab"]} if "ab" in kwargs else {}))
    torch.testing.assert_close(sparse, dense, rtol=1e-9, atol=1e-12)
    return sparse


def test_hellinger_sparse_equals_dense_and_lower_bounds_it(data):
    hidden, weight, teacher, labels = data
    z = hidden @ weight.t()
    dense = hellinger(teacher.log_softmax(-1), z.log_softmax(-1))
    t = full_targets(teacher, labels)
    torch.testing.assert_close(hellinger(teacher_buckets(t.topk_logprobs, t.tail_logmass, V), student_buckets(z, t.topk_ids)), dense)
    t4 = full_targets(teacher, labels, k=4)
    coarse = hellinger(teacher_buckets(t4.topk_logprobs, t4.tail_logmass, V), student_buckets(z, t4.topk_ids))
    assert (coarse <= dense + 1e-12).all()


def test_tail_bucket_is_exact_at_temperature_one(data):
    hidden, weight, teacher, labels = data
    t = full_targets(teacher, labels, k=4)
    lp = teacher_buckets(t.topk_logprobs, t.tail_logmass, V, 1.0)
    full = teacher.log_softmax(-1)
    torch.testing.assert_close(lp[:, :4], t.topk_logprobs)
    torch.testing.assert_close(lp[:, 4].exp(), 1 - t.topk_logprobs.exp().sum(-1))
    assert torch.allclose(lp.exp().sum(-1), torch.ones(len(lp), dtype=torch.float64))
    assert full.shape[1] == V


def dense_adakd(hidden, weight, teacher, name, ratio, T_base, c, latf=True, idts=True):
    """AdaKD written straight from ../shared/reference/adakd.md, on full distributions."""
    z = hidden @ weight.t()
    p, q = teacher.softmax(-1), z.softmax(-1)
    s = (1 / math.sqrt(2)) * ((p.sqrt() - q.sqrt()) ** 2).sum(-1).sqrt()
    N = len(s)
    n = max(1, math.floor(ratio * N)) if latf else N
    sel = torch.topk(s, n).indices.sort().values if latf else torch.arange(N)
    if idts:
        m = s[sel].median()
        u = torch.tanh(torch.log(torch.clamp(s[sel] / m, min=1e-8)))
        T = T_base * torch.exp(-c * u)
    else:
        T = torch.full((n,), T_base, dtype=torch.float64)
    Tc = T.unsqueeze(-1)
    d = dense_div(name, (teacher[sel] / Tc).log_softmax(-1), (z[sel] / Tc).log_softmax(-1))
    return (T ** 2 * d).mean(), sel, T


@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd", "akl", "abkd"])
@pytest.mark.parametrize("latf,idts", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("chunk", [4, 1000])  # several chunks (recomputed logits) / one chunk (logits reused)
def test_adakd_matches_dense_reference(data, name, latf, idts, chunk):
    hidden, weight, teacher, labels = data
    cfg = LossConfig(loss=name, temperature=1.3, adakd=AdaKDConfig(latf=latf, idts=idts, temperature_scale=0.5),
                     chunk_positions=chunk)
    out = kd_loss(hidden, weight, full_targets(teacher, labels), cfg, LATFState(ratio=0.55))
    ref, sel, T = dense_adakd(hidden, weight, teacher, name, 0.55, 1.3, 0.5, latf, idts)
    torch.testing.assert_close(out.loss, ref)
    assert out.selected == len(sel) and out.valid == len(hidden)
    torch.testing.assert_close(out.temperatures.double(), T.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [3, 1000])
@pytest.mark.parametrize("a", [1.0, 0.6])
def test_adakd_gradients_equal_dense_autograd(data, chunk, a):
    """Difficulty, selection and temperatures are constants; the rest is differentiated."""
    hidden, weight, teacher, labels = data
    cfg = LossConfig(loss="rkl", kd_weight=a, temperature=1.2, adakd=AdaKDConfig(), chunk_positions=chunk)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = kd_loss(h1, w1, full_targets(teacher, labels), cfg, LATFState(ratio=0.6))
    out.loss.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.no_grad():
        _, sel, T = dense_adakd(hidden, weight, teacher, "rkl", 0.6, 1.2, 0.5)
    z = h2 @ w2.t()
    Tc = T.unsqueeze(-1)
    d = dense_div("rkl", (teacher[sel] / Tc).log_softmax(-1), (z[sel] / Tc).log_softmax(-1))
    loss = a * (T ** 2 * d).mean() + (1 - a) * torch.nn.functional.cross_entropy(z, labels)
    loss.backward()
    torch.testing.assert_close(out.loss, loss)
    torch.testing.assert_close(h1.grad, h2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_chunked_gradients_equal_dense_autograd(data, name):
    hidden, weight, teacher, labels = data
    cfg = LossConfig(loss=name, kd_weight=0.7, temperature=1.5, adakd=AdaKDConfig(latf=False, idts=False), chunk_positions=2)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    kd_loss(h1, w1, full_targets(teacher, labels), cfg).loss.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    z = h2 @ w2.t()
    d = dense_div(name, (teacher / 1.5).log_softmax(-1), (z / 1.5).log_softmax(-1))
    ce = torch.nn.functional.cross_entropy(z, labels)
    (0.3 * ce + 0.7 * (1.5 ** 2 * d).mean()).backward()
    torch.testing.assert_close(h1.grad, h2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)


@pytest.mark.parametrize("scale,softcap,ada", [(1.0, None, False), (0.37, None, False), (2.5, None, True),
                                                (1.0, 3.0, False), (1.0, 2.0, True)])
def test_head_bias_scale_and_softcap_gradients_equal_dense_autograd(data, scale, softcap, ada):
    """Phi's output bias, Cohere/Granite logit scaling and Gemma 2's final soft-cap: the chunked loss's hand-written
    gradient goes through them exactly as autograd does through the model's own formula."""
    from adakd.trainer.head import OutputHead

    hidden, weight, teacher, labels = data
    bias = torch.randn(V, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cfg = LossConfig(loss="fkl", kd_weight=0.6, temperature=1.3, chunk_positions=4,
                     adakd=AdaKDConfig(latf=ada, idts=ada))
    h1, w1, b1 = (x.clone().requires_grad_() for x in (hidden, weight, bias))
    out = kd_loss(h1, OutputHead(w1, b1, scale, softcap), full_targets(teacher, labels, k=5), cfg, LATFState(ratio=0.7))
    out.loss.backward()
    h2, w2, b2 = (x.clone().requires_grad_() for x in (hidden, weight, bias))
    z = (h2 @ w2.t() + b2) * scale
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    with torch.no_grad():  # the reference: the same selection and temperatures, on the model's own logits
        from adakd.trainer.kd_loss import difficulties

        s = difficulties(hidden, OutputHead(weight, bias, scale, softcap), full_targets(teacher, labels, k=5), 4)
        sel = select(s, 0.7) if ada else torch.arange(len(s))
        T = idts_temperatures(s[sel], 1.3, 0.5) if ada else torch.full((len(sel),), 1.3, dtype=torch.float64)
    t5 = full_targets(teacher, labels, k=5)
    lp = teacher_buckets(t5.topk_logprobs[sel], t5.tail_logmass[sel], V, T)
    lq = student_buckets(z[sel], t5.topk_ids[sel], T)
    d = DIVERGENCES["fkl"](lp, lq)
    loss = 0.6 * (T ** 2 * d).mean() + 0.4 * torch.nn.functional.cross_entropy(z, labels)
    loss.backward()
    torch.testing.assert_close(out.loss, loss)
    for ours, ref in ((h1, h2), (w1, w2), (b1, b2)):
        torch.testing.assert_close(ours.grad, ref.grad)


def test_gradcheck_numerically(data):
    hidden, weight, teacher, labels = data
    t = full_targets(teacher, labels, k=4)
    cfg = LossConfig(loss="srkl", kd_weight=0.8, temperature=1.7, adakd=AdaKDConfig(latf=False, idts=False), chunk_positions=3)
    h = hidden[:5].clone().requires_grad_()
    w = weight.clone().requires_grad_()
    f = lambda a, b: kd_loss(a, b, t.index(torch.arange(5)), cfg).loss  # noqa: E731
    assert torch.autograd.gradcheck(f, (h, w), eps=1e-6, atol=1e-5)


def test_no_valid_position_gives_zero_not_nan():
    h = torch.zeros(0, 6, requires_grad=True)
    w = torch.randn(V, 6, requires_grad=True)
    t = Targets(torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), V)
    out = kd_loss(h, w, t, LossConfig(), LATFState())
    out.loss.backward()
    assert out.loss.item() == 0.0 and torch.isfinite(w.grad).all() and out.selected == 0


def test_unknown_loss_is_refused():
    with pytest.raises(ValueError, match="unknown loss 'kl2'.*fkl, rkl, jsd, sfkl, srkl, tvd, akl, abkd"):
        LossConfig(loss="kl2")


def test_latf_controller_follows_the_loss_trend():
    cfg = AdaKDConfig(ema_decay=0.0)  # E = L, to read the rule directly
    st = LATFState()
    latf_update(st, 10.0, past_warmup=False, cfg=cfg)
    assert st.reference is None and st.ratio == 1.0
    latf_update(st, 10.0, past_warmup=True, cfg=cfg)
    assert st.reference == 10.0
    latf_update(st, 9.0, past_warmup=True, cfg=cfg)  # falling by 10% > eps: narrow
    assert st.ratio == pytest.approx(0.95) and st.reference == 9.0
    latf_update(st, 8.9, past_warmup=True, cfg=cfg)  # within eps: unchanged
    assert st.ratio == pytest.approx(0.95) and st.reference == 9.0
    latf_update(st, 10.0, past_warmup=True, cfg=cfg)  # rising by > eps: widen
    assert st.ratio == pytest.approx(0.95 * 1.05) and st.reference == 10.0
    latf_update(st, 11.0, past_warmup=True, cfg=cfg)  # rising again: capped at 1
    assert st.ratio == 1.0
    for _ in range(200):
        latf_update(st, st.reference * 0.5, past_warmup=True, cfg=cfg)
    assert st.ratio == pytest.approx(0.1)  # floor
    st2 = LATFState.from_json(st.to_json())
    assert st2 == st


def test_selection_and_temperatures():
    s = torch.tensor([0.1, 0.5, 0.3, 0.9, 0.2])
    assert select(s, 0.4).tolist() == [1, 3]
    assert select(s, 0.0).tolist() == [3]  # at least one
    T = idts_temperatures(torch.tensor([0.2, 0.4, 0.8]), 2.0, 0.5)
    assert T[1].item() == pytest.approx(2.0)  # median difficulty -> base temperature
    assert T[2] < 2.0 < T[0]  # harder -> colder
    assert (T > 2.0 * math.exp(-0.5)).all() and (T < 2.0 * math.exp(0.5)).all()


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_a_tail_rounded_to_zero_keeps_every_loss_finite(data, name):
    """A very confident teacher's top-k can sum to 1 in float32: the cache then holds a zero tail."""
    hidden, weight, teacher, labels = data
    t = full_targets(teacher * 20, labels, k=4)
    t.tail_logmass = torch.full_like(t.tail_logmass, -math.inf)
    h, w = hidden.clone().float().requires_grad_(), weight.clone().float().requires_grad_()
    t = Targets(t.topk_ids, t.topk_logprobs.float(), t.tail_logmass.float(), t.labels, V)
    out = kd_loss(h, w, t, LossConfig(loss=name, chunk_positions=4), LATFState())
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()


# ---- alpha-beta divergence ------------------------------------------------------------------------------------

AB_CASES = [(0.2, 0.7), (0.5, 0.5), (1.3, 0.4), (0.0, 0.0), (0.0, 0.7), (0.0, 1.0), (1.0, 0.0), (0.5, 0.0), (2.0, 3.0)]


@pytest.mark.parametrize("ab", AB_CASES + [(-0.5, 0.5), (0.6, -0.6)])  # a + b = 0: only reachable here, not via LossConfig
@pytest.mark.parametrize("temp", [1.0, 2.0, "per-token"])
def test_abkd_sparse_equals_the_official_dense_formula_when_k_is_vocabulary(data, ab, temp):
    sparse = assert_sparse_equals_dense(data, "abkd", temp, abkd_alpha=ab[0], abkd_beta=ab[1], ab=ab)
    # with a < 0 the official a + b = 0 case is 1/a (not 1/a^2) times a non-negative sum: negative, no divergence
    assert (sparse >= -1e-12).all() if min(ab) >= 0 or ab[0] > 0 else (sparse < 0).all()


def test_abkd_known_cases(data):
    hidden, weight, teacher, labels = data
    lp, lq = teacher.log_softmax(-1), (hidden @ weight.t()).log_softmax(-1)
    ab = lambda a, b, x=lp, y=lq: DIVERGENCES["abkd"](x, y, abkd_alpha=a, abkd_beta=b)  # noqa: E731
    torch.testing.assert_close(ab(1.0, 0.0), DIVERGENCES["fkl"](lp, lq))  # a = 1, b = 0: forward KL
    torch.testing.assert_close(ab(0.0, 1.0), DIVERGENCES["rkl"](lp, lq))  # a = 0, b = 1: reverse KL
    torch.testing.assert_close(ab(0.0, 0.0), 0.5 * ((lp - lq) ** 2).sum(-1))  # log-Euclidean
    torch.testing.assert_close(ab(0.2, 0.7, lp, lp), torch.zeros(len(lp), dtype=torch.float64), atol=1e-12, rtol=0)
    # the general formula is continuous into Cichocki's limits; at a = 1 / b = 1 they are the official special cases
    torch.testing.assert_close(ab(1.0, 1e-7), ab(1.0, 0.0), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(ab(1e-7, 1.0), ab(0.0, 1.0), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(ab(1e-6, 1e-6), ab(0.0, 0.0), rtol=1e-4, atol=1e-9)
    # elsewhere the official b = 0 (a = 0) case divides by a (b), not a^2 (b^2): a (b) times the limit (documented)
    torch.testing.assert_close(0.5 * ab(0.5, 1e-7), ab(0.5, 0.0), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(0.7 * ab(1e-7, 0.7), ab(0.0, 0.7), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("ab", AB_CASES)
def test_abkd_chunked_gradients_equal_dense_autograd(data, ab):
    hidden, weight, teacher, labels = data
    cfg = LossConfig(loss="abkd", kd_weight=0.7, temperature=1.5, abkd_alpha=ab[0], abkd_beta=ab[1],
                     adakd=AdaKDConfig(latf=False, idts=False), chunk_positions=2)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = kd_loss(h1, w1, full_targets(teacher, labels), cfg)
    out.loss.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    z = h2 @ w2.t()
    d = dense_div("abkd", (teacher / 1.5).log_softmax(-1), (z / 1.5).log_softmax(-1), ab=ab)
    loss = 0.3 * torch.nn.functional.cross_entropy(z, labels) + 0.7 * (1.5 ** 2 * d).mean()
    loss.backward()
    torch.testing.assert_close(out.loss, loss)
    torch.testing.assert_close(h1.grad, h2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)


@pytest.mark.parametrize("ab", [(0.2, 0.7), (0.0, 0.0), (0.0, 0.7), (0.5, 0.0)])
def test_abkd_gradcheck_numerically_with_a_tail(data, ab):
    hidden, weight, teacher, labels = data
    t = full_targets(teacher, labels, k=4)
    cfg = LossConfig(loss="abkd", kd_weight=0.8, temperature=1.7, abkd_alpha=ab[0], abkd_beta=ab[1],
                     adakd=AdaKDConfig(latf=False, idts=False), chunk_positions=3)
    h = hidden[:5].clone().requires_grad_()
    w = weight.clone().requires_grad_()
    f = lambda a, b: kd_loss(a, b, t.index(torch.arange(5)), cfg).loss  # noqa: E731
    assert torch.autograd.gradcheck(f, (h, w), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("option,field", [("--abkd-alpha", "abkd_alpha"), ("--abkd-beta", "abkd_beta")])
@pytest.mark.parametrize("value", [-0.1, -1.0, math.inf, math.nan])
def test_abkd_parameters_out_of_range_are_refused(option, field, value):
    with pytest.raises(ValueError, match=f"^{option} must be a finite number >= 0, not {value}$"):
        LossConfig(loss="abkd", **{field: value})
    assert LossConfig(loss="abkd", **{field: 0.0}).divergence_kwargs()[field] == 0.0


# ---- LATF warm-up counting against the official loop ---------------------------------------------------------

def official_latf(losses, total, warmup_iters, decay=0.99, loss_ratio_eps=0.05, sample_ratio_eps=0.05, floor=0.1):
    """SassyRong/AdaKD distillation.py's finetune loop, LATF lines only, transcribed literally (gradient
    accumulation 1, so one iteration = one optimizer step). Returns (ratio, reference) after each iteration."""
    step, global_step = 1, 1
    sample_ratio = 1.0
    ema = None  # utils.LossEma
    prev_interval_ema_loss = None
    out = []
    for global_distil_loss in losses:
        ema = global_distil_loss if ema is None else decay * ema + (1 - decay) * global_distil_loss
        cur_ema_loss = ema
        if prev_interval_ema_loss is not None:
            delta_ema_loss = prev_interval_ema_loss - cur_ema_loss
            loss_eps = prev_interval_ema_loss * loss_ratio_eps
            if delta_ema_loss < -loss_eps:
                sample_ratio = min(sample_ratio * (1 + sample_ratio_eps), 1.0)
                prev_interval_ema_loss = cur_ema_loss
            elif delta_ema_loss > loss_eps:
                sample_ratio = max(sample_ratio * (1 - sample_ratio_eps), floor)  # 0.1 in the official code
                prev_interval_ema_loss = cur_ema_loss
        elif prev_interval_ema_loss is None and global_step > warmup_iters * total:
            prev_interval_ema_loss = cur_ema_loss
        out.append((sample_ratio, prev_interval_ema_loss))
        step += 1
        if step % 1 == 0:
            global_step += 1
        if global_step > total:
            break
    return out


def _loss_curve(total: int) -> list[float]:
    """Falls, rises and falls again, with wiggles: moves the ratio both ways."""
    return [2.0 + 1.5 * math.cos(2 * math.pi * i / max(4, total / 3)) + 0.3 * math.sin(1.7 * i) + 3.0 / (1 + i)
            for i in range(total)]


@pytest.mark.parametrize("total", [1, 2, 7, 20, 30, 100, 333])
@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.05, 0.1, 0.29, 0.5, 1.0])
@pytest.mark.parametrize("decay", [0.99, 0.8, 0.0])
def test_latf_trajectory_matches_the_official_loop(total, fraction, decay):
    losses = _loss_curve(total)
    ref = official_latf(losses, total, fraction, decay=decay)
    cfg = AdaKDConfig(ema_decay=decay)
    st = LATFState()
    ours = []
    for step in range(total):  # train.py: 0-based step, update after the optimizer step, before step += 1
        latf_update(st, losses[step], past_warmup=past_warmup(step, total, fraction), cfg=cfg)
        ours.append((st.ratio, st.reference))
    assert ours == ref  # exact: the same float operations in the same order
    set_at = next((i + 1 for i, (_, r) in enumerate(ours) if r is not None), None)  # 1-based iteration
    expected = math.floor(fraction * total) + 1  # the official first iteration with global_step > fraction * total
    assert set_at == (expected if expected <= total else None)


@pytest.mark.parametrize("total,fraction,iteration", [
    (30, 0.05, 2),  # 1.5: the first global step above it is 2 (the LR warm-up, int(1.5) = 1 step, is unchanged)
    (100, 0.05, 6),  # 5.0 exactly: strictly past it, iteration 6 (the old `step + 1 >= warm` rule: 5)
    (20, 0.0, 1),  # no warm-up: the first iteration
    (30, 0.1, 4),  # 0.1 * 30 = 3.0000000000000004 in floats: still 4
    (100, 0.29, 29),  # 0.29 * 100 = 28.999999999999996 in floats, as in the official code: 29, not 30
    (10, 1.0, None),  # never within the run
])
def test_latf_reference_is_set_at_the_official_iteration(total, fraction, iteration):
    first = next((s + 1 for s in range(total) if past_warmup(s, total, fraction)), None)
    assert first == iteration
    assert all(past_warmup(s, total, fraction) for s in range(first or total, total))  # monotone


@pytest.mark.parametrize("eps,step,decay,floor", [(0.02, 0.1, 0.9, 0.3), (0.0, 0.2, 0.5, 0.05), (0.1, 0.01, 0.0, 1.0)])
def test_latf_knobs_act_as_in_the_official_loop(eps, step, decay, floor):
    """--latf-eps/-step/-decay/-floor are the official loop's loss_ratio_eps, sample_ratio_eps, decay and 0.1."""
    total = 120
    losses = _loss_curve(total)
    ref = official_latf(losses, total, 0.05, decay=decay, loss_ratio_eps=eps, sample_ratio_eps=step, floor=floor)
    cfg = AdaKDConfig(loss_ratio_eps=eps, ratio_step=step, ema_decay=decay, min_ratio=floor)
    st, ours = LATFState(), []
    for s in range(total):
        latf_update(st, losses[s], past_warmup=past_warmup(s, total, 0.05), cfg=cfg)
        ours.append((st.ratio, st.reference))
    assert ours == ref
    assert min(r for r, _ in ours) >= floor
    assert ours != official_latf(losses, total, 0.05)  # the knobs change the trajectory


@pytest.mark.parametrize("field,value,option", [("loss_ratio_eps", -0.1, "--latf-eps"), ("ratio_step", 0.0, "--latf-step"),
                                                ("ratio_step", 1.0, "--latf-step"), ("ema_decay", 1.0, "--latf-decay"),
                                                ("min_ratio", 0.0, "--latf-floor"), ("min_ratio", 1.5, "--latf-floor"),
                                                ("temperature_scale", float("nan"), "--temperature-scale")])
def test_adakd_knobs_out_of_range_are_refused(field, value, option):
    with pytest.raises(ValueError, match=f"{option} must be"):
        AdaKDConfig(**{field: value})


def test_idts_with_a_median_difficulty_of_zero_keeps_the_base_temperature():
    """The official code divides by the median: 0/0 = NaN temperatures; here the micro-batch gets T (documented)."""
    from adakd.trainer.adakd import idts_temperatures, idts_u

    s = torch.tensor([0.0, 0.0, 0.0, 0.4, 0.9])
    assert torch.equal(idts_u(s), torch.zeros(5)) and torch.equal(idts_temperatures(s, 2.0, 0.5), torch.full((5,), 2.0))
    official = torch.tanh(torch.log(s / s.median()))  # what the official code computes
    assert torch.isnan(official[:3]).all()


def test_negative_temperature_scale_heats_the_harder_positions():
    from adakd.trainer.adakd import idts_temperatures

    s = torch.tensor([0.1, 0.2, 0.4, 0.8])
    cold, hot = idts_temperatures(s, 1.0, 0.5), idts_temperatures(s, 1.0, -0.5)
    assert cold[-1] < 1 < cold[0] and hot[-1] > 1 > hot[0]
    torch.testing.assert_close(cold * hot, torch.ones(4))  # exp(-c u) exp(c u) = 1


def test_latf_trajectory_exercises_both_directions():
    losses = _loss_curve(100)
    ratios = [r for r, _ in official_latf(losses, 100, 0.05, decay=0.8)]
    moves = {(b > a) - (b < a) for a, b in zip(ratios, ratios[1:])}
    assert {1, -1} <= moves


def test_akl_head_follows_the_official_rule():
    """The bucket whose cumulative mass crosses mu is tail (official `get_ratio`: `mask = cum_sum > mu;
    mask[..., 0] = False`), and the most likely bucket is head even when it alone holds more than mu."""
    from adakd.trainer.losses import akl

    def weights(p, q, mu):  # a transcription of the official head/tail gap ratio, dense, p sorted
        errors = (p - q).abs()
        mask = p.cumsum(-1) > mu
        mask[..., 0] = False
        s1 = errors.masked_fill(mask, 0).sum(-1)
        s2 = errors.masked_fill(~mask, 0).sum(-1)
        return s1 / (s1 + s2)

    kl = lambda a, b: (a * (a.log() - b.log())).sum(-1)  # noqa: E731
    for p, mu in (([0.4, 0.3, 0.2, 0.1], 0.5), ([0.7, 0.2, 0.05, 0.05], 0.5), ([0.25, 0.25, 0.25, 0.25], 0.5),
                  ([0.4, 0.3, 0.2, 0.1], 0.75)):
        p = torch.tensor([p], dtype=torch.float64)
        q = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
        w = weights(p, q, mu)
        # buckets: the four ids as the top-k with an empty tail bucket
        lp = torch.cat([p.log(), torch.full((1, 1), -math.inf, dtype=torch.float64)], -1)
        lq = torch.cat([q.log(), torch.full((1, 1), -math.inf, dtype=torch.float64)], -1)
        got = akl(lp, lq, akl_mu=mu)
        want = w * kl(p, q) + (1 - w) * kl(q, p)
        torch.testing.assert_close(got, want)
    # 0.4 + 0.3 crosses 0.5: only the first bucket is head (the old rule took both)
    p = torch.tensor([[0.4, 0.3, 0.2, 0.1]], dtype=torch.float64)
    assert weights(p, torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64), 0.5).item() == pytest.approx(0.3 / 0.8)
