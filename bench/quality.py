"""Distillation quality on dolly: the AdaKD paper's comparison, at a scale this machine can run.

    python -m bench.quality [--preset cpu|gpu] [--seeds 3] [--jobs 2] [--out runs/quality] [--docs]

1. A byte-level BPE tokenizer trained on dolly's train split (../shared/data/dolly).
2. A teacher (Llama) fine-tuned on the train split's responses, here, with a plain loop.
3. `cache-teacher` once over the train split (k = 64) and once over dev, exactly as users run it.
4. `train-student` from that one cache, per method and seed, with a student several times smaller (random
   init): SFT, FKL, RKL, AdaKD over FKL and RKL, LATF only, IDTS only, and AdaKD over RKL against the
   teacher's full distribution computed live (`--live-teacher`), `--jobs` processes at a time.
5. `adakd eval` of the teacher and every student: NLL, KL(teacher || student) and top-1 agreement on the
   dev cache; ROUGE-L of greedy generations on test.jsonl.
6. A table (mean +- std over seeds) and plots in OUT/; `--docs` also writes them into docs/results.md.

Stages whose outputs exist are reused with `--reuse` (the teacher, caches and finished runs).
The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from bench.common import SHARED, replace_block, save_figure
from adakd.demo import bin_, run

ROOT = Path(__file__).resolve().parents[1]
TEACHER_TAG = "teacher"

# name -> train-student options (every method: the same cache, student, steps, data order per seed)
METHODS: dict[str, list[str]] = {
    "SFT (CE only)": ["--kd-weight", "0", "--no-adakd"],
    "FKL": ["--loss", "fkl", "--no-adakd"],
    "RKL": ["--loss", "rkl", "--no-adakd"],
    "AdaKD-FKL": ["--loss", "fkl", "--adakd"],
    "AdaKD-RKL": ["--loss", "rkl", "--adakd"],
    "LATF only (RKL)": ["--loss", "rkl", "--adakd", "--no-idts"],
    "IDTS only (RKL)": ["--loss", "rkl", "--adakd", "--no-latf"],
    "AdaKD-RKL with live teacher (no cache)": ["--loss", "rkl", "--adakd", "--live-teacher", "{teacher}"],
}


@dataclass
class Model:
    hidden: int
    layers: int

    def config(self, vocab: int, max_positions: int, tok) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
            "hidden_size": self.hidden, "intermediate_size": self.hidden * 8 // 3 // 16 * 16,
            "num_hidden_layers": self.layers, "num_attention_heads": max(1, self.hidden // 64),
            "num_key_value_heads": max(1, self.hidden // 64), "max_position_embeddings": max_positions,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True, "torch_dtype": "float32",
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
        }


@dataclass
class QualityConfig:
    out: str = "runs/quality"
    data: str = str(SHARED / "data" / "dolly")
    vocab: int = 4096
    max_length: int = 320
    teacher: Model = field(default_factory=lambda: Model(256, 4))
    teacher_epochs: float = 1.0
    teacher_batch_tokens: int = 8192
    teacher_lr: float = 1e-3
    student: Model = field(default_factory=lambda: Model(128, 2))
    train_records: int | None = 4000  # records in the cache (the teacher trains on the whole split)
    student_steps: int = 150
    student_batch_tokens: int = 4096
    student_lr: float = 2e-3
    top_k: int = 64
    seeds: int = 3
    methods: tuple[str, ...] = tuple(METHODS)
    test_limit: int | None = None  # all 500
    max_new_tokens: int = 128
    jobs: int = 2
    reuse: bool = False

    @classmethod
    def preset(cls, name: str) -> "QualityConfig":
        if name == "cpu":
            return cls()
        if name == "gpu":  # a GPU node: a bigger teacher and student, the whole split, more steps
            return cls(vocab=8192, max_length=512, teacher=Model(768, 12), teacher_epochs=3, teacher_batch_tokens=32768,
                       teacher_lr=6e-4, student=Model(256, 4), train_records=None, student_steps=2000,
                       student_batch_tokens=16384, student_lr=1e-3, seeds=3, jobs=1)
        raise ValueError(f"unknown preset {name!r}: cpu or gpu")


# ---------------------------------------------------------------- 1. tokenizer


def train_tokenizer(cfg: QualityConfig, out: Path):
    """Byte-level BPE on the train split's prompts and responses (pad, BOS, EOS as special tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rows = read_jsonl(Path(cfg.data) / "train.jsonl")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((r["prompt"] + r["output"] for r in rows), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(out)
    return fast


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------- 2. teacher


