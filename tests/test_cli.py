"""The `adakd` command line: verify and inspect on real caches, the stage placeholders."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
from click.testing import CliRunner
from helpers import make_info, make_sequence

from adakd import cli
from adakd.storage import CacheWriter


def build(path, n=30, k=16):
    rng = np.random.default_rng(0)
    with CacheWriter(path, make_info(k=k), shard_positions=200, block_positions=64) as w:
        for r in range(n):
            w.add(make_sequence(rng, r, 300, k)[0])


def test_verify_ok_and_failing(tmp_path):
    build(tmp_path / "c")
    r = CliRunner().invoke(cli.main, ["verify", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    assert "0 problem(s)" in r.output
    shard = sorted((tmp_path / "c" / "shards").iterdir())[0]
    shard.write_bytes(shard.read_bytes()[:50])
    r = CliRunner().invoke(cli.main, ["verify", str(tmp_path / "c")])
    assert r.exit_code == 1 and shard.name in r.output and "problem:" in r.output


def test_verify_missing_cache(tmp_path):
    r = CliRunner().invoke(cli.main, ["verify", str(tmp_path / "missing")])
    assert r.exit_code == 1 and "no such cache directory" in r.output


def test_inspect_prints_summary_and_plot(tmp_path):
    build(tmp_path / "c")
    png = tmp_path / "dist.png"
    r = CliRunner().invoke(cli.main, ["inspect", str(tmp_path / "c"), "--plot", str(png)])
    assert r.exit_code == 0, r.output
    for word in ("test-teacher", "vocab 300", "top-16", "shards", "sequences", "trained pos.", "/token", "coverage"):
        assert word in r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    n_seq = int([line for line in r.output.splitlines() if line.startswith("sequences")][0].split()[1].replace(",", ""))
    assert n_seq == 30


def test_inspect_error_is_clean(tmp_path):
    r = CliRunner().invoke(cli.main, ["inspect", str(tmp_path)])
    assert r.exit_code != 0 and "not an adakd cache" in r.output and "Traceback" not in r.output


def test_console_scripts_are_installed():
    for name in ("adakd", "cache-teacher", "train-student"):
        assert shutil.which(name), f"console script {name} missing: pip install -e ."
    out = subprocess.run(["adakd", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "verify" in out.stdout and "cache-teacher" in out.stdout


def test_cli_constants_match_the_library():
    """cli.py repeats two values so that --help needs no torch; they must not drift."""
    from adakd.common.packing import DEFAULT_ROW_TOKENS
    from adakd.trainer.losses import DIVERGENCES

    assert cli.ROW_TOKENS == DEFAULT_ROW_TOKENS
    assert set(cli.LOSSES) == set(DIVERGENCES)


def test_verify_fails_on_a_missing_worker_unless_allowed(tmp_path):
    rng = np.random.default_rng(0)
    with CacheWriter(tmp_path / "c", make_info(k=16, num_workers=2), worker_index=0, shard_positions=200) as w:
        for r in range(0, 10, 2):
            w.add(make_sequence(rng, r, 300, 16)[0])
    r = CliRunner().invoke(cli.main, ["verify", str(tmp_path / "c")])
    assert r.exit_code == 1, r.output
    assert "problem: worker 1 of 2 has not written anything yet" in r.output
    assert "the cache is incomplete (1/2 workers done)" in r.output and "--allow-incomplete" in r.output
    r = CliRunner().invoke(cli.main, ["verify", str(tmp_path / "c"), "--allow-incomplete"])
    assert r.exit_code == 0 and "warning: worker 1 of 2 has not written anything yet" in r.output, r.output
