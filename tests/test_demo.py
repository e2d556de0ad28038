"""The README's demo, in its fast variant: the whole pipeline through the real commands."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import cli
from storage import CacheReader, verify_cache


@pytest.mark.slow
def test_fast_demo_runs_the_whole_pipeline(tmp_path):
    out = tmp_path / "demo"
    r = CliRunner().invoke(cli.main, ["demo", "--fast", "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]", "cache-teacher", "train-student"):
        assert step in r.output
    table = (out / "results.md").read_text()
    for row in ("teacher", "CE only", "forward KL", "AdaKD over forward KL"):
        assert row in table
    assert (out / "demo.png").read_bytes()[:4] == b"\x89PNG"
    assert verify_cache(out / "cache").ok and CacheReader(out / "cache").manifest.complete
    for name in ("ce", "forward", "adakd"):
        assert (out / "students" / name / "final" / "model.safetensors").exists()
        assert (out / "students" / name / "generations.jsonl").exists()
