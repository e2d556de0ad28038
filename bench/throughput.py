"""Training throughput on real length distributions: today's padded batches against packed ones.

    python -m bench.throughput [--repeats 3] [--tokens 12000] [--batch-tokens 8192] [--quick] [--docs]

The token stream: the real lengths of dolly's training records (MiniLLM prompt + response + EOS) and of the
TinyStories training stories (text + EOS), both with the real GPT-2 tokenizer from ../shared, in a seeded
shuffled order (as a cache's stream), with random token ids and synthetic top-64 targets (the loss's cost
does not depend on their values). The same first --tokens real tokens of the stream are trained in both
layouts: padded (`--no-packing`: rows x longest <= --batch-tokens, one sequence per row) and packed
(`common.packing`: whole sequences in rows of --row-tokens, rows x width <= --batch-tokens).

Students (random init, float32 on CPU, bfloat16 autocast on GPU), one optimizer step (forward, backward,
AdamW) per micro-batch:
  body   Llama, hidden 512 x 8 layers, 4,096-token vocabulary: the transformer body dominates the step, as in
         a 7B model where the output layer is a few percent of the FLOPs
  gpt2v  bench.trainer's student: Llama hidden 256 x 4 layers with the 50,257-token GPT-2 vocabulary: the
         output layer over the trained positions dominates; it costs the same in both layouts (the chunked loss
         runs it at trained positions only), so packing can only save the body's share (the arithmetic is
         printed beside the measurement)
Losses: CE (kd_weight 0) and AdaKD over reverse KL (LATF ratio 1, the start of a run), on the same batches.

Figures: real (trained) tokens per second, the fraction of computed tokens that are real, the speed-up
against what the computed-token ratio allows, the KD step against the CE step on the same packed batches,
peak memory of a step (each in its own process); then --gradient-checkpointing on 4,096-token sequences (step
time and activation memory with and without), and the hf engine's capture tokens/s padded vs packed (the
body model as teacher). Times are medians over --repeats rounds, the variants interleaved within each round
(ratios within one run: this machine is shared). The last line is a JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .common import SHARED, gpt2_tokenizer, replace_block, step_memory

K = 64
SHAPES = ("dolly", "tinystories")
STUDENTS = {
    "body": dict(hidden=512, layers=8, heads=8, vocab=4096),
    "gpt2v": dict(hidden=256, layers=4, heads=4, vocab=None),  # None: the GPT-2 vocabulary (50,257)
}
QUICK = {"body": dict(hidden=64, layers=2, heads=2, vocab=512), "gpt2v": dict(hidden=64, layers=1, heads=1, vocab=None)}
LOSSES = ("ce", "adakd_rkl")


# ------------------------------------------------------------------------------------------ the stream


@lru_cache(maxsize=None)
def real_lengths(shape: str) -> np.ndarray:
    """GPT-2 token counts of the shared data's training records, in file order."""
    tok = gpt2_tokenizer()
    if shape == "dolly":
        rows = [json.loads(line) for line in (SHARED / "data" / "dolly" / "train.jsonl").open()]
        prompts = tok([r["prompt"] for r in rows])["input_ids"]
        outputs = tok([r["output"] for r in rows])["input_ids"]
        return np.array([len(p) + len(o) + 1 for p, o in zip(prompts, outputs)])
    if shape == "tinystories":
        texts = [json.loads(line)["text"] for line in (SHARED / "data" / "tinystories" / "train.jsonl").open()]
        return np.array([len(t) + 1 for t in tok(texts)["input_ids"]])
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def stream_lengths(shape: str, tokens: int | None, seed: int = 0) -> list[int]:
    """The shape's lengths in a seeded shuffled order, the first ones adding up to `tokens` (all when None)."""
    lengths = real_lengths(shape)[np.random.default_rng(seed).permutation(len(real_lengths(shape)))]
    if tokens is None:
        return lengths.tolist()
    return lengths[: int(np.searchsorted(np.cumsum(lengths), tokens)) + 1].tolist()


