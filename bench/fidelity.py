"""Cache fidelity: what training from a top-k cache costs against the live teacher's exact distribution.

    python -m bench.fidelity [--quick] [--seeds 3] [--jobs 2] [--steps N] [--out runs/fidelity] [--reuse] [--docs]

The same student (same initial weights, same data order, same steps, same loss and AdaKD settings), per
seed, trained by `train-student` from the live teacher (`--live-teacher`: its exact distribution over the
whole vocabulary) and from `cache-teacher` caches of that teacher at k = 8, 16 and 64, then scored on
held-out data against the live teacher with `trainer.teacher_eval.evaluate_teacher` (exact
full-vocabulary KL(teacher || student) and NLL of the true tokens; the function behind
`adakd eval --teacher`).

- Teacher: ../shared/models/stories260K (vocabulary 512). Two regimes: `sharp`, on TinyStories (its
  pretraining domain: top-1 probability 0.63), train.jsonl -> test.jsonl; `flat`, on dolly (top-1 0.41),
  a train subset -> a dev subset.
- Every configuration: base divergence fkl or rkl, with and without AdaKD, from a random init (the
  teacher's config with fewer layers) or from a short cross-entropy-trained start shared by all runs
  of the regime (`train-student --kd-weight 0`, its final/ is then every run's --student).
- Pairing: all caches of a regime are made from the same records with the same shard layout, so a seed
  gives the same data order whichever cache (or the live teacher, which takes its tokens from one of
  them) a run reads; the initial weights depend on the seed (random init) or are the shared start.
- Per configuration and k: the paired differences cache minus live per seed of held-out KL and NLL, their
  mean and 95% t-interval over seeds; the mean absolute per-step gap between the KD-loss trajectories;
  the cache's bytes per trained position (manifest) and mean top-k mass; training wall time relative to live.

The table goes to stdout and OUT/results.md, the plot to OUT/fidelity.png (`--docs`: the block between
the bench.fidelity markers of docs/results.md and docs/img/fidelity.png). The last line printed is one
JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' per-load bars, as the CLI does

from bench.common import SHARED, paired, replace_block, save_figure, t_cdf, t_quantile  # noqa: E402,F401
from adakd.demo import bin_, run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEACHER = SHARED / "models" / "stories260K"
TARGET = 0.01  # nats: |d_kl| and |d_nll| at k = 64 in the sharp regime


@dataclass(frozen=True)
class Regime:
    name: str
    train: str
    heldout: str
    what: str


REGIMES = {
    "sharp": Regime("sharp", str(SHARED / "data" / "tinystories" / "train.jsonl"),
                    str(SHARED / "data" / "tinystories" / "test.jsonl"), "TinyStories train -> test"),
    "flat": Regime("flat", str(SHARED / "data" / "dolly" / "train.jsonl"), str(SHARED / "data" / "dolly" / "dev.jsonl"),
                   "dolly train subset -> dev subset"),
}


@dataclass
class FidelityConfig:
    out: str = "runs/fidelity"
    regimes: tuple[str, ...] = ("sharp", "flat")
    ks: tuple[int, ...] = (8, 16, 64)
    sampled: tuple[str, ...] = ()  # sampled and hybrid caches: "s64" (N = 64 draws), "h8+32" (top-8 + 32 draws)
    losses: tuple[str, ...] = ("fkl", "rkl")
    adakd: tuple[bool, ...] = (False, True)
    inits: tuple[str, ...] = ("random", "ce")
    seeds: int = 3
    steps: int = 40
    batch_tokens: int = 2048
    lr: float = 3e-3
    student_layers: int = 2  # the teacher's config (5 layers) with fewer
    ce_steps: int = 60  # the cross-entropy start
    train_records: int | None = 300  # records cached per regime (all k alike)
    heldout_records: int | None = 120
    eval_positions: int | None = 8192  # held-out trained positions scored per student
    jobs: int = 2
    reuse: bool = False
    quick: bool = False

    @classmethod
    def quick_config(cls, out: str = "runs/fidelity-quick") -> "FidelityConfig":
        """The CI smoke: one regime, one k, one loss with AdaKD, both inits, 2 seeds, a few steps."""
        return cls(out=out, regimes=("sharp",), ks=(16,), losses=("fkl",), adakd=(True,), seeds=2, steps=6,
                   ce_steps=6, train_records=40, heldout_records=12, eval_positions=1024, quick=True)

    def configurations(self) -> list[tuple[str, str, bool]]:
        return [(init, loss, ada) for init in self.inits for loss in self.losses for ada in self.adakd]

    def cache_sources(self) -> list[str]:
        return [f"k{k}" for k in self.ks] + list(self.sampled)


def cache_args(source: str) -> list[str]:
    """cache-teacher's target options for a source name: k64, s64 (sampled, N = 64), h8+32 (hybrid)."""
    if source.startswith("k"):
        return ["--top-k", source[1:]]
    if source.startswith("s"):
        return ["--targets", "sampled", "--samples", source[1:]]
    k, n = source[1:].split("+")
    return ["--targets", "hybrid", "--top-k", k, "--samples", n]


