"""`adakd demo`: the whole pipeline, offline, on a built-in task where what distillation transfers is checkable.

The task mixes prompts whose correct answers form a known distribution ("name an animal with b": bear 40%,
bird 30%, bee 20%, bat 10%; "an even number from 20 to 30": six answers, each 1/6) with deterministic items
(2-digit addition, reversing and sorting short strings). Because the truth is known, every model is scored
exactly: the probability it gives to valid answers, the distance of its answer distribution from the
truth, and greedy exact match on held-out deterministic items.

1. A teacher is trained in-process on plenty of samples (each prompt seen many times, one sampled answer
   each time), so it learns the answer distributions.
2. A student start: one short cross-entropy pre-training on deterministic items and on "say <word>" for every
   answer word, shared by every student (as in the AdaKD paper, students start pretrained): it can spell every
   valid answer but has never seen the prompts.
3. Per seed, a small transfer set: each distributional prompt a couple of times with one sampled answer (what
   cross-entropy learns from) and some deterministic items; `cache-teacher` stores the teacher's distribution
   on it (what KD learns from): a top-16 cache and a sampled cache (64 draws per position).
4. `train-student` from that start: CE only; forward KL and reverse KL, each alone, with AdaKD, with LATF only
   and with IDTS only; IDTS softened (a labelled ablation, not a default); forward KL from the sampled cache.
   And on-policy distillation through the cache, with the same student steps in total: forward KL for the
   first half, then rounds of `adakd generate` (the student answers the transfer prompts) -> `cache-teacher`
   (the teacher scores the student's own answers) -> `train-student` (reverse KL, plain or with AdaKD, on
   them; forward KL as a control). 2 commands at a time.
5. The table (mean and spread over seeds), one sentence per row built from what was measured (the paired
   difference from the run it changes one thing of, and AdaKD's diagnostics from its step logs), a plot, and as
   the last line one JSON object with every figure.

Everything lands in one directory (default `runs/demo`). Nothing is downloaded; nothing from ../shared.

The commands are the console scripts a user runs, with the arguments the log prints. They start from a fork
server that has imported torch, transformers and adakd once (`Launcher`): the demo runs about 50 commands,
and each would otherwise spend about 4 seconds of its life importing them.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

TEMPLATE = "Q: {instruction}\nA: "

# name a <category> with <letter>: answers with their probabilities (weights out of 100)
LEXICON = {
    "animal": {"b": "bear 40 bird 30 bee 20 bat 10", "c": "cat 45 cow 25 crab 20 camel 10",
               "d": "dog 50 duck 25 deer 15 dove 10", "f": "fox 40 frog 30 fish 20 fly 10",
               "g": "goat 40 goose 30 gull 20 gnu 10", "h": "horse 40 hen 30 hawk 20 hare 10"},
    "fruit": {"a": "apple 50 apricot 30 avocado 20", "b": "banana 50 berry 30 blueberry 20",
              "c": "cherry 45 coconut 30 cranberry 25", "g": "grape 60 guava 25 gooseberry 15",
              "l": "lemon 50 lime 35 lychee 15", "p": "pear 40 peach 30 plum 20 papaya 10"},
    "color": {"b": "blue 50 black 30 brown 20", "g": "green 60 gray 30 gold 10", "p": "pink 45 purple 40 peach 15",
              "r": "red 70 rose 20 ruby 10", "s": "silver 50 sand 30 sky 20", "t": "tan 50 teal 35 taupe 15"},
}
NUMBER_RANGES = ((10, 20), (20, 30), (30, 40), (40, 50), (50, 60), (60, 70), (12, 24), (36, 48))


def distributions() -> dict[str, dict[str, float]]:
    """Every distributional prompt (its instruction) and the true probability of each valid answer."""
    out: dict[str, dict[str, float]] = {}
    for category, letters in LEXICON.items():
        for letter, spec in letters.items():
            words = spec.split()
            weights = {w: int(n) for w, n in zip(words[::2], words[1::2])}
            total = sum(weights.values())
            out[f"name a {category} with {letter}"] = {w: n / total for w, n in weights.items()}
    for lo, hi in NUMBER_RANGES:
        evens = [str(x) for x in range(lo, hi + 1) if x % 2 == 0]
        out[f"an even number from {lo} to {hi}"] = {x: 1 / len(evens) for x in evens}
    return out


def deterministic_item(rng: random.Random) -> dict:
    kind = rng.choice(("add", "reverse", "sort"))
    if kind == "add":
        a, b = rng.randint(10, 49), rng.randint(10, 49)
        return {"instruction": f"add {a} {b}", "output": str(a + b)}
    s = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 5)))
    return {"instruction": f"{kind} {s}", "output": s[::-1] if kind == "reverse" else "".join(sorted(s))}


def pretraining_draw(truth: dict[str, dict[str, float]]):
    """The student start's items: deterministic items and "say <word>" for every answer word and number, so a
    student can spell every valid answer but has never seen which prompt wants which, or how often."""
    words = sorted({a for d in truth.values() for a in d})

    def draw(rng: random.Random) -> dict:
        if rng.random() < 0.5:
            return deterministic_item(rng)
        w = rng.choice(words)
        return {"instruction": f"say {w}", "output": w}

    return draw


def sample_answer(dist: dict[str, float], rng: random.Random) -> str:
    return rng.choices(list(dist), weights=list(dist.values()))[0]


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    seeds: int = 2  # 11 student rows x 2 seeds fit 5 minutes; bench.ablation measures AdaKD's parts with 3
    teacher_steps: int = 800
    pretrain_steps: int = 300
    student_steps: int = 200  # packed micro-batches of 1,024 tokens hold 1.65x the sequences padded ones did: 200
    # steps see about the data 300 padded steps saw (37k trained positions against 34k)
    transfer_repeats: int = 2  # each distributional prompt, with one sampled answer each time
    transfer_deterministic: int = 200
    test_items: int = 100
    samples: int = 64  # draws per position of the sampled cache
    batch_tokens: int = 1024  # train-student's micro-batch
    engine: str = "hf"
    jobs: int = 2
    rounds: int = 2  # on-policy rows: forward KL for half the student steps, then this many generate/cache/train rounds
    onpolicy_samples: int = 1  # answers per transfer-set prompt per round (each distributional prompt is there twice)
    fork_server: bool = True  # start the commands from a pre-imported fork server (False: plain subprocesses)

    @classmethod
    def fast(cls, out: str) -> "DemoConfig":
        return cls(out=out, seeds=1, teacher_steps=40, pretrain_steps=10, student_steps=4, transfer_deterministic=20,
                   test_items=12, samples=16)

    @property
    def warmup_steps(self) -> int:
        """The on-policy rows' off-policy forward-KL start: the first half of the student steps."""
        return self.student_steps - self.rounds * self.round_steps

    @property
    def round_steps(self) -> int:
        return self.student_steps // 2 // self.rounds


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


