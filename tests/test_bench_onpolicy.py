"""bench.onpolicy runs end to end on its smallest configuration (the figures mean nothing there; the full run is in
docs/results.md): the shared caches, per seed the off-policy arm and the on-policy arm (warm-up, then 1 round of
generate -> cache-teacher -> train-student), both scored teacher-forced and on-policy, the paired differences with
their intervals, the table and the last-line JSON."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import SHARED

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("tf_kl", "tf_nll", "op_rkl", "op_teacher_nll")


@pytest.mark.slow
def test_onpolicy_quick_one_round(tmp_path):
    if not (SHARED / "models" / "stories260K").is_dir() or not (SHARED / "data" / "tinystories").is_dir():
        pytest.skip(f"bench.onpolicy reads stories260K and TinyStories from {SHARED} (absent)")
    out = tmp_path / "op"
    r = subprocess.run([sys.executable, "-m", "bench.onpolicy", "--quick", "--seeds", "2", "--rounds", "1",
                        "--records", "12", "--prompts", "3", "--eval-prompts", "2", "--new-tokens", "6", "--jobs", "2",
                        "--out", str(out)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])

    assert {"bench", "steps", "seeds", "rounds", "lam", "round_loss", "seconds", "per_seed", "cost", *METRICS} <= set(res)
    assert (res["bench"], res["steps"], res["seeds"], res["rounds"], res["lam"], res["round_loss"]) == \
        ("onpolicy", 4, 2, 1, 0.5, "fkl")
    assert [row["seed"] for row in res["per_seed"]] == [0, 1]
    for key in METRICS:
        off = [row["off"][key] for row in res["per_seed"]]
        on = [row["on"][key] for row in res["per_seed"]]
        assert all(math.isfinite(x) and x >= 0 for x in off + on), (key, off, on)
        m = res[key]
        assert m["off"] == off and m["on"] == on
        d = m["diff"]
        assert d["diffs"] == pytest.approx([a - b for a, b in zip(on, off)], abs=1e-12)
        assert d["mean"] == pytest.approx(statistics.fmean(d["diffs"]), abs=1e-12)
        lo, hi = d["ci95"]  # two seeds: a t-interval (12.71 x the standard error), centred on the mean
        assert lo <= d["mean"] <= hi and (lo + hi) / 2 == pytest.approx(d["mean"], abs=1e-9)
        half = 12.7062 * statistics.stdev(d["diffs"]) / math.sqrt(2)
        assert (hi - lo) / 2 == pytest.approx(half, rel=1e-3, abs=1e-12)

    cost = res["cost"]
    assert all(math.isfinite(v) and v > 0 for v in cost.values()), cost
    assert cost["generated_tokens_per_round"] <= 3 * 6  # 3 prompts, 1 sample each, at most 6 new tokens
    # every stage of the on-policy arm ran and was recorded, and its final student is round 1's
    for seed in (0, 1):
        arm = out / f"seed{seed}" / "on"
        assert json.loads((arm / "progress.json").read_text())["done"] == [
            "warmup", "round-1/generate", "round-1/cache-teacher", "round-1/train-student"]
        assert (arm / "round-1" / "student" / "final").is_dir() and (out / f"seed{seed}" / "off" / "final").is_dir()

    lines = r.stdout.strip().splitlines()
    table = lines[lines.index("| --- | --- | --- | --- |") - 1:][:6]
    assert table[0] == "| metric | off-policy 4 steps | on-policy 2 + 1 rounds | on - off (95% CI) |"
    assert len([ln for ln in table if ln.startswith("| ") and "(one seed)" not in ln]) == 6  # header, rule, 4 metrics
    assert lines[-2].startswith("Rounds' cost (per round, mean over seeds): generation ")
