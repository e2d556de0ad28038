"""What a new user meets: help that tells, ordinary mistakes named plainly, Ctrl-C, a failed vLLM start."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from helpers import SHARED
from tiny import build_teacher, instruction_rows, write_jsonl

from adakd import cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return build_teacher(tmp_path_factory.mktemp("newuser") / "teacher")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("newuser-data") / "d.jsonl", instruction_rows(24, seed=11))


def run(*argv):
    return CliRunner().invoke(cli.main, [str(a) for a in argv])


# -- help ------------------------------------------------------------------------------------------
def test_every_command_has_a_short_help_an_example_and_every_option_a_description():
    out = subprocess.run(["adakd", "--help"], capture_output=True, text=True, env=dict(os.environ, COLUMNS="80"))
    assert out.returncode == 0 and "..." not in out.stdout.split("Commands:")[1], out.stdout  # nothing cut short
    for name, command in cli.main.commands.items():
        assert command.short_help and len(command.short_help) <= 55, name
        text = CliRunner().invoke(cli.main, [name, "--help"]).output
        assert "Example" in text and f"{'adakd ' if name not in ('cache-teacher', 'train-student') else ''}{name}" in text
        for p in command.params:
            if isinstance(p, click.Option) and not p.hidden:
                assert p.help, f"{name} {p.opts[0]} has no description"
    loss = next(p for p in cli.main.commands["train-student"].params if p.name == "loss")
    assert isinstance(loss.type, click.Choice) and "akl" in loss.type.choices


@pytest.mark.parametrize("script", ["cache-teacher", "train-student"])
def test_the_shortcuts_name_themselves(script):
    r = subprocess.run([script, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith(f"Usage: {script} [OPTIONS]"), r.stdout[:200]
    r = subprocess.run([script, "--no-such-option"], capture_output=True, text=True)
    assert r.returncode == 2 and f"Try '{script} --help' for help." in r.stderr, r.stderr


# -- mistakes ----------------------------------------------------------------------------------------
def test_a_mistyped_teacher_path_is_named_and_leaves_no_output(data, tmp_path):
    out = tmp_path / "cache"
    r = run("cache-teacher", "--teacher", tmp_path / "teahcer", "--data", data, "--out", out, "--engine", "hf")
    assert r.exit_code == 1 and f"--teacher {tmp_path / 'teahcer'}: no such directory" in r.output
    assert "tokenizer" not in r.output and not out.exists()


def test_a_train_student_output_directory_given_as_model_points_at_final(teacher, data, tmp_path):
    cache = tmp_path / "cache"
    assert run("cache-teacher", "--teacher", teacher, "--data", data, "--out", cache, "--engine", "hf", "--top-k", "8",
               "--no-progress").exit_code == 0
    cfg = json.loads((teacher / "config.json").read_text())
    cfg.update(num_hidden_layers=1)
    (tmp_path / "s.json").write_text(json.dumps(cfg))
    assert run("train-student", "--cache", cache, "--student", tmp_path / "s.json", "--out", tmp_path / "run",
               "--max-steps", "1", "--no-progress").exit_code == 0
    r = run("eval", "--model", tmp_path / "run", "--cache", cache)
    assert r.exit_code == 1 and f"the trained model is {tmp_path / 'run' / 'final'}" in r.output
    r = run("verify", cache / "manifest-00000.json")
    assert r.exit_code == 1 and "a file, not a cache directory" in r.output and "no such" not in r.output


def test_a_student_with_tokenizer_files_but_no_tokenizer_config_is_not_trained_with_the_teachers(teacher, data, tmp_path):
    """GPT-2's vocab.json + merges.txt beside a Llama config: refused by name, never silently replaced by the teacher's."""
    cache = tmp_path / "cache"
    assert run("cache-teacher", "--teacher", teacher, "--data", data, "--out", cache, "--engine", "hf", "--top-k", "8",
               "--no-progress").exit_code == 0
    student = tmp_path / "student"
    student.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(SHARED / "tokenizers" / "gpt2" / name, student / name)
    cfg = json.loads((teacher / "config.json").read_text())
    (student / "config.json").write_text(json.dumps(dict(cfg, vocab_size=50257, num_hidden_layers=1)))
    r = run("train-student", "--cache", cache, "--student", student, "--out", tmp_path / "run", "--no-progress")
    assert r.exit_code == 1 and "has tokenizer files (vocab.json, merges.txt) that do not load" in r.output
    assert not (tmp_path / "run" / "train_log.jsonl").exists()


def test_no_sequence_length_warning_from_transformers(teacher, tmp_path):
    """adakd polices lengths itself (--max-length); transformers' '(554 > 512) ... indexing errors' misleads."""
    t = tmp_path / "teacher"
    shutil.copytree(teacher, t)
    conf = json.loads((t / "tokenizer_config.json").read_text())
    (t / "tokenizer_config.json").write_text(json.dumps(dict(conf, model_max_length=8)))
    data = write_jsonl(tmp_path / "d.jsonl", instruction_rows(6, seed=2))
    r = subprocess.run([sys.executable, "-m", "adakd.cli", "cache-teacher", "--teacher", str(t), "--data", str(data), "--out",
                        str(tmp_path / "c"), "--engine", "hf", "--top-k", "4", "--no-progress"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "indexing errors" not in r.stderr and "longer than the specified maximum" not in r.stderr


def test_a_cache_with_no_shard_yet_accepts_other_settings(teacher, data, tmp_path):
    """A first run that failed before writing anything (e.g. vLLM did not start) must not lock in its settings."""
    from adakd.storage import CacheWriter
    from adakd.storage.manifest import load_manifest

    from adakd.pipeline.capture import CaptureConfig, build_info, load_teacher_config, load_tokenizer
    from adakd.common.data import DataSpec, load_dataset

    cache = tmp_path / "cache"
    cfg = CaptureConfig(teacher=str(teacher), data=DataSpec(source=str(data)), out=str(cache), k=8, engine="vllm")
    tok = load_tokenizer(str(teacher), False)
    info = build_info(cfg, "vllm", tok, load_teacher_config(str(teacher), False), load_dataset(cfg.data), 255)
    CacheWriter(str(cache), info).close_lock()  # registered, nothing written
    r = run("cache-teacher", "--teacher", teacher, "--data", data, "--out", cache, "--engine", "hf", "--top-k", "8",
            "--no-progress")
    assert r.exit_code == 0, r.output
    from adakd.storage.fs import CacheDir

    assert load_manifest(CacheDir.open(str(cache))).info.engine["name"] == "hf"
    r = run("cache-teacher", "--teacher", teacher, "--data", data, "--out", cache, "--engine", "hf", "--top-k", "16",
            "--no-progress")  # with shards: other settings are refused as before
    assert r.exit_code == 1 and "was made with other settings" in r.output


# -- vLLM that cannot run the teacher ------------------------------------------------------------------
def test_auto_takes_hf_for_a_teacher_vllms_cpu_build_cannot_run(tmp_path, data):
    pytest.importorskip("vllm")
    t = build_teacher(tmp_path / "narrow", hidden=32, heads=4)  # head size 8, like stories260K
    r = subprocess.run([sys.executable, "-m", "adakd.cli", "cache-teacher", "--teacher", str(t), "--data", str(data), "--out",
                        str(tmp_path / "c"), "--top-k", "8", "--no-progress"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "note: vLLM's CPU attention does not support head size 8" in r.stderr and "using --engine hf" in r.stderr
    assert "engine hf" in r.stdout and "Traceback" not in r.stderr
    r = run("cache-teacher", "--teacher", t, "--data", data, "--out", tmp_path / "c2", "--engine", "vllm")
    assert r.exit_code == 1 and "--engine vllm: vLLM's CPU attention does not support head size 8" in r.output
    assert not (tmp_path / "c2").exists()


def test_auto_falls_back_to_hf_when_vllm_fails_to_start(teacher, data, tmp_path, monkeypatch):
    """The fallback itself (the start failure is simulated; a real one is the next test)."""
    pytest.importorskip("vllm")
    from adakd.pipeline import engine_vllm as ev
    from adakd.pipeline.engine import EngineError

    def refuse(*a, **k):
        raise EngineError("vLLM could not start the teacher (simulated)")

    monkeypatch.setattr(ev, "VLLMEngine", refuse)
    r = run("cache-teacher", "--teacher", teacher, "--data", data, "--out", tmp_path / "c", "--top-k", "8",
            "--no-progress")
    assert r.exit_code == 0, r.output
    assert "falling back to --engine hf" in r.output and "engine hf" in r.output
    assert run("verify", tmp_path / "c").exit_code == 0


@pytest.mark.slow
def test_a_vllm_start_failure_is_one_line_with_the_cause(teacher, data, tmp_path):
    pytest.importorskip("vllm")
    broken = tmp_path / "broken"
    shutil.copytree(teacher, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    r = subprocess.run([sys.executable, "-m", "adakd.cli", "cache-teacher", "--teacher", str(broken), "--data", str(data),
                        "--out", str(tmp_path / "c"), "--engine", "vllm", "--top-k", "8", "--no-progress"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "terminate called" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("Error: ")]
    assert len(errors) == 1 and "vLLM could not start the teacher" in errors[0] and "vLLM's full log: " in errors[0]
    log = errors[0].split("vLLM's full log: ")[1].split(". ")[0]
    assert Path(log).exists() and Path(log).stat().st_size > 0


# -- Ctrl-C ----------------------------------------------------------------------------------------------
def _interrupt_when(cmd: list[str], ready, timeout: float = 300) -> subprocess.CompletedProcess:
    """Start `cmd`, send SIGINT once `ready()` holds (observed, not timed), and wait for it to end."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not ready() and proc.poll() is None:
        assert time.monotonic() < deadline, "the command never reached the point to interrupt"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
def test_ctrl_c_on_cache_teacher_exits_130_cleanly_and_resumes(teacher, tmp_path):
    data = write_jsonl(tmp_path / "many.jsonl", instruction_rows(600, seed=4))
    cache = tmp_path / "c"
    cmd = [sys.executable, "-m", "adakd.cli", "cache-teacher", "--teacher", str(teacher), "--data", str(data), "--out",
           str(cache), "--engine", "hf", "--top-k", "8", "--shard-positions", "64", "--batch-tokens", "256",
           "--no-progress"]
    r = _interrupt_when(cmd, lambda: len(list((cache / "shards").glob("*.arrow"))) >= 1)
    assert r.returncode == 130, r.stderr[-3000:]
    assert "interrupted: every shard listed in" in r.stderr and "re-run the same command to resume" in r.stderr
    assert "Traceback" not in r.stderr and "terminate called" not in r.stderr and "Aborted" not in r.stderr
    assert run("verify", cache).exit_code == 1  # intact, but not finished: a gate must not pass it
    assert run("verify", cache, "--allow-incomplete").exit_code == 0  # every byte listed is right
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and run("verify", cache).exit_code == 0


@pytest.mark.slow
def test_ctrl_c_on_train_student_exits_130_cleanly_and_resumes(teacher, data, tmp_path):
    cache = tmp_path / "c"
    assert run("cache-teacher", "--teacher", teacher, "--data", data, "--out", cache, "--engine", "hf", "--top-k", "8",
               "--no-progress").exit_code == 0
    cfg = json.loads((teacher / "config.json").read_text())
    (tmp_path / "s.json").write_text(json.dumps(dict(cfg, num_hidden_layers=1)))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "adakd.cli", "train-student", "--cache", str(cache), "--student", str(tmp_path / "s.json"),
           "--out", str(out), "--max-steps", "100000", "--save-every", "1", "--batch-tokens", "256", "--no-progress"]
    r = _interrupt_when(cmd, lambda: (out / "checkpoints" / "latest").exists())
    assert r.returncode == 130, r.stderr[-3000:]
    assert "interrupted: the last checkpoint in" in r.stderr and "re-run the same command to resume" in r.stderr
    assert "Traceback" not in r.stderr and "terminate called" not in r.stderr
    steps = [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))
