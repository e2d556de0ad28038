"""On-policy rounds through the cache against off-policy training at equal student steps, paired seeds.

    python -m bench.onpolicy [--steps 200] [--seeds 3] [--rounds 2] [--lam 0.5] [--round-loss fkl] [--quick] [--docs]
    python -m bench.onpolicy --quick --rounds 1 --records 12 --jobs 2      (the smoke run tests make)

- Teacher: ../shared/models/stories260K on TinyStories (its domain: a sharp, real teacher). Student: the
  teacher's config with 2 layers, random init (seeded).
- Off-policy: `train-student --loss fkl` from the TinyStories train cache (top-64) for S steps.
- On-policy: the same start trained off-policy for S/2 steps (the warm-up), then `adakd distill` rounds of
  S/(2R) steps each: the student continues stories from prompts cut from the train stories (their first words),
  the teacher scores its continuations offline into a cache, the student trains on the off-policy cache mixed
  with that one (lambda = the on-policy share). Equal student steps in total.
- Scored per seed, both arms, on held-out data: teacher-forced exact KL(teacher || student) and the student's NLL
  on the test stories (`adakd eval --teacher --cache`), and on-policy: the student continues held-out prompts and
  the live teacher scores them (`adakd eval --teacher --data --generate`): KL(student || teacher) on the
  student's own prefixes and the teacher's NLL of the student's text.
- Paired differences on-policy minus off-policy per seed, their mean and 95% t-interval; the rounds' cost:
  generation and scoring seconds per round and the on-policy caches' bytes per trained position.

The last line printed is one JSON object with the figures (`--docs` also writes the block between the
bench.onpolicy markers of docs/results.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from bench.common import SHARED, paired, replace_block  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEACHER = SHARED / "models" / "stories260K"
DATA = SHARED / "data" / "tinystories"
METRICS = (("tf_kl", "teacher-forced KL(teacher||student), test stories"), ("tf_nll", "student NLL, test stories"),
           ("op_rkl", "on-policy KL(student||teacher), own samples"), ("op_teacher_nll", "teacher NLL of own samples"))
# --quick: every stage runs, on a few stories and steps (tests/test_bench_onpolicy.py runs it with --rounds 1)
QUICK = {"steps": 4, "seeds": 2, "prompts": 6, "eval_prompts": 4, "new_tokens": 8, "records": 40, "batch_tokens": 2048}


def adakd(*args: str, log=print) -> str:
    """An adakd command as a user runs it; its stdout (an error carries the end of its output)."""
    cmd = [sys.executable, "-m", "adakd.cli", *map(str, args)]
    log("  $ adakd " + shlex.join(cmd[3:]))
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"adakd {args[0]} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return r.stdout


def prompts(src: Path, dst: Path, n: int, words: int) -> Path:
    """The first `words` words of the first n stories as prompt rows (the student continues them)."""
    rows = [json.loads(line) for line in src.read_text().splitlines()[:n]]
    dst.write_text("".join(json.dumps({"prompt": " ".join(r["text"].split()[:words])}) + "\n" for r in rows))
    return dst


def setup(out: Path, args) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    caches = {}
    for split in ("train", "test"):
        c = out / f"cache-{split}"
        if not (c / "manifest-00000.json").exists():
            adakd("cache-teacher", "--teacher", TEACHER, "--data", DATA / f"{split}.jsonl", "--out", c, "--top-k", 64,
                  "--engine", "hf", "--no-progress", *(["--limit", args.records] if args.records else []))
        caches[split] = c
    cfg = json.loads((TEACHER / "config.json").read_text())
    cfg.update(num_hidden_layers=2)
    (out / "student.json").write_text(json.dumps(cfg))
    return {"train": caches["train"], "test": caches["test"], "student": out / "student.json",
            "prompts": prompts(DATA / "train.jsonl", out / "prompts-train.jsonl", args.prompts, args.prompt_words),
            "heldout": prompts(DATA / "test.jsonl", out / "prompts-test.jsonl", args.eval_prompts, args.prompt_words)}


def train_options(args, steps: int, seed: int, loss: str) -> dict:
    return {"max_steps": steps, "loss": loss, "adakd": False, "lr": args.lr, "batch_tokens": args.batch_tokens,
            "seed": seed}


def off_policy(s: dict, out: Path, args, seed: int) -> Path:
    final = out / "final"
    if not final.exists():
        opts = train_options(args, args.steps, seed, "fkl")
        adakd("train-student", "--cache", s["train"], "--student", s["student"], "--out", out, "--no-progress",
              *_flags(opts))
    return final


def _flags(opts: dict) -> list[str]:
    from adakd.rounds import _options

    return _options(opts)


def on_policy(s: dict, out: Path, args, seed: int) -> tuple[Path, dict]:
    """Warm-up + rounds, each stage timed (the rounds' cost)."""
    from adakd import rounds

    per_round = (args.steps - args.steps // 2) // args.rounds
    cfg = rounds.RoundsConfig(
        teacher=str(TEACHER), student=str(s["student"]), prompts=str(s["prompts"]), out=str(out), rounds=args.rounds,
        off_policy=str(s["train"]), on_policy_weight=args.lam,
        warmup=train_options(args, args.steps // 2, seed, "fkl"),
        generate={"samples": 1, "temperature": 1.0, "max_new_tokens": args.new_tokens, "engine": "hf",
                  "no_progress": True},
        cache={"top_k": 64, "engine": "hf"}, train=train_options(args, per_round, seed, args.round_loss),
        seed=1000 * seed)
    cost = {"generate_s": 0.0, "score_s": 0.0, "generated_tokens": 0, "bytes": 0, "positions": 0}
    done = rounds._done(out) if out.exists() else []
    out.mkdir(parents=True, exist_ok=True)
    for stage in rounds.plan(cfg):
        if stage.name in done:
            continue
        Path(stage.argv[stage.argv.index("--out") + 1]).parent.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        adakd(*stage.argv, log=lambda m: None)
        dt = time.perf_counter() - t
        if stage.name.endswith("/generate"):
            cost["generate_s"] += dt
        elif stage.name.endswith("/cache-teacher"):
            cost["score_s"] += dt
        done.append(stage.name)
        rounds._mark_done(out, done)
    from adakd.storage import CacheReader

    for r in range(1, args.rounds + 1):
        totals = CacheReader(out / f"round-{r}" / "cache").manifest.totals()
        cost["bytes"] += totals["bytes"]
        cost["positions"] += totals["positions"]
    cost["generated_tokens"] = cost["positions"]  # trained positions of an on-policy cache = generated tokens
    return Path(rounds.final_student(cfg)), cost


def score(s: dict, model: Path, args) -> dict:
    tf = json.loads(adakd("eval", "--model", model, "--teacher", TEACHER, "--cache", s["test"],
                          log=lambda m: None).splitlines()[-1])["teacher"]
    op = json.loads(adakd("eval", "--model", model, "--teacher", TEACHER, "--data", s["heldout"], "--generate",
                          "--samples", 1, "--max-new-tokens", args.new_tokens, "--seed", 0,
                          log=lambda m: None).splitlines()[-1])["onpolicy"]
    return {"tf_kl": tf["kl"], "tf_nll": tf["nll"], "op_rkl": op["rkl"], "op_teacher_nll": op["teacher_nll"]}


def run_seed(s: dict, out: Path, args, seed: int) -> tuple[dict, dict]:
    """One paired seed: both arms trained and scored; the on-policy arm's cost."""
    print(f"seed {seed}: off-policy {args.steps} steps; on-policy {args.steps // 2} + {args.rounds} rounds", flush=True)
    a = score(s, off_policy(s, out / f"seed{seed}" / "off", args, seed), args)
    model, cost = on_policy(s, out / f"seed{seed}" / "on", args, seed)
    b = score(s, model, args)
    return {"seed": seed, "off": a, "on": b}, cost


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200, help="student optimizer steps per arm")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--lam", type=float, default=0.5, help="on-policy share of each round's sequences")
    p.add_argument("--round-loss", default="fkl", help="the rounds' divergence (the off-policy arm: fkl)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-tokens", type=int, default=8192)
    p.add_argument("--prompts", type=int, default=400, help="train stories whose first words are the round prompts")
    p.add_argument("--eval-prompts", type=int, default=100)
    p.add_argument("--prompt-words", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--records", type=int, default=0, help="cache only the first N stories (0: all)")
    p.add_argument("--out", default="runs/onpolicy-bench")
    p.add_argument("--jobs", type=int, default=1,
                   help="seeds run side by side, N at a time (each seed's commands as with 1; the rounds' seconds then "
                        "share the cores)")
    p.add_argument("--quick", action="store_true",
                   help="a minutes-long smoke run (the figures mean nothing): small defaults, options given still apply")
    p.add_argument("--docs", action="store_true", help="write the block in docs/results.md")
    args = p.parse_args()
    if args.quick:  # the smoke run's sizes replace the defaults only: `--quick --rounds 1` runs 1 round
        p.set_defaults(**QUICK)
        args = p.parse_args()
    if args.rounds < 1 or args.steps // 2 < 1 or (args.steps - args.steps // 2) // args.rounds < 1:
        p.error(f"--steps {args.steps} --rounds {args.rounds}: the warm-up and every round need at least one step "
                "(--steps >= 2 x rounds, rounds >= 1)")
    if args.seeds < 1 or args.jobs < 1:
        p.error(f"--seeds {args.seeds} --jobs {args.jobs}: at least 1 each")
    out = Path(args.out)
    t0 = time.perf_counter()
    s = setup(out, args)
    if args.jobs > 1:  # seeds are independent: their commands run side by side (each its own processes)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(args.jobs) as pool:
            runs = list(pool.map(lambda seed: run_seed(s, out, args, seed), range(args.seeds)))
    else:
        runs = [run_seed(s, out, args, seed) for seed in range(args.seeds)]
    rows, costs = [r for r, _ in runs], [c for _, c in runs]
    result = {"bench": "onpolicy", "steps": args.steps, "seeds": args.seeds, "rounds": args.rounds, "lam": args.lam,
              "round_loss": args.round_loss, "seconds": round(time.perf_counter() - t0, 1), "per_seed": rows}
    lines = [f"| metric | off-policy {args.steps} steps | on-policy {args.steps // 2} + {args.rounds} rounds | "
             "on - off (95% CI) |", "| --- | --- | --- | --- |"]
    for key, label in METRICS:
        off = [r["off"][key] for r in rows]
        on = [r["on"][key] for r in rows]
        d = paired(on, off)
        ci = f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" if d["ci95"] else "(one seed)"
        lines.append(f"| {label} | {statistics.fmean(off):.3f} | {statistics.fmean(on):.3f} | {d['mean']:+.3f} {ci} |")
        result[key] = {"off": off, "on": on, "diff": d}
    gen = statistics.fmean(c["generate_s"] for c in costs) / args.rounds
    sco = statistics.fmean(c["score_s"] for c in costs) / args.rounds
    bpp = sum(c["bytes"] for c in costs) / max(1, sum(c["positions"] for c in costs))
    toks = statistics.fmean(c["generated_tokens"] for c in costs) / args.rounds
    result["cost"] = {"generate_s_per_round": gen, "score_s_per_round": sco, "generated_tokens_per_round": toks,
                      "cache_bytes_per_position": bpp}
    table = "\n".join(lines) + (f"\n\nRounds' cost (per round, mean over seeds): generation {gen:.1f} s and teacher "
                                f"scoring {sco:.1f} s for {toks:,.0f} generated tokens; on-policy cache "
                                f"{bpp:.1f} bytes per trained position.")
    print(table)
    if args.docs:
        cmd = "python -m bench.onpolicy " + " ".join(sys.argv[1:])
        replace_block(ROOT / "docs" / "results.md", "<!-- bench.onpolicy -->", "<!-- /bench.onpolicy -->",
                      f"Measured by `{cmd}` (CPU, {args.seeds} paired seeds, {result['seconds']:.0f} s):\n\n{table}",
                      heading="## On-policy rounds through the cache (`bench.onpolicy`)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