def sequences(lengths: list[int], vocab: int, seed: int = 0):
    """SequenceTargets with random ids, every position after the first trained, synthetic sorted top-k targets."""
    from adakd.storage import SequenceTargets

    rng = np.random.default_rng(seed)
    out = []
    for r, n in enumerate(lengths):
        ids = rng.integers(0, vocab, n).astype(np.int32)
        mask = np.ones(n, bool)
        mask[0] = False
        start = rng.integers(0, vocab, (n - 1, 1))
        topk = ((start + np.arange(K) * 7) % vocab).astype(np.int32)  # distinct ids
        lp = (-rng.exponential(1.0, (n - 1, K)).cumsum(1) - 1).astype(np.float32)  # descending
        out.append(SequenceTargets(r, ids, mask, topk, lp, lp[:, 0].copy(),
                                   np.full(n - 1, -2.0, np.float32)))
    return out


def batches(seqs, vocab: int, budget: int, row_tokens: int | None):
    from adakd.common.packing import grouped, planner
    from adakd.trainer.batches import collate

    return [collate(g, vocab, None, layout=lay)
            for g, lay in grouped(seqs, lambda s: len(s.input_ids), planner(budget, row_tokens))]


def layout_fraction(shape: str, budget: int, row_tokens: int | None) -> float:
    """Real tokens / computed tokens over the shape's whole stream."""
    from adakd.common.packing import grouped, planner

    real = computed = 0
    for _, lay in grouped(stream_lengths(shape, None), int, planner(budget, row_tokens)):
        real += lay.tokens
        computed += lay.computed
    return real / computed


# ------------------------------------------------------------------------------------------ the students


def student(name: str, quick: bool, max_positions: int = 8192, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = (QUICK if quick else STUDENTS)[name]
    vocab = spec["vocab"] or len(gpt2_tokenizer())
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=spec["hidden"], intermediate_size=spec["hidden"] * 11 // 4,
                      num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
                      num_key_value_heads=spec["heads"], max_position_embeddings=max_positions,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg), vocab


def loss_config(name: str):
    from adakd.trainer.adakd import AdaKDConfig
    from adakd.trainer.kd_loss import LossConfig

    if name == "ce":
        return LossConfig(kd_weight=0.0, adakd=AdaKDConfig(latf=False, idts=False))
    return LossConfig(loss="rkl")


class Trainer:
    """One optimizer step per micro-batch of a student, as train-student takes it (StudentLoss, AdamW)."""

    def __init__(self, model, device, checkpointing: bool = False):
        from adakd.trainer.step import StudentLoss

        self.model = model.to(device).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.device = device
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
        self.nets = {n: StudentLoss(model, loss_config(n)) for n in LOSSES}
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                         else torch.autocast("cpu", enabled=False))

    def step(self, b, loss: str) -> None:
        b = b.to(self.device)
        with self.autocast:
            out, _ = self.nets[loss](b.model_inputs(), b.rows, b.cols, b.targets, 1.0)
        out.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def timed(self, bs, loss: str) -> list[float]:
        times = []
        for b in bs:
            sync(self.device)
            t = time.perf_counter()
            self.step(b, loss)
            sync(self.device)
            times.append(time.perf_counter() - t)
        return times


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------ measurements


