"""`evaluate_teacher` (adakd eval --teacher): the live teacher against a student over the whole vocabulary, checked
against a direct computation (each sequence alone through both models' own forward, full softmaxes in float64)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tiny import cached_teacher, corpus, write_jsonl

from adakd import cli
from adakd.trainer.evaluate import EvalDataError
from adakd.trainer.student import StudentError
from adakd.trainer.teacher_eval import evaluate_teacher, format_line

KEYS = ("kl", "rkl", "nll", "teacher_nll", "top1_agreement", "kl_real", "rkl_real", "teacher_padding_mass",
        "student_padding_mass")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher_eval")
    teacher, data, cache, cfg = cached_teacher(root, records=20, seed=5, k=16)
    real = cfg["vocab_size"]
    students = {}
    for name, extra in (("plain", {}), ("padded", {"vocab_size": real + 13})):
        c = dict(cfg, **extra)
        (root / f"{name}.json").write_text(json.dumps(c))
        out = root / name
        r = CliRunner().invoke(cli.main, ["train-student", "--cache", str(cache), "--student", str(root / f"{name}.json"),
                                          "--out", str(out), "--max-steps", "3", "--lr", "3e-3", "--loss", "fkl",
                                          "--batch-tokens", "1024", "--no-progress"], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        students[name] = out / "final"
    return teacher, data, cache, students, real


def padded_teacher(teacher: Path, out: Path, extra: int = 8) -> Path:
    """The tiny teacher with `extra` padded outputs (ids past its tokenizer) whose logits are not negligible."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").exists():
        return out
    model = AutoModelForCausalLM.from_pretrained(teacher)
    real = model.config.vocab_size
    model.resize_token_embeddings(real + extra, mean_resizing=False)
    with torch.no_grad():
        torch.manual_seed(1)
        model.lm_head.weight[real:] = torch.randn(extra, model.config.hidden_size) * 0.5
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(out)
    return out


