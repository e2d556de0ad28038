import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def fault_capture(tmp_path_factory):
    """For the fault-injection tests: a tiny teacher, 40 records, ~30 shards, and an uninterrupted cache of them."""
    from faultkit import capture_setup, run_cli, shard_files

    setup = capture_setup(tmp_path_factory.mktemp("faults"), records=40)
    setup.extra = ("--top-k", "16", "--engine", "hf", "--shard-positions", "12", "--batch-tokens", "1")
    cache = tmp_path_factory.mktemp("reference") / "cache"
    r = run_cli(setup.argv(cache))
    assert r.rc == 0, r.err[-3000:]
    return setup, cache, shard_files(cache)


@pytest.fixture(scope="session")
def fault_training(fault_capture, tmp_path_factory):
    """For the fault-injection tests: a tiny student on the fault cache, and an uninterrupted run of it."""
    from faultkit import run_cli, train_losses, train_setup

    cap, cache, _ = fault_capture
    setup = train_setup(cap, cache, tmp_path_factory.mktemp("student"))
    reference = tmp_path_factory.mktemp("uninterrupted") / "run"
    r = run_cli(setup.argv(reference))
    assert r.rc == 0, r.err[-3000:]
    assert sorted(train_losses(reference)) == list(range(1, setup.steps + 1))
    return setup, reference
