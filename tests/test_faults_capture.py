"""SIGKILL a real `cache-teacher` process at many moments; every resume ends with the uninterrupted run's
exact shards, and the cache verifies after every kill (see faultkit.py; `python -m bench.faults` runs more)."""

from __future__ import annotations

import random

import pytest
from faultkit import capture_campaign

# moments that random draws could miss: a torn shard, a shard complete but unpublished, a shard published
# but not yet listed, a torn manifest, a manifest complete but unpublished
TARGETED = ("write:1:.arrow", "replace:2:.arrow", "replaced:1:.arrow", "write:2:manifest", "replace:1:manifest")


@pytest.mark.slow
def test_killed_capture_always_resumes_to_the_same_cache(fault_capture, tmp_path):
    setup, _, reference = fault_capture
    c = capture_campaign(setup, reference, tmp_path, kills=10, rng=random.Random(6), first=TARGETED)
    assert c.tried >= 10
    bad = [k for k in c.kills if k.problems]
    assert not bad, bad  # after every kill: the cache verifies and lists only final shards, a prefix
    assert c.finals and not any(c.finals), c.finals  # every resumed cache: byte-identical shards, no warnings
    hits = [k.hit for k in c.kills]
    for what in ("arrow half written", "before publishing 00000-", "just after publishing 00000-",
                 "manifest-00000.json half written", "before publishing manifest-00000.json"):
        assert any(what in h for h in hits), (what, hits)
    assert any(k.arm == "time" for k in c.kills), hits
