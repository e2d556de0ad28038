"""`adakd generate`: the student's answers as records cache-teacher trains exactly; reproducible, resumable, sharded."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from faultkit import run_cli
from tiny import build_teacher, build_tokenizer, instruction_rows, write_jsonl

from adakd import cli
from adakd.common.tokens import generation_prompt
from adakd.storage import CacheReader

ROWS = 6
NEW = 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    model = build_teacher(root / "model")
    data = write_jsonl(root / "prompts.jsonl", instruction_rows(ROWS, seed=3))
    chat = write_jsonl(root / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "the cat sat on the mat"}, {"role": "assistant", "content": "a dog"}]},
        {"messages": [{"role": "system", "content": "be happy"}, {"role": "user", "content": "why is the tree big"}]},
        {"messages": [{"role": "user", "content": "one plus two"}, {"role": "assistant", "content": "three"},
                      {"role": "user", "content": "and then"}]},
    ])
    return root, model, data, chat


def gen(model, data, out, *more: str, ok: bool = True):
    r = CliRunner().invoke(cli.main, ["generate", "--model", str(model), "--data", str(data), "--out", str(out),
                                      "--engine", "hf", "--max-new-tokens", str(NEW), "--no-progress", *more])
    if ok:
        assert r.exit_code == 0, r.output
    return r


def lines(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def cache_of(teacher, data, out) -> list:
    r = CliRunner().invoke(cli.main, ["cache-teacher", "--teacher", str(teacher), "--data", str(data), "--out", str(out),
                                      "--top-k", "4", "--engine", "hf", "--no-progress"])
    assert r.exit_code == 0, r.output
    return list(CacheReader(out).stream())


@pytest.fixture(scope="module")
def reference(setup):
    """One uninterrupted single-worker run, two samples per prompt."""
    root, model, data, _ = setup
    out = root / "reference.jsonl"
    gen(model, data, out, "--samples", "2", "--seed", "7")
    return out


def test_generated_records_train_exactly_their_tokens(setup, reference, tmp_path):
    root, model, data, _ = setup
    rows = lines(reference)
    assert len(rows) == 2 * ROWS
    assert [(r["generation"]["record"], r["generation"]["sample"]) for r in rows] == [(i, j) for i in range(ROWS) for j in (0, 1)]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    for r in rows:
        g = r["generation"]
        assert set(r) == {"prompt", "output", "generation"} and r["prompt"].startswith("Below is an instruction")
        assert len(g["token_ids"]) == len(g["logprobs"]) <= NEW and g["finish"] in ("stop", "length")
        assert all(math.isfinite(x) and x <= 0 for x in g["logprobs"])
        assert (g["finish"] == "stop") == (g["token_ids"][-1] == tok.eos_token_id)
        assert g["model"] == str(model) and g["seed"] == 7 and g["temperature"] == 1.0 and g["top_p"] == 1.0
    seqs = cache_of(model, reference, tmp_path / "cache")
    assert len(seqs) == len(rows)
    for s, r in zip(seqs, rows):
        n = len(generation_prompt(tok, r["prompt"]))
        assert s.input_ids[:n].tolist() == generation_prompt(tok, r["prompt"])  # the prompt the student saw
        assert s.input_ids[s.loss_mask].tolist() == r["generation"]["token_ids"]  # labels == token_ids
        assert s.loss_mask[n:].all() and not s.loss_mask[:n].any()


def test_samples_differ_and_reproduce(setup, reference, tmp_path):
    root, model, data, _ = setup
    rows = lines(reference)
    assert all(rows[2 * i]["generation"]["token_ids"] != rows[2 * i + 1]["generation"]["token_ids"] for i in range(ROWS))
    again = tmp_path / "again.jsonl"
    gen(model, data, again, "--samples", "2", "--seed", "7")
    assert again.read_bytes() == reference.read_bytes()
    other = tmp_path / "other.jsonl"
    gen(model, data, other, "--samples", "2", "--seed", "8")
    assert other.read_bytes() != reference.read_bytes()
    r = gen(model, data, again, "--samples", "2", "--seed", "7")  # finished: a no-op
    assert "already complete" in r.output and again.read_bytes() == reference.read_bytes()


def test_a_killed_run_resumes_byte_identical(setup, tmp_path):
    """SIGKILL before the third fsync, a torn line and half a record appended, then a resume: the bytes of one
    uninterrupted run (all runs in child processes with one thread: floats depend on the thread count)."""
    root, model, data, _ = setup

    def argv(out):
        return ["generate", "--model", str(model), "--data", str(data), "--out", str(out), "--engine", "hf",
                "--max-new-tokens", str(NEW), "--no-progress", "--samples", "2", "--seed", "7"]

    whole = tmp_path / "whole.jsonl"
    assert run_cli(argv(whole), timeout=300).rc == 0
    reference = whole.read_bytes()
    out = tmp_path / "killed.jsonl"
    run = run_cli(argv(out), arms=("fsync:3",), timeout=300)
    assert run.killed, run.err
    partial = out.read_bytes()
    assert 0 < len(partial) < len(reference) and reference.startswith(partial)
    rest = reference[len(partial):]
    with open(out, "ab") as f:  # a whole line of the next record (half a record) and a torn line
        f.write(rest[: rest.index(b"\n") + 40])
    run = run_cli(argv(out), timeout=300)
    assert run.rc == 0, run.err
    assert out.read_bytes() == reference
    r = gen(model, data, out, "--samples", "3", "--seed", "7", ok=False)  # other settings: refused, file untouched
    assert r.exit_code == 1 and "was written with other settings" in r.output and "samples 2 -> 3" in r.output
    assert out.read_bytes() == reference


def test_two_workers_give_the_one_worker_file(setup, reference, tmp_path):
    root, model, data, _ = setup
    out = tmp_path / "w.jsonl"
    for i in (0, 1):
        gen(model, data, out, "--samples", "2", "--seed", "7", "--num-workers", "2", "--worker-index", str(i))
    parts = [tmp_path / f"w.worker-0000{i}-of-00002.jsonl" for i in (0, 1)]
    assert [{r["generation"]["record"] for r in lines(p)} for p in parts] == [{0, 2, 4}, {1, 3, 5}]
    r = CliRunner().invoke(cli.main, ["generate", "--data", str(data), "--out", str(out), "--num-workers", "2", "--merge"])
    assert r.exit_code == 0, r.output
    assert out.read_bytes() == reference.read_bytes()
    seqs = cache_of(model, tmp_path / "w.worker-*-of-00002.jsonl", tmp_path / "cache")  # the worker files, as a glob
    assert sorted(s.input_ids[s.loss_mask].tolist() for s in seqs) == sorted(r["generation"]["token_ids"] for r in lines(reference))


def test_chat_prompts(setup, tmp_path):
    root, model, _, chat = setup
    out = tmp_path / "chat.jsonl"
    gen(model, chat, out, "--samples", "2", "--temperature", "0.8", "--top-p", "0.9")
    rows = lines(out)
    assert len(rows) == 6
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    source = lines(chat)
    for r in rows:
        want = source[r["generation"]["record"]]["messages"]
        want = want[:-1] if want[-1]["role"] == "assistant" else want
        assert r["messages"][:-1] == want and r["messages"][-1]["role"] == "assistant"
    seqs = cache_of(model, out, tmp_path / "cache")
    for s, r in zip(seqs, rows):
        prompt = generation_prompt(tok, messages=r["messages"][:-1])
        assert s.input_ids[: len(prompt)].tolist() == prompt
        assert s.input_ids[s.loss_mask].tolist() == r["generation"]["token_ids"]


def test_generation_errors_name_the_thing(setup, tmp_path):
    root, model, data, chat = setup
    r = gen(tmp_path / "nope", data, tmp_path / "o.jsonl", ok=False)
    assert r.exit_code == 1 and "no such directory" in r.output
    bare = tmp_path / "bare"
    build_tokenizer(bare)  # a tokenizer and no model config
    r = gen(bare, data, tmp_path / "o.jsonl", ok=False)
    assert r.exit_code == 1 and "cannot load the model's config" in r.output
    notemplate = tmp_path / "notemplate"
    for f in os.listdir(model):
        if f != "chat_template.jinja":
            (notemplate / f).parent.mkdir(exist_ok=True)
            (notemplate / f).write_bytes((model / f).read_bytes())
    cfg = json.loads((notemplate / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (notemplate / "tokenizer_config.json").write_text(json.dumps(cfg))
    r = gen(notemplate, chat, tmp_path / "o.jsonl", ok=False)
    assert r.exit_code == 1 and "has no chat template" in r.output
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = gen(model, empty, tmp_path / "o.jsonl", ok=False)
    assert r.exit_code == 1 and "the file is empty" in r.output
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "the cat"}])
    r = gen(model, text, tmp_path / "o.jsonl", ok=False)
    assert r.exit_code == 1 and "no prompts in columns" in r.output
    r = gen(model, data, tmp_path / "missing" / "o.jsonl", ok=False)
    assert r.exit_code == 1 and "does not exist" in r.output
    assert not (tmp_path / "o.jsonl").exists()


def copy_model(src: Path, dst: Path, skip: tuple[str, ...] = (), edit: dict | None = None) -> Path:
    """A copy of the model folder `src` without the files `skip`, JSON files edited by `edit[name](dict)`."""
    dst.mkdir(parents=True)
    for f in os.listdir(src):
        if f in skip:
            continue
        if f in (edit or {}):
            (dst / f).write_text(json.dumps(edit[f](json.loads((src / f).read_text()))))
        else:
            (dst / f).write_bytes((src / f).read_bytes())
    return dst


def failed(r, *words: str) -> str:
    """The one error line of a refused run: status 1 (2: click's own), every word in it, no traceback."""
    assert r.exit_code in (1, 2) and "Traceback" not in r.output, r.output
    for w in words:
        assert w in r.output, (w, r.output)
    return r.output


@pytest.mark.parametrize("option,value,words", [
    ("--samples", "0", ("--samples must be at least 1, not 0",)),
    ("--max-new-tokens", "0", ("--max-new-tokens must be at least 1, not 0",)),
    ("--num-workers", "0", ("--num-workers must be at least 1, not 0",)),
    ("--chunk-records", "0", ("--chunk-records must be at least 1, not 0",)),
    ("--worker-index", "2", ("--worker-index 2 must be in 0..0 (--num-workers 1)",)),
    ("--temperature", "-0.5", ("--temperature must be within [0, 20] (0: greedy), not -0.5",)),
    ("--temperature", "nan", ("--temperature must be within [0, 20]",)),
    ("--temperature", "21", ("--temperature must be within [0, 20] (0: greedy), not 21.0",)),
    ("--top-p", "0", ("--top-p must be within (0, 1], not 0.0",)),
    ("--top-p", "1.5", ("--top-p must be within (0, 1], not 1.5",)),
    ("--engine", "torch", ("'--engine'", "'torch' is not one of")),
])
def test_option_errors_name_the_option(setup, tmp_path, option, value, words):
    """Every option out of range is refused through the real CLI, naming it, before any model loads."""
    root, model, data, _ = setup
    r = gen(tmp_path / "not-loaded", data, tmp_path / "o.jsonl", option, value, ok=False)  # no model needed
    failed(r, *words)
    assert not (tmp_path / "o.jsonl").exists()


def test_model_errors_say_what_to_do(setup, tmp_path):
    root, model, data, chat = setup
    r = CliRunner().invoke(cli.main, ["generate", "--data", str(data), "--out", str(tmp_path / "o.jsonl")])
    failed(r, "--model is required")
    notok = copy_model(model, tmp_path / "notok", skip=("tokenizer.json", "tokenizer_config.json",
                                                         "chat_template.jinja"))
    failed(gen(notok, data, tmp_path / "o.jsonl", ok=False), f"--model {notok}: the model has no usable tokenizer",
           "tokenizer.save_pretrained(DIR)")

    def no_eos(d: dict) -> dict:
        d.pop("eos_token_id", None)
        d.pop("eos_token", None)
        return d

    noeos = copy_model(model, tmp_path / "noeos", edit={"config.json": no_eos, "generation_config.json": no_eos,
                                                         "tokenizer_config.json": no_eos})
    failed(gen(noeos, data, tmp_path / "o.jsonl", ok=False), f"--model {noeos}: the model has no end-of-sequence token",
           "set eos_token_id in the model's generation_config.json")
    noweights = copy_model(model, tmp_path / "noweights", skip=("model.safetensors",))
    failed(gen(noweights, data, tmp_path / "o.jsonl", ok=False), f"--model {noweights}: cannot load the model with "
           "transformers", "pass a causal language model directory")
    assert not (tmp_path / "o.jsonl").exists() or not (tmp_path / "o.jsonl").read_text()


def test_data_errors_name_the_row(setup, tmp_path):
    root, model, data, chat = setup
    out = tmp_path / "o.jsonl"
    failed(gen(model, tmp_path / "nope.jsonl", out, ok=False), "nope.jsonl: no such data file; check the --data path")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "the cat"}\n{"instruction": \n')
    failed(gen(model, bad, out, ok=False), "bad.jsonl, line 2: not valid JSON", "fix or remove this line")
    empty_row = write_jsonl(tmp_path / "empty_row.jsonl", [{"instruction": "the cat"}, {"instruction": "  "}])
    failed(gen(model, empty_row, out, ok=False), "empty_row.jsonl, row 2, column 'instruction': empty; fix or drop this row")
    no_user = write_jsonl(tmp_path / "no_user.jsonl", [
        {"messages": [{"role": "user", "content": "the cat"}]},
        {"messages": [{"role": "system", "content": "be happy"}, {"role": "assistant", "content": "a dog"}]}])
    failed(gen(model, no_user, out, ok=False), "no_user.jsonl, row 2: the conversation has no user turn to answer at "
           "its end", "end each conversation with the user's message")
    strict = copy_model(model, tmp_path / "strict", skip=("chat_template.jinja",))
    (strict / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>"
        "{% endif %}")
    failed(gen(strict, chat, out, ok=False), "chat.jsonl, row 2: the student's chat template rejects this conversation",
           "System role not supported", "fix the record to fit the template")
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "the cat sat"}, {"prompt": "the cat sat on the mat " * 80}])
    failed(gen(model, long, out, ok=False), "long.jsonl, row 2: the prompt is", "and the student takes 256 positions: "
           "no room to answer; shorten the prompt or drop the row")
    assert not out.exists()


