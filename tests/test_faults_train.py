"""SIGKILL a real `train-student` process before random steps and inside checkpoint writes; every re-run
continues from the last complete checkpoint and ends with the uninterrupted run's losses, bit for bit."""

from __future__ import annotations

import random

import pytest
from faultkit import train_campaign

# a torn optimizer file, a complete checkpoint not yet renamed into place, `latest` not yet replaced,
# a checkpoint file not yet fsynced, and before an optimizer step
TARGETED = ("save:2:optimizer", "rename:1", "replace:1:latest", "fsync:4", "step:5")


@pytest.mark.slow
def test_killed_training_resumes_exactly(fault_training, tmp_path):
    setup, reference = fault_training
    c = train_campaign(setup, reference, tmp_path, kills=8, rng=random.Random(3), first=TARGETED)
    assert c.tried >= 8
    bad = [k for k in c.kills if k.problems]
    assert not bad, bad  # complete checkpoints only, and every re-run continued from the last one
    assert c.finals and not any(c.finals), c.finals  # identical losses at every step and identical weights
    hits = " | ".join(k.hit for k in c.kills)
    for what in ("optimizer.safetensors half written", "rename #1: before step-", "before publishing latest",
                 "before the optimizer step"):
        assert what in hits, (what, hits)
