"""Sampled and hybrid caches: the format round trip, capture through the real CLI (hf and vLLM), draws that
follow the teacher's exact distribution, deterministic draws across workers and resumes, and refusals."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tiny import build_teacher, instruction_rows, write_jsonl

from adakd import cli
from adakd.storage import (CacheCorruptError, CacheError, CacheInfo, CacheReader, CacheVersionError, CacheWriter, Encoding,
                     SequenceTargets, format_summary, summarize, verify_cache)
from adakd.storage.codec import SAMPLE_LP_STEP

V = 300


def random_draws(rng, n: int, N: int, head: np.ndarray | None, tail_empty: np.ndarray | None = None):
    """Distinct ids with counts summing to N per position (outside `head`), and log-probabilities."""
    sizes, ids, counts, lps = [], [], [], []
    for i in range(n):
        if tail_empty is not None and tail_empty[i]:
            sizes.append(0)
            continue
        pool = np.setdiff1d(np.arange(V), head[i]) if head is not None else np.arange(V)
        d = int(rng.integers(1, min(N, 40) + 1))
        chosen = rng.choice(pool, size=d, replace=False)
        c = np.ones(d, np.int64) + np.bincount(rng.integers(0, d, N - d), minlength=d)
        lp = -rng.exponential(3.0, d).astype(np.float32)
        sizes.append(d)
        ids.append(chosen)
        counts.append(c)
        lps.append(lp)
    cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
    return dict(sample_sizes=np.array(sizes, np.int32), sample_ids=cat(ids, np.int32),
                sample_counts=cat(counts, np.int32), sample_logprobs=cat(lps, np.float32))


def info_for(enc: Encoding) -> CacheInfo:
    return CacheInfo(teacher={"name_or_path": "t"}, tokenizer={"name_or_path": "t", "vocab_size": V}, engine={"name": "x"},
                     dataset={"spec": "d"}, encoding=enc, target_kind=enc.kind)


def synthetic(kind: str, N: int, seed: int = 0, k: int = 0, records: int = 30):
    rng = np.random.default_rng(seed)
    seqs = []
    for r in range(records):
        L = int(rng.integers(2, 60))
        ids = rng.integers(0, V, L).astype(np.int32)
        mask = rng.random(L) < 0.7
        mask[0] = False
        n = int(mask.sum())
        head = np.stack([rng.choice(V, k, replace=False) for _ in range(n)]).astype(np.int32) if k else np.zeros((n, 0), np.int32)
        hlp = -np.sort(rng.exponential(1.0, (n, k)), 1).astype(np.float32)
        empty = rng.random(n) < 0.2 if kind == "hybrid" else None
        tail = np.where(empty, -np.inf, -rng.exponential(1.0, n)).astype(np.float32) if kind == "hybrid" else None
        seqs.append(SequenceTargets(r, ids, mask, head, hlp, -rng.exponential(2.0, n).astype(np.float32), tail,
                                    **random_draws(rng, n, N, head if k else None, empty)))
    return seqs


@pytest.mark.parametrize("kind,k,N,temperature", [("sampled", 0, 64, 1.0), ("sampled", 0, 300, 2.0),
                                                  ("hybrid", 4, 32, 1.0), ("hybrid", 4, 16, 0.7)])
def test_round_trip(tmp_path, kind, k, N, temperature):
    enc = Encoding(k=k, vocab_size=V, kind=kind, samples=N, sample_temperature=temperature)
    seqs = synthetic(kind, N, k=k)
    with CacheWriter(tmp_path / "c", info_for(enc), shard_positions=200, block_positions=64) as w:
        for s in seqs:
            w.add(s)
    assert verify_cache(tmp_path / "c").ok
    got = list(CacheReader(tmp_path / "c").stream())
    assert [g.record for g in got] == [s.record for s in seqs]
    for a, b in zip(seqs, got):  # the writer normalized `a` in place (order within positions)
        for f in ("sample_sizes", "sample_ids", "sample_counts"):
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
        assert np.abs(a.sample_logprobs - b.sample_logprobs).max(initial=0) <= SAMPLE_LP_STEP / 2 + 1e-6
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        if kind == "sampled":
            assert np.all(b.tail_logmass == 0)


def test_writer_refuses_malformed_draws(tmp_path):
    enc = Encoding(k=0, vocab_size=V, kind="sampled", samples=8)
    good = synthetic("sampled", 8, records=1)[0]
    cases = {
        "counts must sum": dict(sample_counts=good.sample_counts + 1),
        "outside the vocabulary": dict(sample_ids=good.sample_ids + V),
        "needs the teacher's draws": dict(sample_sizes=None),
    }
    for message, change in cases.items():
        s = synthetic("sampled", 8, records=1)[0]
        for f, v in change.items():
            setattr(s, f, v)
        with CacheWriter(tmp_path / message.replace(" ", "_"), info_for(enc)) as w:
            with pytest.raises(CacheError, match=message):
                w.add(s)
    twice = synthetic("sampled", 8, records=1)[0]
    twice.sample_ids[1] = twice.sample_ids[0]
    with CacheWriter(tmp_path / "twice", info_for(enc)) as w:
        with pytest.raises(CacheError, match="appears twice"):
            w.add(twice)


def test_damaged_counts_are_a_clear_error(tmp_path):
    """With checksums off, a count plane changed in place is caught by the per-position sum."""
    import pyarrow as pa

    enc = Encoding(k=0, vocab_size=V, kind="sampled", samples=16)
    with CacheWriter(tmp_path / "c", info_for(enc)) as w:
        for s in synthetic("sampled", 16, records=5):
            w.add(s)
    entry = CacheReader(tmp_path / "c").shards[0]
    path = tmp_path / "c" / entry.file
    table = pa.ipc.open_file(pa.BufferReader(path.read_bytes())).read_all()
    col = table.column("sample_count_0").combine_chunks()
    vals = col.values.to_numpy().copy()
    vals[0] += 2
    table = table.set_column(table.schema.get_field_index("sample_count_0"), "sample_count_0",
                             pa.ListArray.from_arrays(col.offsets, pa.array(vals, pa.uint8())))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as wr:
        wr.write_table(table)
    data = sink.getvalue().to_pybytes()
    path.write_bytes(data)
    manifest = tmp_path / "c" / "manifest-00000.json"
    body = json.loads(manifest.read_text())
    body["shards"][0]["bytes"] = len(data)
    del body["checksum"]
    from adakd.storage.manifest import _checksum
    body["checksum"] = _checksum(body)
    manifest.write_text(json.dumps(body))
    with pytest.raises(CacheCorruptError, match="draw counts do not add up"):
        list(CacheReader(tmp_path / "c", verify_checksums=False).stream())


def test_unknown_kind_is_refused(tmp_path):
    enc = Encoding(k=0, vocab_size=V, kind="sampled", samples=8)
    with CacheWriter(tmp_path / "c", info_for(enc)) as w:
        w.add(synthetic("sampled", 8, records=1)[0])
    manifest = tmp_path / "c" / "manifest-00000.json"
    body = json.loads(manifest.read_text())
    body["cache"]["target_kind"] = body["cache"]["encoding"]["kind"] = "beam"
    del body["checksum"]
    from adakd.storage.manifest import _checksum
    body["checksum"] = _checksum(body)
    manifest.write_text(json.dumps(body))
    with pytest.raises(CacheVersionError, match="target kind 'beam' is not known"):
        CacheReader(tmp_path / "c")


def test_topk_caches_keep_format_version_1(tmp_path):
    """Older adakd reads new top-k caches: their manifest and shard headers are unchanged."""
    enc = Encoding(k=4, vocab_size=V)
    s = synthetic("hybrid", 8, k=4, records=1)[0]
    s.sample_sizes = s.sample_ids = s.sample_counts = s.sample_logprobs = None
    with CacheWriter(tmp_path / "c", info_for(enc)) as w:
        w.add(s)
    body = json.loads((tmp_path / "c" / "manifest-00000.json").read_text())
    assert body["format_version"] == 1 and "kind" not in body["cache"]["encoding"]


# -- capture through the CLI ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampled")
    t = build_teacher(root / "teacher", scale=8.0)  # flat enough that draws spread over many ids
    data = write_jsonl(root / "d.jsonl", instruction_rows(12, seed=3))
    return t, data


def capture(teacher, data, out, *extra, engine="hf"):
    r = CliRunner().invoke(cli.main, ["cache-teacher", "--teacher", str(teacher), "--data", str(data), "--out", str(out),
                                      "--engine", engine, "--no-progress", *extra])
    assert r.exit_code == 0, r.output
    return r


def exact_logprobs(teacher, seq: SequenceTargets) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    with torch.no_grad():
        lp = model(torch.from_numpy(seq.input_ids[None].astype(np.int64))).logits[0].log_softmax(-1)
    return lp[seq.positions].numpy()


@pytest.mark.parametrize("kind", ["sampled", "hybrid"])
def test_capture_draws_follow_the_teacher(teacher, tmp_path, kind):
    """Stored log-probabilities are the teacher's; with many draws the counts match its (tail) distribution."""
    t, data = teacher
    N = 4096
    extra = ["--targets", kind, "--samples", str(N)] + (["--top-k", "4"] if kind == "hybrid" else [])
    capture(t, data, tmp_path / "c", *extra)
    assert verify_cache(tmp_path / "c").ok
    seq = next(iter(CacheReader(tmp_path / "c").stream()))
    lp = exact_logprobs(t, seq)
    off = np.concatenate([[0], np.cumsum(seq.sample_sizes)])
    worst = 0.0
    for i in range(seq.num_positions):
        ids = seq.sample_ids[off[i]:off[i + 1]]
        assert np.abs(seq.sample_logprobs[off[i]:off[i + 1]] - lp[i, ids]).max() <= SAMPLE_LP_STEP / 2 + 1e-4
        p = np.exp(lp[i].astype(np.float64))
        stored = np.concatenate([ids, seq.topk_ids[i]])
        rest = np.delete(p, stored).sum()  # the teacher's exact mass outside the stored ids
        assert abs(seq.rest_logmass[i] - np.log(rest)) <= 1 / 64 + 1e-4
        if kind == "hybrid":
            assert not set(ids.tolist()) & set(seq.topk_ids[i].tolist())
            p[seq.topk_ids[i]] = 0
        p /= p.sum()
        freq = np.zeros_like(p)
        freq[ids] = seq.sample_counts[off[i]:off[i + 1]] / N
        sd = np.sqrt(p * (1 - p) / N) + 1e-12
        worst = max(worst, float((np.abs(freq - p) / sd).max()))
        assert seq.sample_counts[off[i]:off[i + 1]].sum() == N
    assert worst < 6.0, worst  # no id's frequency more than 6 standard deviations from its probability