def test_out_errors_say_what_to_do(setup, reference, tmp_path, monkeypatch):
    root, model, data, _ = setup
    failed(gen(model, data, tmp_path, ok=False), f"--out {tmp_path}: {tmp_path} is a directory",
           f"such as {tmp_path / 'gen.jsonl'}")
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"text": "mine"}\n')
    failed(gen(model, data, foreign, ok=False), f"{foreign}, line 1: not a line written by adakd generate",
           "choose another --out")
    assert foreign.read_text() == '{"text": "mine"}\n'  # untouched
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p).startswith(str(locked)) else real(p, mode, **kw))
    failed(gen(model, data, locked / "o.jsonl", ok=False), f"--out {locked / 'o.jsonl'}: {locked / 'o.jsonl'} is not "
           "writable; choose another --out")
    monkeypatch.undo()
    staging_file = tmp_path / "a-file"
    staging_file.write_text("")
    failed(gen(model, data, "s3://bucket/x/gen.jsonl?endpoint_override=127.0.0.1:1&scheme=http", "--staging",
               str(staging_file), ok=False), "--staging: cannot write the staging file", "give --staging a writable")


def test_merge_errors_say_what_to_do(setup, reference, tmp_path):
    root, model, data, _ = setup

    def merge(out, workers: int):
        return CliRunner().invoke(cli.main, ["generate", "--data", str(data), "--out", str(out), "--num-workers",
                                             str(workers), "--merge"])

    out = tmp_path / "m.jsonl"
    failed(merge(out, 1), "--merge needs the --num-workers the worker files were written with (2 or more), not 1")
    failed(merge(out, 2), "m.worker-00000-of-00002.jsonl: no such worker file; run (or finish) worker 0 with "
           "--num-workers 2 first")
    text = reference.read_bytes()
    (tmp_path / "m.worker-00000-of-00002.jsonl").write_bytes(text)
    (tmp_path / "m.worker-00001-of-00002.jsonl").write_bytes(text[:-10])
    failed(merge(out, 2), "m.worker-00001-of-00002.jsonl: its last line is torn; re-run worker 1 to finish it")
    (tmp_path / "m.worker-00001-of-00002.jsonl").write_bytes(b'{"text": "mine"}\n')
    failed(merge(out, 2), "m.worker-00001-of-00002.jsonl, line 1: not a line written by adakd generate")
    failed(merge(tmp_path / "missing" / "m.jsonl", 2), "does not exist; create it or choose another --out")
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_vllm_generates(setup, tmp_path):
    """vLLM (in a child process): lines written, token counts within bounds, finite log-probabilities."""
    root, model, data, _ = setup
    out = tmp_path / "v.jsonl"
    here = Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here.parent), str(here)]))
    r = subprocess.run([sys.executable, "-m", "adakd.cli", "generate", "--model", str(model), "--data", str(data),
                        "--out", str(out), "--engine", "vllm", "--samples", "2", "--limit", "3", "--max-new-tokens",
                        str(NEW), "--no-progress"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = lines(out)
    assert [(x["generation"]["record"], x["generation"]["sample"]) for x in rows] == [(i, j) for i in range(3) for j in (0, 1)]
    for x in rows:
        g = x["generation"]
        assert g["engine"] == "vllm" and 1 <= len(g["token_ids"]) == len(g["logprobs"]) <= NEW
        assert all(math.isfinite(v) and v <= 0 for v in g["logprobs"])


def test_an_answer_of_the_stop_token_alone_is_trained(setup, reference, tmp_path):
    """A student may answer nothing (its first token is EOS): the record's text is empty, and its one token, the
    stop, is what the student produced and what the teacher must score (a demo's student did this)."""
    root, model, data, _ = setup
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    row = lines(reference)[0]
    row["output"] = ""
    row["generation"].update(token_ids=[tok.eos_token_id], logprobs=[-1.0], finish="stop")
    seqs = cache_of(model, write_jsonl(tmp_path / "empty.jsonl", [row, lines(reference)[1]]), tmp_path / "cache")
    assert s_ids(seqs[0]) == [tok.eos_token_id] and s_ids(seqs[1]) == lines(reference)[1]["generation"]["token_ids"]


def s_ids(s) -> list[int]:
    return s.input_ids[s.loss_mask].tolist()
