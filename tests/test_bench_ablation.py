"""bench.ablation runs end to end on the demo's --fast task (the figures mean nothing there; the full run is in
docs/train-student.md): every setting over both losses, paired differences from each base, AdaKD's diagnostics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_ablation_quick(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bench.ablation", "--quick", "--seeds", "2", "--steps", "3",
                        "--long-steps", "4", "--out", str(tmp_path / "ab")], capture_output=True, text=True,
                       timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    from bench.ablation import LONG, LOSSES, SETTINGS, method

    names = {method(loss, s) for loss in LOSSES for s in SETTINGS} | {method(loss, s, 4) for loss in LOSSES for s in LONG}
    assert set(res["rows"]) == names
    for name, row in res["rows"].items():
        assert len(row["valid"]["seeds"]) == 2 and 0 <= row["valid"]["mean"] <= 1
        is_base = name.endswith("base") or name.endswith("base, 4 steps")
        assert ("vs_base" in row["distance"]) == (not is_base)
        a = row["adakd"]
        assert (a["temp_hard"] is not None) == ("IDTS" in name or "AdaKD" in name), name
        if "c = -0.5" in name:
            assert a["temp_hard"] > 1.0  # the soften direction heats the harder half
        elif a["temp_hard"] is not None:
            assert a["temp_hard"] < 1.0
    assert "| setting | valid answers (%) |" in r.stdout
