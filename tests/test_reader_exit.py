"""The reader's prefetch thread ends on every exit path, so no process dies at interpreter exit.

A daemon thread still decoding (pyarrow, zstd, numpy) when the interpreter finalizes is killed by
pthread_exit inside C/C++ code, which can abort the process ("terminate called without an active
exception", exit 134). Every path that leaves a stream unfinished is run here in a child process: each child
checks, in an atexit hook that runs after the reader's, that no prefetch thread is alive any more, and
must exit with its own status and a clean stderr.
"""

from __future__ import annotations

import gc
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import make_info, make_sequence

from adakd.storage import CacheCorruptError, CacheReader, CacheWriter
from adakd.storage.reader import _prefetched, _stop_all_prefetchers

ROOT = Path(__file__).resolve().parents[1]
REPEATS = 3

# Registered before `storage` is imported, so it runs after the reader's own atexit hook (LIFO).
CHILD = r"""
import atexit, itertools, os, signal, sys, threading

def report():
    alive = [t.name for t in threading.enumerate() if t.name == "adakd-prefetch" and t.is_alive()]
    sys.stderr.write(f"prefetch threads alive at exit: {len(alive)}\n")
    sys.stderr.flush()

atexit.register(report)
from adakd.storage import CacheReader

scenario, paths = sys.argv[1], sys.argv[2:]


def opened(n):
    its = [iter(CacheReader(paths[i % len(paths)]).stream()) for i in range(n)]
    for it in its:
        next(it)
    return its


if scenario == "dropped":  # a few sequences of each cache, the streams then dropped unfinished
    for p in paths:
        list(itertools.islice(CacheReader(p).stream(), 3))
elif scenario == "referenced":  # unfinished streams still referenced when the interpreter exits
    held = opened(2)
elif scenario == "many":
    held = opened(12)
elif scenario == "exhausted":
    for p in paths:
        assert len(list(CacheReader(p).stream())) == 30
elif scenario == "exception":
    held = opened(2)
    raise RuntimeError("consumer failed")
elif scenario == "sys_exit":
    held = opened(2)
    sys.exit(3)
elif scenario == "interrupt":  # Ctrl-C while consuming
    for i, seq in enumerate(CacheReader(paths[0]).stream()):
        if i == 2:
            os.kill(os.getpid(), signal.SIGINT)
elif scenario == "thread":  # consumed in another thread, which ends leaving its stream open
    held = []
    t = threading.Thread(target=lambda: held.extend(opened(2)))
    t.start()
    t.join()
"""

EXPECTED_RC = {"exception": 1, "sys_exit": 3, "interrupt": -signal.SIGINT}


def build(path: Path, n: int = 30, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    with CacheWriter(path, make_info(), shard_positions=200, block_positions=64) as w:
        for r in range(n):
            w.add(make_sequence(rng, r, 300, 16)[0])
    return path


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("exit")
    return [build(root / "a", seed=0), build(root / "b", seed=1)]


def prefetch_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "adakd-prefetch" and t.is_alive()}


@pytest.mark.parametrize("scenario", ["dropped", "referenced", "many", "exhausted", "exception", "sys_exit",
                                      "interrupt", "thread"])
def test_child_exits_cleanly_with_unfinished_streams(caches, scenario):
    for attempt in range(REPEATS):
        r = subprocess.run([sys.executable, "-c", CHILD, scenario, *map(str, caches)], cwd=ROOT, capture_output=True,
                           text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
        where = f"{scenario}, run {attempt + 1}: exit {r.returncode}\n{r.stderr[-3000:]}"
        assert r.returncode == EXPECTED_RC.get(scenario, 0), where
        assert "terminate called" not in r.stderr and "Fatal Python error" not in r.stderr, where
        assert "prefetch threads alive at exit: 0\n" in r.stderr, where


def test_closing_a_stream_ends_its_thread(caches):
    before = prefetch_threads()
    it = iter(CacheReader(caches[0]).stream())
    next(it)
    assert prefetch_threads() - before, "the default stream decodes in a prefetch thread"
    it.close()
    assert prefetch_threads() == before


@pytest.mark.parametrize("how", ["break", "dropped", "exhausted"])
def test_leaving_a_stream_ends_its_thread(caches, how):
    before = prefetch_threads()
    reader = CacheReader(caches[0])
    if how == "break":
        for i, _ in enumerate(reader.stream()):
            if i == 3:
                break
    elif how == "dropped":
        list(itertools.islice(reader.stream(), 3))
    else:
        assert len(list(reader.stream())) == 30
    gc.collect()  # not needed on CPython (closed when the last reference goes), but harmless
    assert prefetch_threads() == before


def test_errors_still_reach_the_consumer_and_end_the_thread(caches, tmp_path):
    cache = build(tmp_path / "c")
    shard = sorted((cache / "shards").iterdir())[-1]
    shard.write_bytes(shard.read_bytes()[:50])
    before = prefetch_threads()
    with pytest.raises(CacheCorruptError, match=shard.name):
        list(CacheReader(cache).stream())
    assert prefetch_threads() == before


def test_prefetch_stays_bounded(caches):
    produced = []

    def source():
        for i in itertools.count():
            produced.append(i)
            yield i

    before = prefetch_threads()
    ahead = _prefetched(source(), depth=2)
    assert next(ahead) == 0
    time.sleep(0.3)  # time for the thread to run ahead as far as it may (an upper bound holds however slow)
    assert len(produced) <= 1 + 2 + 1  # consumed, queued, in hand
    ahead.close()
    assert prefetch_threads() == before


def test_the_exit_hook_stops_streams_left_open(caches):
    before = prefetch_threads()
    its = [iter(CacheReader(p).stream()) for p in caches]
    for it in its:
        next(it)
    _stop_all_prefetchers()
    assert prefetch_threads() == before
    for it in its:  # closing afterwards is harmless
        it.close()