def cache_sequences(cache: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    from adakd.storage import CacheReader

    return [(s.input_ids.astype(np.int64), s.loss_mask.copy()) for s in CacheReader(str(cache)).stream()]


@torch.no_grad()
def direct(student_dir, teacher_dir, seqs, real: int, max_positions: int | None = None) -> dict:
    """Each sequence alone, each model's own forward (model(...).logits), float64 softmaxes over the union of
    outputs with the narrower model's missing outputs at probability 0."""
    from transformers import AutoModelForCausalLM

    s = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    t = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    rows = {k: [] for k in KEYS}
    n = 0
    for ids, mask in seqs:
        pos = np.flatnonzero(mask)
        x = torch.from_numpy(ids)[None]
        zs = s(input_ids=x).logits[0, pos - 1].double()
        zt = t(input_ids=x).logits[0, pos - 1].double()
        labels = torch.from_numpy(ids[pos])
        W = max(zs.shape[1], zt.shape[1])
        lq = torch.full((len(pos), W), -math.inf, dtype=torch.float64)
        lp = lq.clone()
        lq[:, :zs.shape[1]] = torch.log_softmax(zs, -1)
        lp[:, :zt.shape[1]] = torch.log_softmax(zt, -1)
        p, q = lp.exp(), lq.exp()

        def kl(a, la, lb):
            terms = torch.where(a > 0, a * (la - lb), torch.zeros_like(a))
            return terms.sum(-1)

        lpr = torch.log_softmax(lp[:, :real], -1)
        lqr = torch.log_softmax(lq[:, :real], -1)
        vals = {"kl": kl(p, lp, lq), "rkl": kl(q, lq, lp), "nll": -lq[torch.arange(len(pos)), labels],
                "teacher_nll": -lp[torch.arange(len(pos)), labels], "top1_agreement": (lp.argmax(-1) == lq.argmax(-1)).double(),
                "kl_real": kl(lpr.exp(), lpr, lqr), "rkl_real": kl(lqr.exp(), lqr, lpr),
                "teacher_padding_mass": p[:, real:].sum(-1), "student_padding_mass": q[:, real:].sum(-1)}
        for k, v in vals.items():
            rows[k].append(v)
        n += len(pos)
    out = {}
    for k, v in rows.items():
        cat = torch.cat(v)[:max_positions] if max_positions else torch.cat(v)
        out[k] = float(cat.mean())
    out["positions"] = min(n, max_positions) if max_positions else n
    return out


def assert_matches(got: dict, want: dict) -> None:
    assert got["positions"] == want["positions"]
    for k in KEYS:
        if math.isinf(want[k]):
            assert got[k] == want[k], k
        else:
            assert got[k] == pytest.approx(want[k], rel=1e-6, abs=1e-7), k


def test_cache_input_equals_a_direct_full_softmax_computation(setup):
    teacher, _, cache, students, real = setup
    got = evaluate_teacher(str(students["plain"]), str(teacher), cache=str(cache), batch_tokens=512, chunk=7)
    want = direct(students["plain"], teacher, cache_sequences(cache), real)
    assert_matches(got, want)
    assert got["kl"] > 0.1 and got["rkl"] > 0.1 and 0 <= got["top1_agreement"] < 1
    assert got["kl_real"] == got["kl"] and got["teacher_padding_mass"] == 0.0
    assert (got["real_vocab"], got["teacher_outputs"], got["student_outputs"]) == (real, real, real)
    assert "padded" not in format_line(got)


def test_data_input_is_tokenized_as_cache_teacher_does(setup):
    """The data file read through pipeline's reader and tokenizer gives the cache's sequences, so the same numbers."""
    teacher, data, cache, students, real = setup
    got = evaluate_teacher(str(students["plain"]), str(teacher), data=str(data), batch_tokens=700)
    assert_matches(got, direct(students["plain"], teacher, cache_sequences(cache), real))
    limited = evaluate_teacher(str(students["plain"]), str(teacher), data=str(data), limit=5)
    assert limited["positions"] == sum(int(m.sum()) for _, m in cache_sequences(cache)[:5])


def test_max_positions_is_exact_and_memory_chunks_do_not_change_the_numbers(setup):
    teacher, _, cache, students, real = setup
    want = direct(students["plain"], teacher, cache_sequences(cache), real, max_positions=101)
    for kw in ({}, {"chunk_elements": 3 * 1024, "batch_tokens": 64}):  # 5 positions per float64 buffer
        got = evaluate_teacher(str(students["plain"]), str(teacher), cache=str(cache), max_positions=101, **kw)
        assert_matches(got, want)


def test_the_teacher_against_itself(setup):
    teacher, data, cache, _, _ = setup
    for kw in ({"cache": str(cache)}, {"data": str(data)}):
        r = evaluate_teacher(str(teacher), str(teacher), **kw)
        assert r["kl"] == 0.0 and r["rkl"] == 0.0 and r["top1_agreement"] == 1.0 and r["nll"] == r["teacher_nll"]
        assert r["positions"] > 100


def test_padded_student(setup):
    """More outputs than the teacher: KL(teacher || student) exact and finite over the union of outputs; the reverse
    KL is infinite there (the student's mass on outputs the teacher lacks), and finite over the real tokens."""
    teacher, data, cache, students, real = setup
    got = evaluate_teacher(str(students["padded"]), str(teacher), data=str(data))
    want = direct(students["padded"], teacher, cache_sequences(cache), real)
    assert_matches(got, want)
    assert got["student_outputs"] == real + 13 and math.isfinite(got["kl"]) and got["rkl"] == math.inf
    assert 0 < got["student_padding_mass"] < 0.5 and got["teacher_padding_mass"] == 0.0
    assert math.isfinite(got["rkl_real"]) and got["kl_real"] != got["kl"]
    assert "padded outputs" in format_line(got)


def test_padded_teacher(setup, tmp_path):
    teacher, _, cache, students, real = setup
    wide = padded_teacher(teacher, tmp_path / "wide")
    got = evaluate_teacher(str(students["plain"]), str(wide), cache=str(cache), max_positions=80)
    want = direct(students["plain"], wide, cache_sequences(cache), real, max_positions=80)
    assert_matches(got, want)
    assert got["kl"] == math.inf and math.isfinite(got["rkl"]) and got["teacher_padding_mass"] > 0
    # both padded, each its own way: over the union both directions have outputs the other lacks
    both = evaluate_teacher(str(students["padded"]), str(wide), cache=str(cache), max_positions=80)
    assert_matches(both, direct(students["padded"], wide, cache_sequences(cache), real, max_positions=80))


def test_refusals(setup, tmp_path):
    teacher, data, cache, students, real = setup
    with pytest.raises(ValueError, match="exactly one"):
        evaluate_teacher(str(students["plain"]), str(teacher))
    with pytest.raises(StudentError, match="--teacher .*no such model directory"):
        evaluate_teacher(str(students["plain"]), str(tmp_path / "nope"), cache=str(cache))
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text((teacher / "config.json").read_text())
    with pytest.raises(StudentError, match="no weights"):
        evaluate_teacher(str(students["plain"]), str(tmp_path / "cfg"), cache=str(cache))
    narrow = json.loads((teacher / "config.json").read_text())
    narrow.update(vocab_size=real - 3, num_hidden_layers=1)
    from transformers import AutoConfig, AutoModelForCausalLM

    small = AutoModelForCausalLM.from_config(AutoConfig.for_model(**narrow))
    small.save_pretrained(tmp_path / "narrow")
    with pytest.raises(StudentError, match=f"ids {real - 3}..{real - 1} have no output"):
        evaluate_teacher(str(tmp_path / "narrow"), str(teacher), cache=str(cache))
    short = dict(json.loads((teacher / "config.json").read_text()), max_position_embeddings=16, num_hidden_layers=1)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**short)).save_pretrained(tmp_path / "short")
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in corpus(6, seed=2)])
    with pytest.raises(StudentError, match="--max-length 16"):
        evaluate_teacher(str(tmp_path / "short"), str(teacher), data=str(text))
    with pytest.raises(StudentError, match="--max-length 16"):
        evaluate_teacher(str(tmp_path / "short"), str(teacher), cache=str(cache))
    assert evaluate_teacher(str(tmp_path / "short"), str(teacher), data=str(text), max_length=16)["positions"] in range(60, 6 * 15 + 1)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\nnot json\n')
    with pytest.raises(EvalDataError, match="line 2"):
        evaluate_teacher(str(students["plain"]), str(teacher), data=str(bad))