# ---------------------------------------------------------------- statistics


def trajectory_gap(cache_log: list[dict], live_log: list[dict], key: str = "kd") -> float:
    """Mean over the steps both logged of |cache - live| of the per-step training loss `key`."""
    a = {r["step"]: r[key] for r in cache_log}
    b = {r["step"]: r[key] for r in live_log}
    steps = sorted(a.keys() & b.keys())
    return statistics.fmean(abs(a[s] - b[s]) for s in steps) if steps else math.nan


def summarize(runs: list[dict], cfg: FidelityConfig, caches: dict) -> list[dict]:
    """One row per (regime, configuration, k): paired differences over seeds, trajectory gap, size, time."""
    by = {(r["regime"], r["init"], r["loss"], r["adakd"], r["source"], r["seed"]): r for r in runs}
    rows = []
    for regime in cfg.regimes:
        for init, loss, ada in cfg.configurations():
            seeds = [s for s in range(cfg.seeds) if (regime, init, loss, ada, "live", s) in by]
            live = [by[(regime, init, loss, ada, "live", s)] for s in seeds]
            for src in cfg.cache_sources():
                k = int(src[1:]) if src.startswith("k") else src
                cached = [by.get((regime, init, loss, ada, src, s)) for s in seeds]
                if not seeds or None in cached:
                    continue
                dk = paired([r["kl"] for r in cached], [r["kl"] for r in live])
                dn = paired([r["nll"] for r in cached], [r["nll"] for r in live])
                dr = paired([r["rkl"] for r in cached], [r["rkl"] for r in live])
                gaps = [trajectory_gap(c["log"], l["log"]) for c, l in zip(cached, live)]
                info = caches[regime][src] if src in caches[regime] else caches[regime][k]  # by name, or by k
                rows.append({
                    "regime": regime, "k": k, "source": src, "loss": loss, "adakd": ada, "init": init, "seeds": len(seeds),
                    "kl_live": statistics.fmean(r["kl"] for r in live), "kl_cache": statistics.fmean(r["kl"] for r in cached),
                    "d_kl": dk["mean"], "d_kl_ci95": dk["ci95"], "d_kl_seeds": dk["diffs"],
                    "nll_live": statistics.fmean(r["nll"] for r in live), "nll_cache": statistics.fmean(r["nll"] for r in cached),
                    "d_nll": dn["mean"], "d_nll_ci95": dn["ci95"], "d_nll_seeds": dn["diffs"],
                    "d_rkl": dr["mean"], "d_rkl_ci95": dr["ci95"],
                    "loss_gap": statistics.fmean(gaps), "kd_live_final": statistics.fmean(r["log"][-1]["kd"] for r in live),
                    "bytes_per_position": info["bytes_per_position"], "topk_mass": info["topk_mass"],
                    "time_vs_live": statistics.fmean(c["train_seconds"] / l["train_seconds"] for c, l in zip(cached, live)),
                })
    return rows


def within(ci: list[float] | None, x: float = 0.0) -> bool | None:
    return None if ci is None else ci[0] <= x <= ci[1]


