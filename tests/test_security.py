"""No pickle from a cache or a checkpoint, no model code unless --trust-remote-code, no path out of a cache."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from faultkit import ROOT, run_cli, train_final_problems

from adakd import cli
from adakd.storage import CacheCorruptError, CacheError, CacheReader, CacheWriter, verify_cache

SOURCES = [p for d in ("storage", "trainer", "pipeline", "common", "integrations") for p in (ROOT / d).glob("*.py")] + [ROOT / "cli.py", ROOT / "demo.py", ROOT / "rounds.py"]
UNSAFE = {
    "pickle": r"\bimport pickle\b|\bfrom pickle\b|\bpickle\.[A-Za-z_]",
    "torch.load": r"\btorch\.load\b|\bfrom torch import load\b",
    "other pickle loaders": r"\bjoblib\b|\bdill\b|\bcloudpickle\b|\bshelve\b|\bmarshal\b",
    "numpy pickles": r"allow_pickle\s*=\s*True|np\.load\(",
    "weights_only=False": r"weights_only\s*=\s*False",
    "eval/exec": r"(?<![.\w])(eval|exec)\(",
    "trust_remote_code=True": r"trust_remote_code\s*=\s*True",
}


@pytest.mark.parametrize("what", sorted(UNSAFE))
def test_no_unsafe_loader_in_the_code(what):
    hits = [f"{p.relative_to(ROOT)}:{i + 1}: {line.strip()}" for p in SOURCES
            for i, line in enumerate(p.read_text().splitlines())
            if re.search(UNSAFE[what], line) and not line.lstrip().startswith("#")]
    assert not hits, hits


class _Bomb:
    """Unpickling this creates the file `marker`: proof that something unpickled it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_planted_pickles_are_never_opened(fault_training, tmp_path, monkeypatch):
    import torch

    setup, reference = fault_training
    marker = tmp_path / "UNPICKLED"
    bomb = pickle.dumps(_Bomb(marker))

    def refuse(*a, **k):
        raise AssertionError("pickle or torch.load was called")

    for mod, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(mod, name, refuse)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the reference ran (faultkit: OMP_NUM_THREADS=1): the same float reductions
    cache = tmp_path / "cache"
    shutil.copytree(setup.cache, cache)
    for rel in ("evil.pkl", "shards/00000-999999.pkl", "tokenizer/evil.pkl"):
        (cache / rel).write_bytes(bomb)
    out = tmp_path / "run"
    argv = setup.argv(out)[1:]
    argv[argv.index("--cache") + 1] = str(cache)
    r = CliRunner().invoke(cli.main, ["train-student", *argv, "--stop-after", "3"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    ckpt = out / "checkpoints" / "step-000003"
    for rel in ("optimizer.pt", "rng_state.pth", "scheduler.pt", "training_args.bin", "state.pkl",
                "model/pytorch_model.bin", "model/optimizer.bin"):
        (ckpt / rel).write_bytes(bomb)
    r = CliRunner().invoke(cli.main, ["train-student", *argv], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert not marker.exists()
    torch.set_num_threads(threads)
    assert not train_final_problems(out, reference)  # resumed from the planted checkpoint, exactly
    assert verify_cache(cache).ok and not marker.exists()


def test_checkpoint_state_is_safetensors_and_json(fault_training):
    _, reference = fault_training
    ckpt = reference / "checkpoints" / "step-000012"
    names = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file())
    assert {"optimizer.safetensors", "rng.safetensors", "state.json", "model/model.safetensors"} <= set(names)
    assert all(n.endswith((".safetensors", ".json", ".jinja")) for n in names), names
    json.loads((ckpt / "state.json").read_text())


def _evil_model(tmp_path: Path, teacher: Path, marker: Path) -> Path:
    """A model directory whose config asks for its own code; importing that code creates `marker`."""
    d = tmp_path / "evil"
    shutil.copytree(teacher, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="evil-llama", architectures=["EvilForCausalLM"],
               auto_map={"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (d / "config.json").write_text(json.dumps(cfg))
    payload = f"open({str(marker)!r}, 'w').close()\n"
    (d / "configuration_evil.py").write_text(payload + "from transformers import LlamaConfig\n\n\nclass EvilConfig(LlamaConfig):\n"
                                             "    model_type = 'evil-llama'\n")
    (d / "modeling_evil.py").write_text(payload + "from transformers import LlamaForCausalLM\n\n\n"
                                        "class EvilForCausalLM(LlamaForCausalLM):\n    pass\n")
    return d


def test_model_code_runs_only_with_trust_remote_code(fault_capture, fault_training, tmp_path):
    cap, _, _ = fault_capture
    setup, _ = fault_training
    marker = tmp_path / "CODE_RAN"
    evil = _evil_model(tmp_path, cap.teacher, marker)
    cache_args = ["cache-teacher", "--teacher", str(evil), "--data", str(cap.data), "--engine", "hf", "--top-k", "8",
                  "--no-progress"]
    r = CliRunner().invoke(cli.main, [*cache_args, "--out", str(tmp_path / "c")], input="y\n")
    assert r.exit_code == 1 and "cannot load the teacher" in r.output and "custom code" in r.output, r.output
    r = CliRunner().invoke(cli.main, ["train-student", "--cache", str(setup.cache), "--student", str(evil),
                                      "--out", str(tmp_path / "s"), "--max-steps", "1", "--no-progress"], input="y\n")
    assert r.exit_code == 1 and "--student" in r.output and "cannot load the model" in r.output, r.output
    assert not marker.exists()
    # the same directory with the flag: the code runs (in a child process, with its own module cache)
    run = run_cli([*cache_args, "--out", str(tmp_path / "c2"), "--trust-remote-code"],
                  env={"HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert marker.exists(), run.err[-2000:]


def test_a_caches_tokenizer_files_are_never_code(fault_training, tmp_path):
    """A cache whose tokenizer asks for its own code: refused, not run, even with "y" on standard input."""
    setup, _ = fault_training
    marker = tmp_path / "CODE_RAN"
    cache = tmp_path / "cache"
    shutil.copytree(setup.cache, cache)
    tok = cache / "tokenizer"
    conf = json.loads((tok / "tokenizer_config.json").read_text())
    conf.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]})
    (tok / "tokenizer_config.json").write_text(json.dumps(conf))
    (tok / "tokenization_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                              "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    r = CliRunner().invoke(cli.main, ["train-student", "--cache", str(cache), "--student", str(setup.student),
                                      "--out", str(tmp_path / "s"), "--max-steps", "1", "--no-progress"], input="y\n")
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert not marker.exists()


@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc/passwd", "shards/../../../etc/passwd", "../cache2/shards/x.arrow"])
def test_manifest_paths_cannot_escape_the_cache(fault_capture, tmp_path, bad):
    from adakd.storage.manifest import _checksum

    _, reference, _ = fault_capture
    cache = tmp_path / "cache"
    shutil.copytree(reference, cache)
    m = cache / "manifest-00000.json"
    body = json.loads(m.read_text())
    body["shards"][0]["file"] = bad
    body.pop("checksum")
    body["checksum"] = _checksum(body)  # a well-formed, signed manifest: only the path check stands in the way
    m.write_text(json.dumps(body))
    with pytest.raises(CacheCorruptError, match=re.escape(f"{m}: shard file {bad!r} is not")):
        CacheReader(cache)
    report = verify_cache(cache)
    assert not report.ok and bad in report.problems[0] and str(m) in report.problems[0]
    r = CliRunner().invoke(cli.main, ["verify", str(cache)])
    assert r.exit_code == 1 and bad in r.output


@pytest.mark.parametrize("rel", ["tokenizer/../../x", "../x", "/tmp/x", "shards/evil.arrow"])
def test_writer_puts_no_file_outside_its_places(tmp_path, rel):
    from helpers import make_info

    w = CacheWriter(tmp_path / "c", make_info())
    with pytest.raises(CacheError):
        w.put_file(rel, b"x")
    w.close_lock()
    assert not (tmp_path / "x").exists() and not Path("/tmp/x").exists()
