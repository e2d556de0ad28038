"""A writer killed at any moment leaves a valid cache; re-running it ends with the same bytes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from adakd.storage import CacheReader, verify_cache

HERE = Path(__file__).resolve().parent
N = 40


def run_writer(path, *crash):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent)]))
    return subprocess.run([sys.executable, str(HERE / "crash_writer.py"), str(path), str(N), *map(str, crash)],
                          env=env, capture_output=True, text=True, timeout=120)


def shard_bytes(path):
    r = CacheReader(path)
    return {s.file: (Path(path) / s.file).read_bytes() for s in r.shards}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "c"
    assert run_writer(path).returncode == 0
    return shard_bytes(path)


@pytest.mark.slow
@pytest.mark.parametrize("kind,at", [("replace", 1), ("replace", 2), ("replace", 3), ("replace", 6),
                                     ("write", 2), ("write", 5), ("write", 9)])
def test_killed_writer_leaves_valid_cache_and_resumes_identically(tmp_path, reference, kind, at):
    path = tmp_path / "c"
    crashed = run_writer(path, kind, at)
    assert crashed.returncode == -9, crashed.stderr
    if (path / "manifest-00000.json").exists():
        report = verify_cache(path)
        assert report.ok, report.problems
        records = [s.record for s in CacheReader(path).stream()]
        assert records == list(range(len(records)))  # a prefix: complete shards only
        assert not CacheReader(path).manifest.complete
    resumed = run_writer(path)
    assert resumed.returncode == 0, resumed.stderr
    assert shard_bytes(path) == reference
    report = verify_cache(path)
    assert report.ok and not report.warnings, (report.problems, report.warnings)
    assert [s.record for s in CacheReader(path).stream()] == list(range(N))
