"""Fault-injection campaign: crashes, corruption, with figures.

    python -m bench.faults [--capture-kills 50] [--train-kills 20] [--fuzz-cases 2000] [--seed 0]

- `cache-teacher` (tiny Llama teacher from tests/tiny.py, 40 records, ~30 shards, hf engine) SIGKILLed at
  random armed calls (the K-th write / rename / fsync: torn and unpublished shards and manifests,
  tokenizer files) and at random moments; each run resumes the last; after every kill the cache must
  verify and list only final shards; every finished cache must hold the uninterrupted run's shard bytes.
- `train-student` SIGKILLed before random optimizer steps, inside checkpoint file writes, renames,
  `latest` replacements and fsyncs, and at random moments; after every kill the checkpoint a re-run
  would use must be complete, each re-run must continue from it, and every finished run must match the
  uninterrupted run's losses (every step) and final weights bit for bit.
- Corruption: hypothesis-drawn damages to a two-worker cache, judged by tests/corruption.py's oracle.

The harness is the tests' (tests/faultkit.py, tests/corruption.py); the CI runs small variants. The last
line is a JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the harness and the tiny models live with the tests

from corruption import build_pristine, fuzz  # noqa: E402
from faultkit import Campaign, capture_campaign, capture_setup, run_cli, shard_files, train_campaign, train_setup  # noqa: E402


def capture_moment(hit: str) -> str:
    """Where a capture kill landed, in words."""
    if hit.startswith("time"):
        return "random moment"
    words = hit.split(": ", 1)[-1].split(" ")
    name = words[-1] if hit.startswith("replace") else words[0]  # "before publishing NAME", "NAME half written"
    if "." not in name:  # fsync of a directory after a rename, or the temp-dir probe of Python's tempfile
        return "directory entry: before fsync" if hit.startswith("fsync") else "tempfile probe: torn write"
    what = ("shard" if ".arrow" in hit else "manifest" if "manifest-" in hit
            else "tokenizer file" if "tokenizer" in hit or "chat_template" in hit else "other file")
    how = ("torn write" if "half written" in hit else "before publishing" if "before publishing" in hit
           else "just published" if "just after" in hit else "before fsync" if hit.startswith("fsync") else "?")
    return f"{what}: {how}"


def train_moment(hit: str) -> str:
    if hit.startswith("time"):
        return "random moment"
    if hit.startswith("step"):
        return "before an optimizer step"
    if hit.startswith("save"):
        return "checkpoint file torn (" + hit.split(": ")[1].split(" ")[0] + ")"
    if hit.startswith("rename"):
        return "checkpoint not yet renamed into place" if "old-" not in hit else "re-saved step: old copy not yet aside"
    if hit.startswith("replace"):
        return "`latest` not yet replaced" if "latest" in hit else "other rename"
    return "before fsync" if hit.startswith("fsync") else "?"


def summarize(c: Campaign, moment) -> dict:
    return {"tried": c.tried, "survived": c.survived, "runs_finished": len(c.finals),
            "finished_identical": sum(not f for f in c.finals), "moments": dict(Counter(moment(k.hit) for k in c.kills)),
            "problems": [f"{k.arm}: {k.hit}: {k.problems}" for k in c.kills if k.problems] + [str(f) for f in c.finals if f]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--capture-kills", type=int, default=50)
    ap.add_argument("--train-kills", type=int, default=20)
    ap.add_argument("--fuzz-cases", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="adakd-faults-") as tmp:
        root = Path(tmp)
        cap = capture_setup(root / "setup", records=40)
        cap.extra = ("--top-k", "16", "--engine", "hf", "--shard-positions", "12", "--batch-tokens", "1")
        reference = root / "reference"
        if run_cli(cap.argv(reference)).rc != 0:
            raise SystemExit("the uninterrupted capture failed")
        ref_shards = shard_files(reference)
        t = time.perf_counter()
        capture = capture_campaign(cap, ref_shards, root / "capture", args.capture_kills, rng)
        capture_s = time.perf_counter() - t

        train = train_setup(cap, reference, root / "student")
        uninterrupted = root / "uninterrupted"
        if run_cli(train.argv(uninterrupted)).rc != 0:
            raise SystemExit("the uninterrupted training run failed")
        t = time.perf_counter()
        training = train_campaign(train, uninterrupted, root / "train", args.train_kills, rng)
        train_s = time.perf_counter() - t

        build_pristine(root / "pristine")
        t = time.perf_counter()
        corruption = fuzz(root / "pristine", root, args.fuzz_cases, seed=args.seed)
        fuzz_s = time.perf_counter() - t

    cap_sum, train_sum = summarize(capture, capture_moment), summarize(training, train_moment)
    outcomes = {f"verify {v} / read {r}": n for (v, r), n in corruption.outcomes.most_common()}
    lost = bool(cap_sum["problems"] or train_sum["problems"] or corruption.failures)
    print(f"{'crash campaign':<34}{'kills':>7}{'survived':>10}{'resumed to the end':>20}{'identical':>11}{'wall s':>8}")
    for name, s, wall in (("cache-teacher SIGKILL", cap_sum, capture_s), ("train-student SIGKILL", train_sum, train_s)):
        print(f"{name:<34}{s['tried']:>7}{s['survived']:>10}{s['runs_finished']:>20}{s['finished_identical']:>11}{wall:>8.0f}")
    for name, s in (("cache-teacher", cap_sum), ("train-student", train_sum)):
        print(f"\n{name} kill moments")
        for m, n in sorted(s["moments"].items(), key=lambda kv: -kv[1]):
            print(f"  {m:<50}{n:>5}")
    print(f"\ncorruption cases: {corruption.cases} in {fuzz_s:.0f} s ({sum(corruption.damages.values())} damages: "
          + ", ".join(f"{k} {n}" for k, n in corruption.damages.most_common()) + ")")
    for o, n in outcomes.items():
        print(f"  {o:<60}{n:>6}")
    print(f"  {'failures (wrong numbers, hang, other exception, unnamed file)':<60}{len(corruption.failures):>6}")
    for p in cap_sum["problems"] + train_sum["problems"] + [f"{c}: {f}" for c, f in corruption.failures[:10]]:
        print("PROBLEM", p)
    print(json.dumps({
        "capture_kills": cap_sum, "train_kills": train_sum,
        "corruption": {"cases": corruption.cases, "outcomes": outcomes, "damages": dict(corruption.damages),
                       "failures": len(corruption.failures)},
        "nothing_lost": not lost, "seed": args.seed, "wall_s": round(time.perf_counter() - t0, 1),
    }))


if __name__ == "__main__":
    main()