def encode(tok, item: dict) -> tuple[list[int], list[int]]:
    """(token ids, labels): the prompt unlabelled, the response and EOS labelled, as cache-teacher renders it."""
    p = tok(TEMPLATE.format(instruction=item["instruction"]))["input_ids"]
    r = tok(item["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return p + r, [-100] * len(p) + r


def train_lm(config: dict, tok, draw, steps: int, seed: int, out: Path, log, what: str, lr: float = 3e-3) -> None:
    """Plain cross-entropy on responses, a fresh batch of 64 items from `draw(rng)` each step (a plain loop)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**config))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    rng = random.Random(seed)
    model.train()
    for step in range(steps):
        batch = [encode(tok, draw(rng)) for _ in range(64)]
        T = max(len(s) for s, _ in batch)
        ids = torch.full((len(batch), T), tok.pad_token_id)
        labels = torch.full((len(batch), T), -100)
        for i, (s, lab) in enumerate(batch):
            ids[i, : len(s)] = torch.tensor(s)
            labels[i, : len(s)] = torch.tensor(lab)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * (1 - step / steps))
        loss = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if step % 200 == 0 or step == steps - 1:
            log(f"  {what} step {step + 1}/{steps}: loss {loss.item():.3f}")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def teacher_draw(truth: dict[str, dict[str, float]]):
    prompts = sorted(truth)

    def draw(rng: random.Random) -> dict:
        if rng.random() < 0.5:
            p = rng.choice(prompts)
            return {"instruction": p, "output": sample_answer(truth[p], rng)}
        return deterministic_item(rng)

    return draw


def transfer_set(truth: dict[str, dict[str, float]], cfg: DemoConfig, seed: int) -> list[dict]:
    rng = random.Random(1000 + seed)
    items = [{"instruction": p, "output": sample_answer(d, rng)} for p, d in sorted(truth.items())
             for _ in range(cfg.transfer_repeats)]
    items += [deterministic_item(rng) for _ in range(cfg.transfer_deterministic)]
    rng.shuffle(items)
    return items


METHODS = {  # name -> (cache, train-student options)
    "CE only": ("topk", ["--kd-weight", "0", "--no-adakd"]),
    "forward KL": ("topk", ["--loss", "fkl", "--no-adakd"]),
    "AdaKD over forward KL": ("topk", ["--loss", "fkl", "--adakd"]),
    "LATF only over forward KL": ("topk", ["--loss", "fkl", "--adakd", "--no-idts"]),
    "IDTS only over forward KL": ("topk", ["--loss", "fkl", "--adakd", "--no-latf"]),
    "reverse KL": ("topk", ["--loss", "rkl", "--no-adakd"]),
    "AdaKD over reverse KL": ("topk", ["--loss", "rkl", "--adakd"]),
    "LATF only over reverse KL": ("topk", ["--loss", "rkl", "--adakd", "--no-idts"]),
    "IDTS only over reverse KL": ("topk", ["--loss", "rkl", "--adakd", "--no-latf"]),
    "ablation: softened IDTS over reverse KL": ("topk", ["--loss", "rkl", "--adakd", "--no-latf",
                                                         "--temperature-scale", "-0.5"]),
    "forward KL, sampled cache": ("sampled", ["--loss", "fkl", "--no-adakd"]),
}
ROUNDS_CONTROL = "forward KL in rounds, transfer set only"
ONPOLICY_FKL = "on-policy forward KL, from a forward-KL start"
ONPOLICY_ROW = "on-policy reverse KL, from a forward-KL start"
ONPOLICY_ADAKD = "AdaKD over on-policy reverse KL"
ONPOLICY = {  # name -> (trains on the student's own answers, the rounds' train-student options); every row starts
    # from one shared forward-KL warm-up. The control trains its rounds on the transfer set's cache instead: the same
    # schedule (a fresh warm-up and decay per round, as `adakd distill` runs them) without the student's text.
    ROUNDS_CONTROL: (False, ["--loss", "fkl", "--no-adakd"]),
    ONPOLICY_FKL: (True, ["--loss", "fkl", "--no-adakd"]),
    ONPOLICY_ROW: (True, ["--loss", "rkl", "--no-adakd"]),
    ONPOLICY_ADAKD: (True, ["--loss", "rkl", "--adakd"]),
}
BASE = {  # each row is compared with the run(s) it changes one thing of (same seeds: paired)
    "forward KL": "CE only", "reverse KL": "CE only", "forward KL, sampled cache": "forward KL",
    **{n: ("reverse KL" if "reverse" in n else "forward KL") for n in METHODS if "over" in n},
    # rounds: the control changes only the schedule (rounds) from forward KL; on-policy forward KL only the text of
    # the rounds (the student's own answers) from the control; on-policy reverse KL only the divergence from it (and
    # is shown against off-policy reverse KL too); AdaKD is added over the latter
    ROUNDS_CONTROL: "forward KL", ONPOLICY_FKL: ROUNDS_CONTROL, ONPOLICY_ROW: (ONPOLICY_FKL, "reverse KL"),
    ONPOLICY_ADAKD: ONPOLICY_ROW,
}
HOW = {  # what each row changes: its own words; the table's sentence adds what it measured
    "teacher": "trained on many samples per prompt: the answer distributions it learned are the target",
    "student start": "the shared pre-trained start: it can spell every answer, but was never asked the prompts",
    "CE only": "the transfer set's one sampled answer per copy",
    "forward KL": "the teacher's top-16 distribution at every answer position",
    "reverse KL": "the same targets, mode-seeking from the student's side",
    "forward KL, sampled cache": "64 teacher draws per position instead of the top-16",
    "ablation: softened IDTS over reverse KL": "not a default: IDTS with --temperature-scale -0.5 (harder positions "
                                               "hotter, the official code's soften direction)",
    ROUNDS_CONTROL: "forward KL for the first half of the steps (the warm-up every on-policy row shares), then the "
                    "rounds' steps on the transfer set's cache: the rounds' schedule without the student's text",
    ONPOLICY_FKL: "the warm-up, then rounds of: the student answers the transfer prompts (adakd generate, T = 1), the "
                  "teacher scores those answers (cache-teacher), forward KL on them (train-student from the round's "
                  "student)",
    ONPOLICY_ROW: "the same rounds with reverse KL on the student's answers",
    ONPOLICY_ADAKD: "the same rounds with AdaKD (LATF + IDTS, published values) over their reverse KL",
}


def slug(name: str) -> str:
    return name.lower().replace(" ", "-").replace(",", "")


@dataclass
class Scores:
    valid: float  # mean over distributional prompts of the probability of a valid answer
    distance: float  # mean total-variation distance of the answer distribution from the truth
    exact_match: float  # greedy, held-out deterministic items


def answer_scores(model_dir: Path, tok, truth: dict[str, dict[str, float]]) -> tuple[float, float]:
    """Exact, no sampling: the model's probability of every valid answer (its characters, then EOS)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = [(p, a, *encode(tok, {"instruction": p, "output": a})) for p, d in sorted(truth.items()) for a in d]
    T = max(len(ids) for *_, ids, _ in rows)
    ids = torch.full((len(rows), T), tok.pad_token_id)
    labels = torch.full((len(rows), T), -100)
    for i, (*_, s, lab) in enumerate(rows):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(s)] = torch.tensor(lab)
    with torch.no_grad():
        lp = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long()).logits.log_softmax(-1)
    target = labels[:, 1:]
    token_lp = lp[:, :-1].gather(-1, target.clamp_min(0).unsqueeze(-1))[..., 0] * (target >= 0)
    prob = token_lp.sum(-1).exp().tolist()
    by_prompt: dict[str, dict[str, float]] = {}
    for (p, a, *_), q in zip(rows, prob):
        by_prompt.setdefault(p, {})[a] = q
    valid = [sum(q.values()) for q in by_prompt.values()]
    tv = [0.5 * (sum(abs(q[a] - truth[p][a]) for a in q) + (1 - sum(q.values()))) for p, q in by_prompt.items()]
    return statistics.fmean(valid), statistics.fmean(tv)


