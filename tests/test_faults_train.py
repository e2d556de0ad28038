"""SIGKILL a real `train-student` process before random steps and inside checkpoint writes; every re-run
continues from the last complete checkpoint and ends with the uninterrupted run's losses, bit for bit."""

from __future__ import annotations

import errno
import json
import os
import random

import pytest
from faultkit import train_campaign

from adakd.trainer.checkpoint import latest_checkpoint

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


def _checkpoint(root, name):
    (root / name).mkdir(parents=True)
    (root / name / "state.json").write_text("{}")


def test_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step-000003", "step-000010", "step-000009"):
        _checkpoint(root, name)
    (root / ".tmp-1-step-000012").mkdir()  # half-written: never a candidate
    assert latest_checkpoint(tmp_path) == root / "step-000010"  # killed before `latest` was ever written
    (root / "latest").write_text("step-000012")  # killed between moving a re-saved step aside and renaming the new
    assert latest_checkpoint(tmp_path) == root / "step-000010"
    (root / "latest").write_text("step-000003")
    assert latest_checkpoint(tmp_path) == root / "step-000003"


def test_resaving_a_step_keeps_the_old_copy_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from adakd.trainer import checkpoint as ck

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=1, num_key_value_heads=1))
    opt = torch.optim.AdamW(model.parameters())
    save = lambda tag: ck.save_checkpoint(tmp_path, 3, model, None, opt.state_dict(), {"tag": tag}, [None])  # noqa: E731
    save("first")
    real, calls = os.rename, []

    def failing(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the old copy is aside; renaming the new one in fails
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(ck.os, "rename", failing)
    with pytest.raises(ck.CheckpointError, match="step 3 could not be written"):
        save("second")
    monkeypatch.setattr(ck.os, "rename", real)
    assert json.loads((tmp_path / "checkpoints" / "step-000003" / "state.json").read_text())["tag"] == "first"
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-000003"
    save("third")
    assert json.loads((tmp_path / "checkpoints" / "step-000003" / "state.json").read_text())["tag"] == "third"
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp-")] == []
