"""`train-student` end to end from a cache written by `cache-teacher`: training, resume, DDP, bad input."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tiny import build_teacher, cached_teacher, instruction_rows, write_jsonl

from adakd import cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    teacher, _, cache, cfg = cached_teacher(root, records=48, seed=3, k=16)
    student = root / "student.json"
    student.write_text(json.dumps(cfg))
    return teacher, cache, student


def train(setup, out, *extra, ok=True):
    _, cache, student = setup
    r = CliRunner().invoke(cli.main, ["train-student", "--cache", str(cache), "--student", str(student), "--out", str(out),
                                      "--batch-tokens", "1024", "--no-progress", *extra], catch_exceptions=False)
    if ok:
        assert r.exit_code == 0, r.output
    return r


def log(out) -> list[dict]:
    rows = [json.loads(line) for line in (Path(out) / "train_log.jsonl").read_text().splitlines()]
    return list({r["step"]: r for r in rows}.values())  # a resumed run may log a step twice: keep the last


def test_trains_end_to_end_and_saves_a_loadable_student(setup, tmp_path):
    out = tmp_path / "run"
    r = train(setup, out, "--max-steps", "12", "--plot", "--loss", "rkl", "--lr", "3e-3")
    assert "trained 12/12 steps" in r.output
    rows = log(out)
    assert [x["step"] for x in rows] == list(range(1, 13))
    for key in ("loss", "kd", "ce", "latf_ratio", "temp_mean", "temp_min", "temp_max", "selected", "tokens_per_s", "lr"):
        assert key in rows[0]
    assert rows[-1]["loss"] < rows[0]["loss"]  # it learns
    assert all(x["temp_min"] < 1.0 < x["temp_max"] for x in rows)  # IDTS spreads temperatures around T = 1
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    assert model.config.hidden_size == 32 and len(tok) == model.config.vocab_size
    assert (out / "train_plot.png").read_bytes()[:4] == b"\x89PNG"
    hist = json.loads((out / "temperatures.json").read_text())
    assert sum(hist["counts"]) == sum(x["selected"] for x in rows) and len(hist["edges"]) == len(hist["counts"]) + 1
    assert not list((out / "final").glob("*.bin")) and list((out / "final").glob("*.safetensors"))


@pytest.mark.parametrize("loss", ["fkl", "jsd", "sfkl", "srkl", "tvd", "akl"])
def test_every_loss_trains(setup, tmp_path, loss):
    train(setup, tmp_path / loss, "--max-steps", "3", "--loss", loss, "--kd-weight", "0.5")
    rows = log(tmp_path / loss)
    assert len(rows) == 3 and all(r["ce"] > 0 and r["kd"] >= 0 for r in rows)


def test_ablation_switches(setup, tmp_path):
    train(setup, tmp_path / "nolatf", "--max-steps", "2", "--no-latf")
    train(setup, tmp_path / "noidts", "--max-steps", "2", "--no-idts")
    train(setup, tmp_path / "plain", "--max-steps", "2", "--no-adakd")
    assert all(r["temp_min"] == r["temp_max"] == 1.0 for r in log(tmp_path / "noidts"))
    assert all(r["temp_min"] == r["temp_max"] == 1.0 for r in log(tmp_path / "plain"))
    assert all(r["temp_min"] < r["temp_max"] for r in log(tmp_path / "nolatf"))


def test_yaml_config_with_command_line_override(setup, tmp_path):
    _, cache, student = setup
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"cache: {cache}\nstudent: {student}\nout: {tmp_path / 'y'}\nmax-steps: 2\nloss: fkl\nbatch_tokens: 1024\n")
    r = CliRunner().invoke(cli.main, ["train-student", "--config", str(cfg), "--max-steps", "3", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert len(log(tmp_path / "y")) == 3
    state = json.loads((tmp_path / "y" / "checkpoints" / "step-000003" / "state.json").read_text())
    assert state["config"]["loss"]["loss"] == "fkl"


def test_resume_continues_exactly(setup, tmp_path):
    args = ("--max-steps", "10", "--lr", "3e-3", "--seed", "5", "--epochs", "3")
    train(setup, tmp_path / "full", *args)
    train(setup, tmp_path / "split", *args, "--stop-after", "4")
    state = json.loads((tmp_path / "split" / "checkpoints" / "step-000004" / "state.json").read_text())
    assert state["step"] == 4 and state["latf"]["ratio"] > 0 and state["cursors"][0]["unit"] >= 0
    r = train(setup, tmp_path / "split", *args)
    assert "trained 10/10 steps" in r.output
    full, split = log(tmp_path / "full"), log(tmp_path / "split")
    assert [x["loss"] for x in split] == [x["loss"] for x in full]  # bit-identical on CPU
    assert [x["latf_ratio"] for x in split] == [x["latf_ratio"] for x in full]
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "split" / "final" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(setup, tmp_path, monkeypatch):
    from adakd.trainer import checkpoint as ck

    real = ck.save_file
    calls = {"n": 0}

    def failing(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] >= 3:  # the second checkpoint's first file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ck, "save_file", failing)
    r = train(setup, tmp_path / "r", "--max-steps", "6", "--save-every", "2", ok=False)
    assert r.exit_code == 1 and "step 4" in r.output and "No space left" in r.output and "step-000002" in r.output
    assert (tmp_path / "r" / "checkpoints" / "latest").read_text() == "step-000002"
    assert not [p for p in (tmp_path / "r" / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


def test_nan_loss_stops_with_the_step(setup, tmp_path, monkeypatch):
    from adakd.trainer import step as tt

    real = tt.kd_loss

    def poisoned(*a, **k):
        out = real(*a, **k)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(tt, "kd_loss", poisoned)
    r = train(setup, tmp_path / "n", "--max-steps", "3", ok=False)
    assert r.exit_code == 1 and "step 0" in r.output and "not finite" in r.output


def test_bad_inputs(setup, tmp_path):
    teacher, cache, student = setup
    r = train(setup, tmp_path / "a", "--loss", "kl3", ok=False)
    assert r.exit_code == 2 and "Invalid value for '--loss': 'kl3' is not one of 'fkl', 'rkl'" in r.output
    r = CliRunner().invoke(cli.main, ["train-student", "--cache", str(tmp_path / "none"), "--student", str(student),
                                      "--out", str(tmp_path / "b")])
    assert r.exit_code == 1 and "no such cache directory" in r.output
    r = CliRunner().invoke(cli.main, ["train-student", "--student", str(student), "--out", str(tmp_path / "b")])
    assert r.exit_code == 1 and "--cache is required" in r.output


def test_incomplete_cache_is_refused(setup, tmp_path):
    teacher, _, student = setup
    data = write_jsonl(tmp_path / "d.jsonl", instruction_rows(10))
    cache = tmp_path / "half"
    r = CliRunner().invoke(cli.main, ["cache-teacher", "--teacher", str(teacher), "--data", str(data), "--out", str(cache),
                                      "--top-k", "16", "--engine", "hf", "--no-progress", "--num-workers", "2"])
    assert r.exit_code == 0
    r = CliRunner().invoke(cli.main, ["train-student", "--cache", str(cache), "--student", str(student), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "incomplete (1/2 workers done)" in r.output


def test_incompatible_student_vocabulary_is_refused(setup, tmp_path):
    from tiny import build_tokenizer
    from transformers import AutoTokenizer

    teacher, cache, student = setup
    other = tmp_path / "otherstudent"
    tok = AutoTokenizer.from_pretrained(teacher)
    vocab = tok.get_vocab()
    build_tokenizer(other)  # the same training corpus: same ids; then swap two tokens
    data = json.loads((other / "tokenizer.json").read_text())
    v = data["model"]["vocab"]
    a, b = sorted(v, key=v.get)[300:302]
    v[a], v[b] = v[b], v[a]
    (other / "tokenizer.json").write_text(json.dumps(data))
    cfg = json.loads(student.read_text())
    (other / "config.json").write_text(json.dumps(cfg))
    r = CliRunner().invoke(cli.main, ["train-student", "--cache", str(cache), "--student", str(other), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "2 tokens to other ids" in r.output and repr(a) in r.output
    assert len(vocab) == len(tok)
    small = dict(cfg, vocab_size=100)
    (tmp_path / "small.json").write_text(json.dumps(small))
    r = CliRunner().invoke(cli.main, ["train-student", "--cache", str(cache), "--student", str(tmp_path / "small.json"),
                                      "--out", str(tmp_path / "o2")])
    assert r.exit_code == 1 and "has 100 outputs" in r.output


def test_eval_reports_nll_kl_and_agreement(setup, tmp_path):
    _, cache, _ = setup
    out = tmp_path / "e"
    train(setup, out, "--max-steps", "4")
    r = CliRunner().invoke(cli.main, ["eval", "--model", str(out / "final"), "--cache", str(cache)])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output.strip().splitlines()[-1])["cache"]
    assert res["positions"] > 0 and res["nll"] > 0 and res["kl"] >= 0 and 0 <= res["top1_agreement"] <= 1


EXIT_CHILD = ROOT / "tests" / "exit_child.py"


def assert_group_ended(stderr: str) -> None:
    """Both ranks destroyed their group (gloo's worker threads joined) before interpreter exit: a worker still
    alive then may free a tensor during finalization and abort the finished run (timing-dependent, so checked
    here by its cause rather than by the abort)."""
    assert stderr.count("gloo worker threads at exit: 0") == 2, stderr[-3000:]
    assert "terminate called" not in stderr


@pytest.mark.slow
def test_two_process_ddp_with_gloo(setup, tmp_path):
    _, cache, student = setup
    out = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    # --standalone: the rendezvous takes a free port, so runs of this test at once on one machine do not collide
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(EXIT_CHILD), "-m", "adakd.cli", "train-student", "--cache", str(cache), "--student", str(student),
                        "--out", str(out), "--max-steps", "4", "--batch-tokens", "1024", "--no-progress", "--save-every", "2"],
                       env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_group_ended(r.stderr)
    rows = log(out)
    assert [x["step"] for x in rows] == [1, 2, 3, 4]
    state = json.loads((out / "checkpoints" / "step-000004" / "state.json").read_text())
    assert state["world"] == 2 and len(state["cursors"]) == 2 and state["cursors"][0]["rank"] == 0 and state["cursors"][1]["rank"] == 1
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "final")


@pytest.mark.slow
def test_two_process_fsdp2_trains_checkpoints_and_resumes(setup, tmp_path):
    _, cache, student = setup
    out = tmp_path / "fsdp"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    # --standalone: the rendezvous takes a free port each time, so concurrent runs on one machine do not collide
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(EXIT_CHILD),
            "-m", "adakd.cli", "train-student", "--cache", str(cache), "--student", str(student), "--out", str(out), "--max-steps", "4",
            "--save-every", "2", "--batch-tokens", "1024", "--no-progress", "--fsdp"]
    for extra in (["--stop-after", "2"], []):
        r = subprocess.run(base + extra, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-3000:]
        assert_group_ended(r.stderr)
    assert [x["step"] for x in log(out)] == [1, 2, 3, 4]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.config.hidden_size == 32


def test_gradient_accumulation_and_clipping(setup, tmp_path):
    train(setup, tmp_path / "acc", "--max-steps", "3", "--grad-accum", "2", "--batch-tokens", "512", "--clip", "0.5")
    train(setup, tmp_path / "one", "--max-steps", "6", "--grad-accum", "1", "--batch-tokens", "512")
    acc, one = log(tmp_path / "acc"), log(tmp_path / "one")
    assert [r["step"] for r in acc] == [1, 2, 3]
    # one optimizer step of accumulation covers two micro-batches: the same positions as two plain steps
    assert acc[0]["valid"] == one[0]["valid"] + one[1]["valid"] and acc[1]["valid"] == one[2]["valid"] + one[3]["valid"]
    assert all(r["grad_norm"] > 0 for r in acc)


def test_generation_eval_scores_rouge_l(setup, tmp_path):
    from rouge_score import rouge_scorer

    out = tmp_path / "g"
    train(setup, out, "--max-steps", "2")
    # prompts of different lengths: batches are formed by length, results come back in input order
    rows = [{"prompt": f"what is {w} and", "output": "the cat sat on the mat."} for w in ("one " * 9, "two", "three " * 4)]
    data = write_jsonl(tmp_path / "test.jsonl", rows)
    args = ["eval", "--model", str(out / "final"), "--data", str(data), "--max-new-tokens", "8", "--batch-size", "2"]
    r = CliRunner().invoke(cli.main, args + ["--out-file", str(tmp_path / "a.jsonl")])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output.strip().splitlines()[-1])["generation"]
    gens = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert res["n"] == 3 and len(gens) == 3 and [g["prompt"] for g in gens] == [x["prompt"] for x in rows]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expect = sum(scorer.score(g["reference"], g["generation"])["rougeL"].fmeasure * 100 for g in gens) / 3
    assert abs(res["rougeL"] - expect) < 1e-9
    r2 = CliRunner().invoke(cli.main, args + ["--out-file", str(tmp_path / "b.jsonl")])  # greedy: deterministic
    assert (tmp_path / "b.jsonl").read_text() == (tmp_path / "a.jsonl").read_text()
    s1 = CliRunner().invoke(cli.main, args + ["--do-sample", "--seed", "3", "--out-file", str(tmp_path / "s1.jsonl")])
    s2 = CliRunner().invoke(cli.main, args + ["--do-sample", "--seed", "3", "--out-file", str(tmp_path / "s2.jsonl")])
    assert s1.exit_code == s2.exit_code == 0 and (tmp_path / "s1.jsonl").read_text() == (tmp_path / "s2.jsonl").read_text()
    assert r2.exit_code == 0


def test_generation_eval_bad_data(setup, tmp_path):
    out = tmp_path / "g"
    train(setup, out, "--max-steps", "1")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    r = CliRunner().invoke(cli.main, ["eval", "--model", str(out / "final"), "--data", str(bad)])
    assert r.exit_code == 1 and "line 1" in r.output and "'output'" in r.output
    r = CliRunner().invoke(cli.main, ["eval", "--model", str(out / "final")])
    assert r.exit_code == 1 and "--cache" in r.output


@pytest.mark.parametrize("steps", [["--max-steps", "2"], ["--epochs", "1"]])
def test_too_little_data_for_one_step_is_refused(setup, tmp_path, steps):
    r = train(setup, tmp_path / "t", *steps, "--grad-accum", "1000", ok=False)
    assert r.exit_code == 1 and "not enough data for one optimizer step" in r.output


def test_live_teacher_gives_the_exact_full_vocabulary_targets(setup, tmp_path):
    """--live-teacher == a k = V cache of the same teacher (up to the cache's 1/32-nat steps), whatever k the cache has."""
    teacher, cache16, _ = setup
    data = write_jsonl(tmp_path / "d.jsonl", instruction_rows(48, seed=3))
    full = tmp_path / "cache-full"
    vocab = json.loads((teacher / "config.json").read_text())["vocab_size"]
    r = CliRunner().invoke(cli.main, ["cache-teacher", "--teacher", str(teacher), "--data", str(data), "--out", str(full),
                                      "--top-k", str(vocab), "--engine", "hf", "--no-progress"])
    assert r.exit_code == 0, r.output
    common = ("--max-steps", "3", "--loss", "rkl", "--temperature", "2", "--lr", "3e-3")
    _, _, student = setup
    runs = {}
    for name, cache, extra in [("cached", full, ()), ("live-full", full, ("--live-teacher", str(teacher))),
                               ("live-k16", cache16, ("--live-teacher", str(teacher)))]:
        train((teacher, cache, student), tmp_path / name, *common, *extra)
        runs[name] = [x["kd"] for x in log(tmp_path / name)]
    assert runs["live-full"] == runs["live-k16"]  # the cached top-k are not used
    assert runs["live-full"] == pytest.approx(runs["cached"], rel=2e-2, abs=1e-3)
    assert runs["live-full"] != runs["cached"]  # ...but really computed live, not read


def test_live_teacher_with_another_vocabulary_is_refused(setup, tmp_path):
    other = build_teacher(tmp_path / "other", vocab_size=300)
    r = train(setup, tmp_path / "run", "--max-steps", "1", "--live-teacher", str(other), ok=False)
    assert r.exit_code == 1 and "--live-teacher" in r.output and "vocabulary" in r.output


def test_checkpoint_with_unreadable_weights_is_named(setup, tmp_path):
    out = tmp_path / "run"
    train(setup, out, "--max-steps", "4", "--stop-after", "2")
    ckpt = sorted((out / "checkpoints").glob("step-*"))[-1]
    weights = next((ckpt / "model").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    r = train(setup, out, "--max-steps", "4", ok=False)
    assert r.exit_code == 1 and "cannot read the checkpoint's weights" in r.output and weights.name in r.output


def test_eval_of_a_directory_without_a_model_is_named(setup, tmp_path):
    data = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "output": "b"}])
    r = CliRunner().invoke(cli.main, ["eval", "--model", str(tmp_path / "nothing"), "--data", str(data)])
    assert r.exit_code == 1 and "--model" in r.output and "nothing" in r.output