def targets(rows: list[dict]) -> dict:
    """The sharp regime at k = 64: |d_kl| and |d_nll| <= 0.01 nats, and zero inside the seed interval."""
    sel = [r for r in rows if r["regime"] == "sharp" and r["source"] == "k64"]
    checks = [{"init": r["init"], "loss": r["loss"], "adakd": r["adakd"],
               "abs_ok": abs(r["d_kl"]) <= TARGET and abs(r["d_nll"]) <= TARGET,
               "zero_in_ci": bool(within(r["d_kl_ci95"]) and within(r["d_nll_ci95"]))} for r in sel]
    return {"configurations": len(checks), "abs_within_0.01": sum(c["abs_ok"] for c in checks),
            "zero_in_both_ci95": sum(c["zero_in_ci"] for c in checks),
            "met": bool(checks) and all(c["abs_ok"] for c in checks), "checks": checks}


# ---------------------------------------------------------------- the real commands


def student_config(out: Path, layers: int) -> Path:
    cfg = json.loads((TEACHER / "config.json").read_text())
    cfg.update(num_hidden_layers=layers)
    out.write_text(json.dumps(cfg))
    return out


def make_cache(data: str, out: Path, source: str, limit: int | None, log, threads: int, reuse: bool) -> None:
    if reuse and any(out.glob("manifest-*.json")):
        from adakd.storage import CacheReader

        if CacheReader(str(out)).manifest.complete:
            return
    shutil.rmtree(out, ignore_errors=True)
    cmd = [bin_("cache-teacher"), "--teacher", str(TEACHER), "--data", data, "--out", str(out), *cache_args(source),
           "--engine", "hf", "--no-progress"]
    run(cmd + (["--limit", str(limit)] if limit else []), log, threads)


def cache_info(cache: Path) -> dict:
    from adakd.storage import summarize as summarize_cache

    s = summarize_cache(str(cache))
    t = s.totals
    return {"bytes_per_position": t["bytes"] / max(t["positions"], 1), "positions": t["positions"], "tokens": t["tokens"],
            "sequences": t["sequences"], "topk_mass": float(s.topk_mass.mean()), "top1_prob": float(s.top1_prob.mean()),
            "layout": [(e.rows, e.positions, e.blocks, e.records) for e in s.manifest.shards]}


def train(cache: Path, student: Path, out: Path, seed: int, cfg: FidelityConfig, extra: list[str], log, threads: int,
          steps: int | None = None) -> float:
    if out.exists():
        shutil.rmtree(out)
    t0 = time.time()
    run([bin_("train-student"), "--cache", str(cache), "--student", str(student), "--out", str(out), "--max-steps",
         str(steps or cfg.steps), "--batch-tokens", str(cfg.batch_tokens), "--lr", str(cfg.lr), "--seed", str(seed),
         "--no-progress", *extra], log, threads)
    return time.time() - t0


def read_log(out: Path) -> list[dict]:
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    return list({r["step"]: r for r in rows}.values())


def evaluate(model: Path, heldout: Path, cfg: FidelityConfig) -> dict:
    from adakd.trainer.teacher_eval import evaluate_teacher

    return evaluate_teacher(str(model), str(TEACHER), cache=str(heldout), max_positions=cfg.eval_positions)


def slug(init: str, loss: str, ada: bool) -> str:
    return f"{init}-{loss}-{'adakd' if ada else 'plain'}"


def one_run(regime: str, init: str, loss: str, ada: bool, seed: int, source: str, root: Path, cfg: FidelityConfig,
            log, threads: int) -> dict:
    r_dir = root / regime
    d = r_dir / "runs" / slug(init, loss, ada) / f"seed{seed}" / source
    done = d / "result.json"
    if cfg.reuse and done.exists():
        return json.loads(done.read_text())
    student = root / "student.json" if init == "random" else r_dir / "ce-start" / "final"
    extra = ["--loss", loss, "--adakd" if ada else "--no-adakd"]
    if source == "live":
        cache = r_dir / f"cache-k{max(cfg.ks)}"  # tokens, positions and order only: the targets are the teacher's
        extra += ["--live-teacher", str(TEACHER)]
    else:
        cache = r_dir / f"cache-{source}"
    seconds = train(cache, student, d, seed, cfg, extra, log, threads)
    res = evaluate(d / "final", r_dir / "cache-heldout", cfg)
    r = {"regime": regime, "init": init, "loss": loss, "adakd": ada, "seed": seed, "source": source,
         "train_seconds": seconds, **{k: res[k] for k in ("positions", "kl", "rkl", "nll", "teacher_nll", "top1_agreement")},
         "log": [{"step": x["step"], "kd": x["kd"], "latf_ratio": x["latf_ratio"]} for x in read_log(d)]}
    done.write_text(json.dumps(r))
    log(f"  {regime} {slug(init, loss, ada)} seed {seed} {source:>4}: held-out KL {r['kl']:.4f}  NLL {r['nll']:.4f}  "
        f"({seconds:.0f} s)")
    return r