def exact_match(model_dir: Path, test_file: Path, out_file: Path) -> float:
    from adakd.trainer.evaluate import evaluate_generation

    return evaluate_generation(str(model_dir), str(test_file), str(out_file), max_new_tokens=8, batch_size=64)["exact_match"]


def score(model_dir: Path, tok, truth, test_file: Path, out_file: Path) -> Scores:
    valid, distance = answer_scores(model_dir, tok, truth)
    return Scores(valid, distance, exact_match(model_dir, test_file, out_file))


def bin_(name: str) -> str:
    """The console script installed beside this Python (the venv's), else whatever PATH finds."""
    return shutil.which(name, path=os.path.dirname(sys.executable)) or name


# What every command imports: loaded once by the fork server, so a command starts in well under a second
PRELOAD = ["torch", "transformers", "transformers.models.llama.modeling_llama", "adakd.cli", "adakd.trainer.train",
           "adakd.trainer.evaluate", "adakd.pipeline.capture", "adakd.pipeline.engine_hf", "adakd.pipeline.generate"]
ENTRY_POINTS = {"cache-teacher": "cache_teacher_cmd", "train-student": "train_student_cmd", "adakd": "main"}


def _command_child(cmd: list[str], threads: int | None, output: str) -> None:
    """In a fork-server child: one console script's click command with `cmd`'s arguments, as its process would run
    it (its own process, its exit status, stdout and stderr into `output`)."""
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    if threads:
        import torch

        os.environ.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        torch.set_num_threads(threads)
    from adakd import cli

    name = os.path.basename(cmd[0])
    getattr(cli, ENTRY_POINTS[name]).main(cmd[1:], prog_name=name)


