"""The README's demo, in its fast variant: the whole pipeline through the real commands."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from adakd import cli
from adakd import demo
from adakd.storage import CacheReader, verify_cache


def test_truth_is_a_distribution_per_prompt():
    truth = demo.distributions()
    assert len(truth) >= 20
    for prompt, dist in truth.items():
        assert abs(sum(dist.values()) - 1) < 1e-9 and all(p > 0 for p in dist.values()), prompt
        assert len(dist) >= 3  # several valid answers: what CE from one sampled answer cannot see


def test_transfer_sets_differ_by_seed_and_hold_every_prompt():
    cfg = demo.DemoConfig()
    truth = demo.distributions()
    a, b = demo.transfer_set(truth, cfg, 0), demo.transfer_set(truth, cfg, 1)
    assert a != b
    for items in (a, b):
        assert {i["instruction"] for i in items} >= set(truth)
        assert all(i["output"] in truth[i["instruction"]] for i in items if i["instruction"] in truth)


@pytest.mark.slow
def test_fast_demo_runs_the_whole_pipeline(tmp_path):
    out = tmp_path / "demo"
    r = CliRunner().invoke(cli.main, ["demo", "--fast", "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]", "cache-teacher", "train-student"):
        assert step in r.output
    table = (out / "results.md").read_text()
    for row in ("teacher", "student start", *demo.METHODS):
        assert f"| {row} |" in table
    assert (out / "demo.png").read_bytes()[:4] == b"\x89PNG"
    figures = json.loads(r.output.strip().splitlines()[-1])  # the last line: every row's figures
    assert set(figures["rows"]) == {"teacher", "student start", *demo.METHODS}
    for row in figures["rows"].values():
        for metric in ("valid", "distance", "exact_match"):
            assert 0 <= row[metric]["mean"] <= 1 and row[metric]["sd"] >= 0
    for kind in ("topk", "sampled"):
        cache = out / "seed0" / f"cache-{kind}"
        assert verify_cache(cache).ok and CacheReader(cache).manifest.complete
        assert CacheReader(cache).info.target_kind == kind
    for name in demo.METHODS:
        assert (out / "seed0" / demo.slug(name) / "final" / "model.safetensors").exists()