def test_final_student_is_replaced_whole(setup, tmp_path):
    out = tmp_path / "run"
    train(setup, out, "--max-steps", "2")
    (out / "final" / "stale.txt").write_text("from an earlier save")
    train(setup, out, "--max-steps", "2")  # complete: re-running writes final/ again, as a new directory
    assert not (out / "final" / "stale.txt").exists() and list((out / "final").glob("*.safetensors"))
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]


def test_gradient_checkpointing_changes_no_number_and_resumes(setup, tmp_path):
    """Recomputing the activations in the backward pass gives the same losses and weights, packed, and a run
    stopped and resumed with it continues exactly."""
    from safetensors.torch import load_file

    args = ("--max-steps", "6", "--lr", "3e-3", "--kd-weight", "0.5")
    train(setup, tmp_path / "plain", *args)
    train(setup, tmp_path / "ckpt", *args, "--gradient-checkpointing")
    train(setup, tmp_path / "split", *args, "--gradient-checkpointing", "--stop-after", "3")
    train(setup, tmp_path / "split", *args, "--gradient-checkpointing")
    plain, ckpt, split = (log(tmp_path / n) for n in ("plain", "ckpt", "split"))
    assert [x["loss"] for x in ckpt] == pytest.approx([x["loss"] for x in plain], rel=1e-6)
    assert [x["loss"] for x in split] == [x["loss"] for x in ckpt]  # resumed: bit-identical
    assert all(x["real_fraction"] > 0.9 for x in ckpt)  # packed
    wa = load_file(str(tmp_path / "plain" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "ckpt" / "final" / "model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-7) for k in wa)


def test_gradient_checkpointing_is_refused_for_a_student_without_it(setup, tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    monkeypatch.setattr(LlamaForCausalLM, "supports_gradient_checkpointing", False)
    r = train(setup, tmp_path / "r", "--max-steps", "2", "--gradient-checkpointing", ok=False)
    assert r.exit_code == 1 and "--gradient-checkpointing" in r.output and "LlamaForCausalLM" in r.output
    assert not (tmp_path / "r" / "train_log.jsonl").exists()


def test_no_packing_trains_on_padded_rows_and_packing_computes_fewer_tokens(setup, tmp_path):
    train(setup, tmp_path / "packed", "--max-steps", "3", "--batch-tokens", "512")
    train(setup, tmp_path / "padded", "--max-steps", "3", "--batch-tokens", "512", "--no-packing")
    packed, padded = log(tmp_path / "packed"), log(tmp_path / "padded")
    assert all(x["real_fraction"] < 0.9 for x in padded) and all(x["real_fraction"] > 0.9 for x in packed)
    assert sum(x["valid"] for x in packed) > sum(x["valid"] for x in padded)  # the same budget holds more sequences


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_gradient_checkpointing_under_torchrun(setup, tmp_path, fsdp):
    _, cache, student = setup
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    losses = {}
    for name, extra in (("plain", []), ("ckpt", ["--gradient-checkpointing"])):
        out = tmp_path / name
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "-m", "adakd.cli", "train-student", "--cache", str(cache), "--student", str(student), "--out",
                            str(out), "--max-steps", "3", "--batch-tokens", "1024", "--no-progress",
                            *(["--fsdp"] if fsdp else []), *extra], env=env, capture_output=True, text=True,
                           timeout=300, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-3000:]
        losses[name] = [x["loss"] for x in log(out)]
    assert len(losses["ckpt"]) == 3 and losses["ckpt"] == pytest.approx(losses["plain"], rel=1e-5)


@pytest.mark.parametrize("scale", ["0.5", "-0.5"])
def test_adakd_diagnostics_in_the_log_and_the_knobs_in_the_state(setup, tmp_path, scale):
    """What LATF and IDTS do is in every step's line: the harder half colder than the easier with the published
    scale (hotter with a negative one), the saturated share, the difficulty quantiles, LATF's moving average and
    reference (set past the warm-up); the LATF knobs reach the run."""
    out = tmp_path / "d"
    train(setup, out, "--max-steps", "12", "--lr", "3e-3", "--temperature-scale", scale, "--latf-eps", "0.01",
          "--latf-step", "0.2", "--latf-decay", "0.5", "--latf-floor", "0.3", "--warmup-fraction", "0.25", "--plot")
    rows = log(out)
    for r in rows:
        assert (r["temp_hard"] < 1.0 < r["temp_easy"]) if scale == "0.5" else (r["temp_hard"] > 1.0 > r["temp_easy"])
        assert 0.0 <= r["temp_saturated"] <= 1.0
        assert 0.0 <= r["difficulty_p10"] <= r["difficulty_p50"] <= r["difficulty_p90"] <= 1.0
        assert r["latf_ema"] is not None and r["latf_ratio"] >= 0.3
    assert rows[0]["latf_reference"] is None and rows[-1]["latf_reference"] is not None  # set at step 4 (0.25 x 12)
    cfg = json.loads((out / "checkpoints" / "step-000012" / "state.json").read_text())["config"]["loss"]["adakd"]
    assert (cfg["loss_ratio_eps"], cfg["ratio_step"], cfg["ema_decay"], cfg["min_ratio"]) == (0.01, 0.2, 0.5, 0.3)
    assert cfg["temperature_scale"] == float(scale)
    assert (out / "train_plot.png").read_bytes()[:4] == b"\x89PNG"
    plain = tmp_path / "plain"
    train(setup, plain, "--max-steps", "2", "--no-adakd")
    assert all(r["temp_hard"] is None and r["difficulty_p50"] is None and r["temp_saturated"] is None for r in log(plain))
