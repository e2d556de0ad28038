"""Fault-injection campaign: crashes on local disk and on S3, corruption of every cache kind, with figures.

    python -m bench.faults [--capture-kills 50] [--train-kills 20] [--s3-capture-kills 20] [--s3-train-kills 10]
                           [--fuzz-cases 10000] [--seed 0]

- `cache-teacher` (tiny Llama teacher from tests/tiny.py, 40 records, ~30 shards, hf engine) SIGKILLed at
  random armed calls (the K-th write / rename / fsync: torn and unpublished shards and manifests,
  tokenizer files) and at random moments; each run resumes the last; after every kill the cache must
  verify and list only final shards; every finished cache must hold the uninterrupted run's shard bytes.
- `train-student` SIGKILLed before random optimizer steps, inside checkpoint file writes, renames,
  `latest` replacements and fsyncs, and at random moments; after every kill the checkpoint a re-run
  would use must be complete, each re-run must continue from it, and every finished run must match the
  uninterrupted run's losses (every step) and final weights bit for bit.
- The same two against a real S3 server (moto on 127.0.0.1, tests/s3server.py), `--out s3://...`: SIGKILLed
  at the K-th upload, half sent or just completed (shards, manifests, tokenizer files; checkpoint files,
  `state.json`, `latest`, the log, the lease), before optimizer steps and at random moments after the first
  upload; the same checks on the store's objects, against the uninterrupted local-disk runs (shard bytes;
  losses and weights). No unlisted shard object may be left at the end.
- Corruption: hypothesis-drawn damages to two-worker caches of all three kinds (top-k, format version 1;
  sampled and hybrid, version 2: the draws' columns and settings, and shards or manifests of another kind put
  in place), judged by tests/corruption.py's oracle: a clear CacheError naming the file, or exactly the
  pristine numbers. The pristine caches are built and read once; a case copies one small cache, damages it,
  verifies it and reads it in full (about 20 ms).

The harness is the tests' (tests/faultkit.py, tests/corruption.py); the CI runs small variants. The output is a
table per campaign; the last line is a JSON object with every figure.
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

from corruption import build_pristines, fuzz  # noqa: E402
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


def store_moment(hit: str) -> str:
    """Where a kill of a run writing to an object store landed, in words."""
    if hit.startswith("time"):
        return "random moment"
    if hit.startswith("step"):
        return "before an optimizer step"
    name = hit.split(": ", 1)[-1].replace(" half uploaded", "").replace("just after uploading ", "")
    what = ("shard" if name.endswith(".arrow") else "manifest" if name.startswith("manifest-")
            else "lease" if name == ".lease" else "`latest`" if name == "latest" else "state.json" if name == "state.json"
            else "step log" if name.endswith(".jsonl") else "tokenizer file" if "tokenizer" in name or "chat_template" in name
            else "checkpoint file" if name.endswith((".safetensors", ".json")) else "other object")
    return f"{what}: " + ("half uploaded" if "half uploaded" in hit else "just uploaded")


def summarize(c: Campaign, moment) -> dict:
    return {"tried": c.tried, "survived": c.survived, "runs_finished": len(c.finals),
            "finished_identical": sum(not f for f in c.finals), "moments": dict(Counter(moment(k.hit) for k in c.kills)),
            "problems": [f"{k.arm}: {k.hit}: {k.problems}" for k in c.kills if k.problems] + [str(f) for f in c.finals if f]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--capture-kills", type=int, default=50)
    ap.add_argument("--train-kills", type=int, default=20)
    ap.add_argument("--s3-capture-kills", type=int, default=20)
    ap.add_argument("--s3-train-kills", type=int, default=10)
    ap.add_argument("--fuzz-cases", type=int, default=10000)
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

        store = {"capture": Campaign(), "train": Campaign()}
        store_s = {"capture": 0.0, "train": 0.0}
        if args.s3_capture_kills or args.s3_train_kills:
            from s3server import S3Server

            with S3Server() as s3:
                s3.make_bucket("faults")
                uri = lambda name: s3.uri("faults", name)
                t = time.perf_counter()
                if args.s3_capture_kills:
                    store["capture"] = capture_campaign(cap, ref_shards, root / "s3-capture", args.s3_capture_kills, rng,
                                                        store=lambda n: uri(f"capture/{n}"), env=s3.env())
                store_s["capture"] = time.perf_counter() - t
                t = time.perf_counter()
                if args.s3_train_kills:
                    store["train"] = train_campaign(train, uninterrupted, root / "s3-train", args.s3_train_kills, rng,
                                                    store=lambda n: uri(f"train/{n}"), env=s3.env())
                store_s["train"] = time.perf_counter() - t

        pristines = build_pristines(root / "pristine")
        t = time.perf_counter()
        corruption = fuzz(pristines, root, args.fuzz_cases, seed=args.seed)
        fuzz_s = time.perf_counter() - t

    cap_sum, train_sum = summarize(capture, capture_moment), summarize(training, train_moment)
    s3_cap_sum, s3_train_sum = summarize(store["capture"], store_moment), summarize(store["train"], store_moment)
    outcomes = {f"verify {v} / read {r}": n for (v, r), n in corruption.outcomes.most_common()}
    by_kind = {k: {f"verify {v} / read {r}": n for (v, r), n in c.most_common()} for k, c in sorted(corruption.kinds.items())}
    sums = {"cache-teacher SIGKILL": (cap_sum, capture_s), "train-student SIGKILL": (train_sum, train_s),
            "cache-teacher SIGKILL, --out s3://": (s3_cap_sum, store_s["capture"]),
            "train-student SIGKILL, --out s3://": (s3_train_sum, store_s["train"])}
    lost = bool(any(s["problems"] for s, _ in sums.values()) or corruption.failures)
    print(f"{'crash campaign':<40}{'kills':>7}{'survived':>10}{'resumed to the end':>20}{'identical':>11}{'wall s':>8}")
    for name, (s, wall) in sums.items():
        print(f"{name:<40}{s['tried']:>7}{s['survived']:>10}{s['runs_finished']:>20}{s['finished_identical']:>11}{wall:>8.0f}")
    for name, (s, _) in sums.items():
        if s["tried"]:
            print(f"\n{name}: kill moments")
            for m, n in sorted(s["moments"].items(), key=lambda kv: -kv[1]):
                print(f"  {m:<50}{n:>5}")
    print(f"\ncorruption cases: {corruption.cases} in {fuzz_s:.0f} s ("
          + ", ".join(f"{k} {sum(c.values())}" for k, c in sorted(corruption.kinds.items())) + f"; "
          f"{sum(corruption.damages.values())} damages: "
          + ", ".join(f"{k} {n}" for k, n in corruption.damages.most_common()) + ")")
    kinds = sorted(corruption.kinds)
    print(f"  {'outcome':<52}" + "".join(f"{k:>9}" for k in kinds) + f"{'all':>8}")
    for o, n in outcomes.items():
        print(f"  {o:<52}" + "".join(f"{by_kind[k].get(o, 0):>9}" for k in kinds) + f"{n:>8}")
    print(f"  {'failures (wrong numbers, hang, raised, no file named)':<52}"
          + "".join(f"{sum(1 for c, _ in corruption.failures if c.startswith(k + ':')):>9}" for k in kinds)
          + f"{len(corruption.failures):>8}")
    problems = [p for s, _ in sums.values() for p in s["problems"]]
    for p in problems + [f"{c}: {f}" for c, f in corruption.failures[:10]]:
        print("PROBLEM", p)
    print(json.dumps({
        "capture_kills": cap_sum, "train_kills": train_sum, "s3_capture_kills": s3_cap_sum, "s3_train_kills": s3_train_sum,
        "corruption": {"cases": corruption.cases, "cases_by_kind": {k: sum(c.values()) for k, c in sorted(corruption.kinds.items())},
                       "outcomes": outcomes, "outcomes_by_kind": by_kind, "damages": dict(corruption.damages),
                       "failures": len(corruption.failures), "wall_s": round(fuzz_s, 1)},
        "walls_s": {"capture": round(capture_s, 1), "train": round(train_s, 1), "s3_capture": round(store_s["capture"], 1),
                    "s3_train": round(store_s["train"], 1), "corruption": round(fuzz_s, 1)},
        "nothing_lost": not lost, "seed": args.seed, "wall_s": round(time.perf_counter() - t0, 1),
    }))


if __name__ == "__main__":
    main()
