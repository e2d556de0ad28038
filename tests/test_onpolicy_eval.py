"""`adakd eval --generate` (trainer.onpolicy_eval): the student samples, the live teacher scores every sampled token.
Checked against a direct computation: the samples re-drawn one prompt at a time with full forwards (no cache,
no batch) from the same per-(seed, prompt, sample) generators, and KL(student || teacher) by hand in float64."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import draw_by_hand
from tiny import build_teacher, cached_teacher, corpus, write_jsonl

from adakd import cli
from adakd.trainer.onpolicy_eval import OnPolicyError, evaluate_onpolicy, format_report, report, sample_generator
from adakd.trainer.student import StudentError

NEW = 8  # --max-new-tokens: enough to see a prefix drift, small enough for a fast file


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny teacher with instruction data (with outputs) and its cache; a smaller Llama student sharing the
    tokenizer (peaked random weights, so its samples and the teacher's judgement of them differ); prompt files."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("onpolicy")
    teacher, data, cache, cfg = cached_teacher(root, records=6, seed=5, k=8)
    torch.manual_seed(3)
    student = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
    with torch.no_grad():
        student.lm_head.weight.mul_(8.0)
    student.save_pretrained(root / "student", safe_serialization=True)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(root / "student")
    texts = corpus(8, seed=9)
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": t} for t in texts[:3]])
    return {"root": root, "teacher": teacher, "student": root / "student", "data": data, "cache": cache,
            "prompts": prompts}


@torch.no_grad()
def direct(student_dir, teacher_dir, prompts: list[str], samples: int, seed: int, temperature: float = 1.0,
           top_p: float = 1.0) -> tuple[dict, list[list[str]]]:
    """Each (prompt, sample) alone: the student re-run over the whole prefix at every step (model(...).logits), the
    token drawn by inverse CDF from the same generator; then both models' full forwards over prompt + sample and
    the per-position divergences in float64."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(student_dir)
    s = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    t = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    real = len(tok)
    rkl, tnll, snll, texts = [], [], [], []
    for i, prompt in enumerate(prompts):
        ids = tok(prompt)["input_ids"]
        texts.append([])
        for j in range(samples):
            g = sample_generator(seed, i, j)
            seq = list(ids)
            for _ in range(NEW):
                z = s(input_ids=torch.tensor([seq])).logits[0, -1, :real].double().numpy()
                u = torch.rand((), generator=g, dtype=torch.float64).item()
                seq.append(draw_by_hand(z, u, temperature, top_p)[0])
                if seq[-1] == tok.eos_token_id:
                    break
            x = torch.tensor([seq])
            pos = torch.arange(len(ids) - 1, len(seq) - 1)
            lq = torch.log_softmax(s(input_ids=x).logits[0, pos].double(), -1)
            lp = torch.log_softmax(t(input_ids=x).logits[0, pos].double(), -1)
            labels = x[0, pos + 1]
            rkl.append((lq.exp() * (lq - lp)).sum(-1))
            tnll.append(-lp[torch.arange(len(pos)), labels])
            snll.append(-lq[torch.arange(len(pos)), labels])
            texts[-1].append(tok.decode(seq[len(ids):], skip_special_tokens=True))
    cat = [torch.cat(v) for v in (rkl, tnll, snll)]
    return ({"rkl": float(cat[0].mean()), "teacher_nll": float(cat[1].mean()), "student_nll": float(cat[2].mean()),
             "generated_tokens": len(cat[0])}, texts)


def _samples(path: Path) -> list[str]:
    return [json.loads(line)["response"] for line in path.read_text().splitlines()]


def test_the_teacher_as_its_own_student(setup):
    r = evaluate_onpolicy(str(setup["teacher"]), str(setup["teacher"]), str(setup["prompts"]), samples=2,
                          max_new_tokens=NEW, seed=1)
    assert r["rkl"] < 1e-5 and r["kl"] < 1e-5 and r["teacher_nll"] == r["student_nll"]
    assert r["top1_agreement"] == 1.0 and r["prompts"] == 3 and r["samples"] == 6
    assert 6 <= r["generated_tokens"] <= 6 * NEW


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_equals_a_direct_computation(setup, tmp_path, temperature, top_p):
    prompts = [json.loads(line)["prompt"] for line in setup["prompts"].read_text().splitlines()]
    out = tmp_path / "samples.jsonl"
    got = evaluate_onpolicy(str(setup["student"]), str(setup["teacher"]), str(setup["prompts"]), samples=2,
                            max_new_tokens=NEW, seed=7, temperature=temperature, top_p=top_p, batch_size=3,
                            batch_tokens=64, out_file=str(out))
    want, texts = direct(setup["student"], setup["teacher"], prompts, 2, 7, temperature, top_p)
    assert _samples(out) == [x for per in texts for x in per]  # the very same samples
    assert got["generated_tokens"] == want["generated_tokens"]
    for k in ("rkl", "teacher_nll", "student_nll"):
        assert got[k] == pytest.approx(want[k], abs=1e-5), k
    assert got["rkl"] > 0.1 and got["teacher_nll"] > got["student_nll"]  # the teacher dislikes the student's text
    assert (got["temperature"], got["top_p"], got["seed"]) == (temperature, top_p, 7)


