"""Packed batches (common.packing) change no number beyond float rounding.

1. The planner: whole sequences only, rows x width within the budget, first fit, positions restarting at
   each sequence, a row's padding a run of its own; batches in stream order with exact cursors.
2. Every family of the architecture matrix (tests/families.py): the same sequences packed and padded give
   the same per-position logits, loss (CE and KD parts), AdaKD difficulties, LATF selection and IDTS
   temperatures, on top-k and on sampled targets; a family whose forward cannot take packed rows is named
   by `packing_error` (and only those listed in NOT_PACKED), and then trains on padded rows with a note.
3. The hf engine: a packed batch scores like a padded one, for every family, teacher-only ones included.
4. An MoE student's router load-balancing loss (trainer.router): the family's own value on padded rows, the same
   on packed rows (their padding excluded by the batch's real_mask), weighted per micro-batch by trained positions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from families import ALL, FAMILIES, ROUTER_LOSS, VOCAB, config

from adakd.common.packing import Layout, PackedPlanner, PaddedPlanner, Rows, grouped, layout_of, packing_error, planner
from adakd.pipeline.sampling import Sampler, draw
from adakd.storage import SequenceTargets
from adakd.trainer.adakd import AdaKDConfig, LATFState, idts_temperatures, select
from adakd.trainer.batches import collate
from adakd.trainer.head import final_hidden, output_head
from adakd.trainer.kd_loss import LossConfig, difficulties, kd_loss
from adakd.trainer.student import packed_rows

# Families whose forward cannot take packed rows exactly (and why): they train and score on padded rows.
NOT_PACKED = {
    "opt": "OPT takes its learned positions from the attention mask and builds its mask without the position ids",
    "falcon": "Falcon builds its causal mask without the position ids: packed sequences would attend to each other",
    "bloom": "BLOOM builds its causal mask without the position ids (and its ALiBi from the attention mask)",
    "mpt": "MPT builds its causal mask without the position ids: packed sequences would attend to each other",
    "gpt_oss": "GPT-OSS builds its full and sliding-window masks without the position ids",
    "mamba": "Mamba's recurrent state and convolution run along the whole row: transformers' torch path has no "
             "per-sequence reset, so each sequence starts from the state its row neighbour left",
    "mamba2": "Mamba 2's recurrent state and convolution run along the whole row (no per-sequence reset)",
    "jamba": "Jamba's Mamba layers carry their recurrent state from one packed sequence into the next",
    "zamba2": "Zamba 2's Mamba 2 layers carry their recurrent state from one packed sequence into the next",
    "granitemoehybrid": "GraniteMoE-hybrid's Mamba 2 layers carry their recurrent state from one packed sequence into "
                        "the next",
    "falcon_h1": "Falcon-H1's Mamba 2 mixers carry their recurrent state from one packed sequence into the next",
}
K = 16


# ------------------------------------------------------------------------------------------ 1. the planner


def test_packed_planner_places_whole_sequences_by_first_fit_within_the_budget():
    p = PackedPlanner(budget=100, row_tokens=40)  # two rows of 40
    taken = [n for n in (30, 25, 8, 10, 2, 35) if p.add(n)]
    assert taken == [30, 25, 8, 10, 2]  # 35 fits no row: the batch closes (the caller starts the next with it)
    lay = p.layout()
    assert lay.rows == 2 and lay.width == 40 and lay.computed <= 100 and lay.packed
    assert lay.row.tolist() == [0, 1, 0, 1, 0]  # first fit: the 8 and the 2 go back to row 0
    assert lay.start.tolist() == [0, 0, 30, 25, 38]
    assert lay.tokens == 75


def test_a_sequence_longer_than_a_row_gets_a_row_of_its_own_length_and_one_longer_than_the_budget_goes_alone():
    p = PackedPlanner(budget=100, row_tokens=40)
    assert p.add(70) and p.layout().width == 70 and not p.add(40)  # capacity 70: one row (100 // 70), full
    p.reset()
    assert p.add(20) and p.add(20) and p.add(40) and not p.add(41)  # rows of 40: 20 + 20, 40; a 41 fits no row
    p.reset()
    assert p.add(150) and not p.add(1)
    assert p.layout().computed == 150


def test_a_model_with_chunked_attention_shares_rows_only_within_a_chunk():
    """Llama 4 counts its attention chunks from the row's start: rows wider than a chunk hold one sequence."""
    p = planner(400, Rows(300, shared=100))
    assert all(p.add(n) for n in (60, 40, 70, 30, 100, 90)) and not p.add(20)  # four rows of at most 100
    lay = p.layout()
    assert lay.rows == 4 and lay.width == 100
    assert layout_of([60, 40, 70, 30, 100], 400, 300).rows == 1  # without the limit: one row of 300
    p.reset()
    assert p.add(150) and not p.add(10)  # longer than a chunk: alone in its batch
    assert p.layout().rows == 1 and p.layout().width == 150