# ---------------------------------------------------------------- report


def _ci(ci: list[float] | None, p: int = 4) -> str:
    return "n/a" if ci is None else f"[{ci[0]:+.{p}f}, {ci[1]:+.{p}f}]"


def markdown(rows: list[dict]) -> str:
    lines = ["| regime | init | loss | AdaKD | k | top-k mass | B/pos | KL live | d_KL (cache - live) [95% CI] | "
             "d_NLL [95% CI] | KD-loss gap | time vs live |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(
            f"| {r['regime']} | {r['init']} | {r['loss']} | {'yes' if r['adakd'] else 'no'} | {r['k']} | "
            f"{r['topk_mass']:.4f} | {r['bytes_per_position']:.1f} | {r['kl_live']:.4f} | {r['d_kl']:+.4f} "
            f"{_ci(r['d_kl_ci95'])} | {r['d_nll']:+.4f} {_ci(r['d_nll_ci95'])} | {r['loss_gap']:.4f} | "
            f"{r['time_vs_live']:.2f}x |")
    return "\n".join(lines)


def by_k(rows: list[dict], cfg: FidelityConfig) -> str:
    """Per regime and k, over the configurations: the mean and the largest |d_kl|, |d_nll|, and how many
    configurations have both within 0.01 nats and zero inside both intervals."""
    lines = ["| regime | k | configurations | mean d_KL | max abs d_KL | mean d_NLL | max abs d_NLL | both within 0.01 | "
             "0 in both CIs |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for regime in cfg.regimes:
        for k in cfg.ks:
            sel = [r for r in rows if r["regime"] == regime and r["source"] == f"k{k}"]
            if not sel:
                continue
            ok = sum(abs(r["d_kl"]) <= TARGET and abs(r["d_nll"]) <= TARGET for r in sel)
            zero = sum(bool(within(r["d_kl_ci95"]) and within(r["d_nll_ci95"])) for r in sel)
            lines.append(f"| {regime} | {k} | {len(sel)} | {statistics.fmean(r['d_kl'] for r in sel):+.4f} | "
                         f"{max(abs(r['d_kl']) for r in sel):.4f} | {statistics.fmean(r['d_nll'] for r in sel):+.4f} | "
                         f"{max(abs(r['d_nll']) for r in sel):.4f} | {ok}/{len(sel)} | {zero}/{len(sel)} |")
    return "\n".join(lines)


def sampled_vs_topk(rows: list[dict], cfg: FidelityConfig) -> str:
    """Sampled and hybrid caches against top-k at no fewer bytes per position: is each within the seed interval of
    the live teacher (zero inside both the d_KL and the d_NLL 95% intervals), per regime and configuration?"""
    if not cfg.sampled:
        return ""
    lines = ["Sampled and hybrid caches against top-k (per configuration; 'live-like': zero inside both 95% "
             "intervals of the paired differences from the live teacher):", "",
             "| regime | init | loss | AdaKD | cache | B/pos | d_KL [95% CI] | d_NLL [95% CI] | live-like | top-k caches "
             "with no more bytes that are live-like |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in (r for r in rows if not r["source"].startswith("k")):
        peers = [p for p in rows if p["source"].startswith("k") and (p["regime"], p["init"], p["loss"], p["adakd"]) ==
                 (r["regime"], r["init"], r["loss"], r["adakd"]) and p["bytes_per_position"] <= r["bytes_per_position"]]
        like = bool(within(r["d_kl_ci95"]) and within(r["d_nll_ci95"]))
        peer_like = [p["source"] for p in peers if within(p["d_kl_ci95"]) and within(p["d_nll_ci95"])]
        lines.append(f"| {r['regime']} | {r['init']} | {r['loss']} | {'yes' if r['adakd'] else 'no'} | {r['source']} | "
                     f"{r['bytes_per_position']:.1f} | {r['d_kl']:+.4f} {_ci(r['d_kl_ci95'])} | {r['d_nll']:+.4f} "
                     f"{_ci(r['d_nll_ci95'])} | {'yes' if like else 'no'} | "
                     f"{', '.join(peer_like) if peer_like else ('none of ' + ', '.join(p['source'] for p in peers)) if peers else 'no top-k cache is that small'} |")
    return "\n".join(lines)


def plot(rows: list[dict], cfg: FidelityConfig, path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, len(cfg.regimes), figsize=(6.5 * len(cfg.regimes), 8), squeeze=False)
    confs = cfg.configurations()
    for j, regime in enumerate(cfg.regimes):
        for i, (key, label) in enumerate((("d_kl", "held-out KL(teacher || student)"), ("d_nll", "held-out NLL"))):
            a = ax[i][j]
            for c, (init, loss, ada) in enumerate(confs):
                sel = sorted((r for r in rows if (r["regime"], r["init"], r["loss"], r["adakd"]) == (regime, init, loss, ada)
                              and r["source"].startswith("k")), key=lambda r: r["k"])
                if not sel:
                    continue
                x = [math.log2(r["k"]) + 0.09 * (c - (len(confs) - 1) / 2) for r in sel]
                y = [r[key] for r in sel]
                err = [[r[key] - (r[f"{key}_ci95"] or [r[key]] * 2)[0] for r in sel],
                       [(r[f"{key}_ci95"] or [r[key]] * 2)[1] - r[key] for r in sel]]
                a.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=3, lw=1,
                           ls="-" if init == "random" else "--", label=f"{init} {loss}{' AdaKD' if ada else ''}")
            a.axhline(0, color="k", lw=0.8)
            a.axhspan(-TARGET, TARGET, color="#88cc88", alpha=0.25, lw=0)
            a.set_xticks([math.log2(k) for k in cfg.ks], [str(k) for k in cfg.ks])
            a.set(xlabel="k (cached top-k)", ylabel=f"cache - live: {label} (nats)",
                  title=f"{regime}: {REGIMES[regime].what}")
            a.set_yscale("symlog", linthresh=0.01)
        ax[0][j].legend(fontsize=6, ncol=2, loc="best")
    fig.suptitle(f"paired differences over {cfg.seeds} seeds, 95% t-intervals; band: +-{TARGET} nats")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_bytes(rows: list[dict], cfg: FidelityConfig, path: Path) -> str:
    """With sampled/hybrid caches: each cache's paired difference from live against its bytes per position."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, len(cfg.regimes), figsize=(6.5 * len(cfg.regimes), 8), squeeze=False)
    styles = {"k": ("top-k", "o", "#3366aa"), "s": ("sampled", "s", "#cc5533"), "h": ("hybrid", "^", "#339955")}
    for j, regime in enumerate(cfg.regimes):
        for i, (key, label) in enumerate((("d_kl", "held-out KL(teacher || student)"), ("d_nll", "held-out NLL"))):
            a = ax[i][j]
            for c, (init, loss, ada) in enumerate(cfg.configurations()):
                for kind, (name, marker, color) in styles.items():
                    sel = sorted((r for r in rows if (r["regime"], r["init"], r["loss"], r["adakd"]) == (regime, init, loss, ada)
                                  and r["source"].startswith(kind)), key=lambda r: r["bytes_per_position"])
                    if not sel:
                        continue
                    err = [[r[key] - (r[f"{key}_ci95"] or [r[key]] * 2)[0] for r in sel],
                           [(r[f"{key}_ci95"] or [r[key]] * 2)[1] - r[key] for r in sel]]
                    a.errorbar([r["bytes_per_position"] for r in sel], [r[key] for r in sel], yerr=err, marker=marker,
                               color=color, ms=5, capsize=3, lw=1, ls="-" if c == 0 else "--",
                               label=f"{name}, {init} {loss}{' AdaKD' if ada else ''}")
                    for r in sel:
                        a.annotate(r["source"], (r["bytes_per_position"], r[key]), fontsize=7, xytext=(3, 3),
                                   textcoords="offset points")
            a.axhline(0, color="k", lw=0.8)
            a.set_xscale("log")
            a.set(xlabel="cache bytes per trained position", ylabel=f"cache - live: {label} (nats)",
                  title=f"{regime}: {REGIMES[regime].what}")
        ax[0][j].legend(fontsize=6, loc="best")
    fig.suptitle(f"paired differences from the live teacher over {cfg.seeds} seeds, 95% t-intervals")
    fig.tight_layout()
    return save_figure(fig, path)


BEGIN, END = "<!-- bench.fidelity:begin -->", "<!-- bench.fidelity:end -->"
SAMPLED_BEGIN, SAMPLED_END = "<!-- bench.fidelity-sampled:begin -->", "<!-- bench.fidelity-sampled:end -->"


def write_docs(body: str, path: Path, sampled: bool = False) -> None:
    """A run with sampled or hybrid caches has its own block (and plot), beside the top-k study's."""
    if sampled:
        replace_block(path, SAMPLED_BEGIN, SAMPLED_END, body.replace("img/fidelity.png", "img/fidelity-sampled.png"),
                      "## Cache fidelity: sampled and hybrid caches against top-k and the live teacher")
    else:
        replace_block(path, BEGIN, END, body, '## Cache fidelity: top-k caches against the live teacher')


# ---------------------------------------------------------------- main


def fidelity(cfg: FidelityConfig, command: str, docs: bool = False) -> dict:
    import torch

    torch.set_num_threads(1)  # the in-process evaluations: one core each, beside the other job
    root = Path(cfg.out)
    if not cfg.reuse and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    def log(msg: str) -> None:
        print(msg, flush=True)

    threads = max(1, (os.cpu_count() or 1) // cfg.jobs)
    student_config(root / "student.json", cfg.student_layers)
    stamp = {}
    pool = ThreadPoolExecutor(cfg.jobs)
    try:
        t0 = time.time()
        jobs = []
        for name in cfg.regimes:
            reg = REGIMES[name]
            (root / name).mkdir(exist_ok=True)
            jobs += [(reg.train, root / name / f"cache-{src}", src, cfg.train_records) for src in cfg.cache_sources()]
            jobs.append((reg.heldout, root / name / "cache-heldout", "k8", cfg.heldout_records))
        log(f"[1/4] cache-teacher x {len(jobs)}: k = {', '.join(map(str, cfg.ks))} per regime on its first "
            f"{cfg.train_records or 'all'} training records, and a held-out cache ({cfg.jobs} at a time)")
        list(pool.map(lambda j: make_cache(*j, log, threads, cfg.reuse), jobs))
        caches = {}
        for name in cfg.regimes:
            caches[name] = {src: cache_info(root / name / f"cache-{src}") for src in cfg.cache_sources()}
            layouts = {json.dumps(c["layout"]) for c in caches[name].values()}
            if len(layouts) != 1:  # different layouts would give different data orders: no pairing
                raise RuntimeError(f"{name}: the caches of different k have different shard layouts; pairing needs one")
            caches[name]["heldout"] = cache_info(root / name / "cache-heldout")
            for src in cfg.cache_sources():
                log(f"  {name} {src}: {caches[name][src]['positions']:,} positions, mean stored mass "
                    f"{caches[name][src]['topk_mass']:.4f}, {caches[name][src]['bytes_per_position']:.1f} bytes/position")
        stamp["caches_s"] = time.time() - t0
        t0 = time.time()
        if "ce" in cfg.inits:
            log(f"[2/4] the cross-entropy start: train-student --kd-weight 0, {cfg.ce_steps} steps, per regime")

            def ce_start(name: str) -> None:
                final = root / name / "ce-start" / "final"
                if cfg.reuse and (final / "model.safetensors").exists():
                    return
                train(root / name / f"cache-k{max(cfg.ks)}", root / "student.json", root / name / "ce-start", 1000, cfg,
                      ["--kd-weight", "0", "--no-adakd"], log, threads, steps=cfg.ce_steps)

            list(pool.map(ce_start, cfg.regimes))
        stamp["ce_start_s"] = time.time() - t0
        t0 = time.time()
        sources = ["live"] + cfg.cache_sources()
        tasks = [(name, init, loss, ada, seed, src) for name in cfg.regimes for seed in range(cfg.seeds)
                 for init, loss, ada in cfg.configurations() for src in sources]
        log(f"[3/4] train-student x {len(tasks)} ({len(cfg.configurations())} configurations x {len(sources)} sources "
            f"x {cfg.seeds} seeds x {len(cfg.regimes)} regimes; {cfg.steps} steps of {cfg.batch_tokens} tokens), each "
            "then scored against the live teacher on held-out data")
        runs = list(pool.map(lambda t: one_run(*t, root, cfg, log, threads), tasks))
        stamp["runs_s"] = time.time() - t0
    finally:
        pool.shutdown()
    teacher = {name: {"nll": statistics.fmean(r["teacher_nll"] for r in runs if r["regime"] == name),
                      "positions": next(r["positions"] for r in runs if r["regime"] == name),
                      "heldout_topk8_mass": caches[name]["heldout"]["topk_mass"]} for name in cfg.regimes}
    rows = summarize(runs, cfg, caches)
    goal = targets(rows)
    minutes = (time.time() - t_start) / 60
    timing_file = root / "timing.json"
    if cfg.reuse and timing_file.exists():  # a re-report: the figures of the run that did the work
        timing = json.loads(timing_file.read_text())
        minutes, stamp, command = timing["minutes"], timing["stages_s"], timing["command"]
    elif not cfg.reuse:
        timing_file.write_text(json.dumps({"minutes": minutes, "stages_s": stamp, "command": command}))
    table = markdown(rows)
    summary = by_k(rows, cfg)
    equal_bytes = sampled_vs_topk(rows, cfg)
    log("[4/4] report")
    body = "\n\n".join([
        f"Command: `{command}` ({minutes:.0f} min wall on {os.cpu_count()} CPU cores, {cfg.jobs} jobs at a time). "
        f"Teacher stories260K (vocabulary 512); student: its config with {cfg.student_layers} of 5 layers; "
        f"{cfg.steps} steps of {cfg.batch_tokens} padded tokens, lr {cfg.lr}; CE start: {cfg.ce_steps} steps of "
        f"`--kd-weight 0`; caches of the first {cfg.train_records or 'all'} training records; scored on the first "
        f"{cfg.eval_positions or 'all'} trained positions of the first {cfg.heldout_records or 'all'} held-out records "
        f"(teacher NLL there: " + ", ".join(f"{n} {t['nll']:.3f}" for n, t in teacher.items()) + f"); {cfg.seeds} seeds, "
        "paired (same initial weights and data order per seed).",
        "Per regime and k, over the configurations:\n\n" + summary,
        *([equal_bytes] if equal_bytes else []),
        "Every configuration (d = cache minus live, mean over seeds, 95% t-interval; KD-loss gap: mean over steps "
        "of |KD loss from the cache - KD loss from the live teacher|; time: train-student wall time, cache / live):\n\n"
        + table,
        f"Target (sharp, k = 64: |d_KL| and |d_NLL| <= {TARGET} nats): {goal['abs_within_0.01']}/{goal['configurations']} "
        f"configurations; zero inside both intervals: {goal['zero_in_both_ci95']}/{goal['configurations']}.",
        "![fidelity](img/fidelity.png)",
    ])
    (root / "results.md").write_text(body.replace("img/fidelity.png", "fidelity.png") + "\n")
    draw = plot_bytes if cfg.sampled else plot
    draw(rows, cfg, root / "fidelity.png")
    if docs:
        draw(rows, cfg, ROOT / "docs" / "img" / ("fidelity-sampled.png" if cfg.sampled else "fidelity.png"))
        write_docs(body, ROOT / "docs" / "results.md", sampled=bool(cfg.sampled))
    print()
    print(summary)
    print()
    if equal_bytes:
        print(equal_bytes)
        print()
    print(table)
    print(f"\ntarget (sharp, k = 64, |d| <= {TARGET}): {goal['abs_within_0.01']}/{goal['configurations']}; "
          f"{minutes:.1f} min; {root}/results.md")
    slim = [{k: v for k, v in r.items() if not k.endswith("_seeds")} | {"d_kl_seeds": r["d_kl_seeds"],
                                                                       "d_nll_seeds": r["d_nll_seeds"]} for r in rows]
    return {"bench": "fidelity", "minutes": round(minutes, 1), "stages_s": stamp,
            "config": {**asdict(cfg), "teacher": str(TEACHER)},
            "caches": {n: {str(k): {kk: vv for kk, vv in v.items() if kk != "layout"} for k, v in c.items()}
                       for n, c in caches.items()},
            "teacher": teacher, "target": goal, "results": slim}


def _csv(text: str, cast=str) -> tuple:
    return tuple(cast(x.strip()) for x in text.split(",") if x.strip())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI smoke: sharp regime, k = 16, fkl + AdaKD, 2 seeds, 6 steps")
    ap.add_argument("--out", default=None)
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--jobs", type=int, default=None, help="runs at a time")
    ap.add_argument("--steps", type=int, default=None, help="train-student steps per run")
    ap.add_argument("--batch-tokens", type=int, default=None)
    ap.add_argument("--ce-steps", type=int, default=None)
    ap.add_argument("--train-records", type=int, default=None, help="records cached per regime (0: all)")
    ap.add_argument("--eval-positions", type=int, default=None, help="held-out positions scored per student (0: all)")
    ap.add_argument("--regimes", default=None, help="comma-separated: sharp, flat")
    ap.add_argument("--ks", default=None, help="comma-separated k values, e.g. 8,16,64")
    ap.add_argument("--sampled", default=None, help="comma-separated sampled/hybrid caches, e.g. s64,h8+32")
    ap.add_argument("--adakd", default=None, help="comma-separated: on, off")
    ap.add_argument("--losses", default=None, help="comma-separated: fkl, rkl")
    ap.add_argument("--inits", default=None, help="comma-separated: random, ce")
    ap.add_argument("--reuse", action="store_true", help="reuse the caches, CE start and finished runs in --out")
    ap.add_argument("--docs", action="store_true", help="also write docs/results.md's fidelity block and docs/img/fidelity.png")
    a = ap.parse_args(argv)
    cfg = FidelityConfig.quick_config() if a.quick else FidelityConfig()
    over = {k: v for k, v in {"out": a.out, "seeds": a.seeds, "jobs": a.jobs, "steps": a.steps,
                              "batch_tokens": a.batch_tokens, "ce_steps": a.ce_steps}.items() if v is not None}
    if a.train_records is not None:
        over["train_records"] = a.train_records or None
    if a.eval_positions is not None:
        over["eval_positions"] = a.eval_positions or None
    for name, cast, allowed in (("regimes", str, set(REGIMES)), ("ks", int, None), ("losses", str, {"fkl", "rkl"}),
                                ("inits", str, {"random", "ce"})):
        text = getattr(a, name)
        if text:
            values = _csv(text, cast)
            if allowed is not None and not set(values) <= allowed:
                ap.error(f"--{name}: choose from {sorted(allowed)}")
            over[name] = values
    if a.sampled:
        over["sampled"] = _csv(a.sampled, str)
        if not all(x[:1] in "sh" and x[1:].replace("+", "").isdigit() for x in over["sampled"]):
            ap.error("--sampled: names like s64 (sampled, N = 64) or h8+32 (hybrid: top-8 + 32 draws)")
    if a.adakd:
        modes = _csv(a.adakd, str)
        if not set(modes) <= {"on", "off"}:
            ap.error("--adakd: choose from on, off")
        over["adakd"] = tuple(m == "on" for m in modes)
    cfg = replace(cfg, reuse=a.reuse, **over)
    if cfg.seeds < 1 or cfg.jobs < 1 or cfg.steps < 1 or not cfg.ks or min(cfg.ks) < 1:
        ap.error("--seeds, --jobs, --steps and every k must be at least 1")
    command = "python -m bench.fidelity " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    print(json.dumps(fidelity(cfg, command.strip(), a.docs)))


if __name__ == "__main__":
    main()
