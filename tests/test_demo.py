"""The README's demo, in its fast variant: the whole pipeline through the real commands."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from adakd import cli
from adakd import demo
from adakd.storage import CacheReader, verify_cache


def test_truth_is_a_distribution_per_prompt():
    truth = demo.distributions()
    assert len(truth) >= 20
    for prompt, dist in truth.items():
        assert abs(sum(dist.values()) - 1) < 1e-9 and all(p > 0 for p in dist.values()), prompt
        assert len(dist) >= 3  # several valid answers: what CE from one sampled answer cannot see


def test_transfer_sets_differ_by_seed_and_hold_every_prompt():
    cfg = demo.DemoConfig()
    truth = demo.distributions()
    a, b = demo.transfer_set(truth, cfg, 0), demo.transfer_set(truth, cfg, 1)
    assert a != b
    for items in (a, b):
        assert {i["instruction"] for i in items} >= set(truth)
        assert all(i["output"] in truth[i["instruction"]] for i in items if i["instruction"] in truth)


@pytest.mark.slow
def test_fast_demo_runs_the_whole_pipeline(tmp_path):
    out = tmp_path / "demo"
    r = CliRunner().invoke(cli.main, ["demo", "--fast", "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]", "cache-teacher", "train-student"):
        assert step in r.output
    table = (out / "results.md").read_text()
    for row in ("teacher", "student start", *demo.METHODS, *demo.ONPOLICY):
        assert f"| {row} |" in table
    assert (out / "demo.png").read_bytes()[:4] == b"\x89PNG"
    figures = json.loads(r.output.strip().splitlines()[-1])  # the last line: every row's figures
    assert set(figures["rows"]) == {"teacher", "student start", *demo.METHODS, *demo.ONPOLICY}
    for row in figures["rows"].values():
        for metric in ("valid", "distance", "exact_match"):
            assert 0 <= row[metric]["mean"] <= 1 and row[metric]["sd"] >= 0
    for kind in ("topk", "sampled"):
        cache = out / "seed0" / f"cache-{kind}"
        assert verify_cache(cache).ok and CacheReader(cache).manifest.complete
        assert CacheReader(cache).info.target_kind == kind
    for name in demo.METHODS:
        assert (out / "seed0" / demo.slug(name) / "final" / "model.safetensors").exists()
    # on-policy rows: one shared warm-up, then per round the student's answers, the teacher's cache of them, and the
    # round's student; the same student steps in total as the other rows
    cfg = demo.DemoConfig.fast(str(out))
    assert cfg.warmup_steps + cfg.rounds * cfg.round_steps == cfg.student_steps and cfg.round_steps >= 1
    assert "adakd generate" in r.output.replace("/adakd generate", " adakd generate")
    warm = out / "seed0" / "onpolicy-warmup"
    assert json.loads((warm / "train_log.jsonl").read_text().splitlines()[-1])["step"] == cfg.warmup_steps
    for name, (own_answers, _) in demo.ONPOLICY.items():
        runs = demo.run_dirs(demo.Setup(cfg, out, None, {}, None, None, None, 1, None), 0, name)
        assert len(runs) == cfg.rounds and (runs[-1] / "final" / "model.safetensors").exists()
        for before, run in zip([warm, *runs], runs):
            last = json.loads((run / "train_log.jsonl").read_text().splitlines()[-1])
            assert last["step"] == cfg.round_steps
            if not own_answers:  # the control: the rounds' schedule on the transfer set's cache, no generation
                assert not before.with_name(before.name + "-answers.jsonl").exists() or before == warm
                continue
            answers = [json.loads(x) for x in before.with_name(before.name + "-answers.jsonl").read_text().splitlines()]
            assert answers and all(a["generation"]["model"] == str(before / "final") for a in answers)
            cache = before.with_name(before.name + "-cache")
            assert verify_cache(cache).ok
            assert sum(1 for _ in CacheReader(cache).stream()) == len(answers)


def test_the_launcher_runs_a_command_as_its_own_process_would(tmp_path):
    """The fork server starts the demo's commands pre-imported: the same exit status and messages as the process."""
    import subprocess

    launcher = demo.Launcher(True, "hf")
    for cmd in ([demo.bin_("train-student"), "--help"], [demo.bin_("adakd"), "verify", str(tmp_path / "no-cache")],
                [demo.bin_("cache-teacher"), "--teacher", str(tmp_path / "none"), "--data", str(tmp_path / "x.jsonl"),
                 "--out", str(tmp_path / "c")]):
        code, output = launcher(cmd, 1)
        r = subprocess.run(cmd, capture_output=True, text=True)
        # one stream (stdout and stderr interleaved as written) against two: the same lines
        assert code == r.returncode and sorted(output.splitlines()) == sorted((r.stdout + r.stderr).splitlines()), cmd
    assert code != 0 and (str(tmp_path / "x.jsonl") in output or str(tmp_path / "none") in output)
