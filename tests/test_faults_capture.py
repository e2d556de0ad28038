"""SIGKILL a real `cache-teacher` process at many moments; every resume ends with the uninterrupted run's
exact shards, and the cache verifies after every kill (see faultkit.py; `python -m bench.faults` runs more)."""

from __future__ import annotations

import random

import pytest
from faultkit import CaptureSetup, capture_campaign, capture_setup, run_cli, shard_files

# moments that random draws could miss: a torn shard, a shard complete but unpublished, a shard published
# but not yet listed, a torn manifest, a manifest complete but unpublished
TARGETED = ("write:1:.arrow", "replace:2:.arrow", "replaced:1:.arrow", "write:2:manifest", "replace:1:manifest")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> CaptureSetup:
    s = capture_setup(tmp_path_factory.mktemp("faults"), records=40)
    s.extra = ("--top-k", "16", "--engine", "hf", "--shard-positions", "12", "--batch-tokens", "1")  # ~30 shards
    return s


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("reference") / "cache"
    r = run_cli(setup.argv(out))
    assert r.rc == 0, r.err[-3000:]
    return shard_files(out)


@pytest.mark.slow
def test_killed_capture_always_resumes_to_the_same_cache(setup, reference, tmp_path):
    c = capture_campaign(setup, reference, tmp_path, kills=12, rng=random.Random(6), first=TARGETED)
    assert c.tried >= 12
    bad = [k for k in c.kills if k.problems]
    assert not bad, bad  # after every kill: the cache verifies and lists only final shards, a prefix
    assert c.finals and not any(c.finals), c.finals  # every resumed cache: byte-identical shards, no warnings
    hits = [k.hit for k in c.kills]
    for what in ("arrow half written", "before publishing 00000-", "just after publishing 00000-",
                 "manifest-00000.json half written", "before publishing manifest-00000.json"):
        assert any(what in h for h in hits), (what, hits)
    assert any(k.arm == "time" for k in c.kills)
