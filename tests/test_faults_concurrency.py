"""Real processes at once: two workers of one cache, two processes for one worker slot, a reader while a
writer runs. Scoring one record per engine call (--batch-tokens 1) makes every number independent of how
records are split, so a two-worker cache must hold exactly the single-worker cache's numbers."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from faultkit import Run, final_cache_problems, run_cli

from storage import CacheNotFoundError, CacheReader, verify_cache

FIELDS = ("input_ids", "loss_mask", "topk_ids", "topk_logprobs", "target_logprob", "tail_logmass")


def in_parallel(*calls) -> list[Run]:
    """Run each (argv, kwargs) as its own child process, all at once (threads only wait on them)."""
    results: list = [None] * len(calls)

    def one(i: int, argv: list[str], kw: dict) -> None:
        results[i] = run_cli(argv, **kw)

    threads = [threading.Thread(target=one, args=(i, argv, kw)) for i, (argv, kw) in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def decoded(path) -> dict:
    return {s.record: s for s in CacheReader(path).stream()}


def assert_same_numbers(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for r, s in got.items():
        for f in FIELDS:
            np.testing.assert_array_equal(getattr(s, f), getattr(want[r], f), err_msg=f"record {r} {f}")


@pytest.mark.slow
def test_two_workers_at_once_make_the_single_worker_cache(fault_capture, tmp_path):
    setup, reference, _ = fault_capture
    out = tmp_path / "c"
    slow = {"arms": ("slow:0:0.05",)}  # stretch the writing phases so they overlap
    runs = in_parallel(*[(setup.argv(out, "--num-workers", "2", "--worker-index", str(i)), slow) for i in (0, 1)])
    assert [r.rc for r in runs] == [0, 0], [r.err[-2000:] for r in runs]
    report = verify_cache(out)
    assert report.ok and not report.warnings, (report.problems, report.warnings)
    m = CacheReader(out).manifest
    assert m.complete and sorted(m.workers) == [0, 1]
    spans = [[(out / e.file).stat().st_mtime for e in m.workers[i].shards] for i in (0, 1)]
    assert max(map(min, spans)) < min(map(max, spans)), "the two writers did not overlap"
    assert_same_numbers(decoded(out), decoded(reference))


@pytest.mark.slow
def test_two_processes_for_one_worker_slot_one_is_refused(fault_capture, tmp_path):
    setup, _, reference = fault_capture
    out = tmp_path / "c"
    hold = {"arms": ("pause:1:3",)}  # whoever takes the lock first holds it 3 s before its first write
    runs = in_parallel((setup.argv(out), hold), (setup.argv(out), hold))
    assert sorted(r.rc for r in runs) == [0, 1], [r.err[-2000:] for r in runs]
    refused = next(r for r in runs if r.rc == 1)
    assert "worker 0 is being written by another live process" in refused.err and "--worker-index" in refused.err
    assert "Traceback" not in refused.err
    assert not final_cache_problems(out, reference)  # the other one finished the cache undisturbed


@pytest.mark.slow
def test_a_reader_during_writing_sees_only_complete_shards(fault_capture, tmp_path):
    setup, reference, _ = fault_capture
    want = decoded(reference)
    order = sorted(want)
    out = tmp_path / "c"
    writer: list[Run] = []
    t = threading.Thread(target=lambda: writer.append(run_cli(setup.argv(out), arms=("slow:0:0.05",))))
    t.start()
    seen, not_yet = set(), 0
    while t.is_alive():
        try:
            reader = CacheReader(out)
        except CacheNotFoundError:
            not_yet += 1  # no manifest yet: the clear "nothing here yet" state
            time.sleep(0.02)
            continue
        got = {s.record: s for s in reader.stream()}
        assert sorted(got) == order[: len(got)]  # whole shards, in order: a prefix of the records
        assert_same_numbers(got, {r: want[r] for r in got})
        report = verify_cache(out)
        assert report.ok, report.problems
        if len(got) < len(order):
            assert not reader.manifest.complete and any("not complete" in w for w in report.warnings)
        seen.add(len(got))
    t.join()
    assert writer[0].rc == 0, writer[0].err[-2000:]
    assert len(seen) >= 3, seen  # it really read while shards were being added
    assert_same_numbers(decoded(out), want)
