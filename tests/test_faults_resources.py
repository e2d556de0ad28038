"""A full disk (RLIMIT_FSIZE: writes past the size fail with EFBIG) during capture and during checkpointing
ends with one clear message and exit status 1, leaves what was complete intact, and a re-run completes;
an unwritable output path is refused before any work."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from faultkit import (
    checkpoint_problems,
    final_cache_problems,
    partial_cache_problems,
    resume_step,
    run_cli,
    train_final_problems,
)

from adakd import cli
from adakd.storage import CacheReader, verify_cache


def _clean_failure(r, *words: str) -> None:
    assert r.rc == 1, (r.rc, r.err[-3000:])
    assert "Traceback" not in r.err and "Error:" in r.err, r.err[-3000:]
    for w in words:
        assert w in r.err, (w, r.err[-2000:])


@pytest.mark.slow
def test_full_disk_during_capture_keeps_the_cache_valid_and_resumable(fault_capture, tmp_path):
    setup, _, reference = fault_capture
    out = tmp_path / "c"
    first = run_cli(setup.argv(out), arms=("replaced:4:manifest",))  # 3 shards listed, tokenizer saved
    assert first.killed and len(CacheReader(out).shards) == 3
    # shards are 5-6 KB: a 5,000-byte limit fails the next one
    r = run_cli(setup.argv(out), fsize=5000)
    _clean_failure(r, "00000-000003.arrow: cannot be written (File too large)", "re-run to resume")
    assert len(CacheReader(out).shards) == 3 and not partial_cache_problems(out, reference)
    # the manifest grows by ~300 bytes a shard: a 7,000-byte limit fails it part-way, after its shard is published
    r = run_cli(setup.argv(out), fsize=7000)
    _clean_failure(r, "manifest-00000.json: cannot be written (File too large)")
    listed = len(CacheReader(out).shards)
    assert 3 < listed < len(reference) and not partial_cache_problems(out, reference)
    report = verify_cache(out)
    assert report.ok and any("not in any manifest" in w for w in report.warnings)  # the shard it could not list
    assert any("not complete" in w for w in report.incomplete) and not report.complete
    assert run_cli(setup.argv(out)).rc == 0
    assert not final_cache_problems(out, reference)


@pytest.mark.slow
def test_full_disk_while_checkpointing_keeps_the_last_checkpoint(fault_training, tmp_path):
    setup, reference = fault_training
    out = tmp_path / "run"
    assert run_cli(setup.argv(out, "--stop-after", "4")).rc == 0  # checkpoints at steps 3 and 4
    # model.safetensors is ~170 KB, optimizer.safetensors ~340 KB: a 250 KB limit fails the optimizer file
    r = run_cli(setup.argv(out), fsize=250_000)
    _clean_failure(r, "checkpoint at step 6 could not be written", "File too large", "step-000004) is intact")
    assert resume_step(out) == 4 and not checkpoint_problems(out)
    assert (out / "checkpoints" / "latest").read_text() == "step-000004"
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert run_cli(setup.argv(out)).rc == 0
    assert not train_final_problems(out, reference)


def test_unwritable_training_output_is_refused_before_work(fault_training, tmp_path):
    setup, _ = fault_training
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = blocker / "run"
    # a missing student is not reached: the output is checked first
    args = setup.argv(out)[1:]
    args[args.index("--student") + 1] = str(tmp_path / "no-student.json")
    r = CliRunner().invoke(cli.main, ["train-student", *args])
    assert r.exit_code == 1 and "not writable" in r.output and str(out) in r.output, r.output
    assert "student" not in r.output.split("not writable")[1] and "Traceback" not in r.output
