"""The Python API (adakd.open_cache / batches / Distiller) and the Hugging Face Trainer integration compute what
`train-student` computes: the same first batch, the same step-1 loss from the same weights; AdaKD's state rides in
the Trainer's checkpoints and a resumed Trainer run ends where an uninterrupted one does."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from tiny import cached_teacher

import adakd
from adakd import cli

TRAIN = ["--loss", "rkl", "--adakd", "--batch-tokens", "512", "--lr", "1e-3", "--seed", "0", "--no-progress"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A real cache, a student directory with saved weights (the same start for every trainer), and the
    step-1 record of `train-student` from it."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("api")
    teacher, _, cache, cfg = cached_teacher(root, records=32, seed=11, k=16)
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
    student.save_pretrained(root / "student")
    AutoTokenizer.from_pretrained(teacher).save_pretrained(root / "student")
    r = CliRunner().invoke(cli.main, ["train-student", "--cache", str(cache), "--student", str(root / "student"),
                                      "--out", str(root / "ts"), "--max-steps", "3", *TRAIN])
    assert r.exit_code == 0, r.output
    log = [json.loads(line) for line in (root / "ts" / "train_log.jsonl").read_text().splitlines()]
    return root, cache, log


def load(root):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(root / "student")


def test_the_api_loop_gives_train_students_step_1_loss(setup):
    root, cache, log = setup
    model = load(root)
    reader = adakd.open_cache(cache)
    distiller = adakd.Distiller("rkl", adakd=True)
    first = next(iter(adakd.batches(reader, model, batch_tokens=512)))
    assert first.position_ids is not None and first.sequences > 1  # packed rows, several sequences each
    out = distiller(model, first, distiller.denominators([first]))
    step1 = log[0]
    assert out.loss.item() == pytest.approx(step1["loss"], rel=1e-5)
    assert out.kd == pytest.approx(step1["kd"], rel=1e-5)
    assert out.selected == step1["selected"] and out.valid == step1["valid"]
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_distiller_state_round_trips_and_latf_moves(setup):
    fast = adakd.AdaKDConfig(ema_decay=0.0)  # the moving average is the last value: LATF reacts at once
    d = adakd.Distiller("fkl", adakd=fast, warmup_fraction=0.0)
    for kd in (5.0, 5.0, 4.0, 3.0, 2.0):
        d.step(kd, total_steps=10)
    state = json.loads(json.dumps(d.state_dict()))  # JSON-able, as checkpoints keep it
    e = adakd.Distiller("fkl", adakd=fast, warmup_fraction=0.0)
    e.load_state_dict(state)
    assert e.state_dict() == d.state_dict() and e.steps == 5
    assert d.latf_ratio == pytest.approx(0.95 ** 3)  # three falls of over 5%: r shrank by sigma three times
    with pytest.raises(Exception, match="not a Distiller state"):
        e.load_state_dict({"latf": 3})


def test_an_incomplete_cache_is_refused_unless_allowed(setup, tmp_path):
    """Worker 0 of 2 finished, worker 1 never ran: train-student's rule (refused unless allowed) holds here too."""
    root, _, _ = setup
    half = tmp_path / "half"
    r = CliRunner().invoke(cli.main, ["cache-teacher", "--teacher", str(root / "teacher"), "--data", str(root / "d.jsonl"),
                                      "--out", str(half), "--top-k", "16", "--engine", "hf", "--num-workers", "2",
                                      "--worker-index", "0", "--no-progress"])
    assert r.exit_code == 0, r.output
    with pytest.raises(adakd.CacheError, match="incomplete .1/2 workers done.*allow_incomplete=True"):
        adakd.open_cache(half)
    reader = adakd.open_cache(half, allow_incomplete=True)
    assert not reader.manifest.complete


def trainer_for(root, cache, out, max_steps, save_steps=0):
    from transformers import TrainingArguments

    from adakd.integrations.hf import CacheDataset, DistillationTrainer

    model = load(root)
    args = TrainingArguments(str(out), max_steps=max_steps, learning_rate=1e-3, per_device_train_batch_size=1,
                             logging_steps=1, save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
                             report_to=[], use_cpu=True, seed=0, lr_scheduler_type="constant", warmup_steps=0,
                             disable_tqdm=True)
    return DistillationTrainer(model=model, args=args, train_dataset=CacheDataset(adakd.open_cache(cache), model,
                                                                                   batch_tokens=512),
                               distiller=adakd.Distiller("rkl", adakd=True))