def training(args, device) -> dict:
    """Real tokens/s per student, shape, layout and loss; real fractions; KD/CE; the arithmetic for gpt2v."""
    out: dict = {}
    for sname in STUDENTS:
        model, vocab = student(sname, args.quick)
        tr = Trainer(model, device)
        layouts = {"padded": None, "packed": args.row_tokens}
        data = {shape: {lay: batches(sequences(stream_lengths(shape, args.tokens), vocab), vocab, args.batch_tokens, rt)
                        for lay, rt in layouts.items()} for shape in SHAPES}
        for shape in SHAPES:
            for lay in layouts:
                tr.step(data[shape][lay][0], "adakd_rkl")  # warm-up (optimizer state, allocator)
        times = {(shape, lay, loss): [] for shape in SHAPES for lay in layouts for loss in LOSSES}
        for _ in range(args.repeats):
            for key in times:
                times[key].append(tr.timed(data[key[0]][key[1]], key[2]))
        res = {}
        for shape in SHAPES:
            r: dict = {}
            for lay in layouts:
                bs = data[shape][lay]
                real = sum(b.tokens for b in bs)
                computed = sum(b.computed for b in bs)
                r[lay] = {"batches": len(bs), "real_tokens": real, "computed_tokens": computed,
                          "real_fraction": real / computed,
                          "stream_real_fraction": layout_fraction(shape, args.batch_tokens, layouts[lay])}
                for loss in LOSSES:
                    s = statistics.median(sum(t) for t in times[(shape, lay, loss)])
                    r[lay][f"{loss}_tokens_per_s"] = real / s
                    r[lay][f"{loss}_s"] = s
            allowed = r["packed"]["real_fraction"] / r["padded"]["real_fraction"]
            r["allowed_speedup"] = allowed
            for loss in LOSSES:
                r[f"{loss}_speedup"] = r["packed"][f"{loss}_tokens_per_s"] / r["padded"][f"{loss}_tokens_per_s"]
                r[f"{loss}_speedup_vs_allowed"] = r[f"{loss}_speedup"] / allowed
            r["kd_over_ce_packed"] = statistics.median(
                sum(a) / sum(c) for a, c in zip(times[(shape, "packed", "adakd_rkl")], times[(shape, "packed", "ce")]))
            if sname == "gpt2v":
                r["predicted_speedup"] = predicted(model, r)
            res[shape] = r
        out[sname] = {"params": sum(p.numel() for p in model.parameters()), "vocab": vocab, "shapes": res}
        del tr, model, data
    return out


def row_sweep(args, device) -> dict:
    """The row length's trade-off on the dolly shape, body student, CE: real-token share (whole stream) against
    real tokens/s, each row length's batches of the same slice, interleaved, medians over the rounds."""
    model, vocab = student("body", args.quick)
    tr = Trainer(model, device)
    seqs = sequences(stream_lengths("dolly", args.tokens), vocab)
    data = {rt: batches(seqs, vocab, args.batch_tokens, rt) for rt in args.sweep}
    for bs in data.values():
        tr.step(bs[0], "ce")
    times = {rt: [] for rt in data}
    for _ in range(args.repeats):
        for rt, bs in data.items():
            times[rt].append(sum(tr.timed(bs, "ce")))
    real = sum(len(s.input_ids) for s in seqs)
    return {str(rt): {"stream_real_fraction": layout_fraction("dolly", args.batch_tokens, rt),
                      "ce_tokens_per_s": real / statistics.median(times[rt])} for rt in data}


def predicted(model, r: dict) -> float:
    """What packing can gain when the output layer runs at trained positions only, from FLOPs: the body's
    6 x params per computed token (attention scores aside) + the head's 6 x H x V per real token."""
    H, V = model.config.hidden_size, model.config.vocab_size
    head = 6 * H * V
    body = 6 * (sum(p.numel() for p in model.parameters()) - 2 * H * V)
    cost = lambda lay: body * r[lay]["computed_tokens"] + head * r[lay]["real_tokens"]  # noqa: E731
    return cost("padded") / cost("packed")