def test_reproducible_and_independent_of_batching(setup, tmp_path):
    args = (str(setup["student"]), str(setup["teacher"]), str(setup["prompts"]))
    a = evaluate_onpolicy(*args, samples=2, max_new_tokens=NEW, seed=3, out_file=str(tmp_path / "a.jsonl"))
    b = evaluate_onpolicy(*args, samples=2, max_new_tokens=NEW, seed=3, batch_size=1,
                          out_file=str(tmp_path / "b.jsonl"))
    assert json.dumps(a) == json.dumps(b)
    assert _samples(tmp_path / "a.jsonl") == _samples(tmp_path / "b.jsonl")
    c = evaluate_onpolicy(*args, samples=2, max_new_tokens=NEW, seed=4, out_file=str(tmp_path / "c.jsonl"))
    assert json.dumps(a) != json.dumps(c) and _samples(tmp_path / "a.jsonl") != _samples(tmp_path / "c.jsonl")
    # a sample depends on (seed, prompt, sample) alone: --limit keeps the first prompts' samples
    evaluate_onpolicy(*args, samples=2, max_new_tokens=NEW, seed=3, limit=2, out_file=str(tmp_path / "d.jsonl"))
    assert len(_samples(tmp_path / "a.jsonl")) == 6
    assert _samples(tmp_path / "d.jsonl") == _samples(tmp_path / "a.jsonl")[:4]


def test_chat_and_instruction_prompts(setup, tmp_path):
    texts = corpus(6, seed=4)
    chat = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": texts[0]}]},  # the student answers the last user turn
        {"messages": [{"role": "user", "content": texts[1]}, {"role": "assistant", "content": texts[2]},
                      {"role": "user", "content": texts[3]}]},
        {"messages": [{"role": "user", "content": texts[4]}, {"role": "assistant", "content": texts[5]}]},  # + reference
    ])
    r = report(str(setup["student"]), str(setup["teacher"]), str(chat), max_new_tokens=NEW, seed=0)
    assert r["onpolicy"]["prompts"] == 3 and r["onpolicy"]["generated_tokens"] >= 3
    assert "teacher_forced" not in r  # not every row has a reference
    with_refs = write_jsonl(tmp_path / "refs.jsonl", [
        {"messages": [{"role": "user", "content": texts[4]}, {"role": "assistant", "content": texts[5]}]}])
    r = report(str(setup["student"]), str(setup["teacher"]), str(with_refs), max_new_tokens=NEW, seed=0)
    assert r["teacher_forced"]["positions"] > 0 and "teacher-forced, reference outputs" in format_report(r)
    # the instruction rows of the cached data: the same prompts cache-teacher rendered, references scored beside
    r = report(str(setup["student"]), str(setup["teacher"]), str(setup["data"]), max_new_tokens=NEW, limit=3,
               cache=str(setup["cache"]))
    assert r["onpolicy"]["prompts"] == 3 and r["teacher_forced"]["positions"] > 0
    assert r["teacher_forced_cache"]["positions"] > r["teacher_forced"]["positions"]


def test_refusals(setup, tmp_path):
    other = build_teacher(tmp_path / "other", vocab_size=300)
    with pytest.raises(StudentError, match="maps .* tokens to other ids than the --teacher's.*one vocabulary"):
        evaluate_onpolicy(str(other), str(setup["teacher"]), str(setup["prompts"]), max_new_tokens=NEW)
    for kw, msg in (({"samples": 0}, "--samples must be at least 1"),
                    ({"temperature": 0.0}, "--temperature must be above 0"),
                    ({"top_p": 1.5}, r"--top-p must be in \(0, 1\]"), ({"max_new_tokens": 300}, "leaves no room")):
        with pytest.raises(OnPolicyError, match=msg):
            evaluate_onpolicy(str(setup["student"]), str(setup["teacher"]), str(setup["prompts"]),
                              **{"max_new_tokens": NEW, **kw})
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a"}, {"text": "no prompt"}])
    from adakd.trainer.evaluate import EvalDataError

    with pytest.raises(EvalDataError, match="line 2: needs a text field 'prompt'"):
        evaluate_onpolicy(str(setup["student"]), str(setup["teacher"]), str(bad))
    system_only = write_jsonl(tmp_path / "sys.jsonl", [{"messages": [{"role": "system", "content": "hi"}]}])
    with pytest.raises(EvalDataError, match="needs a user message"):
        evaluate_onpolicy(str(setup["student"]), str(setup["teacher"]), str(system_only))


def test_cli_prints_json_last(setup, tmp_path):
    base = ["eval", "--model", str(setup["student"]), "--teacher", str(setup["teacher"])]
    r = CliRunner().invoke(cli.main, base + ["--data", str(setup["data"]), "--generate", "--samples", "2",
                                             "--max-new-tokens", str(NEW), "--limit", "2", "--seed", "5",
                                             "--out-file", str(tmp_path / "s.jsonl")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["onpolicy"]["samples"] == 4 and math.isfinite(result["onpolicy"]["rkl"])
    assert result["teacher_forced"]["positions"] > 0
    assert lines[0].startswith("on-policy: 2 prompts x 2 samples")
    assert len(_samples(tmp_path / "s.jsonl")) == 4
    r = CliRunner().invoke(cli.main, ["eval", "--model", str(setup["student"]), "--data", str(setup["prompts"]),
                                      "--generate"])
    assert r.exit_code == 1 and "--generate needs --teacher" in r.output
    r = CliRunner().invoke(cli.main, base + ["--data", str(setup["prompts"]), "--generate", "--temperature", "0"])
    assert r.exit_code == 1 and "--temperature must be above 0" in r.output and "Traceback" not in r.output
