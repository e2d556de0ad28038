"""One sampler (adakd.common.sampler) for `adakd generate --engine hf` and `adakd eval --generate`: the rule by hand
(nucleus, ties by id, greedy, real vocabulary only, the log-probability under the distribution sampled from), and the
two commands run through the real CLI on one padded-vocabulary model drawing the very same token ids."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import draw_by_hand
from tiny import build_tokenizer, corpus, instruction_rows, write_jsonl

from adakd import cli
from adakd.common.sampler import draw, processed_logprobs, sample_generator, sample_seed

PAD = 16  # padded output rows beyond the tokenizer's ids
NEW = 10


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.8), (1.3, 0.3), (0.0, 1.0), (0.0, 0.5)])
def test_draw_follows_the_rule_by_hand(temperature, top_p):
    torch.manual_seed(0)
    real, rows = 50, 64
    logits = torch.randn(rows, real + PAD) * 3
    logits[:, real:] = 100.0  # padded rows: never drawn however likely
    gens = [sample_generator(11, r, 0) for r in range(rows)]
    tokens, logp = draw(logits, gens, real, temperature, top_p)
    lp_all = processed_logprobs(logits, real, temperature, top_p)
    assert tokens.dtype == torch.int64 and logp.dtype == torch.float64 and lp_all.shape == (rows, real)
    for r in range(rows):
        u = torch.rand((), generator=sample_generator(11, r, 0), dtype=torch.float64).item()
        t, lp = draw_by_hand(logits[r, :real].double().numpy(), u, temperature, top_p)
        assert int(tokens[r]) == t < real
        assert float(logp[r]) == pytest.approx(lp, abs=1e-9)
        assert float(lp_all[r, t]) == pytest.approx(lp, abs=1e-9)  # the same distribution, in full
        if temperature and top_p < 1:  # the nucleus: mass >= top_p, and no smaller prefix of it reaches top_p
            kept = torch.isfinite(lp_all[r])
            p = torch.softmax(logits[r, :real].double() / temperature, -1)
            assert p[kept].sum() >= top_p - 1e-12 and p[kept].sum() - p[kept].min() < top_p
            assert torch.exp(lp_all[r][kept]).sum() == pytest.approx(1.0, abs=1e-12)


def test_ties_go_to_the_lower_id_and_one_uniform_per_step():
    logits = torch.zeros(1, 8)
    logits[0, [2, 5]] = 5.0  # a tie between ids 2 and 5, together almost all the mass
    assert draw(logits, [sample_generator(0, 0, 0)], 8, 0.0, 1.0)[0].item() == 2  # greedy: the lower id
    # top_p just above one of them: the nucleus is {2} (ties sorted by id), whatever the uniform
    assert {draw(logits, [sample_generator(0, r, 0)], 8, 1.0, 0.4)[0].item() for r in range(20)} == {2}
    g, h = sample_generator(0, 0, 0), sample_generator(0, 0, 0)
    draw(logits, [g], 8, 0.0, 1.0)  # greedy still takes its uniform: a step is a step
    torch.rand((), generator=h, dtype=torch.float64)
    assert torch.rand((), generator=g).item() == torch.rand((), generator=h).item()
    assert sample_seed(1, 2, 3) == sample_seed(1, 2, 3) != sample_seed(1, 3, 2)


def padded_model(out: Path) -> Path:
    """A tiny Llama whose output layer has PAD rows past the tokenizer's ids, each with a large bias-like weight
    so that a sampler over all outputs would draw them often."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(out)
    torch.manual_seed(4)
    cfg = LlamaConfig(vocab_size=len(tok) + PAD, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False, torch_dtype="float32")
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(12.0)
        model.lm_head.weight[len(tok):] = model.lm_head.weight[:PAD] * 1.5
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return padded_model(tmp_path_factory.mktemp("padded") / "model")


def _invoke(args: list[str]):
    r = CliRunner().invoke(cli.main, args)
    assert r.exit_code == 0, r.output
    return r


@pytest.mark.parametrize("rows,temperature,top_p", [("prompt", 1.0, 1.0), ("instruction", 0.8, 0.9)])
def test_generate_hf_and_eval_generate_draw_the_same_tokens(model, tmp_path, rows, temperature, top_p):
    """The real `adakd generate --engine hf` and `adakd eval --generate` on the same model, prompts, seed,
    temperature and top-p: every (prompt, sample) has the same token ids; none is a padded output."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": t} for t in corpus(4, seed=8)] if rows == "prompt"
                       else instruction_rows(4, seed=6))
    opts = ["--samples", "3", "--seed", "13", "--temperature", str(temperature), "--top-p", str(top_p),
            "--max-new-tokens", str(NEW)]
    gen = tmp_path / "gen.jsonl"
    _invoke(["generate", "--model", str(model), "--data", str(data), "--out", str(gen), "--engine", "hf",
             "--no-progress", *opts])
    ev = tmp_path / "eval.jsonl"
    _invoke(["eval", "--model", str(model), "--teacher", str(model), "--data", str(data), "--generate",
             "--out-file", str(ev), "--batch-size", "5", *opts])
    g = {(x["generation"]["record"], x["generation"]["sample"]): x["generation"]
         for x in map(json.loads, gen.read_text().splitlines())}
    e = {(x["prompt_index"], x["sample"]): x["token_ids"] for x in map(json.loads, ev.read_text().splitlines())}
    assert sorted(g) == sorted(e) == [(i, j) for i in range(4) for j in range(3)]
    for key in g:
        assert g[key]["token_ids"] == e[key], key
    ids = [t for x in g.values() for t in x["token_ids"]]
    assert len(ids) > 20 and max(ids) < len(tok)
    assert len({tuple(x["token_ids"]) for x in g.values()}) > 6  # real samples, not one greedy answer
    # generate's log-probabilities are the distribution sampled from, recomputed with a full forward
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    row = json.loads(gen.read_text().splitlines()[0])
    prompt = tok(row["prompt"])["input_ids"]
    seq = prompt + row["generation"]["token_ids"]
    with torch.no_grad():
        logits = m(input_ids=torch.tensor([seq])).logits[0, len(prompt) - 1:len(seq) - 1]
    assert logits.shape[-1] == len(tok) + PAD
    assert float(torch.softmax(logits, -1)[:, len(tok):].sum(-1).max()) > 0.05  # padding has mass: never drawn
    lp = processed_logprobs(logits, len(tok), temperature, top_p)
    want = lp[torch.arange(len(seq) - len(prompt)), torch.tensor(row["generation"]["token_ids"])]
    assert row["generation"]["logprobs"] == pytest.approx(want.tolist(), abs=1e-4)
    assert all(math.isfinite(x) for x in row["generation"]["logprobs"])
