"""bench.throughput and bench.gpu_check run end to end in their small forms (the figures mean nothing there; the
full runs are in docs/results.md), print their tables and end with one JSON object."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> tuple[str, dict]:
    r = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout, json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_throughput_quick():
    out, res = run("bench.throughput", "--quick")
    assert "| student | data | layout |" in out and "targets:" in out
    for student in ("body", "gpt2v"):
        for shape in ("dolly", "tinystories"):
            r = res["training"][student]["shapes"][shape]
            assert r["packed"]["real_tokens"] == r["padded"]["real_tokens"] > 0  # the same token stream
            assert r["packed"]["ce_tokens_per_s"] > 0 and r["kd_over_ce_packed"] > 0
    assert res["training"]["body"]["shapes"]["dolly"]["packed"]["stream_real_fraction"] > \
        res["training"]["body"]["shapes"]["dolly"]["padded"]["stream_real_fraction"]
    assert set(res["checkpointing"]["step_s"]) == {"off", "on"} and res["capture"]["speedup"] > 0
    p = res["capture"]["parity"]
    assert p["positions"] > 0 and p["packed"]["max_abs_logprob"] < 1e-3 and p["padded"]["max_abs_logprob"] < 1e-3
    assert len(res["memory"]) == 8 and all(m["peak_bytes"] > 0 for m in res["memory"].values())


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    lengths = tmp_path / "lengths.json"
    run("bench.gpu_check", "--write-lengths", str(lengths))
    assert len(json.loads(lengths.read_text())) == 11435
    out, res = run("bench.gpu_check", "--dry-run", "--lengths", str(lengths))
    assert res["dry_run"] and res["lengths"] == str(lengths) and res["parity"]["ok"]
    t = res["training"]
    assert t["packed"]["real_fraction"] > t["padded"]["real_fraction"] and t["ce_speedup"] > 0
    assert "time_ratio" in res["checkpointing"] and res["capture"]["speedup"] > 0
