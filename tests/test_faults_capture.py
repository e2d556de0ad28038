"""SIGKILL a real `cache-teacher` process at many moments; every resume ends with the uninterrupted run's
exact shards, and the cache verifies after every kill, on local disk and on S3 (see faultkit.py; `python -m bench.faults`
runs more)."""

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


@pytest.mark.slow
def test_killed_capture_to_s3_resumes_to_the_local_runs_cache(fault_capture, tmp_path):
    """The same on a real S3 server (moto, tests/s3server.py): killed with a shard half uploaded and with a shard
    uploaded but not yet listed; after each kill the cache verifies and lists a prefix of final shards, and the
    resumed cache holds the uninterrupted local-disk run's shard bytes, with no unlisted shard objects."""
    from s3server import S3Server

    setup, _, reference = fault_capture
    with S3Server() as s3:
        s3.make_bucket("faults")
        c = capture_campaign(setup, reference, tmp_path, kills=2, rng=random.Random(0),
                             first=("put:1:.arrow", "putted:2:.arrow"), store=lambda n: s3.uri("faults", n), env=s3.env())
    assert c.tried == 2 and not [k for k in c.kills if k.problems], c.kills
    assert len(c.finals) == 1 and not c.finals[0], c.finals
    hits = [k.hit for k in c.kills]
    assert "half uploaded" in hits[0] and ".arrow" in hits[0], hits
    assert "just after uploading 00000-000001.arrow" in hits[1], hits
