"""`cache-teacher` with the transformers engine: numbers, masks, shapes, resume, workers, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tiny import build_teacher, corpus, instruction_rows, write_jsonl

from adakd import cli
from adakd.storage import CacheReader, verify_cache


@pytest.fixture(scope="session")
def teacher(tmp_path_factory) -> Path:
    return build_teacher(tmp_path_factory.mktemp("teacher") / "tiny")


@pytest.fixture(scope="session")
def instr(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "instr.jsonl", instruction_rows(40))


def run(*args: str, ok: bool = True):
    r = CliRunner().invoke(cli.main, ["cache-teacher", "--no-progress", *args], catch_exceptions=False)
    if ok:
        assert r.exit_code == 0, r.output
    return r


def records(path) -> list:
    return list(CacheReader(path).stream())


def test_hf_cache_holds_the_teachers_numbers(teacher, instr, tmp_path):
    out = tmp_path / "c"
    r = run("--teacher", str(teacher), "--data", str(instr), "--out", str(out), "--top-k", "16", "--engine", "hf")
    assert "40 kept" in r.output and "tokens/s" in r.output
    assert verify_cache(out).ok
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher)
    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    rows = [json.loads(line) for line in instr.read_text().splitlines()]
    seqs = records(out)
    assert [s.record for s in seqs] == list(range(40))
    for s in seqs[:6]:
        row = rows[s.record]
        prompt_ids = tok(_prompt(row))["input_ids"]
        response_ids = tok(row["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert s.input_ids.tolist() == prompt_ids + response_ids  # exactly the scored tokens
        assert s.loss_mask.tolist() == [False] * len(prompt_ids) + [True] * len(response_ids)
        with torch.no_grad():
            lp = model(torch.tensor([s.input_ids.tolist()])).logits[0].float().log_softmax(-1)
        rows_lp = lp[torch.from_numpy(s.positions)]
        v, i = rows_lp.topk(16)
        agree = (i.numpy() == s.topk_ids).all(1).mean()
        assert agree >= 0.99
        assert np.abs(v.numpy() - s.topk_logprobs).max() <= 1 / 64 + 1e-4
        exact_t = rows_lp.gather(1, torch.from_numpy(s.labels.astype(np.int64))[:, None])[:, 0].numpy()
        assert np.abs(exact_t - s.target_logprob).max() <= 0.01


def _prompt(row: dict) -> str:
    from adakd.common.data import DEFAULT_TEMPLATE, DEFAULT_TEMPLATE_WITH_INPUT

    t = DEFAULT_TEMPLATE_WITH_INPUT if row["input"].strip() else DEFAULT_TEMPLATE
    return t.format(instruction=row["instruction"], input=row["input"])


def test_minillm_prompt_field_is_used(teacher, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "what is two plus two", "instruction": "x", "input": "",
                                               "output": "four"} for _ in range(3)])
    run("--teacher", str(teacher), "--data", str(data), "--out", str(tmp_path / "c"), "--top-k", "8", "--engine", "hf")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher)
    s = records(tmp_path / "c")[0]
    n_prompt = len(tok("what is two plus two")["input_ids"])
    assert s.input_ids[:n_prompt].tolist() == tok("what is two plus two")["input_ids"]
    assert not s.loss_mask[:n_prompt].any() and s.loss_mask[n_prompt:].all()


def test_chat_data_trains_assistant_turns_only(teacher, tmp_path):
    msgs = [{"role": "user", "content": "the cat sat"}, {"role": "assistant", "content": "on the mat"},
            {"role": "user", "content": "and then"}, {"role": "assistant", "content": "it was happy"}]
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": msgs}])
    run("--teacher", str(teacher), "--data", str(data), "--out", str(tmp_path / "c"), "--top-k", "8", "--engine", "hf")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher)
    s = records(tmp_path / "c")[0]
    trained = tok.decode(s.input_ids[s.loss_mask].tolist())
    assert "on the mat" in trained and "it was happy" in trained
    assert "the cat sat" not in trained and "and then" not in trained and "user" not in trained


def test_plain_text_trains_every_token_and_appends_eos(teacher, tmp_path):
    data = tmp_path / "t.txt"
    data.write_text("\n".join(corpus(5, seed=3)) + "\n")
    run("--teacher", str(teacher), "--data", str(data), "--out", str(tmp_path / "c"), "--top-k", "8", "--engine", "hf")
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(teacher).eos_token_id
    for s in records(tmp_path / "c"):
        assert s.input_ids[-1] == eos and s.loss_mask[1:].all() and not s.loss_mask[0]


@pytest.mark.parametrize("policy", ["truncate", "skip"])
def test_length_policy_is_counted(teacher, instr, tmp_path, policy):
    r = run("--teacher", str(teacher), "--data", str(instr), "--out", str(tmp_path / "c"), "--top-k", "8",
            "--engine", "hf", "--max-length", "125", "--length-policy", policy)
    seqs = records(tmp_path / "c")
    assert all(len(s.input_ids) <= 125 for s in seqs)
    m = CacheReader(tmp_path / "c").manifest.workers[0].progress["counts"]
    if policy == "truncate":
        assert m["kept"] + m["skipped_no_trained_token"] == 40 and m["skipped_too_long"] == 0
        assert m["truncated"] > 0 and f"({m['truncated']} truncated)" in r.output
    else:
        assert m["skipped_too_long"] > 0 and m["kept"] + m["skipped_too_long"] == 40 and m["truncated"] == 0
        assert len(seqs) == m["kept"]


def test_workers_cover_every_record_exactly_once(teacher, instr, tmp_path):
    single = tmp_path / "one"
    run("--teacher", str(teacher), "--data", str(instr), "--out", str(single), "--top-k", "8", "--engine", "hf")
    multi = tmp_path / "many"
    for i in (2, 0, 1):  # any order, one process each
        run("--teacher", str(teacher), "--data", str(instr), "--out", str(multi), "--top-k", "8", "--engine", "hf",
            "--num-workers", "3", "--worker-index", str(i))
    got = sorted(records(multi), key=lambda s: s.record)
    want = records(single)
    assert [s.record for s in got] == [s.record for s in want] == list(range(40))
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        assert (a.topk_ids == b.topk_ids).all(1).mean() >= 0.99
    report = verify_cache(multi)
    assert report.ok and not report.warnings and CacheReader(multi).manifest.complete


def test_rerun_of_a_complete_cache_does_nothing(teacher, instr, tmp_path):
    args = ("--teacher", str(teacher), "--data", str(instr), "--out", str(tmp_path / "c"), "--top-k", "8", "--engine", "hf")
    run(*args)
    before = {p.name: p.read_bytes() for p in (tmp_path / "c" / "shards").iterdir()}
    r = run(*args)
    assert "already complete" in r.output
    assert {p.name: p.read_bytes() for p in (tmp_path / "c" / "shards").iterdir()} == before


@pytest.mark.parametrize("change,what", [
    (("--top-k", "4"), "encoding.k: 4 here, 8 in the cache"),
    (("--prompt-template", "Q: {instruction}\nA: "), "prompt_template"),
    (("--max-length", "100"), "max_length: 100 here"),
    (("--limit", "10"), "dataset"),
])
def test_rerun_with_other_settings_is_refused(teacher, instr, tmp_path, change, what):
    base = ["--teacher", str(teacher), "--data", str(instr), "--out", str(tmp_path / "c"), "--engine", "hf"]
    run(*base, "--top-k", "8")
    args = base + (["--top-k", "8"] if "--top-k" not in change else []) + list(change)
    r = run(*args, ok=False)
    assert r.exit_code == 1 and "other settings" in r.output and what in r.output


def test_other_teacher_is_refused(teacher, instr, tmp_path):
    run("--teacher", str(teacher), "--data", str(instr), "--out", str(tmp_path / "c"), "--top-k", "8", "--engine", "hf")
    other = build_teacher(tmp_path / "other", seed=1)
    r = run("--teacher", str(other), "--data", str(instr), "--out", str(tmp_path / "c"), "--top-k", "8", "--engine", "hf", ok=False)
    assert r.exit_code == 1 and "teacher.fingerprint" in r.output


# -- resume after a kill -------------------------------------------------------------------------
def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "import cli; cli.main()", "cache-teacher", "--no-progress", *args]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_cache(teacher, tmp_path):
    data = write_jsonl(tmp_path / "big.jsonl", instruction_rows(300, seed=5))
    args = ["--teacher", str(teacher), "--data", str(data), "--top-k", "16", "--engine", "hf", "--shard-positions", "300",
            "--batch-tokens", "1024"]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    ref = tmp_path / "ref"
    subprocess.run(_cli(*args, "--out", str(ref)), env=env, check=True, capture_output=True)
    out = tmp_path / "c"
    proc = subprocess.Popen(_cli(*args, "--out", str(out)), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        m = out / "manifest-00000.json"
        if m.exists() and len(json.loads(m.read_text())["shards"]) >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -9, "the run finished before it could be killed; make it longer"
    partial = CacheReader(out)
    assert not partial.manifest.complete and verify_cache(out).ok
    done = [s.record for s in partial.stream()]
    assert done == list(range(len(done))) and 0 < len(done) < 300
    subprocess.run(_cli(*args, "--out", str(out)), env=env, check=True, capture_output=True)
    ref_files = {p.name: p.read_bytes() for p in (ref / "shards").iterdir()}
    out_files = {p.name: p.read_bytes() for p in (out / "shards").iterdir()}
    assert out_files == ref_files  # byte-identical shards: nothing duplicated, nothing dropped
    assert [s.record for s in records(out)] == list(range(300))
    assert verify_cache(out).ok and not verify_cache(out).warnings


# -- bad input -----------------------------------------------------------------------------------
def bad(teacher, data, tmp_path, *extra):
    r = run("--teacher", str(teacher), "--data", str(data), "--out", str(tmp_path / "c"), "--engine", "hf",
            "--top-k", "8", *extra, ok=False)
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    return r.output


def test_missing_column(teacher, instr, tmp_path):
    out = bad(teacher, instr, tmp_path, "--response-field", "answer_text")
    assert "answer_text" in out and "not in the data" in out and str(instr) in out


def test_empty_value_names_row_and_column(teacher, tmp_path):
    rows = instruction_rows(5)
    rows[3]["output"] = "   "
    out = bad(teacher, write_jsonl(tmp_path / "d.jsonl", rows), tmp_path)
    assert "row 4" in out and "'output'" in out and "empty" in out
    assert not (tmp_path / "c" / "shards").exists() or not list((tmp_path / "c" / "shards").glob("*.arrow"))


def test_non_text_value(teacher, tmp_path):
    rows = instruction_rows(5)
    rows[2]["instruction"] = 42
    for r in rows:
        r["instruction"] = str(r["instruction"]) if r is not rows[2] else 42
    path = tmp_path / "d.jsonl"
    write_jsonl(path, rows)
    out = bad(teacher, path, tmp_path)
    assert "row 3" in out and "'instruction'" in out and "expected text" in out


def test_unknown_shape(teacher, tmp_path):
    out = bad(teacher, write_jsonl(tmp_path / "d.jsonl", [{"foo": "a", "bar": "b"}]), tmp_path)
    assert "cannot tell the record shape" in out and "foo" in out


def test_missing_and_empty_files(teacher, tmp_path):
    assert "no such data file" in bad(teacher, tmp_path / "nope.jsonl", tmp_path)
    (tmp_path / "empty.jsonl").write_text("")
    assert "empty" in bad(teacher, tmp_path / "empty.jsonl", tmp_path)


def test_k_larger_than_vocabulary(teacher, instr, tmp_path):
    out = bad(teacher, instr, tmp_path, "--top-k", "100000")
    assert "larger than the teacher's vocabulary" in out


def test_tokenizer_that_cannot_be_loaded(teacher, instr, tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_bytes((teacher / "config.json").read_bytes())  # a model, no tokenizer
    r = run("--teacher", str(tmp_path / "broken"), "--data", str(instr), "--out", str(tmp_path / "c"), "--engine", "hf", ok=False)
    assert r.exit_code == 1 and "cannot load the tokenizer" in r.output and str(tmp_path / "broken") in r.output


def test_teacher_that_cannot_be_loaded(teacher, instr, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    r = run("--teacher", str(broken), "--tokenizer", str(teacher), "--data", str(instr), "--out", str(tmp_path / "c"),
            "--engine", "hf", ok=False)
    assert r.exit_code == 1 and "cannot load the teacher" in r.output and str(broken) in r.output


def test_teacher_weights_that_cannot_be_loaded(teacher, instr, tmp_path):
    import shutil

    broken = tmp_path / "noweights"
    shutil.copytree(teacher, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    out = bad(broken, instr, tmp_path)
    assert "cannot load the teacher" in out and str(broken) in out
    assert not list((tmp_path / "c" / "shards").glob("*.arrow"))


def test_mismatched_tokenizer_is_refused(teacher, instr, tmp_path):
    from transformers import AutoTokenizer

    big = AutoTokenizer.from_pretrained(teacher)
    big.add_tokens([f"<extra{i}>" for i in range(600)])
    big.save_pretrained(tmp_path / "bigtok")
    out = bad(teacher, instr, tmp_path, "--tokenizer", str(tmp_path / "bigtok"))
    assert "do not belong together" in out


def test_unwritable_output_is_refused_before_work(teacher, instr, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run("--teacher", str(teacher), "--data", str(instr), "--out", str(blocker / "cache"), "--engine", "hf", ok=False)
    assert r.exit_code == 1 and "not writable" in r.output and str(blocker / "cache") in r.output


def test_worker_index_out_of_range(teacher, instr, tmp_path):
    out = bad(teacher, instr, tmp_path, "--num-workers", "2", "--worker-index", "2")
    assert "--worker-index 2" in out