def test_draws_do_not_depend_on_workers_batches_or_resume(teacher, tmp_path):
    t, data = teacher
    base = ["--targets", "sampled", "--samples", "32"]
    capture(t, data, tmp_path / "one", *base)
    capture(t, data, tmp_path / "two", *base, "--num-workers", "2", "--worker-index", "0", "--batch-tokens", "64")
    capture(t, data, tmp_path / "two", *base, "--num-workers", "2", "--worker-index", "1")
    one = {s.record: s for s in CacheReader(tmp_path / "one").stream()}
    two = {s.record: s for s in CacheReader(tmp_path / "two").stream()}
    assert one.keys() == two.keys()
    for r, s in one.items():
        for f in ("sample_sizes", "sample_ids", "sample_counts", "sample_logprobs"):
            np.testing.assert_array_equal(getattr(s, f), getattr(two[r], f))
    other_seed = {s.record: s for s in CacheReader(capture(t, data, tmp_path / "seed", *base, "--sample-seed", "1") and
                                                   tmp_path / "seed").stream()}
    assert any(not np.array_equal(s.sample_counts, other_seed[r].sample_counts) for r, s in one.items())
    # a resumed run (the last shard and its manifest entry lost) ends with the very same bytes
    capture(t, data, tmp_path / "small", *base, "--shard-positions", "40")
    before = {p.name: p.read_bytes() for p in (tmp_path / "small" / "shards").iterdir()}
    manifest = tmp_path / "small" / "manifest-00000.json"
    body = json.loads(manifest.read_text())
    last = body["shards"].pop()
    body["complete"] = False
    body["progress"] = {"next_index": last["records"][0], "counts": body["progress"]["counts"]}
    body["progress"]["counts"]["kept"] -= last["rows"]
    body["progress"]["counts"]["tokens"] -= last["tokens"]
    body["progress"]["counts"]["positions"] -= last["positions"]
    del body["checksum"]
    from adakd.storage.manifest import _checksum
    body["checksum"] = _checksum(body)
    manifest.write_text(json.dumps(body))
    (tmp_path / "small" / last["file"]).unlink()
    capture(t, data, tmp_path / "small", *base, "--shard-positions", "40")
    assert {p.name: p.read_bytes() for p in (tmp_path / "small" / "shards").iterdir()} == before


