"""Refusals before any work, and the exact counts users ask for: a student's context, padded ids in a cache,
a teacher whose vocabulary cannot be read, `adakd eval --max-positions`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import make_info, make_sequence
from tiny import cached_teacher

from adakd import cli
from adakd.storage import CacheReader, CacheWriter


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ctx")
    teacher, _, cache, cfg = cached_teacher(root)
    return teacher, cache, cfg, root


def run(*argv):
    return CliRunner().invoke(cli.main, [str(a) for a in argv])


def test_the_cache_records_its_longest_sequence(setup):
    _, cache, _, _ = setup
    reader = CacheReader(cache)
    longest = max(len(s.input_ids) for s in reader.stream(prefetch=0))
    assert reader.manifest.longest_sequence() == longest
    assert f"longest {longest} tokens" in run("inspect", cache).output


def test_a_student_shorter_than_the_caches_sequences_is_refused_or_truncated(setup, tmp_path):
    _, cache, cfg, _ = setup
    longest = CacheReader(cache).manifest.longest_sequence()
    P = longest - 8  # shorter than some sequences, long enough to keep trained positions in most
    short = tmp_path / "short.json"
    short.write_text(json.dumps(dict(cfg, max_position_embeddings=P)))
    r = run("train-student", "--cache", cache, "--student", short, "--out", tmp_path / "o", "--max-steps", "2", "--no-progress")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert f"longest sequence has {longest} tokens" in r.output and f"handles {P} positions" in r.output
    assert f"--max-length {P}" in r.output and not (tmp_path / "o" / "train_log.jsonl").exists()
    r = run("train-student", "--cache", cache, "--student", short, "--out", tmp_path / "o", "--max-steps", "2",
            "--max-length", P + 1, "--no-progress")
    assert r.exit_code == 1 and f"--max-length {P + 1} is longer than the --student model's context ({P} positions)" in r.output
    r = run("train-student", "--cache", cache, "--student", short, "--out", tmp_path / "o", "--max-steps", "2",
            "--max-length", P, "--no-progress", "--batch-tokens", "256")
    assert r.exit_code == 0, r.output
    model = tmp_path / "o" / "final"
    r = run("eval", "--model", model, "--cache", cache)
    assert r.exit_code == 1 and f"--model model handles {P} positions" in r.output and f"--max-length {P}" in r.output
    r = run("eval", "--model", model, "--cache", cache, "--max-length", P)
    assert r.exit_code == 0, r.output
    expected = sum(int(s.loss_mask[:P].sum()) for s in CacheReader(cache).stream(prefetch=0))
    assert json.loads(r.output.strip().splitlines()[-1])["cache"]["positions"] == expected


def test_truncation_keeps_the_targets_of_the_kept_positions():
    from adakd.trainer.batches import truncate

    rng = np.random.default_rng(0)
    seq = next(s for s in (make_sequence(rng, 0, 300, 8, length=30)[0] for _ in range(100)) if s.loss_mask[:12].any())
    cut = truncate(seq, 20)
    n = int(seq.loss_mask[:20].sum())
    assert len(cut.input_ids) == 20 and cut.num_positions == n
    np.testing.assert_array_equal(cut.topk_ids, seq.topk_ids[:n])
    np.testing.assert_array_equal(cut.labels, seq.labels[:n])
    first = int(np.flatnonzero(seq.loss_mask)[0])
    assert truncate(seq, first) is None  # nothing trained is left
    assert truncate(seq, 30) is seq


def test_eval_max_positions_is_exact_and_errors_name_model(setup, tmp_path):
    teacher, cache, cfg, _ = setup
    student = tmp_path / "s.json"
    student.write_text(json.dumps(cfg))
    assert run("train-student", "--cache", cache, "--student", student, "--out", tmp_path / "o", "--max-steps", "1",
               "--no-progress").exit_code == 0
    total = CacheReader(cache).manifest.totals()["positions"]
    for n in (1, 7, total - 1, total + 50):
        r = run("eval", "--model", tmp_path / "o" / "final", "--cache", cache, "--max-positions", n)
        assert r.exit_code == 0, r.output
        assert json.loads(r.output.strip().splitlines()[-1])["cache"]["positions"] == min(n, total)
    r = run("eval", "--model", tmp_path / "nothing", "--cache", cache)
    assert r.exit_code == 1 and "--model" in r.output and "--student" not in r.output


def test_a_cache_holding_ids_beyond_the_student_is_refused_with_the_id(tmp_path):
    """A cache written before the padding rule may hold padded ids: named, not an index error mid-step."""
    from transformers import LlamaConfig

    rng = np.random.default_rng(1)
    info = make_info(vocab=300, k=8, tokenizer={"name_or_path": "t", "fingerprint": "sha256:1", "vocab_size": 250})
    with CacheWriter(tmp_path / "c", info) as w:
        for r in range(12):
            w.add(make_sequence(rng, r, 300, 8, length=30)[0])
    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1,
                      num_key_value_heads=1, max_position_embeddings=64)
    cfg.save_pretrained(tmp_path / "student")
    r = run("train-student", "--cache", tmp_path / "c", "--student", tmp_path / "student", "--out", tmp_path / "o",
            "--max-steps", "1", "--no-progress")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "beyond the student's 256 outputs" in r.output and "rebuild the cache" in r.output


def test_a_student_lacking_real_ids_is_refused_naming_them(setup, tmp_path):
    _, cache, cfg, _ = setup
    small = tmp_path / "small.json"
    small.write_text(json.dumps(dict(cfg, vocab_size=cfg["vocab_size"] - 3)))
    r = run("train-student", "--cache", cache, "--student", small, "--out", tmp_path / "o", "--no-progress")
    v = cfg["vocab_size"]
    assert r.exit_code == 1 and f"ids {v - 3}..{v - 1} (" in r.output and "have no student output" in r.output


def test_a_teacher_whose_vocabulary_cannot_be_read_is_refused_before_it_loads(setup, tmp_path):
    """A wrapper config with no vocab_size anywhere (here a vision model): refused from its config alone."""
    teacher, _, _, root = setup
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 1,
                                                 "num_attention_heads": 1, "intermediate_size": 64}))
    r = run("cache-teacher", "--teacher", odd, "--tokenizer", teacher, "--data", root / "d.jsonl", "--out",
            tmp_path / "c", "--engine", "hf", "--no-progress")
    assert r.exit_code == 1 and "states no output vocabulary size" in r.output and "ViTConfig" in r.output
    assert "Traceback" not in r.output