def test_padded_planner_is_rows_times_longest():
    p = PaddedPlanner(budget=100)
    assert p.add(30) and p.add(20) and p.add(30) and not p.add(30)  # 4 x 30 > 100
    lay = p.layout()
    assert (lay.rows, lay.width, lay.computed, lay.packed) == (3, 30, 90, False)


def test_block_restarts_positions_and_gives_padding_a_run_of_its_own():
    lay = layout_of([3, 2, 4], budget=12, row_tokens=6)
    seqs = [np.array([5, 6, 7]), np.array([8, 9]), np.array([1, 2, 3, 4])]
    block = lay.block(seqs)
    assert set(block) == {"input_ids", "position_ids"}
    ids, pos = block["input_ids"].tolist(), block["position_ids"].tolist()
    assert ids == [[5, 6, 7, 8, 9], [1, 2, 3, 4, 0]]  # width: the fullest row
    assert pos == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    padded = layout_of([3, 2, 4], budget=12, row_tokens=None).block(seqs)
    assert set(padded) == {"input_ids", "attention_mask"} and padded["attention_mask"].sum() == 9
    r, c = lay.place(1, np.array([0, 1]))
    assert r.tolist() == [0, 0] and c.tolist() == [3, 4]


def test_grouped_keeps_order_and_lets_empty_items_ride_along():
    items = [("a", 30), ("skip", 0), ("b", 50), ("c", 40), ("d", 90), ("skip2", 0)]
    out = list(grouped(items, lambda x: x[1], planner(120, 60)))  # two rows of 60
    assert [[x[0] for x in g] for g, _ in out] == [["a", "skip", "b"], ["c"], ["d", "skip2"]]
    assert all(isinstance(lay, Layout) for _, lay in out)
    assert [lay.tokens for _, lay in out] == [80, 40, 90]