@pytest.mark.slow
def test_hf_trainer_step_1_loss_and_resume(setup, tmp_path):
    root, cache, log = setup
    whole = trainer_for(root, cache, tmp_path / "whole", 4)
    whole.train()
    logs = [h for h in whole.state.log_history if "loss" in h]
    assert len(logs) == 4
    assert logs[0]["loss"] == pytest.approx(log[0]["loss"], rel=1e-4, abs=1e-4)  # the Trainer rounds its logged loss
    assert logs[0]["kd"] == pytest.approx(log[0]["kd"], rel=1e-5)
    assert logs[0]["latf_ratio"] == 1.0 and "temp_mean" in logs[0]
    # the Trainer's later steps follow its own LR schedule, so only step 1 is train-student's; resumption is exact:
    cut = trainer_for(root, cache, tmp_path / "cut", 4, save_steps=2)
    cut.args.max_steps = 2  # as if killed after the checkpoint at step 2
    cut.train()
    saved = json.loads((tmp_path / "cut" / "checkpoint-2" / "adakd_state.json").read_text())
    assert saved["steps"] == 2
    resumed = trainer_for(root, cache, tmp_path / "cut", 4, save_steps=2)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.distiller.state_dict() == whole.distiller.state_dict()
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    later = [h for h in resumed.state.log_history if "loss" in h]
    assert later[-1]["loss"] == pytest.approx(logs[-1]["loss"], abs=2e-4)


def test_resuming_without_adakd_state_is_refused(setup, tmp_path):
    root, cache, _ = setup
    (tmp_path / "checkpoint-1").mkdir()
    t = trainer_for(root, cache, tmp_path, 2)
    with pytest.raises(FileNotFoundError, match="adakd_state.json"):
        t.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))


def test_a_ddp_wrapped_student_gives_the_same_loss_and_gradients(setup, tmp_path):
    """Through a DDP wrapper (as a Trainer wraps the model on several GPUs) the hidden states come from the whole
    model's forward, called through the wrapper, captured by a hook: the same loss and gradients as the bare model."""
    import torch.distributed as tdist

    root, cache, _ = setup
    bare, wrapped_inner = load(root), load(root)
    first = next(iter(adakd.batches(adakd.open_cache(cache), bare, batch_tokens=512)))
    d = adakd.Distiller("rkl", adakd=True)
    tdist.init_process_group("gloo", store=tdist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(wrapped_inner)
        a = d(bare, first)
        b = d(wrapped, first)
        a.loss.backward()
        b.loss.backward()
    finally:
        tdist.destroy_process_group()
    assert b.loss.item() == pytest.approx(a.loss.item(), rel=1e-6)
    for (name, p), q in zip(bare.named_parameters(), wrapped_inner.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-8, msg=name)


@pytest.mark.slow
def test_the_docs_examples_run(setup, tmp_path):
    """docs/python-api.md's examples, run as written on a real cache (only the paths replaced); the fragment on
    gradient accumulation gets the names it assumes."""
    import re
    from pathlib import Path

    root, cache, _ = setup
    text = (Path(__file__).resolve().parents[1] / "docs" / "python-api.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 4
    paths = {"runs/student-init": str(root / "student"), "runs/stories-train": str(cache),
             "runs/hf-student": str(tmp_path / "hf")}
    loop: dict = {}  # blocks 1, 2 and 4 continue one another (the plain loop's names); block 3 stands alone
    for i, block in enumerate(blocks):
        for old, new in paths.items():
            block = block.replace(old, new)
        if i == 1:
            loop.update(accum=2, w=1, ddp_student=loop["student"],
                        it=iter(adakd.batches(loop["cache"], loop["student"], batch_tokens=512)))
        exec(compile(block, f"python-api.md block {i + 1}", "exec"), {} if i == 2 else loop)
    assert loop["distiller"].steps >= 3  # block 1's step, block 2's, block 4's
    assert (tmp_path / "hf" / "checkpoint-20" / "adakd_state.json").exists()


@pytest.mark.slow
def test_hf_trainer_under_torchrun_matches_train_student(setup, tmp_path):
    """Two ranks, gradient accumulation 2: the Trainer's step-1 loss is train-student's (the same per-token mean
    over both ranks' micro-batches), and both ranks end together (no rank waits on a collective the other skips)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root, cache, _ = setup
    here = Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=str(here), OMP_NUM_THREADS="1")
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    r = subprocess.run(run + [str(here / "hf_child.py"), str(cache), str(root / "student"), str(tmp_path / "hf"), "3",
                              "2"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run(run + ["-m", "adakd.cli", "train-student", "--cache", str(cache), "--student", str(root / "student"),
                              "--out", str(tmp_path / "ts"), "--max-steps", "3", "--grad-accum", "2", *TRAIN],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    hf = [h for h in json.loads((tmp_path / "hf" / "hf_log.json").read_text()) if "loss" in h]
    ts = [json.loads(line) for line in (tmp_path / "ts" / "train_log.jsonl").read_text().splitlines()]
    assert len(hf) == 3
    assert hf[0]["loss"] == pytest.approx(ts[0]["loss"], rel=1e-4)
    assert hf[0]["kd"] == pytest.approx(ts[0]["kd"], rel=1e-5)