class Launcher:
    """Runs the demo's commands: from a fork server that imported `PRELOAD` once, or as plain subprocesses
    (`fork_server=False`, and always for commands it has no entry point for or that start vLLM, which manages
    processes of its own)."""

    def __init__(self, fork_server: bool, engine: str):
        self.engine = engine
        self.seconds: list[tuple[str, float]] = []  # (command, wall seconds), in the order they ended
        self.ctx = multiprocessing.get_context("forkserver") if fork_server else None
        if self.ctx:
            self.ctx.set_forkserver_preload(PRELOAD)

    def __call__(self, cmd: list[str], threads: int | None) -> tuple[int, str]:
        t0 = time.perf_counter()
        try:
            return self._run(cmd, threads)
        finally:
            self.seconds.append((shlex.join(cmd), round(time.perf_counter() - t0, 2)))

    def _run(self, cmd: list[str], threads: int | None) -> tuple[int, str]:
        name = os.path.basename(cmd[0])
        if self.ctx is None or name not in ENTRY_POINTS or self.engine == "vllm" and name == "cache-teacher":
            env = dict(os.environ)
            if threads:
                env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
            r = subprocess.run(cmd, capture_output=True, text=True, env=env)
            return r.returncode, r.stdout + r.stderr
        import tempfile

        with tempfile.TemporaryDirectory(prefix="adakd-demo-") as tmp:
            output = os.path.join(tmp, "output.txt")
            p = self.ctx.Process(target=_command_child, args=(cmd, threads, output))
            p.start()
            p.join()
            return p.exitcode, Path(output).read_text(errors="replace") if os.path.exists(output) else ""


