"""Real processes at once: two workers of one cache, two processes for one worker slot, a reader while a
writer runs. Scoring one record per engine call (--batch-tokens 1) makes every number independent of how
records are split, so a two-worker cache must hold exactly the single-worker cache's numbers."""

from __future__ import annotations

import threading
import time
from typing import Callable

import numpy as np
import pytest
from faultkit import Run, arrive, at_meeting, final_cache_problems, meet_env, run_cli

from adakd.storage import CacheNotFoundError, CacheReader, verify_cache

FIELDS = ("input_ids", "loss_mask", "topk_ids", "topk_logprobs", "target_logprob", "tail_logmass")


def in_parallel(*calls, after_first: Callable[[], None] | None = None) -> list[Run]:
    """Run each (argv, kwargs) as its own child process, all at once (threads only wait on them);
    `after_first` runs as soon as the first of them has ended."""
    results: list = [None] * len(calls)
    ended = threading.Event()

    def one(i: int, argv: list[str], kw: dict) -> None:
        try:
            results[i] = run_cli(argv, **kw)
        finally:
            ended.set()

    threads = [threading.Thread(target=one, args=(i, argv, kw)) for i, (argv, kw) in enumerate(calls)]
    for t in threads:
        t.start()
    if after_first is not None:
        ended.wait()
        after_first()
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
    # each worker, its first shard published, holds its second until the other has done the same: the two
    # write the one cache at once however the machine schedules them
    meet = {"arms": ("meet:2:2",), "env": meet_env(tmp_path / "meet")}
    runs = in_parallel(*[(setup.argv(out, "--num-workers", "2", "--worker-index", str(i)), meet) for i in (0, 1)])
    assert [r.rc for r in runs] == [0, 0], [(r.hit, r.err[-2000:]) for r in runs]
    both = "00000-000001.arrow, 00001-000001.arrow"
    assert [r.hit for r in runs] == [[f"meet #2: before publishing {i:05d}-000001.arrow, 2 of 2 here: {both}"]
                                     for i in (0, 1)]
    report = verify_cache(out)
    assert report.ok and not report.warnings, (report.problems, report.warnings)
    m = CacheReader(out).manifest
    assert m.complete and sorted(m.workers) == [0, 1] and all(len(m.workers[i].shards) > 2 for i in (0, 1))
    assert_same_numbers(decoded(out), decoded(reference))


@pytest.mark.slow
def test_two_processes_for_one_worker_slot_one_is_refused(fault_capture, tmp_path):
    setup, _, reference = fault_capture
    out, meetings = tmp_path / "c", tmp_path / "meet"
    # whoever takes the lock holds it at its first shard until the test joins it there, which the test does
    # only once the other process has ended
    hold = {"arms": ("meet:1:2",), "env": meet_env(meetings)}
    runs = in_parallel((setup.argv(out), hold), (setup.argv(out), hold), after_first=lambda: arrive(meetings, 1))
    assert sorted(r.rc for r in runs) == [0, 1], [(r.hit, r.err[-2000:]) for r in runs]
    holder, refused = sorted(runs, key=lambda r: r.rc)
    assert holder.hit == ["meet #1: before publishing 00000-000000.arrow, 2 of 2 here: 00000-000000.arrow, test"]
    assert not refused.hit
    assert "worker 0 is being written by another live process" in refused.err and "--worker-index" in refused.err
    assert "Traceback" not in refused.err
    assert not final_cache_problems(out, reference)  # the other one finished the cache undisturbed


HELD_AT = (3, 6, 9)  # the writer waits for the reader before publishing these shards


def read_while_writing(out, want: dict) -> int | None:
    """Read a cache being written: whole shards, in order (a prefix of the records), exact numbers, checked
    files; the number of records it holds (None: no manifest yet, the clear "nothing here yet" state).
    Verified before it is read: a cache found incomplete then was incomplete at the check too."""
    try:
        CacheReader(out)
    except CacheNotFoundError:
        return None
    report = verify_cache(out)
    assert report.ok, report.problems
    reader = CacheReader(out)
    got = {s.record: s for s in reader.stream()}
    assert sorted(got) == sorted(want)[: len(got)]
    assert_same_numbers(got, {r: want[r] for r in got})
    if len(got) < len(want):
        assert not reader.manifest.complete and any("not complete" in w for w in report.incomplete)
    return len(got)


@pytest.mark.slow
def test_a_reader_during_writing_sees_only_complete_shards(fault_capture, tmp_path):
    setup, reference, _ = fault_capture
    want = decoded(reference)
    out, meetings = tmp_path / "c", tmp_path / "meet"
    writer: list[Run] = []
    arms = tuple(f"meet:{k}:2" for k in HELD_AT)
    t = threading.Thread(target=lambda: writer.append(run_cli(setup.argv(out), arms=arms, env=meet_env(meetings))))
    t.start()
    held, pending = [], list(HELD_AT)
    try:
        while t.is_alive():
            if pending and at_meeting(meetings, pending[0]):  # the writer holds shard k back: k - 1 are published
                held.append(read_while_writing(out, want))
                arrive(meetings, pending.pop(0), "reader")
            elif read_while_writing(out, want) is None:
                time.sleep(0.02)
    finally:  # a failed check must not leave the writer waiting for the reader
        for k in pending:
            arrive(meetings, k, "reader")
        t.join()
    assert writer[0].rc == 0, (writer[0].hit, writer[0].err[-2000:])
    rows = [e.rows for e in CacheReader(reference).shards]
    assert held == [sum(rows[: k - 1]) for k in HELD_AT]  # it read while shards were being added
    held_back = [(k, f"00000-{k - 1:06d}.arrow") for k in HELD_AT]
    assert writer[0].hit == [f"meet #{k}: before publishing {f}, 2 of 2 here: {f}, reader" for k, f in held_back]
    assert_same_numbers(decoded(out), want)