def test_inspect_reports_draws(teacher, tmp_path):
    t, data = teacher
    capture(t, data, tmp_path / "c", "--targets", "hybrid", "--top-k", "4", "--samples", "16")
    s = summarize(tmp_path / "c")
    assert s.distinct is not None and 1 <= s.distinct.mean() <= 16
    assert np.all((s.ess >= 1 - 1e-9) & (s.ess <= s.distinct + 1e-9))  # Kish ESS lies between 1 and the support size
    assert np.all(s.support_mass >= s.topk_mass - 1e-6)
    text = format_summary(s)
    assert "hybrid: top-4" in text and "distinct ids per position of 16 draws" in text and "effective sample size" in text


@pytest.mark.parametrize("args,message", [
    (["--targets", "sampled", "--top-k", "5"], "--targets sampled stores draws only"),
    (["--targets", "hybrid", "--samples", "0"], "--samples must be within"),
    (["--targets", "sampled", "--sample-temperature", "0"], "--sample-temperature must be within"),
])
def test_bad_target_options_are_refused(teacher, tmp_path, args, message):
    t, data = teacher
    r = CliRunner().invoke(cli.main, ["cache-teacher", "--teacher", str(t), "--data", str(data), "--out",
                                      str(tmp_path / "c"), "--engine", "hf", "--no-progress", *args])
    assert r.exit_code == 1 and message in r.output, r.output
    assert not (tmp_path / "c").exists()


