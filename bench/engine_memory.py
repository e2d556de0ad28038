"""Peak memory of the transformers engine: logits at the union of the batch's trained positions (the
old engine, taken from git) against logits at the needed (row, position) pairs only (the current one).

    python -m bench.engine_memory [--old-rev REV] [--batches 3]

Teacher: Llama-shaped, the GPT-2 vocabulary (50,257), hidden 256, 4 layers, random weights, float32,
CPU (or the GPU when there is one), k = 64. Batches:
  - staggered: 8 sequences of 480, 420, ..., 60 tokens, each training its second half;
  - dolly: dolly train records (MiniLLM prompt + response, response trained, at most 480 tokens),
    batched as `cache-teacher --engine hf` batches them (8,192 padded tokens), the first few batches.
Each variant runs in its own process under `/usr/bin/time -v` (maximum resident set size): `load` only
loads the teacher and builds the batches (the floor), `old` and `new` also score them. A hook on the
output layer records the bytes of the logits tensor each engine makes. The two engines' outputs are
compared bit for bit. The last line is a JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

K = 64
MAX_LENGTH = 480
BATCH_TOKENS = 8192  # cache-teacher's default for --engine hf
OLD_REV = "7fddcf96ee55e987d33eddcd035268a72cd19193"  # last commit with the union-of-positions engine
ROOT = Path(__file__).resolve().parents[1]


def staggered() -> list:
    from adakd.common.tokens import Tokenized

    rng = np.random.default_rng(0)
    out = []
    for r, L in enumerate(range(480, 0, -60)):
        mask = np.zeros(L, bool)
        mask[L // 2:] = True
        out.append(Tokenized(r, rng.integers(0, 50257, L).astype(np.int32), mask))
    return [out]


def dolly_batches(teacher: Path, n: int) -> list[list]:
    """The first n batches cache-teacher would form (consecutive records, rows x longest <= budget)."""
    from .capture import dolly, tokenized

    with tempfile.TemporaryDirectory() as d:
        seqs = tokenized(teacher, dolly(Path(d) / "d.jsonl", 40 * n), MAX_LENGTH)
    batches, cur = [], []
    for s in seqs:
        if cur and max(len(t.input_ids) for t in cur + [s]) * (len(cur) + 1) > BATCH_TOKENS:
            batches.append(cur)
            cur = []
        cur.append(s)
    return (batches + [cur])[:n]


def old_engine_file(rev: str, out: Path) -> Path:
    """The engine at `rev`, importable from outside the package (relative imports made absolute)."""
    src = subprocess.run(["git", "show", f"{rev}:pipeline/engine_hf.py"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    out.write_text(re.sub(r"^from \.(\w+) import", r"from pipeline.\1 import", src, flags=re.M))
    return out


def load_engine(variant: str, teacher: Path, engine_file: str | None):
    if variant == "old":
        import importlib.util

        spec = importlib.util.spec_from_file_location("engine_hf_old", engine_file)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.HFEngine(str(teacher), K)
    from adakd.pipeline.engine_hf import HFEngine

    return HFEngine(str(teacher), K)


def child(args) -> None:
    """One variant in this process: prints a JSON line; the parent reads max RSS from /usr/bin/time."""
    import torch

    torch.set_num_threads(1)
    batches = staggered() if args.scenario == "staggered" else dolly_batches(Path(args.teacher), args.batches)
    engine = load_engine("new" if args.child == "load" else args.child, Path(args.teacher), args.engine_file)
    logits_bytes = []
    engine.model.get_output_embeddings().register_forward_hook(
        lambda m, a, out: logits_bytes.append(out.numel() * out.element_size()))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    scored = [] if args.child == "load" else [s for b in batches for s in engine.score(b)]
    wall = time.perf_counter() - t
    if scored:
        np.savez(args.out, ids=np.concatenate([s.topk_ids for s in scored]),
                 lp=np.concatenate([s.topk_logprobs for s in scored]), tgt=np.concatenate([s.target_logprob for s in scored]))
    needed = sum(int(s.loss_mask.sum()) for b in batches for s in b)
    print(json.dumps({"logits_bytes_max": max(logits_bytes, default=0), "needed_positions": needed,
                      "sequences": sum(map(len, batches)), "batches": len(batches), "score_s": round(wall, 2),
                      "cuda_peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None}))


def run_variant(variant: str, scenario: str, teacher: Path, engine_file: Path, out: Path, batches: int) -> dict:
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "bench.engine_memory", "--child", variant, "--scenario", scenario,
           "--teacher", str(teacher), "--engine-file", str(engine_file), "--out", str(out), "--batches", str(batches)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{variant}/{scenario} failed:\n{r.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    return dict(json.loads(r.stdout.strip().splitlines()[-1]), max_rss_bytes=rss_kb * 1024)


def same_outputs(a: Path, b: Path) -> bool:
    x, y = np.load(a), np.load(b)
    return all(np.array_equal(x[f], y[f]) for f in ("ids", "lp", "tgt"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old-rev", default=OLD_REV)
    p.add_argument("--batches", type=int, default=3, help="dolly batches to score")
    p.add_argument("--child", choices=("load", "old", "new"))
    p.add_argument("--scenario", choices=("staggered", "dolly"))
    p.add_argument("--teacher")
    p.add_argument("--engine-file")
    p.add_argument("--out")
    args = p.parse_args()
    if args.child:
        return child(args)
    from .capture import build_teacher

    mb = 2 ** 20
    res: dict = {"old_rev": args.old_rev, "k": K, "vocab": 50257, "hidden": 256, "layers": 4}
    with tempfile.TemporaryDirectory(prefix="adakd-engine-memory-") as d:
        d = Path(d)
        teacher = build_teacher(d / "teacher")
        engine_file = old_engine_file(args.old_rev, d / "engine_hf_old.py")
        print(f"{'scenario':<10} {'variant':<5} {'seqs':>5} {'needed':>7} {'logits MiB':>11} {'max RSS MiB':>12} "
              f"{'over load':>10} {'score s':>8}")
        for scenario in ("staggered", "dolly"):
            rows = {v: run_variant(v, scenario, teacher, engine_file, d / f"{scenario}-{v}.npz", args.batches)
                    for v in ("load", "old", "new")}
            for v, r in rows.items():
                r["over_load_bytes"] = r["max_rss_bytes"] - rows["load"]["max_rss_bytes"]
                print(f"{scenario:<10} {v:<5} {r['sequences']:>5} {r['needed_positions']:>7} "
                      f"{r['logits_bytes_max'] / mb:>11.1f} {r['max_rss_bytes'] / mb:>12.1f} "
                      f"{r['over_load_bytes'] / mb:>10.1f} {r['score_s']:>8.2f}")
            rows["identical_outputs"] = same_outputs(d / f"{scenario}-old.npz", d / f"{scenario}-new.npz")
            print(f"{scenario}: old and new outputs bit-identical: {rows['identical_outputs']}")
            res[scenario] = rows
    print(json.dumps(res))


if __name__ == "__main__":
    main()
