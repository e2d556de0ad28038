"""What AdaKD's two parts do to a run, one at a time, on the demo's task, with paired seeds.

    python -m bench.ablation [--seeds 3] [--steps 300] [--long-steps 900] [--out runs/ablation] [--docs] [--quick]

The setup is `adakd demo`'s (demo.prepare): its teacher trained on many samples, the shared student start, per
seed a small transfer set and its top-16 cache. Over forward KL and over reverse KL, the same students (same
start, seed, data order, steps, learning rate) are trained with:
  base                   --no-adakd
  AdaKD                  LATF + IDTS, the published values
  LATF only              --no-idts
  IDTS only              --no-latf
  IDTS only, c = 0.25    --no-latf --temperature-scale 0.25 (half the published scale)
  IDTS only, c = -0.5    --no-latf --temperature-scale -0.5 (the official code's "soften" direction: harder hotter)
and base and AdaKD for --long-steps. Each student is scored exactly as the demo scores it (probability of a valid
answer, TV distance of its answer distribution from the truth, greedy exact match on held-out deterministic items),
and its train_log.jsonl is read for what AdaKD did: IDTS's share of distilled positions at saturated temperatures
(|tanh| > 0.9) and the mean temperature of the positions harder than the median, LATF's final ratio and the step
where it first narrowed. Per setting: mean and sd over seeds, and the paired difference from its base (same seed)
with a 95% t-interval. The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from .common import paired, replace_block

SETTINGS = {  # name -> train-student options on top of --loss
    "base": ["--no-adakd"],
    "AdaKD": ["--adakd"],
    "LATF only": ["--adakd", "--no-idts"],
    "IDTS only": ["--adakd", "--no-latf"],
    "IDTS only, c = 0.25": ["--adakd", "--no-latf", "--temperature-scale", "0.25"],
    "IDTS only, c = -0.5": ["--adakd", "--no-latf", "--temperature-scale", "-0.5"],
}
LONG = ("base", "AdaKD")
LOSSES = {"fkl": "forward KL", "rkl": "reverse KL"}
METRICS = ("valid", "distance", "exact_match")
BEGIN, END = "<!-- bench.ablation -->", "<!-- /bench.ablation -->"


def method(loss: str, setting: str, long: int | None = None) -> str:
    return f"{LOSSES[loss]}, {setting}" + (f", {long} steps" if long else "")


def diagnostics(log_file: Path) -> dict:
    """What AdaKD did in a run, from its step log."""
    rows = [json.loads(line) for line in log_file.read_text().splitlines()]
    mean = lambda key: statistics.fmean(v) if (v := [r[key] for r in rows if r.get(key) is not None]) else None  # noqa: E731
    narrowed = next((r["step"] for r in rows if r["latf_ratio"] < 1.0), None)
    return {"saturated": mean("temp_saturated"), "temp_hard": mean("temp_hard"), "temp_easy": mean("temp_easy"),
            "final_ratio": rows[-1]["latf_ratio"], "narrowed_at": narrowed, "steps": len(rows)}


def run(args) -> dict:
    from adakd import demo

    cfg = demo.DemoConfig(out=args.out, seeds=args.seeds, student_steps=args.steps)
    if args.quick:
        cfg = demo.DemoConfig.fast(args.out)
        cfg.seeds, cfg.student_steps = args.seeds, args.steps
    t0 = time.time()
    setup = demo.prepare(cfg, print)
    methods = {method(loss, s): ("topk", ["--loss", loss, *flags]) for loss in LOSSES for s, flags in SETTINGS.items()}
    longs = {method(loss, s, args.long_steps): ("topk", ["--loss", loss, *SETTINGS[s]]) for loss in LOSSES for s in LONG}
    print(f"training {len(methods)} x {cfg.seeds} students of {cfg.student_steps} steps and {len(longs)} x {cfg.seeds} "
          f"of {args.long_steps}", flush=True)
    demo.train_students(setup, methods)
    demo.train_students(setup, longs, steps=args.long_steps)
    setup.jobs.shutdown()
    scores = demo.score_students(setup, [*methods, *longs])
    res: dict = {"bench": "ablation", "seeds": cfg.seeds, "steps": cfg.student_steps, "long_steps": args.long_steps,
                 "batch_tokens": cfg.batch_tokens, "rows": {}}
    for name, per_seed in scores.items():
        loss = next(k for k, v in LOSSES.items() if name.startswith(v))
        long = args.long_steps if name.endswith(" steps") else None
        base = method(loss, "base", long)
        row: dict = {}
        for m in METRICS:
            xs = [getattr(s, m) for s in per_seed]
            row[m] = {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0, "seeds": xs}
            if name != base:
                row[m]["vs_base"] = paired(xs, [getattr(s, m) for s in scores[base]])
        logs = [diagnostics(setup.out / f"seed{s}" / demo.slug(name) / "train_log.jsonl") for s in range(cfg.seeds)]
        row["adakd"] = {k: (statistics.fmean(v) if (v := [d[k] for d in logs if d[k] is not None]) else None)
                        for k in logs[0]}
        res["rows"][name] = row
    res["seconds"] = round(time.time() - t0, 1)
    return res


def _fmt(x: dict, pct: bool) -> str:
    f = (lambda v: f"{100 * v:.1f}") if pct else (lambda v: f"{v:.3f}")
    cell = f"{f(x['mean'])} ± {f(x['sd'])}"
    vs = x.get("vs_base")
    if vs and vs["ci95"]:
        lo, hi = vs["ci95"]
        cell += f" ({'+' if vs['mean'] >= 0 else ''}{f(vs['mean'])} [{f(lo)}, {f(hi)}])"
    return cell


def table(res: dict) -> str:
    lines = [f"Students from the demo's start, {res['steps']} steps of `--batch-tokens {res['batch_tokens']}` (packed), "
             f"{res['seeds']} seeds; mean ± sd, and in brackets the paired difference from the same loss's base (same "
             "seeds) with its 95% t-interval. IDTS columns: share of distilled positions at saturated temperatures "
             "(|tanh| > 0.9) and mean temperature of the positions harder than the median, averaged over steps; LATF: "
             "its final ratio and the first step it narrowed.", "",
             "| setting | valid answers (%) | TV to the truth | exact match (%) | IDTS saturated / T of harder | "
             "LATF final r (narrowed at) |", "| --- | --- | --- | --- | --- | --- |"]
    for name, r in res["rows"].items():
        a = r["adakd"]
        idts = f"{a['saturated']:.0%} / {a['temp_hard']:.2f}" if a["temp_hard"] is not None else ""
        latf = f"{a['final_ratio']:.2f}" + (f" ({a['narrowed_at']:.0f})" if a["narrowed_at"] else "")
        lines.append(f"| {name} | {_fmt(r['valid'], True)} | {_fmt(r['distance'], False)} | "
                     f"{_fmt(r['exact_match'], True)} | {idts} | {latf} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--long-steps", type=int, default=900)
    ap.add_argument("--out", default="runs/ablation")
    ap.add_argument("--quick", action="store_true", help="the demo's --fast task and students (seconds; for tests)")
    ap.add_argument("--docs", action="store_true", help="write the table into docs/train-student.md")
    args = ap.parse_args()
    res = run(args)
    text = table(res)
    print(text)
    if args.docs:
        replace_block(Path(__file__).resolve().parents[1] / "docs" / "train-student.md", BEGIN, END, text,
                      "## What AdaKD does to a run")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
