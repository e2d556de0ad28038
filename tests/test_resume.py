"""Re-running `train-student` into an existing --out, as users do after Ctrl-C or a finished run: tied and
untied students resume, and the step log holds every step once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from tiny import cached_teacher

from adakd import cli


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    _, _, cache, cfg = cached_teacher(tmp_path_factory.mktemp("resume"), records=32, seed=7)
    return cache, cfg


def train(cache, student, out, *extra):
    r = CliRunner().invoke(cli.main, ["train-student", "--cache", str(cache), "--student", str(student), "--out", str(out),
                                      "--batch-tokens", "512", "--no-progress", "--max-steps", "6", "--save-every", "2",
                                      *extra])
    assert r.exit_code == 0, r.output
    return r


def logged_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def losses(out: Path) -> dict[int, float]:
    return {json.loads(x)["step"]: json.loads(x)["loss"] for x in (out / "train_log.jsonl").read_text().splitlines()}


@pytest.mark.parametrize("tied", [True, False])
def test_resume_after_an_interrupt_and_rerun_of_a_finished_run(setup, tmp_path, tied):
    cache, cfg = setup
    student = tmp_path / "student.json"
    student.write_text(json.dumps(dict(cfg, tie_word_embeddings=tied)))
    reference = tmp_path / "reference"
    train(cache, student, reference)
    out = tmp_path / "run"
    train(cache, student, out, "--stop-after", "3")
    # the state a kill leaves just after step 3 was logged, before its checkpoint: the last one is step 2
    ckpts = out / "checkpoints"
    shutil.rmtree(ckpts / "step-000003")
    (ckpts / "latest").write_text("step-000002")
    assert logged_steps(out) == [1, 2, 3]
    r = train(cache, student, out)
    assert "trained 6/6 steps" in r.output
    assert logged_steps(out) == [1, 2, 3, 4, 5, 6]  # step 3 again, once
    assert losses(out) == pytest.approx(losses(reference), rel=1e-5)  # the resumed run is the uninterrupted one
    r = train(cache, student, out)  # a finished run, re-run: nothing to do, the student written again
    assert "trained 6/6 steps" in r.output and logged_steps(out) == [1, 2, 3, 4, 5, 6]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) == tied


def test_keep_last_keeps_the_newest_checkpoints_and_resume_works(setup, tmp_path):
    cache, cfg = setup
    student = tmp_path / "student.json"
    student.write_text(json.dumps(cfg))
    out = tmp_path / "run"
    train(cache, student, out, "--save-every", "1", "--keep-last", "2", "--stop-after", "4")
    kept = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert kept == ["step-000003", "step-000004"]
    train(cache, student, out, "--save-every", "1", "--keep-last", "2")
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-000005", "step-000006"]
    assert logged_steps(out) == [1, 2, 3, 4, 5, 6]
