"""`adakd distill`: on-policy rounds (generate -> cache-teacher -> train-student), each stage its own process,
resumable at any stage: a run killed inside each stage and re-run ends identical to an uninterrupted run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from tiny import cached_teacher, instruction_rows, write_jsonl

from adakd import cli, rounds

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rounds")
    teacher, _, cache, cfg = cached_teacher(root, records=16, seed=3, k=8)
    (root / "student.json").write_text(json.dumps(cfg))
    prompts = write_jsonl(root / "prompts.jsonl", [{k: v for k, v in r.items() if k != "output"}
                                                   for r in instruction_rows(6, seed=9)])
    return root, teacher, cache, prompts


def config(setup, out: Path, **over) -> dict:
    root, teacher, cache, prompts = setup
    base = dict(teacher=str(teacher), student=str(root / "student.json"), prompts=str(prompts), out=str(out),
                rounds=2, off_policy=str(cache), on_policy_weight=0.5,
                warmup={"max_steps": 2, "loss": "fkl", "batch_tokens": 512, "save_every": 1},
                generate={"samples": 1, "max_new_tokens": 6, "engine": "hf", "no_progress": True},
                cache={"top_k": 8, "engine": "hf"},
                train={"max_steps": 2, "loss": "rkl", "batch_tokens": 512, "save_every": 1})
    base.update(over)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(base))
    return base


def config_of(out: Path) -> dict:
    return yaml.safe_load((out.parent / f"{out.name}.yaml").read_text())


def samples_of(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for r in rows:
        r["generation"].pop("model")
    return rows


def test_the_plan_names_every_stage_and_mixes_the_caches(setup, tmp_path):
    cfg = rounds.RoundsConfig(**config(setup, tmp_path / "p"))
    names = [s.name for s in rounds.plan(cfg)]
    assert names == ["warmup", "round-1/generate", "round-1/cache-teacher", "round-1/train-student",
                     "round-2/generate", "round-2/cache-teacher", "round-2/train-student"]
    train2 = rounds.plan(cfg)[-1].argv
    assert train2[train2.index("--student") + 1].endswith("round-1/student/final")
    assert train2.count("--cache") == 2 and train2[train2.index("--cache-weights") + 1] == "0.5,0.5"
    gen2 = rounds.plan(cfg)[4].argv
    assert gen2[gen2.index("--seed") + 1] == "2" and "--no-progress" in gen2
    r = CliRunner().invoke(cli.main, ["distill", "--config", str(tmp_path / "p.yaml"), "--print"])
    assert r.exit_code == 0 and r.output.count("\nadakd ") + r.output.startswith("adakd ") == 7


def test_bad_configs_are_refused_by_name(setup, tmp_path):
    config(setup, tmp_path / "bad", rounds=0)
    r = CliRunner().invoke(cli.main, ["distill", "--config", str(tmp_path / "bad.yaml")])
    assert r.exit_code == 1 and "rounds must be at least 1" in r.output
    config(setup, tmp_path / "clash", train={"out": "x"})
    r = CliRunner().invoke(cli.main, ["distill", "--config", str(tmp_path / "clash.yaml")])
    assert r.exit_code == 1 and "set by the rounds themselves" in r.output
    (tmp_path / "typo.yaml").write_text("teacher: t\nstudent: s\nprompts: p\nout: o\nround: 2\n")
    r = CliRunner().invoke(cli.main, ["distill", "--config", str(tmp_path / "typo.yaml")])
    assert r.exit_code == 1 and "unknown option(s) ['round']" in r.output


@pytest.mark.slow
def test_killed_in_every_stage_and_resumed_ends_as_an_uninterrupted_run(setup, tmp_path, monkeypatch):
    """One uninterrupted run; one killed (SIGKILL, tests/fault_child.py) inside round 1's generate, then inside its
    cache-teacher, then inside its train-student, re-run after each kill: the same final student, bit for bit."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one thread count for every process: identical float bits
    whole = tmp_path / "whole"
    cfg = rounds.RoundsConfig(**config(setup, whole))
    assert len(rounds.run(cfg, echo=lambda m: None)) == 7
    assert rounds.run(cfg, echo=lambda m: None) == []  # finished: a re-run does nothing
    samples = [json.loads(line) for line in (whole / "round-1" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and all(s["generation"]["token_ids"] for s in samples)

    cut = tmp_path / "cut"
    cfg = rounds.RoundsConfig(**config(setup, cut))
    arms = {"round-1/generate": "fsync:2", "round-1/cache-teacher": "replace:2", "round-1/train-student": "step:2"}
    real = rounds.command
    for stage, arm in arms.items():
        monkeypatch.setattr(rounds, "command", lambda s, stage=stage, arm=arm: (
            [sys.executable, str(HERE / "fault_child.py"), "--arm", arm, "--", *s.argv] if s.name == stage else real(s)))
        with pytest.raises(rounds.RoundsError, match=f"\\[{stage}\\] exited with status -9"):
            rounds.run(cfg, echo=lambda m: None)
        assert stage not in json.loads((cut / "progress.json").read_text())["done"]
    monkeypatch.setattr(rounds, "command", real)
    rounds.run(cfg, echo=lambda m: None)
    for rel in ("round-1/samples.jsonl", "round-2/samples.jsonl"):  # the same records (each names its model's path)
        assert samples_of(cut / rel) == samples_of(whole / rel), rel
    final = Path(rounds.final_student(cfg)) / "model.safetensors"
    assert final.read_bytes() == (Path(rounds.final_student(rounds.RoundsConfig(**config_of(whole))))
                                  / "model.safetensors").read_bytes()
