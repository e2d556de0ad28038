"""bench.fidelity: the paired intervals, the summary over seeds, the docs block, and the --quick smoke run end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.fidelity import (BEGIN, END, FidelityConfig, paired, summarize, t_cdf, t_quantile, targets, trajectory_gap,
                            write_docs)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("df, q", [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622), (30, 2.0423)])
def test_t_quantiles_match_the_tables(df, q):
    assert t_quantile(0.975, df) == pytest.approx(q, abs=1e-4)
    assert t_cdf(q, df) == pytest.approx(0.975, abs=1e-5) and t_cdf(-q, df) == pytest.approx(0.025, abs=1e-5)


def test_paired_difference_and_its_t_interval():
    r = paired([1.0, 2.0, 4.0], [0.5, 1.0, 2.5])  # differences 0.5, 1.0, 1.5: mean 1, sd 0.5
    half = 4.302653 * 0.5 / math.sqrt(3)
    assert r["diffs"] == [0.5, 1.0, 1.5] and r["mean"] == pytest.approx(1.0)
    assert r["ci95"] == pytest.approx([1 - half, 1 + half], rel=1e-5)
    assert paired([2.0], [1.5]) == {"mean": 0.5, "ci95": None, "diffs": [0.5]}
    assert paired([1.0, 1.0], [1.0, 1.0])["ci95"] == [0.0, 0.0]
    with pytest.raises(ValueError):
        paired([1.0, 2.0], [1.0])


def test_trajectory_gap_over_the_common_steps():
    a = [{"step": 1, "kd": 2.0}, {"step": 2, "kd": 1.0}, {"step": 3, "kd": 0.5}]
    b = [{"step": 1, "kd": 2.5}, {"step": 2, "kd": 0.5}]
    assert trajectory_gap(a, b) == pytest.approx(0.5)
    assert math.isnan(trajectory_gap(a, []))


def _run(regime, init, loss, ada, source, seed, kl, nll, seconds=10.0, kd=(3.0, 2.0)):
    return {"regime": regime, "init": init, "loss": loss, "adakd": ada, "source": source, "seed": seed, "kl": kl,
            "rkl": 2 * kl, "nll": nll, "train_seconds": seconds,
            "log": [{"step": i + 1, "kd": v} for i, v in enumerate(kd)]}


def test_summary_pairs_each_cache_with_the_live_run_of_its_seed():
    cfg = FidelityConfig(regimes=("sharp",), ks=(8, 64), losses=("fkl",), adakd=(True,), inits=("random",), seeds=3)
    runs, live_kl = [], [1.0, 1.2, 0.9]
    for s in range(3):
        runs.append(_run("sharp", "random", "fkl", True, "live", s, live_kl[s], 2.0, seconds=20.0))
        runs.append(_run("sharp", "random", "fkl", True, "k64", s, live_kl[s] + 0.001 * (s + 1), 2.0 + 0.002, kd=(3.1, 2.0)))
        runs.append(_run("sharp", "random", "fkl", True, "k8", s, live_kl[s] + 0.1, 2.05, seconds=10.0))
    caches = {"sharp": {8: {"bytes_per_position": 17.0, "topk_mass": 0.8}, 64: {"bytes_per_position": 97.0, "topk_mass": 0.999}}}
    rows = summarize(runs, cfg, caches)
    assert [(r["k"], r["seeds"]) for r in rows] == [(8, 3), (64, 3)]
    k8, k64 = rows
    assert k8["d_kl"] == pytest.approx(0.1) and k8["d_kl_ci95"] == pytest.approx([0.1, 0.1])  # no spread over seeds
    assert k8["d_nll"] == pytest.approx(0.05) and k8["time_vs_live"] == pytest.approx(0.5) and k8["bytes_per_position"] == 17.0
    assert k64["d_kl"] == pytest.approx(0.002) and k64["d_kl_ci95"][0] < 0.002 < k64["d_kl_ci95"][1]
    assert k64["d_kl_seeds"] == pytest.approx([0.001, 0.002, 0.003]) and k64["loss_gap"] == pytest.approx(0.05)
    assert k64["kl_live"] == pytest.approx(statistics_mean(live_kl)) and k64["d_rkl"] == pytest.approx(0.004)
    goal = targets(rows)
    assert goal["configurations"] == 1 and goal["abs_within_0.01"] == 1 and goal["met"] is True
    assert goal["zero_in_both_ci95"] == 0  # the k = 64 intervals here lie above zero


def statistics_mean(xs):
    return sum(xs) / len(xs)


def test_summary_skips_configurations_with_a_missing_run():
    cfg = FidelityConfig(regimes=("sharp",), ks=(8,), losses=("fkl",), adakd=(False,), inits=("ce",), seeds=2)
    runs = [_run("sharp", "ce", "fkl", False, "live", s, 1.0, 2.0) for s in range(2)] + [_run("sharp", "ce", "fkl", False, "k8", 0, 1.1, 2.0)]
    assert summarize(runs, cfg, {"sharp": {8: {"bytes_per_position": 1.0, "topk_mass": 0.9}}}) == []


def test_docs_block_is_appended_once_then_replaced_keeping_the_rest(tmp_path):
    p = tmp_path / "results.md"
    p.write_text("# Results\n\n<!-- bench.quality:begin -->\nq\n<!-- bench.quality:end -->\n\n## Findings\n\nkept\n")
    write_docs("first", p)
    text = p.read_text()
    assert "## Findings\n\nkept" in text and "first" in text and "<!-- bench.quality:end -->" in text
    write_docs("second", p)
    text = p.read_text()
    assert "second" in text and "first" not in text and text.count(BEGIN) == 1 and text.count(END) == 1
    assert text.count("## Cache fidelity") == 1


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path):
    """The CI smoke: the real cache-teacher and train-student, the live teacher, both inits, 2 seeds."""
    out = tmp_path / "fidelity"
    r = subprocess.run([sys.executable, "-m", "bench.fidelity", "--quick", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=1200, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert last["bench"] == "fidelity" and len(last["results"]) == 2  # random and CE start, k = 16
    for row in last["results"]:
        for key in ("regime", "k", "loss", "adakd", "init", "d_kl", "d_kl_ci95", "d_nll", "d_nll_ci95",
                    "bytes_per_position", "loss_gap", "time_vs_live"):
            assert key in row
        assert row["regime"] == "sharp" and row["k"] == 16 and row["seeds"] == 2
        assert math.isfinite(row["kl_live"]) and row["kl_live"] > 0 and abs(row["d_kl"]) < 0.5
        lo, hi = row["d_kl_ci95"]
        assert lo <= row["d_kl"] <= hi and 5 < row["bytes_per_position"] < 100 and 0.9 < row["topk_mass"] < 1
    assert {row["init"] for row in last["results"]} == {"random", "ce"}
    assert (out / "sharp" / "ce-start" / "final" / "model.safetensors").exists()
    assert "| sharp | random | fkl | yes | 16 |" in (out / "results.md").read_text()
    assert (out / "fidelity.png").read_bytes()[:4] == b"\x89PNG"
    # paired: a seed's cached and live runs start from the same weights on the same batches
    for init in ("random", "ce"):
        logs = [[json.loads(x) for x in (out / "sharp" / "runs" / f"{init}-fkl-adakd" / "seed0" / src / "train_log.jsonl")
                 .read_text().splitlines()] for src in ("live", "k16")]
        assert [x["valid"] for x in logs[0]] == [x["valid"] for x in logs[1]]
        assert logs[0][0]["kd"] == pytest.approx(logs[1][0]["kd"], rel=0.1)  # one model, two views of one teacher