def tokenized(path: Path, tok, max_length: int):
    """The records as cache-teacher tokenizes them (same prompt handling, masks, truncation)."""
    from adakd.common.data import DataSpec, iter_records, load_dataset
    from adakd.common.tokens import RecordTokenizer, Tokenized

    spec = DataSpec(source=str(path))
    rt = RecordTokenizer(tok, max_length)
    return [t for r in iter_records(spec, load_dataset(spec)) if isinstance(t := rt(r), Tokenized)]


def length_batches(seqs: list, batch_tokens: int, rng: np.random.Generator) -> list[list]:
    """Shuffled batches of similar lengths (sorted within windows), each within a padded-token budget."""
    order = rng.permutation(len(seqs))
    out: list[list] = []
    for w in range(0, len(order), 1024):
        window = sorted((seqs[i] for i in order[w:w + 1024]), key=lambda s: len(s.input_ids))
        cur: list = []
        for s in window:
            if cur and len(s.input_ids) * (len(cur) + 1) > batch_tokens:
                out.append(cur)
                cur = []
            cur.append(s)
        if cur:
            out.append(cur)
    return [out[i] for i in rng.permutation(len(out))]


def train_teacher(cfg: QualityConfig, tok, out: Path, log: Callable[[str], None]) -> dict:
    """Cross-entropy on the responses of the whole train split: the teacher every student learns from."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)
    seqs = tokenized(Path(cfg.data) / "train.jsonl", tok, cfg.max_length)
    rng = np.random.default_rng(1234)
    plan = length_batches(seqs, cfg.teacher_batch_tokens, rng)
    steps = max(1, round(cfg.teacher_epochs * len(plan)))
    while len(plan) < steps:
        plan += length_batches(seqs, cfg.teacher_batch_tokens, rng)
    plan = plan[:steps]
    model = LlamaForCausalLM(LlamaConfig(**cfg.teacher.config(len(tok), cfg.max_length + cfg.max_new_tokens, tok)))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.teacher_lr, betas=(0.9, 0.95), weight_decay=0.01)
    warm = max(1, steps // 20)
    t0, tokens = time.time(), 0
    model.train()
    for step, batch in enumerate(plan):
        ids, mask, rows, cols, labels = _pack(batch)
        lr = cfg.teacher_lr * min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * step / steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[rows, cols]
        loss = torch.nn.functional.cross_entropy(model.lm_head(hidden), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(mask.sum())
        if step % 50 == 0 or step == steps - 1:
            log(f"  teacher step {step + 1}/{steps}: loss {loss.item():.3f}  ({tokens / (time.time() - t0):,.0f} tok/s)")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return {"steps": steps, "tokens": tokens, "seconds": time.time() - t0, "records": len(seqs)}


def _pack(batch: list):
    import torch

    T = max(len(s.input_ids) for s in batch)
    ids = torch.zeros((len(batch), T), dtype=torch.long)
    mask = torch.zeros_like(ids)
    rows, cols, labels = [], [], []
    for b, s in enumerate(batch):
        ids[b, : len(s.input_ids)] = torch.from_numpy(s.input_ids.astype(np.int64))
        mask[b, : len(s.input_ids)] = 1
        pos = np.nonzero(s.loss_mask)[0]
        rows += [b] * len(pos)
        cols += (pos - 1).tolist()
        labels += s.input_ids[pos].tolist()
    return ids, mask, torch.tensor(rows), torch.tensor(cols), torch.tensor(labels)


# ---------------------------------------------------------------- 3-5. the real commands


def cache_teacher(teacher: Path, data: Path, out: Path, cfg: QualityConfig, limit: int | None, log) -> None:
    cmd = [bin_("cache-teacher"), "--teacher", str(teacher), "--data", str(data), "--out", str(out), "--top-k",
           str(cfg.top_k), "--engine", "hf", "--max-length", str(cfg.max_length), "--no-progress"]
    run(cmd + (["--limit", str(limit)] if limit else []), log)


def evaluate(model: Path, dev_cache: Path, cfg: QualityConfig, seed: int, log, threads: int | None) -> dict:
    """`adakd eval`: dev-cache metrics, and ROUGE-L of responses sampled at T = 1 (MiniLLM / DistiLLM / AdaKD's
    protocol) on test; the JSON it prints last."""
    cmd = [bin_("adakd"), "eval", "--model", str(model), "--cache", str(dev_cache), "--data",
           str(Path(cfg.data) / "test.jsonl"), "--out-file", str(model / f"test_generations_seed{seed}.jsonl"),
           "--max-new-tokens", str(cfg.max_new_tokens), "--batch-size", "64", "--do-sample", "--seed", str(seed)]
    if cfg.test_limit:
        cmd += ["--limit", str(cfg.test_limit)]
    out = run(cmd, log, threads)
    r = json.loads(out.strip().splitlines()[-1])
    return {"nll": r["cache"]["nll"], "kl": r["cache"]["kl"], "top1": r["cache"]["top1_agreement"],
            "rougeL": r["generation"]["rougeL"], "exact_match": r["generation"]["exact_match"]}


def student_run(method: str, seed: int, root: Path, cfg: QualityConfig, log, threads: int) -> dict:
    d = root / "students" / slug(method) / f"seed{seed}"
    done = d / "result.json"
    if cfg.reuse and done.exists():
        return json.loads(done.read_text())
    if d.exists():
        shutil.rmtree(d)
    extra = [a.replace("{teacher}", str(root / TEACHER_TAG)) for a in METHODS[method]]
    t0 = time.time()
    run([bin_("train-student"), "--cache", str(root / "cache-train"), "--student", str(root / "student.json"),
         "--out", str(d), "--max-steps", str(cfg.student_steps), "--batch-tokens", str(cfg.student_batch_tokens),
         "--lr", str(cfg.student_lr), "--seed", str(seed), "--plot", "--no-progress", *extra], log, threads)
    seconds = time.time() - t0
    r = {"method": method, "seed": seed, "train_seconds": seconds,
         **evaluate(d / "final", root / "cache-dev", cfg, seed, log, threads)}
    done.write_text(json.dumps(r))
    log(f"  {method}, seed {seed}: ROUGE-L {r['rougeL']:.2f}  dev NLL {r['nll']:.3f}  KL {r['kl']:.3f}  ({seconds:.0f} s)")
    return r


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


# ---------------------------------------------------------------- 6. report


def summarize(results: list[dict], methods: tuple[str, ...]) -> dict[str, dict]:
    table = {}
    for m in methods:
        rs = [r for r in results if r["method"] == m]
        table[m] = {key: (statistics.mean(r[key] for r in rs), statistics.stdev(r[key] for r in rs) if len(rs) > 1 else 0.0)
                    for key in ("rougeL", "nll", "kl", "top1", "train_seconds")}
        table[m]["seeds"] = len(rs)
    return table


def markdown(table: dict[str, dict], teacher: dict, cfg: QualityConfig, info: dict) -> str:
    fmt = lambda v, p: f"{v[0]:.{p}f} ± {v[1]:.{p}f}"  # noqa: E731
    lines = ["| model | ROUGE-L (test) | NLL (dev) | KL(teacher‖student) (dev) | top-1 agreement (dev) | train s |",
             "| --- | --- | --- | --- | --- | --- |",
             f"| teacher ({cfg.teacher.hidden} x {cfg.teacher.layers}, {info['teacher_params'] / 1e6:.1f}M) | "
             f"{fmt(teacher['rougeL'], 2)} | {teacher['nll'][0]:.3f} | {teacher['kl'][0]:.4f} | {teacher['top1'][0]:.1%} | - |"]
    for m, t in table.items():
        lines.append(f"| {m} | {fmt(t['rougeL'], 2)} | {fmt(t['nll'], 3)} | {fmt(t['kl'], 3)} | "
                     f"{t['top1'][0]:.1%} ± {t['top1'][1]:.1%} | {t['train_seconds'][0]:.0f} |")
    return "\n".join(lines)


def plots(root: Path, table: dict[str, dict], teacher: dict, cfg: QualityConfig, dest: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    files = []
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.5))
    for a, key, label in zip(ax, ("rougeL", "nll", "kl"), ("ROUGE-L on test (higher is better)", "NLL on dev (lower is better)",
                                                            "KL(teacher || student) on dev (lower is better)")):
        a.barh(names, [table[m][key][0] for m in names], xerr=[table[m][key][1] for m in names], color="#3366aa")
        a.axvline(teacher[key][0], color="#aa3333", ls="--", label="teacher")
        a.set(title=label)
        a.invert_yaxis()
        a.legend(loc="lower right")
    for a in ax[1:]:
        a.set_yticklabels([])
    fig.tight_layout()
    files.append(save_figure(fig, dest / "quality_scores.png"))
    logs = {m: _log(root, m, 0) for m in names}
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.5))
    for m, rows in logs.items():
        key = "ce" if "SFT" in m else "kd"
        ax[0].plot([r["step"] for r in rows], [r[key] for r in rows], label=f"{m} ({key})")
        if "--adakd" in METHODS[m] and "--no-latf" not in METHODS[m]:
            ax[1].plot([r["step"] for r in rows], [r["latf_ratio"] for r in rows], label=m)
        hist = root / "students" / slug(m) / "seed0" / "temperatures.json"
        if "--adakd" in METHODS[m] and "--no-idts" not in METHODS[m] and hist.exists():
            h = json.loads(hist.read_text())
            c = np.asarray(h["counts"])
            ax[2].stairs(c / max(c.sum(), 1), h["edges"], label=m)
    ax[0].set(title="training loss (seed 0; each method its own loss)", xlabel="step", yscale="log")
    ax[1].set(title="LATF selection ratio (seed 0)", xlabel="step", ylim=(0, 1.05))
    ax[2].set(title="IDTS per-token temperatures (seed 0, all steps)", xlabel="T", ylabel="share of selected tokens")
    for a in ax:
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    fig.tight_layout()
    files.append(save_figure(fig, dest / "quality_training.png"))
    return files


def _log(root: Path, method: str, seed: int) -> list[dict]:
    path = root / "students" / slug(method) / f"seed{seed}" / "train_log.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    return list({r["step"]: r for r in rows}.values())


BEGIN, END = "<!-- bench.quality:begin -->", "<!-- bench.quality:end -->"


def write_docs(body: str, path: Path) -> None:
    replace_block(path, BEGIN, END, body, '')


# ---------------------------------------------------------------- main


def quality(cfg: QualityConfig, command: str, docs: bool) -> dict:
    root = Path(cfg.out)
    if not cfg.reuse and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    def log(msg: str) -> None:
        print(msg, flush=True)

    stamp = {}
    data = Path(cfg.data)
    teacher = root / TEACHER_TAG
    if not (teacher / "model.safetensors").exists():
        log(f"[1/5] tokenizer: byte-level BPE, {cfg.vocab} tokens, trained on {data / 'train.jsonl'}")
        tok = train_tokenizer(cfg, root / "tokenizer")
        log(f"[2/5] teacher: Llama {cfg.teacher.hidden} x {cfg.teacher.layers}, {cfg.teacher_epochs} epoch(s) of the train split")
        t0 = time.time()
        (root / "teacher_train.json").write_text(json.dumps(train_teacher(cfg, tok, teacher, log)))
        stamp["teacher_s"] = time.time() - t0
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(teacher)
    (root / "student.json").write_text(json.dumps(cfg.student.config(len(tok), cfg.max_length + cfg.max_new_tokens, tok)))
    t0 = time.time()
    for name, file, limit in (("cache-train", "train.jsonl", cfg.train_records), ("cache-dev", "dev.jsonl", None)):
        if not (cfg.reuse and (root / name / "manifest-00000.json").exists()):
            log(f"[3/5] cache-teacher over {file}" + (f" (first {limit} records)" if limit else ""))
            shutil.rmtree(root / name, ignore_errors=True)
            cache_teacher(teacher, data / file, root / name, cfg, limit, log)
    stamp["caches_s"] = time.time() - t0
    t0 = time.time()
    threads = max(1, (os.cpu_count() or 1) // cfg.jobs)
    log(f"[4/5] train-student x {len(cfg.methods) * cfg.seeds} ({cfg.seeds} seeds; {cfg.jobs} at a time, {threads} thread(s) each), "
        "each then `adakd eval`")
    tasks = [(m, s) for s in range(cfg.seeds) for m in cfg.methods]
    with ThreadPoolExecutor(cfg.jobs) as pool:
        teacher_evals = [pool.submit(_teacher_eval, teacher, root, cfg, s, log, threads) for s in range(cfg.seeds)]
        results = list(pool.map(lambda t: student_run(t[0], t[1], root, cfg, log, threads), tasks))
        teacher_r = summarize([{**f.result(), "method": "teacher", "train_seconds": 0.0} for f in teacher_evals], ("teacher",))["teacher"]
    stamp["students_s"] = time.time() - t0
    table = summarize(results, cfg.methods)
    info = {"teacher_params": _params(teacher), "student_params": _params(root / "students" / slug(cfg.methods[0]) / "seed0" / "final"),
            "cache_positions": _positions(root / "cache-train")}
    report = markdown(table, teacher_r, cfg, info)
    timing_file = root / "timing.json"
    if cfg.reuse and timing_file.exists():  # a re-report: keep the figures of the run that did the work
        timing = json.loads(timing_file.read_text())
    else:
        import resource

        cpu = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for f in ("ru_utime", "ru_stime"))
        timing = {"minutes": (time.time() - t_start) / 60, "cpu_minutes": cpu / 60, "stages_s": stamp}
        if not cfg.reuse:
            timing_file.write_text(json.dumps(timing))
    elapsed = timing["minutes"] * 60
    sft = table.get("SFT (CE only)")
    # "clearly": better by more than the two standard deviations together, on both measures
    stronger = bool(sft and teacher_r["rougeL"][0] - sft["rougeL"][0] > teacher_r["rougeL"][1] + sft["rougeL"][1]
                    and sft["nll"][0] - teacher_r["nll"][0] > sft["nll"][1])
    body = "\n\n".join([
        f"Command: `{command}` (preset `{'gpu' if cfg.teacher.layers > 4 else 'cpu'}`; {elapsed / 60:.0f} min wall on "
        f"{os.cpu_count()} CPU cores, {timing['cpu_minutes']:.0f} CPU-minutes; ROUGE-L over {cfg.test_limit or 500} test prompts, at most "
        f"{cfg.max_new_tokens} new tokens, sampled at T = 1 as in MiniLLM / DistiLLM / AdaKD, one sampling seed per run).",
        f"Teacher Llama {cfg.teacher.hidden} x {cfg.teacher.layers} ({info['teacher_params'] / 1e6:.2f}M parameters), "
        f"student Llama {cfg.student.hidden} x {cfg.student.layers} ({info['student_params'] / 1e6:.2f}M, "
        f"{info['teacher_params'] / info['student_params']:.1f}x smaller), vocabulary {len(tok)}; one cache, "
        f"k = {cfg.top_k}, {info['cache_positions']:,} trained positions; students: {cfg.student_steps} steps of "
        f"{cfg.student_batch_tokens} padded tokens, lr {cfg.student_lr}, random init; mean ± std over {cfg.seeds} seeds.",
        report,
        "![scores](img/quality_scores.png)\n\n![training](img/quality_training.png)",
    ])
    (root / "results.md").write_text(body + "\n")
    img = (ROOT / "docs" / "img") if docs else root
    plots(root, table, teacher_r, cfg, img)
    if docs:
        write_docs(body, ROOT / "docs" / "results.md")
    print()
    print(report)
    if cfg.teacher.layers <= 4:
        print(f"\nnote: {CPU_NOTE}")
    print(f"\nteacher clearly stronger than the SFT students (ROUGE-L and NLL): {stronger}; {elapsed / 60:.1f} min; {root}/results.md")
    return {"bench": "quality", "minutes": round(elapsed / 60, 1), "cpu_minutes": round(timing["cpu_minutes"], 1),
            "teacher": teacher_r, "teacher_stronger": stronger, "config": {**asdict(cfg), "methods": list(cfg.methods)}, **info,
            "stages_s": timing["stages_s"],
            "methods": {m: {k: (list(v) if isinstance(v, tuple) else v) for k, v in t.items()} for m, t in table.items()}}


def _teacher_eval(teacher: Path, root: Path, cfg: QualityConfig, seed: int, log, threads: int) -> dict:
    done = root / f"teacher_eval_seed{seed}.json"
    if cfg.reuse and done.exists():
        return json.loads(done.read_text())
    r = evaluate(teacher, root / "cache-dev", cfg, seed, log, threads)
    done.write_text(json.dumps(r))
    log(f"  teacher, seed {seed}: ROUGE-L {r['rougeL']:.2f}  dev NLL {r['nll']:.3f}")
    return r


def _params(model_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())


def _positions(cache: Path) -> int:
    from adakd.storage import CacheReader

    return CacheReader(str(cache)).manifest.totals()["positions"]


CPU_NOTE = ("at the cpu preset's scale every ROUGE-L sits near the floor of models this small, within a point of the "
            "others across seeds: it cannot separate distillation methods. What a CPU can prove about the cache is "
            "measured by `python -m bench.fidelity` (students trained from caches against the live teacher, on a real "
            "sharp teacher); use `--preset gpu` for a ROUGE-L comparison.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=["cpu", "gpu"], default="cpu", help="cpu: within 60 min on 2 cores; gpu: larger models, more data")
    ap.add_argument("--out", default=None)
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--jobs", type=int, default=None, help="student runs at a time")
    ap.add_argument("--student-steps", type=int, default=None)
    ap.add_argument("--train-records", type=int, default=None, help="records in the cache (0: all)")
    ap.add_argument("--teacher-epochs", type=float, default=None)
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--methods", default=None, help="comma-separated subset of: " + ", ".join(METHODS))
    ap.add_argument("--reuse", action="store_true", help="reuse the teacher, caches and finished runs in --out")
    ap.add_argument("--docs", action="store_true", help="also write docs/results.md and docs/img/")
    a = ap.parse_args()
    cfg = QualityConfig.preset(a.preset)
    over = {k: v for k, v in {"out": a.out, "seeds": a.seeds, "jobs": a.jobs, "student_steps": a.student_steps,
                              "teacher_epochs": a.teacher_epochs, "test_limit": a.test_limit}.items() if v is not None}
    if a.train_records is not None:
        over["train_records"] = a.train_records or None
    if a.methods:
        names = tuple(m.strip() for m in a.methods.split(","))
        unknown = [m for m in names if m not in METHODS]
        if unknown:
            ap.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
        over["methods"] = names
    cfg = replace(cfg, reuse=a.reuse, **over)
    command = "python -m bench.quality " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    print(json.dumps(quality(cfg, command.strip(), a.docs)))


if __name__ == "__main__":
    main()