def test_other_target_settings_are_refused_on_resume(teacher, tmp_path):
    t, data = teacher
    capture(t, data, tmp_path / "c", "--targets", "sampled", "--samples", "8")
    r = CliRunner().invoke(cli.main, ["cache-teacher", "--teacher", str(t), "--data", str(data), "--out", str(tmp_path / "c"),
                                      "--engine", "hf", "--no-progress", "--targets", "sampled", "--samples", "16"])
    assert r.exit_code == 1 and "samples" in r.output and "other settings" in r.output, r.output


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
@pytest.mark.parametrize("kind", ["sampled", "hybrid"])
def test_vllm_draws_agree_with_hf(tmp_path, kind):
    """vLLM's route: every rank's prompt log-probability (prompt_logprobs = vocabulary size), drawn from with the
    same seeded uniforms as the hf engine, so the two caches hold (nearly) the same draws."""
    import os
    from pathlib import Path

    t = build_teacher(tmp_path / "teacher")
    data = write_jsonl(tmp_path / "d.jsonl", instruction_rows(8, seed=7))
    here = Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here.parent), str(here)]))
    caches = {}
    for engine in ("vllm", "hf"):
        out = tmp_path / engine
        extra = ["--targets", kind, "--samples", "64"] + (["--top-k", "8"] if kind == "hybrid" else [])
        r = subprocess.run([sys.executable, "-c", "import cli; cli.main()", "cache-teacher", "--teacher", str(t), "--data",
                            str(data), "--out", str(out), "--engine", engine, "--no-progress", *extra],
                           env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"engine {engine}" in r.stdout
        assert verify_cache(out).ok
        caches[engine] = list(CacheReader(out).stream())
    same = total = 0
    for a, b in zip(caches["vllm"], caches["hf"]):
        assert a.record == b.record
        oa = np.concatenate([[0], np.cumsum(a.sample_sizes)])
        ob = np.concatenate([[0], np.cumsum(b.sample_sizes)])
        for i in range(a.num_positions):
            da = dict(zip(a.sample_ids[oa[i]:oa[i + 1]].tolist(), a.sample_counts[oa[i]:oa[i + 1]].tolist()))
            db = dict(zip(b.sample_ids[ob[i]:ob[i + 1]].tolist(), b.sample_counts[ob[i]:ob[i + 1]].tolist()))
            same += da == db
            total += 1
    assert same / total >= 0.95, same / total


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_auto_engine_takes_hf_for_draws(teacher, tmp_path):
    """vLLM hands every prompt log-probability over for draws (bench.capture: about 8x slower than hf): auto
    does not pick it for sampled caches, and says so."""
    t, data = teacher
    r = capture(t, data, tmp_path / "c", "--targets", "sampled", "--samples", "8", engine="auto")
    assert "engine hf" in r.output and "using --engine hf" in r.output
    assert CacheReader(tmp_path / "c").info.engine["name"] == "hf"
