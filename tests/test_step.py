"""One loss normalization: CE and KD are means per trained token over the whole optimizer step, whatever the
micro-batches (gradient accumulation) and ranks (DDP, FSDP2) the tokens fall in (trainer/step.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from step_child import GROUPS, LOSS, gradients, micro_batches, one_batch

from adakd.trainer.adakd import AdaKDConfig
from adakd.trainer.kd_loss import LossConfig
from adakd.trainer.step import step_counts

ROOT = Path(__file__).resolve().parents[1]


def assert_same(a: dict, b: dict, rtol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=1e-7, msg=k)


def test_micro_batches_differ_in_size():
    sizes = [int(b.targets.labels.numel()) for b in micro_batches()]
    assert len(set(sizes)) == len(sizes) and max(sizes) > 3 * min(sizes)  # averaging per micro-batch would differ


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_grad_accum_4_equals_the_same_tokens_in_one_micro_batch(packed):
    four, res4 = gradients(micro_batches(packed), 1)
    one, res1 = gradients([one_batch(packed)], 1)
    assert_same(four, one)
    assert res4.kd == pytest.approx(res1.kd, rel=1e-5) and res4.ce == pytest.approx(res1.ce, rel=1e-5)
    assert res4.valid == res1.valid == sum(int(b.targets.labels.numel()) for b in micro_batches())


def test_the_old_per_micro_batch_mean_is_not_what_is_optimized():
    """The mean of per-micro-batch means (what averaging each micro-batch's own loss gives) differs here."""
    from adakd.trainer.head import final_hidden, output_head
    from adakd.trainer.kd_loss import kd_loss
    from step_child import student

    model = student()
    for b in micro_batches():
        h = final_hidden(model, **b.model_inputs())[b.rows, b.cols]
        (kd_loss(h, output_head(model), b.targets, LOSS).loss / len(GROUPS)).backward()
    old = {n: p.grad.clone() for n, p in model.named_parameters()}
    new, _ = gradients(micro_batches(), 1)
    assert max((old[k] - new[k]).abs().max().item() for k in new) > 1e-4


def test_step_counts_follow_latf_per_micro_batch():
    micro = micro_batches()
    sizes = [int(b.targets.labels.numel()) for b in micro]
    latf = LossConfig(loss="rkl", adakd=AdaKDConfig())
    assert step_counts(micro, latf, 0.5) == (sum(sizes), sum(max(1, n // 2) for n in sizes))
    assert step_counts(micro, LOSS, 0.5) == (sum(sizes), sum(sizes))  # no LATF: every position distilled
    assert step_counts(micro, LossConfig(loss="rkl", adakd=AdaKDConfig(latf=False)), 0.5) == (sum(sizes), sum(sizes))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_equal_one_rank_on_the_same_global_batch(tmp_path, mode):
    from safetensors import safe_open
    from safetensors.torch import load_file

    out = tmp_path / "grads.safetensors"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(ROOT / "tests" / "step_child.py"), str(out), mode],
                       env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    two = load_file(str(out))
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    one, res = gradients(micro_batches(), 1)
    assert_same(two, one)
    assert float(meta["kd"]) == pytest.approx(res.kd, rel=1e-6) and float(meta["ce"]) == pytest.approx(res.ce, rel=1e-6)
