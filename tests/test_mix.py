"""Training from several caches at once (on-policy rounds, trainer/mix.py): weights hold, the order is
deterministic, a stopped run resumes exactly, DDP saves every cache's cursor per rank, incompatible caches are
refused naming both, and one cache is what it always was."""

from __future__ import annotations

import json
import math
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from tiny import build_teacher, cached_teacher, instruction_rows, write_jsonl

from adakd import cli
from adakd.storage import CacheReader
from adakd.trainer.errors import TrainError
from adakd.trainer.mix import MixCursor, MixedStream, choice, cursor_from_json, narrow_topk, parse_weights

ROOT = Path(__file__).resolve().parents[1]


def cache_teacher(teacher: Path, data: Path, out: Path, *extra: str) -> Path:
    r = CliRunner().invoke(cli.main, ["cache-teacher", "--teacher", str(teacher), "--data", str(data), "--out", str(out),
                                      "--engine", "hf", "--no-progress", *extra])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Cache A (off-policy, k 8), cache B (other records and seed, the same teacher, k 8), cache C (B's records at
    k 4), and a student config."""
    root = tmp_path_factory.mktemp("mix")
    teacher, _, a, cfg = cached_teacher(root, records=16, seed=7, k=8)
    data_b = write_jsonl(root / "b.jsonl", instruction_rows(12, seed=11))
    b = cache_teacher(teacher, data_b, root / "cache-b", "--top-k", "8")
    c = cache_teacher(teacher, data_b, root / "cache-c", "--top-k", "4")
    student = root / "student.json"
    student.write_text(json.dumps(cfg))
    return {"root": root, "teacher": teacher, "a": a, "b": b, "c": c, "data_b": data_b, "student": student}


def train(s, out, *extra, caches=("a", "b"), ok=True):
    args = ["train-student"]
    for c in caches:
        args += ["--cache", str(s[c])]
    r = CliRunner().invoke(cli.main, [*args, "--student", str(s["student"]), "--out", str(out), "--batch-tokens", "512",
                                      "--no-progress", *extra])
    if ok:
        assert r.exit_code == 0, r.output
    return r


def log(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]


def weights_of(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_weights_hold_within_sampling_error():
    """The draw's shares: over 60,000 positions each cache's fraction is within 4 standard errors of its weight
    (a fixed seed: deterministic; 4 SE is a 6e-5 two-sided chance per cache for a correct draw)."""
    w = parse_weights("5,3,2", 3)
    assert w == pytest.approx([0.5, 0.3, 0.2])
    cum = np.cumsum(w)
    n = 60_000
    for seed, rank in ((0, 0), (3, 1)):
        counts = np.bincount([choice(cum, seed, rank, i) for i in range(n)], minlength=3)
        for got, p in zip(counts / n, w):
            assert abs(got - p) <= 4 * math.sqrt(p * (1 - p) / n), (seed, rank, counts)
    # counter-based: the choice at n depends on (seed, rank, n) alone; ranks and seeds draw differently
    assert [choice(cum, 0, 0, i) for i in range(50)] == [choice(cum, 0, 0, i) for i in range(50)]
    assert [choice(cum, 0, 0, i) for i in range(50)] != [choice(cum, 0, 1, i) for i in range(50)]
    assert [choice(cum, 0, 0, i) for i in range(50)] != [choice(cum, 1, 0, i) for i in range(50)]


def test_weights_are_validated():
    assert parse_weights(None, 2) == [0.5, 0.5] and parse_weights([1, 3], 2) == [0.25, 0.75]
    for bad, why in (("0.5", "1 weight(s) for 2 cache(s)"), ("1,-1", "positive"), ("1,0", "positive"),
                     ("a,b", "comma-separated numbers"), ("1,nan", "positive")):
        with pytest.raises(TrainError, match=re.escape(why)):
            parse_weights(bad, 2)


def test_the_mixed_stream_follows_the_draw_and_resumes_from_any_cursor(setup):
    a, b = CacheReader(setup["a"]), CacheReader(setup["b"])
    w = [0.7, 0.3]
    mixed = MixedStream([a, b], w, seed=4)
    seqs, cursors = [], []
    for s in mixed:
        seqs.append(s)
        cursors.append(mixed.cursor)
    # the same as drawing by hand from each cache's own stream, up to the first draw of a cache that ran out
    own = [iter(list(a.stream(seed=4))), iter(list(b.stream(seed=4)))]
    expected, n = [], 0
    while (s := next(own[choice(np.cumsum(w), 4, 0, n)], None)) is not None:
        expected.append(s)
        n += 1
    assert [s.record for s in seqs] == [s.record for s in expected] and len(seqs) > 10
    assert all(np.array_equal(x.input_ids, y.input_ids) for x, y in zip(seqs, expected))
    assert [s.record for s in MixedStream([a, b], w, seed=4)] == [s.record for s in seqs]  # deterministic
    # resuming from the JSON of any cursor continues with exactly the next sequence
    for j in (0, 5, len(seqs) - 2):
        c = cursor_from_json(json.loads(json.dumps(cursors[j].to_json())))
        assert isinstance(c, MixCursor) and c.n == j + 1
        assert [s.record for s in MixedStream([a, b], w, seed=4, cursor=c)] == [s.record for s in seqs[j + 1:]]
    with pytest.raises(TrainError, match="same --cache list"):
        MixedStream([a, b], [0.5, 0.5], seed=4, cursor=cursors[3])


def test_narrowing_top_k_keeps_the_mass_and_caches_of_different_k_train_together(setup, tmp_path):
    seq = next(iter(CacheReader(setup["a"]).stream()))
    cut = narrow_topk(seq, 3)
    assert cut.topk_ids.shape[1] == 3 and np.array_equal(cut.topk_ids, seq.topk_ids[:, :3])
    total = np.logaddexp(np.logaddexp.reduce(seq.topk_logprobs.astype(np.float64), axis=1), seq.tail_logmass)
    kept = np.logaddexp(np.logaddexp.reduce(cut.topk_logprobs.astype(np.float64), axis=1), cut.tail_logmass)
    assert kept == pytest.approx(total, abs=1e-5)
    train(setup, tmp_path / "k", "--max-steps", "3", caches=("a", "c"))  # k 8 and k 4: every batch at k 4
    assert [r["step"] for r in log(tmp_path / "k")] == [1, 2, 3]


def test_a_stopped_run_resumes_exactly_across_an_epoch(setup, tmp_path):
    extra = ("--max-steps", "12", "--save-every", "2", "--cache-weights", "0.6,0.4", "--seed", "1")
    reference = tmp_path / "reference"
    train(setup, reference, *extra)
    ref = log(reference)
    assert {r["epoch"] for r in ref} == {0, 1}  # the epoch ended (a cache ran out) and the next one began
    out = tmp_path / "run"
    train(setup, out, *extra, "--stop-after", "5")
    # a kill just after step 5 was logged, before its checkpoint: the last one is step 4
    shutil.rmtree(out / "checkpoints" / "step-000005")
    (out / "checkpoints" / "latest").write_text("step-000004")
    state = json.loads((out / "checkpoints" / "step-000004" / "state.json").read_text())
    (cur,) = state["cursors"]
    assert cur["mix"] > 0 and len(cur["caches"]) == 2 and cur["weights"] == [0.6, 0.4]
    assert state["config"]["cache"] == [str(setup["a"]), str(setup["b"])]
    r = train(setup, out, *extra)
    assert "trained 12/12 steps" in r.output
    got = log(out)
    assert [x["step"] for x in got] == list(range(1, 13))
    for x, y in zip(got, ref):  # every step: the same batch, the same loss
        assert (x["loss"], x["kd"], x["valid"], x["epoch"]) == (y["loss"], y["kd"], y["valid"], y["epoch"])
    wa, wb = weights_of(out / "final"), weights_of(reference / "final")
    assert all(np.array_equal(wa[k].numpy(), wb[k].numpy()) for k in wb)
    # a resume with other weights or another cache list is refused, not silently continued differently
    out2 = tmp_path / "again"
    train(setup, out2, *extra, "--stop-after", "2")
    r = train(setup, out2, "--max-steps", "12", "--save-every", "2", "--seed", "1", ok=False)
    assert r.exit_code == 1 and "--cache-weights" in r.output
    r = train(setup, out2, "--max-steps", "12", "--seed", "1", caches=("a",), ok=False)
    assert r.exit_code == 1 and "same --cache list" in r.output


def test_epochs_count_the_mixed_stream_and_a_config_file_lists_caches(setup, tmp_path):
    conf = tmp_path / "run.yaml"
    conf.write_text(f"cache: [{setup['a']}, {setup['b']}]\ncache_weights: [1, 1]\nstudent: {setup['student']}\n"
                    f"out: {tmp_path / 'e'}\nepochs: 2\nbatch_tokens: 512\nno_progress: true\n")
    r = CliRunner().invoke(cli.main, ["train-student", "--config", str(conf)])
    assert r.exit_code == 0, r.output
    rows = log(tmp_path / "e")
    per_epoch = sum(1 for x in rows if x["epoch"] == 0)
    assert per_epoch > 0 and len(rows) == 2 * per_epoch and {x["epoch"] for x in rows} == {0, 1}


def test_from_a_previous_rounds_student(setup, tmp_path):
    first = tmp_path / "round1"
    train(setup, first, "--max-steps", "8", caches=("a",))
    train(setup, tmp_path / "fresh", "--max-steps", "1")
    r = CliRunner().invoke(cli.main, ["train-student", "--cache", str(setup["a"]), "--cache", str(setup["b"]),
                                      "--student", str(first / "final"), "--out", str(tmp_path / "round2"),
                                      "--batch-tokens", "512", "--no-progress", "--max-steps", "2"])
    assert r.exit_code == 0, r.output
    # the same first batch: the pretrained round-1 student starts lower than a random one
    assert log(tmp_path / "round2")[0]["loss"] < log(tmp_path / "fresh")[0]["loss"]


def test_incompatible_caches_are_refused_naming_both(setup, tmp_path):
    root = setup["root"]
    other = build_teacher(root / "other-teacher", vocab_size=384)
    d = cache_teacher(other, setup["data_b"], root / "cache-other-tok", "--top-k", "8")
    runner = CliRunner()

    def refused(x: Path, y: Path, *extra: str) -> str:
        out = tmp_path / f"out-{x.name}-{y.name}"
        r = runner.invoke(cli.main, ["train-student", "--cache", str(x), "--cache", str(y), "--student",
                                     str(setup["student"]), "--out", str(out), "--no-progress", *extra])
        assert r.exit_code == 1, r.output
        assert str(x) in r.output and str(y) in r.output, r.output
        assert not (out / "checkpoints").exists()  # before any work
        return r.output

    assert "different tokenizers" in refused(setup["a"], d)
    s = cache_teacher(setup["teacher"], setup["data_b"], root / "cache-sampled", "--targets", "sampled", "--samples", "8")
    assert "different target kinds" in refused(setup["a"], s)
    out = runner.invoke(cli.main, ["train-student", "--cache", str(setup["a"]), "--cache", str(setup["a"]), "--student",
                                   str(setup["student"]), "--out", str(tmp_path / "twice"), "--no-progress"]).output
    assert "given more than once" in out
    r = runner.invoke(cli.main, ["train-student", "--cache", str(setup["a"]), "--cache", str(setup["b"]),
                                 "--cache-weights", "1,2,3", "--student", str(setup["student"]), "--out",
                                 str(tmp_path / "w"), "--no-progress"])
    assert r.exit_code == 1 and "3 weight(s) for 2 cache(s)" in r.output and not (tmp_path / "w").exists()


def test_one_cache_is_unchanged(setup, tmp_path):
    """One --cache: the plain stream, and checkpoints in the format before mixing (a storage.Cursor per rank)."""
    train(setup, tmp_path / "one", "--max-steps", "2", "--save-every", "2", caches=("a",))
    state = json.loads((tmp_path / "one" / "checkpoints" / "step-000002" / "state.json").read_text())
    assert "mix" not in state["cursors"][0] and state["cursors"][0]["cache"] and state["config"]["cache"] == str(setup["a"])
    from transformers import AutoModelForCausalLM

    from adakd.trainer import api

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "final")
    reader = CacheReader(setup["a"])
    plain = [(b.tokens, b.cursor) for b in api.batches(reader, model, batch_tokens=512, quiet=True)]
    listed = [(b.tokens, b.cursor) for b in api.batches([reader], model, batch_tokens=512, quiet=True)]
    assert plain == listed and len(plain) > 2
    mixed = list(api.batches([reader, CacheReader(setup["b"])], model, batch_tokens=512, weights=[0.5, 0.5], quiet=True))
    assert isinstance(mixed[0].cursor, MixCursor)


@pytest.mark.slow
def test_two_process_ddp_checkpoints_every_caches_cursor_per_rank(setup, tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "adakd.cli",
            "train-student", "--cache", str(setup["a"]), "--cache", str(setup["b"]), "--cache-weights", "0.5,0.5",
            "--student", str(setup["student"]), "--out", str(out), "--max-steps", "4", "--save-every", "2",
            "--batch-tokens", "512", "--no-progress"]
    for extra in (["--stop-after", "2"], []):
        r = subprocess.run(base + extra, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-3000:]
    assert [x["step"] for x in log(out)] == [1, 2, 3, 4]
    state = json.loads((out / "checkpoints" / "step-000004" / "state.json").read_text())
    assert state["world"] == 2 and len(state["cursors"]) == 2
    for rank, cur in enumerate(state["cursors"]):
        assert cur["rank"] == rank and cur["world"] == 2 and cur["mix"] > 0 and len(cur["caches"]) == 2
        assert all(c["rank"] == rank and c["world"] == 2 for c in cur["caches"])