@pytest.mark.parametrize("shape", ["dolly", "tinystories"])
def test_on_real_lengths_at_least_95_percent_of_computed_tokens_are_real(shape):
    """The shared data's real GPT-2 lengths (dolly: 38% real tokens padded at 8,192, the issue's figure)."""
    from bench.throughput import stream_lengths

    from adakd.common.packing import DEFAULT_ROW_TOKENS

    lengths = stream_lengths(shape, None)
    for budget in (4096, 8192, 32768):
        real = computed = padded = 0
        for _, lay in grouped(lengths, int, planner(budget, DEFAULT_ROW_TOKENS)):
            real += lay.tokens
            computed += lay.computed
            assert lay.computed <= max(budget, lay.width) and lay.rows <= max(1, budget // DEFAULT_ROW_TOKENS)
        for _, lay in grouped(lengths, int, planner(budget, None)):
            padded += lay.computed
        assert real == sum(lengths) and real / computed >= 0.95, (budget, real / computed)
        assert real / padded < (0.5 if shape == "dolly" else 0.75)  # what padding costs on the same stream


# ---------------------------------------------------------------- 2. every family: packed == padded


def sequences(kind: str, seed: int = 0, lengths=(30, 57, 9, 64, 21, 44, 13)) -> list[SequenceTargets]:
    """Sequences with the targets of a random teacher at their trained positions: top-k, or 32 draws each."""
    rng = np.random.default_rng(seed)
    out = []
    for r, L in enumerate(lengths):
        ids = rng.integers(4, VOCAB, L).astype(np.int32)
        mask = np.zeros(L, bool)
        mask[int(rng.integers(1, L // 2 + 1)):] = True
        n = int(mask.sum())
        lp = torch.from_numpy(rng.standard_normal((n, VOCAB)) * 3).log_softmax(-1)
        k = K if kind == "topk" else 0
        v, i = lp.topk(k, -1)
        tail = torch.log1p(-v.exp().sum(-1).clamp(max=1 - 1e-6)) if k else torch.zeros(n)
        extra = {}
        if kind == "sampled":
            sampler = Sampler(32, seed=seed)
            d = draw(lp.float(), sampler.uniforms([r], [n], "cpu"), sampler, VOCAB)
            extra = dict(sample_sizes=d.sizes, sample_ids=d.ids, sample_counts=d.counts, sample_logprobs=d.logprobs,
                         rest_logmass=d.rest)
        out.append(SequenceTargets(r, ids, mask, i.numpy().astype(np.int32), v.float().numpy(),
                                   lp[np.arange(n), ids[mask]].float().numpy(), tail.float().numpy(), **extra))
    return out


def student(family: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    return AutoModelForCausalLM.from_config(config(family), dtype=torch.float32).eval()


def both_layouts(seqs: list[SequenceTargets]):
    lengths = [len(s.input_ids) for s in seqs]
    packed = collate(seqs, VOCAB, None, layout=layout_of(lengths, 400, 100))
    padded = collate(seqs, VOCAB, None)
    assert packed.attention_mask is None and packed.position_ids is not None and packed.input_ids.shape[0] < len(seqs)
    assert padded.position_ids is None and padded.input_ids.shape[0] == len(seqs)
    assert torch.equal(packed.targets.labels, padded.targets.labels)
    return packed, padded


@pytest.mark.parametrize("family", FAMILIES)
def test_packing_error_names_exactly_the_families_that_cannot_pack(family, capsys):
    model = student(family)
    why = packing_error(model)
    assert (why is None) == (family not in NOT_PACKED), why
    rows = packed_rows(2048, ("--student", model))
    err = capsys.readouterr().err
    if family in NOT_PACKED:
        assert rows is None and "padded rows" in err and type(model).__name__ in err and why in err
    else:
        assert rows.tokens == 2048 and err == ""
        chunk = getattr(model.config.get_text_config(), "attention_chunk_size", None)
        assert rows.shared == chunk  # chunked attention (Llama 4): sequences share a row only within a chunk


@pytest.mark.parametrize("kind", ["topk", "sampled"])
@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in NOT_PACKED])
def test_packed_equals_padded_logits_loss_and_adakd(family, kind):
    model = student(family)
    head = output_head(model)
    packed, padded = both_layouts(sequences(kind))
    cfg = LossConfig(loss="rkl", kd_weight=0.7, adakd=AdaKDConfig(), chunk_positions=64)
    got = {}
    for name, b in (("packed", packed), ("padded", padded)):
        with torch.no_grad():
            h = final_hidden(model, **b.model_inputs())[b.rows, b.cols]
        s = difficulties(h, head, b.targets, cfg.chunk_positions, importance=cfg.importance)
        idx = select(s, 0.6)
        hh = h.detach().requires_grad_(True)
        out = kd_loss(hh, head, b.targets, cfg, LATFState(ratio=0.6))
        out.loss.backward()
        got[name] = dict(logits=head.logits(h.detach()), loss=out.loss.item(), kd=out.kd, ce=out.ce, s=s, idx=idx,
                         temps=idts_temperatures(s[idx], 1.0, 0.5), out_temps=out.temperatures, grad=hh.grad)
    a, b = got["packed"], got["padded"]
    scale = max(1.0, b["logits"].abs().max().item())
    torch.testing.assert_close(a["logits"], b["logits"], atol=2e-4 * scale, rtol=0)
    for key in ("loss", "kd", "ce"):
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    torch.testing.assert_close(a["s"], b["s"], atol=1e-5, rtol=1e-4)
    assert torch.equal(a["idx"], b["idx"]) and len(a["idx"]) == int(0.6 * len(b["s"]))
    torch.testing.assert_close(a["temps"], b["temps"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a["out_temps"], b["out_temps"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a["grad"], b["grad"], atol=1e-6, rtol=1e-3)


# ---------------------------------------------------------------------------------- 3. the hf engine


@pytest.mark.parametrize("family", ALL)
def test_hf_engine_packed_scores_like_padded(family, tmp_path):
    from transformers import AutoModelForCausalLM

    from adakd.pipeline.engine_hf import HFEngine
    from adakd.common.tokens import Tokenized

    torch.manual_seed(2)
    model = AutoModelForCausalLM.from_config(config(family), dtype=torch.float32)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(4.0)  # peaked: top-k ranks further apart than float rounding
    model.save_pretrained(tmp_path, safe_serialization=True)
    rng = np.random.default_rng(3)
    batch = []
    for r, L in enumerate((40, 25, 61, 12, 33, 50)):
        mask = np.zeros(L, bool)
        mask[L // 3:] = True
        batch.append(Tokenized(r, rng.integers(4, VOCAB, L).astype(np.int32), mask))
    packed = HFEngine(str(tmp_path), K, dtype="float32", batch_tokens=256, row_tokens=128)
    padded = HFEngine(str(tmp_path), K, dtype="float32", batch_tokens=256, row_tokens=None)
    assert (packed.row_tokens is None) == (family in NOT_PACKED)
    if family in NOT_PACKED:
        return
    assert packed.layout(batch).rows < len(batch)
    for a, b in zip(packed.score(batch), padded.score(batch)):
        np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=1e-4, rtol=0)
        np.testing.assert_allclose(a.target_logprob, b.target_logprob, atol=1e-4, rtol=0)
        gap = np.abs(np.diff(b.topk_logprobs, axis=1)).min(1) > 1e-3  # ranks apart beyond rounding: the same ids
        np.testing.assert_array_equal(a.topk_ids[gap], b.topk_ids[gap])


# ------------------------------------------------------------ 4. an MoE student's router load-balancing loss


@pytest.mark.parametrize("family", ROUTER_LOSS)
def test_router_loss_is_the_family_own_on_padded_rows_and_the_same_on_packed_rows(family):
    """StudentLoss adds coef * the family's own aux loss (`model(..., output_router_logits=True).aux_loss` on the padded
    batch, its attention mask excluding the padding); on packed rows the batch's real_mask excludes each row's padding
    the same way, so the value is the padded one (families that pack); the switch turns it off."""
    from adakd.trainer.step import StudentLoss

    model = student(family)
    packed, padded = both_layouts(sequences("topk"))
    assert packed.real_mask is not None and packed.real_mask.sum() == padded.attention_mask.sum()
    assert not packed.real_mask.all()  # the packed rows have padding, which must not count
    cfg = LossConfig(loss="fkl")
    net, off = StudentLoss(model, cfg), StudentLoss(model, cfg, router_aux_loss=False)
    coef = model.config.router_aux_loss_coef
    with torch.no_grad():
        own = model(input_ids=padded.input_ids, attention_mask=padded.attention_mask, output_router_logits=True)
    got, grads = {}, {}
    for name, b in (("padded", padded), ("packed", packed)):
        for which, m in (("on", net), ("off", off)):
            model.zero_grad()
            loss, out = m(b.model_inputs(), b.rows, b.cols, b.targets, 1.0, None, b.real_mask)
            loss.backward()
            grads[name, which] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
            aux = out.router_aux
            if which == "off":
                assert aux is None and loss.item() == pytest.approx(out.loss.item(), rel=1e-6)
            else:
                assert loss.item() == pytest.approx(out.loss.item() + coef * aux, rel=1e-6)
                got[name] = aux
        assert any(not torch.equal(a, b) for a, b in zip(grads[name, "on"], grads[name, "off"]))  # it trains the routers
    assert got["padded"] == pytest.approx(own.aux_loss.item(), rel=1e-6)
    if family not in NOT_PACKED:
        assert got["packed"] == pytest.approx(got["padded"], rel=1e-5)
    # without real_mask, the packed rows' padding would count: a different value
    _, out = net(packed.model_inputs(), packed.rows, packed.cols, packed.targets, 1.0)
    assert out.router_aux != pytest.approx(got["packed"], rel=1e-5)


def test_router_loss_weighs_each_micro_batch_by_its_share_of_the_step_trained_positions():
    """Under gradient accumulation each micro-batch adds coef * aux * (its trained positions / the step's), so a step
    adds coef * the positions-weighted mean of its micro-batches' aux losses, and router_aux logs that mean."""
    from adakd.trainer.step import StudentLoss

    model = student("mixtral")
    seqs = sequences("topk")
    a, b = collate(seqs[:3], VOCAB, None), collate(seqs[3:], VOCAB, None)
    na, nb = a.rows.numel(), b.rows.numel()
    net = StudentLoss(model, LossConfig(loss="fkl"))
    alone = [net(m.model_inputs(), m.rows, m.cols, m.targets, 1.0)[1].router_aux for m in (a, b)]
    total = (na + nb, na + nb)
    losses = [net(m.model_inputs(), m.rows, m.cols, m.targets, 1.0, total) for m in (a, b)]
    step = sum(out.router_aux for _, out in losses)
    assert step == pytest.approx((alone[0] * na + alone[1] * nb) / (na + nb), rel=1e-6)
    for (loss, out), aux, n in zip(losses, alone, (na, nb)):
        assert loss.item() == pytest.approx(out.loss.item() + 0.02 * aux * n / (na + nb), rel=1e-6)
