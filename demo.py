"""`adakd demo`: the whole pipeline, offline, on a built-in task whose answers can be checked.

1. Generate instruction/response items: 2-digit addition, reversing and sorting short strings.
2. Train a character-level teacher on them (here, in-process; a plain loop).
3. `cache-teacher` over the training items, exactly as users run it (vLLM when installed, else hf).
4. `train-student` three times from that one cache: cross-entropy only, forward KL, AdaKD over forward KL
   (students start from random weights; reverse KL, mode-seeking, learns far slower from scratch here).
5. Exact-match accuracy of every model on held-out items (greedy generation), a table and a plot.

Everything lands in one directory (default `runs/demo`). Nothing is downloaded; nothing from ../shared.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

TEMPLATE = "Q: {instruction}\nA: "


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    train_items: int = 4000
    test_items: int = 200
    teacher_steps: int = 1500
    student_steps: int = 400
    seed: int = 0
    engine: str = "auto"

    @classmethod
    def fast(cls, out: str) -> "DemoConfig":
        return cls(out=out, train_items=300, test_items=24, teacher_steps=60, student_steps=12, engine="hf")


def make_items(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    letters = "abcdefgh"
    items = []
    for _ in range(n):
        kind = rng.choice(("add", "reverse", "sort"))
        if kind == "add":
            a, b = rng.randint(10, 49), rng.randint(10, 49)
            items.append({"instruction": f"add {a} {b}", "output": str(a + b)})
        else:
            s = "".join(rng.choice(letters) for _ in range(rng.randint(3, 5)))
            items.append({"instruction": f"{kind} {s}", "output": s[::-1] if kind == "reverse" else "".join(sorted(s))})
    return items


def build_tokenizer(path: Path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789 :\nQA"))
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(path)
    return fast


def model_config(vocab: int, hidden: int, layers: int, tok) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": hidden * 3, "num_hidden_layers": layers, "num_attention_heads": hidden // 32,
        "num_key_value_heads": hidden // 32, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
        "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
        "tie_word_embeddings": False, "torch_dtype": "float32",
    }


def train_teacher(items: list[dict], tok, out: Path, steps: int, seed: int, log) -> None:
    """Plain cross-entropy on the responses: the teacher the students will learn from."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**model_config(len(tok), 128, 4, tok)))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    seqs = []
    for it in items:
        p = tok(TEMPLATE.format(instruction=it["instruction"]))["input_ids"]
        r = tok(it["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seqs.append((p + r, [-100] * len(p) + r))
    rng = random.Random(seed)
    model.train()
    for step in range(steps):
        batch = rng.sample(seqs, 64)
        T = max(len(s) for s, _ in batch)
        ids = torch.full((len(batch), T), tok.pad_token_id)
        labels = torch.full((len(batch), T), -100)
        for i, (s, lab) in enumerate(batch):
            ids[i, : len(s)] = torch.tensor(s)
            labels[i, : len(s)] = torch.tensor(lab)
        lr = 3e-3 * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * (1 - step / steps))
        for g in opt.param_groups:
            g["lr"] = lr
        loss = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if step % 100 == 0 or step == steps - 1:
            log(f"  teacher step {step + 1}/{steps}: loss {loss.item():.3f}")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def accuracy(model_dir: Path, test_file: Path, out_file: Path) -> float:
    from trainer.evaluate import evaluate_generation

    r = evaluate_generation(str(model_dir), str(test_file), str(out_file), max_new_tokens=8, batch_size=64)
    return r["exact_match"]


def bin_(name: str) -> str:
    """The console script installed beside this Python (the venv's), else whatever PATH finds."""
    return shutil.which(name, path=os.path.dirname(sys.executable)) or name


def run(cmd: list[str], log, threads: int | None = None) -> str:
    """Run a command as a user would, logging it; its stdout, or an error with the end of its output."""
    log("  $ " + shlex.join(cmd))
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return r.stdout


def demo(cfg: DemoConfig) -> dict:
    out = Path(cfg.out)
    if out.exists():
        shutil.rmtree(out)
    (out / "data").mkdir(parents=True)
    lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)

    t0 = time.time()
    items = make_items(cfg.train_items + cfg.test_items, cfg.seed)
    train, test = items[: cfg.train_items], items[cfg.train_items:]
    seen = {i["instruction"] for i in train}
    test = [t for t in test if t["instruction"] not in seen] or test
    write = lambda p, rows: p.write_text("".join(json.dumps(r) + "\n" for r in rows))  # noqa: E731
    write(out / "data" / "train.jsonl", train)
    write(out / "data" / "test.jsonl", [{"prompt": TEMPLATE.format(instruction=t["instruction"]), "output": t["output"]}
                                        for t in test])
    log(f"[1/5] task: {len(train)} training and {len(test)} held-out items (addition, reverse, sort)")
    tok = build_tokenizer(out / "tokenizer")
    log(f"[2/5] training the teacher (Llama, hidden 128 x 4 layers, {cfg.teacher_steps} steps)")
    train_teacher(train, tok, out / "teacher", cfg.teacher_steps, cfg.seed, log)
    student_cfg = out / "student.json"
    student_cfg.write_text(json.dumps(model_config(len(tok), 64, 2, tok)))
    log("[3/5] cache-teacher")
    run([bin_("cache-teacher"), "--teacher", str(out / "teacher"), "--data", str(out / "data" / "train.jsonl"),
         "--out", str(out / "cache"), "--top-k", "16", "--engine", cfg.engine, "--prompt-template", TEMPLATE,
         "--no-progress"], log)
    students = {"CE only (SFT)": ["--kd-weight", "0", "--no-adakd"], "forward KL": ["--loss", "fkl", "--no-adakd"],
                "AdaKD over forward KL": ["--loss", "fkl", "--adakd"]}
    dirs = {name: out / "students" / name.split()[0].lower() for name in students}
    log("[4/5] train-student x 3 from the one cache")
    for name, extra in students.items():
        d = dirs[name]
        run([bin_("train-student"), "--cache", str(out / "cache"), "--student", str(student_cfg), "--out", str(d),
             "--max-steps", str(cfg.student_steps), "--batch-tokens", "2048", "--lr", "3e-3", "--seed", str(cfg.seed),
             "--no-progress", *extra], log)
    log("[5/5] held-out exact-match accuracy (greedy)")
    acc = {"teacher (hidden 128 x 4)": accuracy(out / "teacher", out / "data" / "test.jsonl", out / "teacher_generations.jsonl")}
    for name, d in dirs.items():
        acc[f"student: {name}"] = accuracy(d / "final", out / "data" / "test.jsonl", d / "generations.jsonl")
    table = ["| model | accuracy |", "| --- | --- |"] + [f"| {k} | {v:.1%} |" for k, v in acc.items()]
    for row in table:
        log(row)
    _plot(acc, out, dirs)
    elapsed = time.time() - t0
    log(f"done in {elapsed:.0f} s; everything is in {out}/ (results.md, demo.png, cache/, students/)")
    (out / "results.md").write_text("# adakd demo\n\n" + "\n".join(table) + f"\n\nWall time {elapsed:.0f} s.\n")
    return {"accuracy": acc, "seconds": elapsed}


def _plot(acc: dict, out: Path, dirs: dict[str, Path]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(16, 4.2))
    bars = ax[0].barh(list(acc), [v * 100 for v in acc.values()], color=["#444"] + ["#3366aa"] * (len(acc) - 1))
    ax[0].bar_label(bars, fmt="%.1f%%", padding=3)
    ax[0].set(xlabel="held-out exact match (%)", title="accuracy", xlim=(0, 110))
    for name, d in dirs.items():  # CE and KD are different quantities: one axis each
        rows = [json.loads(x) for x in (d / "train_log.jsonl").read_text().splitlines()]
        panel, key = (ax[1], "ce") if "CE" in name else (ax[2], "kd")
        panel.plot([r["step"] for r in rows], [r[key] for r in rows], label=name)
    ax[1].set(xlabel="optimizer step", ylabel="cross-entropy of the true tokens (nats)", title="CE-only student", yscale="log")
    ax[2].set(xlabel="optimizer step", ylabel="KD loss, mean T² · D (nats)", title="KD students", yscale="log")
    ax[2].legend()
    fig.suptitle(f"adakd demo: {out}")
    fig.tight_layout()
    fig.savefig(out / "demo.png", dpi=100)
    plt.close(fig)