def memory_child(spec: str, args) -> dict:
    """One step's memory in this process: spec = student,shape,layout,loss or ckpt,on|off."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    parts = spec.split(",")
    if parts[0] == "ckpt":
        model, vocab = student("body", args.quick, max_positions=args.long)
        tr = Trainer(model, device, checkpointing=parts[1] == "on")
        b = batches(sequences([args.long], vocab), vocab, args.long, None)[0]
        loss = "adakd_rkl"
    else:
        sname, shape, lay, loss = parts
        model, vocab = student(sname, args.quick)
        tr = Trainer(model, device)
        rt = args.row_tokens if lay == "packed" else None
        bs = batches(sequences(stream_lengths(shape, args.tokens), vocab), vocab, args.batch_tokens, rt)
        b = max(bs, key=lambda x: x.computed)  # the slice's largest batch
    tr.step(b, loss)
    return step_memory(lambda: tr.step(b, loss), device) | {"computed": b.computed, "real": b.tokens}


def child(spec: str, args) -> dict:
    cmd = [sys.executable, "-m", "bench.throughput", "--memory-of", spec, "--tokens", str(args.tokens),
           "--batch-tokens", str(args.batch_tokens), "--row-tokens", str(args.row_tokens), "--long", str(args.long)]
    r = subprocess.run(cmd + (["--quick"] if args.quick else []), capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def memory(args) -> dict:
    return {f"{s},dolly,{lay},{loss}": child(f"{s},dolly,{lay},{loss}", args)
            for s in STUDENTS for lay in ("padded", "packed") for loss in LOSSES}


def checkpointing(args, device) -> dict:
    """--gradient-checkpointing on one --long-token sequence: step time (interleaved medians) and memory."""
    model, vocab = student("body", args.quick, max_positions=args.long)
    b = batches(sequences([args.long], vocab), vocab, args.long, None)[0]
    trainers = {"off": Trainer(model, device)}
    model2, _ = student("body", args.quick, max_positions=args.long)
    trainers["on"] = Trainer(model2, device, checkpointing=True)
    for t in trainers.values():
        t.step(b, "adakd_rkl")
    times = {k: [] for k in trainers}
    for _ in range(args.repeats):
        for k, t in trainers.items():
            times[k].append(t.timed([b], "adakd_rkl")[0])
    mem = {k: child(f"ckpt,{k}", args) for k in trainers}
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"tokens": args.long, "step_s": med, "memory": mem, "time_ratio": med["on"] / med["off"],
            "activation_ratio": mem["on"]["step_bytes"] / max(mem["off"]["step_bytes"], 1)}


def capture(args, device) -> dict:
    """The hf engine (the body model as teacher, top-64) over the dolly slice: real tokens/s padded vs packed."""
    from adakd.pipeline.engine_hf import HFEngine
    from adakd.common.tokens import Tokenized

    model, vocab = student("body", args.quick)
    lengths = stream_lengths("dolly", args.tokens * 2)
    rng = np.random.default_rng(1)
    items = []
    for r, n in enumerate(lengths):
        mask = np.ones(n, bool)
        mask[0] = False
        items.append(Tokenized(r, rng.integers(0, vocab, n).astype(np.int32), mask))
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d, safe_serialization=True)
        engines = {lay: HFEngine(d, K, dtype="auto", device=device.type, batch_tokens=args.batch_tokens,
                                 row_tokens=rt) for lay, rt in (("padded", None), ("packed", args.row_tokens))}
        from adakd.common.packing import grouped, planner

        plans = {lay: [g for g, _ in grouped(items, lambda t: len(t.input_ids), planner(e.batch_tokens, e.row_tokens))]
                 for lay, e in engines.items()}
        for lay, e in engines.items():
            e.score(plans[lay][0])
        times = {lay: [] for lay in engines}
        for _ in range(args.repeats):
            for lay, e in engines.items():
                sync(device)
                t = time.perf_counter()
                for g in plans[lay]:
                    e.score(g)
                sync(device)
                times[lay].append(time.perf_counter() - t)
        parity = numeric_parity(d, items[:args.parity], engines, device)
    real = sum(lengths)
    tps = {lay: real / statistics.median(v) for lay, v in times.items()}
    return {"real_tokens": real, "tokens_per_s": tps, "speedup": tps["packed"] / tps["padded"],
            "batches": {lay: len(p) for lay, p in plans.items()}, "parity": parity}


def numeric_parity(teacher: str, items, engines: dict, device) -> dict:
    """What a batch's layout changes in the cached numbers: each layout's targets against the teacher run on every
    sequence alone (no padding, no neighbour): the largest log-probability difference and how often the top-k
    ids (in order) are the same."""
    from adakd.common.packing import grouped, planner
    from adakd.pipeline.engine_hf import HFEngine

    alone = HFEngine(teacher, K, dtype="auto", device=device.type, batch_tokens=1, row_tokens=None)
    ref = [alone.score([t])[0] for t in items]
    out = {}
    for lay, e in engines.items():
        got = [s for g, _ in grouped(items, lambda t: len(t.input_ids), planner(e.batch_tokens, e.row_tokens))
               for s in e.score(g)]
        lp = max(float(np.abs(a.topk_logprobs - b.topk_logprobs).max()) for a, b in zip(got, ref))
        tgt = max(float(np.abs(a.target_logprob - b.target_logprob).max()) for a, b in zip(got, ref))
        same = np.mean(np.concatenate([(a.topk_ids == b.topk_ids).all(1) for a, b in zip(got, ref)]))
        out[lay] = {"max_abs_logprob": lp, "max_abs_target_logprob": tgt, "same_topk_ids": float(same)}
    out["positions"] = int(sum(len(r.target_logprob) for r in ref))
    return out


# ------------------------------------------------------------------------------------------ report


def report(res: dict, args) -> str:
    lines = [f"Measured by `python -m bench.throughput` ({res['device']}, --batch-tokens {args.batch_tokens}, "
             f"--row-tokens {args.row_tokens}, {args.tokens:,} real tokens of each stream per round, medians of "
             f"{args.repeats} rounds):", ""]
    lines.append("| student | data | layout | real / computed tokens (slice; whole stream) | CE real tok/s | "
                 "AdaKD-RKL real tok/s | step memory (MiB) |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- |")
    for sname, sr in res["training"].items():
        for shape, r in sr["shapes"].items():
            for lay in ("padded", "packed"):
                x = r[lay]
                mem = res["memory"].get(f"{sname},{shape},{lay},ce")
                m = f"{mem['step_bytes'] / 2**20:,.0f}" if mem else ""
                lines.append(f"| {sname} | {shape} | {lay} | {x['real_fraction']:.3f}; {x['stream_real_fraction']:.3f} | "
                             f"{x['ce_tokens_per_s']:,.0f} | {x['adakd_rkl_tokens_per_s']:,.0f} | {m} |")
    lines += ["", "| student | data | speed-up CE / AdaKD-RKL | allowed by the computed tokens | of which reached | "
              "KD step / CE step (packed) |", "| --- | --- | --- | --- | --- | --- |"]
    for sname, sr in res["training"].items():
        for shape, r in sr["shapes"].items():
            pred = f" (FLOPs predict {r['predicted_speedup']:.2f}x)" if "predicted_speedup" in r else ""
            lines.append(f"| {sname} | {shape} | {r['ce_speedup']:.2f}x / {r['adakd_rkl_speedup']:.2f}x{pred} | "
                         f"{r['allowed_speedup']:.2f}x | {r['ce_speedup_vs_allowed']:.0%} / "
                         f"{r['adakd_rkl_speedup_vs_allowed']:.0%} | {r['kd_over_ce_packed']:.3f} |")
    sw = res["row_sweep"]
    lines += ["", "Row length (body student, dolly, CE): " + "; ".join(
        f"{rt}: {x['stream_real_fraction']:.3f} real, {x['ce_tokens_per_s']:,.0f} real tok/s" for rt, x in sw.items()) + "."]
    c = res["checkpointing"]
    lines += ["", f"--gradient-checkpointing, body student, one {c['tokens']:,}-token sequence, AdaKD-RKL: step "
              f"{c['step_s']['off']:.2f} s -> {c['step_s']['on']:.2f} s ({c['time_ratio']:.2f}x), step memory "
              f"{c['memory']['off']['step_bytes'] / 2**20:,.0f} -> {c['memory']['on']['step_bytes'] / 2**20:,.0f} MiB "
              f"({c['activation_ratio']:.2f}x)."]
    e = res["capture"]
    p = e["parity"]
    lines += ["", f"hf engine (body model as teacher, top-{K}, dolly, {e['real_tokens']:,} tokens): "
              f"{e['tokens_per_s']['padded']:,.0f} -> {e['tokens_per_s']['packed']:,.0f} tokens/s "
              f"({e['speedup']:.2f}x). Against the teacher run on each sequence alone ({p['positions']:,} positions): "
              f"padded batches differ by at most {p['padded']['max_abs_logprob']:.2g} nats in the top-{K} log-probabilities "
              f"(same ids in the same order at {p['padded']['same_topk_ids']:.1%} of positions), packed ones by "
              f"{p['packed']['max_abs_logprob']:.2g} ({p['packed']['same_topk_ids']:.1%})."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=None, help="[default: 3; --quick 1]")
    ap.add_argument("--tokens", type=int, default=None,
                    help="real tokens of each shape's stream trained per round [default: 12000; --quick 1500]")
    ap.add_argument("--batch-tokens", type=int, default=None, help="[default: 8192; --quick 1024]")
    ap.add_argument("--row-tokens", type=int, default=None, help="[default: common.packing.DEFAULT_ROW_TOKENS]")
    ap.add_argument("--long", type=int, default=None,
                    help="sequence length of the checkpointing measurement [default: 4096; --quick 256]")
    ap.add_argument("--sweep", default=None, help="row lengths compared on dolly [default: 512,1024,2048,4096]")
    ap.add_argument("--parity", type=int, default=64, help="sequences scored alone for the numeric parity")
    ap.add_argument("--quick", action="store_true", help="tiny students and few tokens: seconds (for the tests)")
    ap.add_argument("--docs", action="store_true", help="write the table into docs/results.md")
    ap.add_argument("--save", default=None, help="also write the figures measured so far to this JSON file after each part")
    ap.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    import transformers

    from adakd.common.packing import DEFAULT_ROW_TOKENS

    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bars between the table's lines
    args.sweep = [int(x) for x in (args.sweep or ("128,256" if args.quick else "512,1024,2048,4096")).split(",")]
    for name, full, quick in (("repeats", 3, 1), ("tokens", 12000, 1500), ("batch_tokens", 8192, 1024), ("long", 4096, 256),
                              ("row_tokens", DEFAULT_ROW_TOKENS, 256)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.memory_of:
        print(json.dumps(memory_child(args.memory_of, args)))
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    res = {"bench": "throughput", "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "batch_tokens": args.batch_tokens, "row_tokens": args.row_tokens, "repeats": args.repeats,
           "tokens": args.tokens, "quick": args.quick}
    parts = {"training": lambda: training(args, device), "row_sweep": lambda: row_sweep(args, device),
             "memory": lambda: memory(args), "checkpointing": lambda: checkpointing(args, device),
             "capture": lambda: capture(args, device)}
    for name, part in parts.items():
        res[name] = part()
        if args.save:  # each part as it ends: a failure later keeps what was measured
            Path(args.save).parent.mkdir(parents=True, exist_ok=True)
            Path(args.save).write_text(json.dumps(res))
    body = res["training"]["body"]["shapes"]
    res["targets"] = {
        "real_fraction_ge_0.95": min(r["packed"]["stream_real_fraction"] for r in body.values()) >= 0.95,
        "body_dolly_speedup_ge_2.3": body["dolly"]["adakd_rkl_speedup"] >= 2.3 and body["dolly"]["ce_speedup"] >= 2.3,
        "within_10pct_of_allowed": min(body["dolly"]["ce_speedup_vs_allowed"],
                                       body["dolly"]["adakd_rkl_speedup_vs_allowed"]) >= 0.9,
        "kd_within_1.1x_ce": max(r["kd_over_ce_packed"] for r in body.values()) <= 1.1,
        "checkpointing_half_memory_1.4x_time": res["checkpointing"]["activation_ratio"] <= 0.5
        and res["checkpointing"]["time_ratio"] <= 1.4,
    }
    res["wall_s"] = time.perf_counter() - t0
    text = report(res, args)
    print(text)
    print("targets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in res["targets"].items()))
    if args.docs:
        replace_block(Path(__file__).resolve().parents[1] / "docs" / "results.md", "<!-- bench.throughput -->",
                      "<!-- /bench.throughput -->", text, "## Throughput: packed batches")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