def run(cmd: list[str], log, threads: int | None = None, launcher: Launcher | None = None) -> str:
    """Run a command as a user would, logging it; its output, or an error with the end of its output."""
    log("  $ " + shlex.join(cmd))
    code, output = (launcher or Launcher(False, "hf"))(cmd, threads)
    if code != 0:
        raise RuntimeError(f"{cmd[0]} failed ({code}):\n{output[-4000:]}")
    return output


@dataclass
class Setup:
    """What every student of a run shares: the task, the teacher, the student start and the per-seed caches."""

    cfg: DemoConfig
    out: Path
    tok: object
    truth: dict[str, dict[str, float]]
    test_file: Path
    log: object
    jobs: ThreadPoolExecutor
    threads: int
    launcher: Launcher

    def run(self, cmd: list[str]) -> str:
        return run(cmd, self.log, self.threads, self.launcher)


def prepare(cfg: DemoConfig, log) -> Setup:
    """Steps 1-3: the task, the teacher, the student start, and per seed a transfer set with its two caches."""
    out = Path(cfg.out)
    if out.exists():
        shutil.rmtree(out)
    (out / "data").mkdir(parents=True)
    truth = distributions()
    rng = random.Random(7)
    test = []
    while len(test) < cfg.test_items:
        item = deterministic_item(rng)
        test.append({"prompt": TEMPLATE.format(instruction=item["instruction"]), "output": item["output"]})
    test_file = out / "data" / "test.jsonl"
    test_file.write_text("".join(json.dumps(r) + "\n" for r in test))
    (out / "data" / "truth.json").write_text(json.dumps(truth, indent=1))
    log(f"[1/5] task: {len(truth)} prompts with known answer distributions, deterministic items (addition, "
        f"reverse, sort), {len(test)} held-out deterministic items")
    tok = build_tokenizer(out / "tokenizer")
    log(f"[2/5] the teacher (Llama, hidden 128 x 3 layers, {cfg.teacher_steps} steps of 64 sampled items) and the "
        f"student start (hidden 64 x 2, {cfg.pretrain_steps} steps on deterministic and \"say <word>\" items)")
    train_lm(model_config(len(tok), 128, 3, tok), tok, teacher_draw(truth), cfg.teacher_steps, 0, out / "teacher", log,
             "teacher")
    train_lm(model_config(len(tok), 64, 2, tok), tok, pretraining_draw(truth), cfg.pretrain_steps, 1,
             out / "student-start", log, "student start")
    setup = Setup(cfg, out, tok, truth, test_file, log, ThreadPoolExecutor(cfg.jobs),
                  max(1, (os.cpu_count() or 1) // cfg.jobs), Launcher(cfg.fork_server, cfg.engine))
    log(f"[3/5] per seed: a transfer set ({len(truth) * cfg.transfer_repeats} distributional + "
        f"{cfg.transfer_deterministic} deterministic items) and cache-teacher on it: top-16 and sampled (N = {cfg.samples})")

    def caches(seed: int) -> None:
        d = out / f"seed{seed}"
        d.mkdir()
        (d / "transfer.jsonl").write_text("".join(json.dumps(r) + "\n" for r in transfer_set(truth, cfg, seed)))
        for kind, extra in (("topk", ["--top-k", "16"]), ("sampled", ["--targets", "sampled", "--samples", str(cfg.samples)])):
            setup.run([bin_("cache-teacher"), "--teacher", str(out / "teacher"), "--data", str(d / "transfer.jsonl"),
                       "--out", str(d / f"cache-{kind}"), "--engine", cfg.engine, "--prompt-template", TEMPLATE,
                       "--no-progress", *extra])

    list(setup.jobs.map(caches, range(cfg.seeds)))
    return setup


def train_student(setup: Setup, caches: list[Path], student: Path, out: Path, steps: int, seed: int,
                  extra: list[str]) -> None:
    setup.run([bin_("train-student"), *[a for c in caches for a in ("--cache", str(c))], "--student", str(student),
               "--out", str(out), "--max-steps", str(steps), "--batch-tokens", str(setup.cfg.batch_tokens), "--lr", "3e-3",
               "--seed", str(seed), "--no-progress", *extra])


def train_students(setup: Setup, methods: dict[str, tuple[str, list[str]]], steps: int | None = None,
                   onpolicy: bool = False) -> None:
    """Every method x seed, `train-student` from the student start (`cfg.jobs` at a time), into seed<s>/<slug>; with
    `onpolicy`, each seed's on-policy rows too (`onpolicy_rows`, queued first: each is a chain of commands)."""
    cfg = setup.cfg

    def student(task: tuple[int, str]) -> None:
        seed, name = task
        kind, extra = methods[name]
        d = setup.out / f"seed{seed}"
        train_student(setup, [d / f"cache-{kind}"], setup.out / "student-start", d / slug(name),
                      steps or cfg.student_steps, seed, extra)

    chains = [setup.jobs.submit(onpolicy_rows, setup, s) for s in range(cfg.seeds)] if onpolicy else []
    list(setup.jobs.map(student, [(s, m) for s in range(cfg.seeds) for m in methods]))
    for c in chains:
        c.result()


def onpolicy_rows(setup: Setup, seed: int) -> None:
    """One seed's on-policy rows: a forward-KL warm-up on the top-16 cache for the first half of the student steps,
    then `cfg.rounds` rounds of generate -> cache-teacher -> train-student (the row's divergence on the round's cache
    only, GKD's lambda = 1), each round from the previous round's student: the commands `adakd distill` runs per
    round. The rows share the warm-up and so its answers and their cache; after that each row answers with its own
    student. The control's rounds train on the transfer set's cache (no generation)."""
    cfg = setup.cfg
    d = setup.out / f"seed{seed}"
    prompts = d / "prompts.jsonl"  # the transfer set's questions, without its answers
    prompts.write_text("".join(json.dumps({"instruction": json.loads(line)["instruction"]}) + "\n"
                               for line in (d / "transfer.jsonl").read_text().splitlines()))
    warmup = d / "onpolicy-warmup"
    train_student(setup, [d / "cache-topk"], setup.out / "student-start", warmup, cfg.warmup_steps, seed,
                  ["--loss", "fkl", "--no-adakd"])
    current = {name: warmup for name in ONPOLICY}
    for r in range(1, cfg.rounds + 1):
        for name, (own_answers, extra) in ONPOLICY.items():
            run_dir = current[name]
            answers, cache = run_dir.with_name(run_dir.name + "-answers.jsonl"), run_dir.with_name(run_dir.name + "-cache")
            if not own_answers:
                cache = d / "cache-topk"
            elif not cache.exists():  # round 1: the rows answer with the shared warm-up student
                setup.run([bin_("adakd"), "generate", "--model", str(run_dir / "final"), "--data", str(prompts), "--out",
                           str(answers), "--engine", "hf", "--samples", str(cfg.onpolicy_samples), "--max-new-tokens",
                           "16", "--seed", str(100 * seed + r), "--prompt-template", TEMPLATE, "--no-progress"])
                setup.run([bin_("cache-teacher"), "--teacher", str(setup.out / "teacher"), "--data", str(answers),
                           "--out", str(cache), "--engine", cfg.engine, "--prompt-template", TEMPLATE, "--top-k", "16",
                           "--no-progress"])
            current[name] = d / slug(name) / f"round-{r}"
            train_student(setup, [cache], run_dir / "final", current[name], cfg.round_steps, seed, extra)


def run_dirs(setup: Setup, seed: int, name: str) -> list[Path]:
    """The train-student output directories of a row's student in one seed, in order (the last holds final/)."""
    d = setup.out / f"seed{seed}" / slug(name)
    return [d / f"round-{r}" for r in range(1, setup.cfg.rounds + 1)] if name in ONPOLICY else [d]


def score_students(setup: Setup, names) -> dict[str, list[Scores]]:
    """Each trained student of these methods, every seed, scored exactly against the truth."""
    return {name: [score(run_dirs(setup, s, name)[-1] / "final", setup.tok, setup.truth, setup.test_file,
                         setup.out / f"seed{s}" / slug(name) / "generations.jsonl") for s in range(setup.cfg.seeds)]
            for name in names}


def demo(cfg: DemoConfig) -> dict:
    lines: list[str] = []

    def log(msg: str) -> None:
        if msg.startswith("["):  # a stage: when it began
            msg += f" (at {time.time() - t0:.0f} s)"
        print(msg, flush=True)
        lines.append(msg)

    t0 = time.time()
    setup = prepare(cfg, log)
    out, tok, truth, test_file = setup.out, setup.tok, setup.truth, setup.test_file
    log(f"[4/5] train-student x {len(METHODS) * cfg.seeds} ({len(METHODS)} methods x {cfg.seeds} seeds, "
        f"{cfg.student_steps} steps each, from the student start), and per seed the on-policy rows: "
        f"{cfg.warmup_steps} steps of forward KL, then {cfg.rounds} rounds of adakd generate -> cache-teacher -> "
        f"train-student ({cfg.round_steps} steps of reverse KL, or forward KL, on the student's own answers); "
        f"{cfg.jobs} at a time")
    train_students(setup, METHODS, onpolicy=True)
    setup.jobs.shutdown()
    log("[5/5] scoring: exact answer distributions against the truth, greedy exact match on held-out items")
    results: dict[str, list[Scores]] = {
        "teacher": [score(out / "teacher", tok, truth, test_file, out / "teacher_generations.jsonl")],
        "student start": [score(out / "student-start", tok, truth, test_file, out / "start_generations.jsonl")],
    }
    results.update(score_students(setup, [*METHODS, *ONPOLICY]))
    summary = {name: _summary(rows) for name, rows in results.items()}
    for name in [*METHODS, *ONPOLICY]:
        summary[name]["adakd"] = _adakd_diagnostics([[r / "train_log.jsonl" for r in run_dirs(setup, s, name)]
                                                     for s in range(cfg.seeds)])
    table = _table(summary, cfg)
    for row in table:
        log(row)
    verdict = _verdict(summary)
    log(verdict)
    _plot(summary, out, cfg)
    elapsed = time.time() - t0
    log(f"done in {elapsed:.0f} s; everything is in {out}/ (results.md, demo.png, timings.json, caches and students per "
        "seed)")
    (out / "timings.json").write_text(json.dumps({"seconds": round(elapsed, 1), "commands": setup.launcher.seconds},
                                                 indent=1))
    (out / "results.md").write_text("# adakd demo\n\n" + "\n".join(table) + f"\n\n{verdict}\n\nWall time {elapsed:.0f} s.\n")
    figures = {"bench": "demo", "seeds": cfg.seeds, "seconds": round(elapsed, 1), "rows": summary,
               "kd_beats_ce": verdict.startswith("KD beats")}
    print(json.dumps(figures), flush=True)
    return figures


def _adakd_diagnostics(logs: list[list[Path]]) -> dict:
    """What AdaKD did in a method's runs (per seed, the step logs of its runs in order): IDTS's saturated share and
    the harder half's mean temperature, averaged over steps and seeds; LATF's final ratio (each seed's last run)."""
    rows = [json.loads(line) for runs in logs for f in runs for line in f.read_text().splitlines()]
    mean = lambda key: statistics.fmean(v) if (v := [r[key] for r in rows if r.get(key) is not None]) else None  # noqa: E731
    finals = [json.loads(runs[-1].read_text().splitlines()[-1])["latf_ratio"] for runs in logs]
    return {"saturated": mean("temp_saturated"), "temp_hard": mean("temp_hard"), "final_ratio": statistics.fmean(finals)}


def what(name: str, summary: dict) -> str:
    """One sentence per row, true by construction: what the row changes, and what was measured against the row it
    changes (the same seeds: the mean paired difference in TV distance, and whether its sign holds on every seed)."""
    if name in ("teacher", "student start"):
        return HOW[name]
    if name in HOW:
        head = HOW[name]
    else:
        parts = [p for p in ("LATF", "IDTS") if p in name] if "only" in name else ["LATF", "IDTS"]
        head = " + ".join(parts) + " with the published values"
    s = summary[name]
    bases = BASE.get(name) or ()
    text = head
    for base in (bases,) if isinstance(bases, str) else bases:
        d = [a - b for a, b in zip(s["distance"]["seeds"], summary[base]["distance"]["seeds"])]
        v = [a - b for a, b in zip(s["valid"]["seeds"], summary[base]["valid"]["seeds"])]
        mean_d = statistics.fmean(d)
        if len(d) > 1 and all(x < 0 for x in d):
            verdict = "closer to the truth on every seed"
        elif len(d) > 1 and all(x > 0 for x in d):
            verdict = "farther from the truth on every seed"
        else:
            verdict = "no difference that holds on every seed"
        text += (f"; against {base}: TV {mean_d:+.3f}, valid answers {100 * statistics.fmean(v):+.1f} points "
                 f"({verdict})")
    a = s.get("adakd") or {}
    if a.get("temp_hard") is not None:
        text += (f"; IDTS held {a['saturated']:.0%} of distilled positions at saturated temperatures, the harder "
                 f"half at T = {a['temp_hard']:.2f} on average")
    if a.get("final_ratio") is not None and a["final_ratio"] < 1 and "LATF" in text:
        text += f"; LATF ended distilling {a['final_ratio']:.0%} of the positions"
    return text


def _summary(rows: list[Scores]) -> dict:
    out = {}
    for key in ("valid", "distance", "exact_match"):
        xs = [getattr(r, key) for r in rows]
        out[key] = {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0, "seeds": xs}
    return out


def _cell(s: dict, pct: bool) -> str:
    f = (lambda x: f"{100 * x:.1f}") if pct else (lambda x: f"{x:.3f}")
    return f"{f(s['mean'])} ± {f(s['sd'])}" if s["sd"] else f(s["mean"])


def _table(summary: dict, cfg: DemoConfig) -> list[str]:
    rows = ["| model | valid answers (%) | distance to the true answer distribution (TV, 0 = exact) | "
            "exact match, deterministic items (%) | what it shows |", "| --- | --- | --- | --- | --- |"]
    for name, s in summary.items():
        rows.append(f"| {name} | {_cell(s['valid'], True)} | {_cell(s['distance'], False)} | "
                    f"{_cell(s['exact_match'], True)} | {what(name, summary)} |")
    rows.append(f"\nStudents: mean ± standard deviation over {cfg.seeds} seeds (each seed its own transfer set and "
                "data order).")
    return rows


def _verdict(summary: dict) -> str:
    """Does every KD student beat CE only beyond the seed spread on the distance to the truth?"""
    ce = summary["CE only"]["distance"]
    kd = {n: s["distance"] for n, s in summary.items() if n not in ("teacher", "student start", "CE only")}
    beats = {n: d["mean"] + d["sd"] < ce["mean"] - ce["sd"] for n, d in kd.items()}
    better = [n for n, b in beats.items() if b]
    head = "KD beats CE only" if better else "KD does not beat CE only"
    return (f"{head} beyond the seed spread on the distance to the truth: {len(better)}/{len(beats)} KD students "
            f"(CE only {ce['mean']:.3f} ± {ce['sd']:.3f}; " +
            ", ".join(f"{n} {d['mean']:.3f}" for n, d in kd.items()) + ").")


def _plot(summary: dict, out: Path, cfg: DemoConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, ax = plt.subplots(1, 3, figsize=(17, 4.6))
    panels = (("valid", "valid answers (%)", 100), ("distance", "TV distance to the true answer distribution", 1),
              ("exact_match", "exact match, deterministic items (%)", 100))
    colors = ["#444", "#999", "#aa5533"] + ["#339955" if n in ONPOLICY else "#3366aa" for n in names[3:]]
    for a, (key, label, scale) in zip(ax, panels):
        means = [summary[n][key]["mean"] * scale for n in names]
        sds = [summary[n][key]["sd"] * scale for n in names]
        a.barh(names, means, xerr=sds, color=colors, capsize=3)
        for i, n in enumerate(names):
            for x in summary[n][key]["seeds"]:
                a.plot(x * scale, i, "k.", ms=3)
        a.set(xlabel=label)
        a.invert_yaxis()
    ax[1].set_title("lower is better")
    fig.suptitle(f"adakd demo: what distillation transfers ({cfg.seeds} seeds; bars: mean, whiskers: sd, dots: seeds)")
    fig.tight_layout()
    fig.savefig(out / "demo.png", dpi=100)
    plt.close(fig)
