"""Trainer-step benchmark: what does KD (and AdaKD) cost over plain cross-entropy fine-tuning?

    python -m bench.trainer [--repeats 5] [--hidden 256] [--layers 4] [--batch 4] [--seq 256]

Student: Llama-shaped with the real 50,257-token GPT-2 vocabulary (../shared/tokenizers/gpt2), random
weights, float32 on CPU (bfloat16 autocast on GPU). One batch, every position trained, top-64 targets
(sorted, with a tail). Each variant is one full training step (forward, backward, AdamW step):
  ce            our chunked cross-entropy from hidden states (kd_weight 0): the plain fine-tuning cost
  hf_ce         transformers' own loss (model(labels=...)): materializes (B, T, V) logits
  rkl           reverse KL on the sparse targets, chunked
  adakd_rkl     AdaKD over reverse KL, chunked, LATF ratio 1.0 (the start of training)
  adakd_rkl_r50 the same at LATF ratio 0.5 (later in training: only half the positions are distilled)
  dense_adakd   AdaKD over reverse KL computed the peers' way: (B, T, V) student log-probabilities
Time: median over repeats, variants interleaved in one process. Peak memory: each variant in its own
process (RSS sampled every 0.5 ms during the step on CPU, after malloc_trim; max allocated on GPU);
`step MiB` is that peak minus the memory held just before the step (model, optimizer state, batch).
The last line is a JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

VARIANTS = ("ce", "hf_ce", "rkl", "adakd_rkl", "adakd_rkl_r50", "dense_adakd")
K = 64


def build(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    from .common import gpt2_tokenizer

    V = len(gpt2_tokenizer())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=args.hidden // 64, max_position_embeddings=max(1024, args.seq),
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (args.batch, args.seq), generator=g)
    B, T = ids.shape
    rows = torch.arange(B).repeat_interleave(T - 1)
    cols = torch.arange(T - 1).repeat(B)
    teacher = torch.randn(len(rows), V, generator=g) * 3
    lp = teacher.log_softmax(-1)
    v, i = lp.topk(K, -1)
    tail = torch.log1p(-v.exp().sum(-1).clamp(max=1 - 1e-7))
    from adakd.trainer.kd_loss import Targets

    targets = Targets(i, v, tail, ids[:, 1:].reshape(-1), V)
    del teacher, lp
    return model, ids, rows, cols, targets


def make_step(name: str, model, ids, rows, cols, targets, device):
    from adakd.trainer.adakd import AdaKDConfig, LATFState
    from adakd.trainer.kd_loss import LossConfig, kd_loss
    from adakd.trainer.losses import rkl, student_buckets, teacher_buckets

    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    base = model.model
    W = model.lm_head.weight
    mask = torch.ones_like(ids)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    cfgs = {
        "ce": (LossConfig(kd_weight=0.0, adakd=AdaKDConfig(latf=False, idts=False)), 1.0),
        "rkl": (LossConfig(loss="rkl", adakd=AdaKDConfig(latf=False, idts=False)), 1.0),
        "adakd_rkl": (LossConfig(loss="rkl"), 1.0),
        "adakd_rkl_r50": (LossConfig(loss="rkl"), 0.5),
    }

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast:
            if name == "hf_ce":
                loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
            elif name == "dense_adakd":
                h = base(input_ids=ids, attention_mask=mask).last_hidden_state
                logits = model.lm_head(h).float()[rows, cols]  # (N, V): what the peers hold
                lp_t = teacher_buckets(targets.topk_logprobs, targets.tail_logmass, targets.vocab_size)
                with torch.no_grad():
                    from adakd.trainer.adakd import idts_temperatures
                    from adakd.trainer.losses import hellinger

                    s = hellinger(lp_t, student_buckets(logits, targets.topk_ids))
                    T = idts_temperatures(s, 1.0, 0.5)
                d = rkl(teacher_buckets(targets.topk_logprobs, targets.tail_logmass, targets.vocab_size, T),
                        student_buckets(logits, targets.topk_ids, T))
                loss = (T ** 2 * d).mean()
            else:
                cfg, ratio = cfgs[name]
                h = base(input_ids=ids, attention_mask=mask).last_hidden_state[rows, cols]
                loss = kd_loss(h, W, targets, cfg, LATFState(ratio=ratio)).loss
        loss.backward()
        opt.step()

    return step


def peak_memory(name: str, args) -> dict:
    """Run one variant alone and report its step's peak memory."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, ids, rows, cols, targets = build(args)
    model.to(device)
    ids, rows, cols = ids.to(device), rows.to(device), cols.to(device)
    from adakd.trainer.kd_loss import Targets

    targets = Targets(*(x.to(device) for x in (targets.topk_ids, targets.topk_logprobs, targets.tail_logmass, targets.labels)),
                      targets.vocab_size)
    step = make_step(name, model, ids, rows, cols, targets, device)
    step()  # optimizer state allocated: memory from here on is the step's own
    from .common import step_memory

    return step_memory(step, device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_of:
        print(json.dumps(peak_memory(args.memory_of, args)))
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, ids, rows, cols, targets = build(args)
    model.to(device)
    steps = {n: make_step(n, model, ids, rows, cols, targets, device) for n in VARIANTS}
    times: dict[str, list[float]] = {n: [] for n in VARIANTS}
    for n in VARIANTS:
        steps[n]()  # warm-up
    for _ in range(args.repeats):
        for n in VARIANTS:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            steps[n]()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[n].append(time.perf_counter() - t)
    mem = {}
    for n in VARIANTS:
        cmd = [sys.executable, "-m", "bench.trainer", "--memory-of", n, "--hidden", str(args.hidden), "--layers",
               str(args.layers), "--batch", str(args.batch), "--seq", str(args.seq)]
        r = subprocess.run(cmd, capture_output=True, text=True, check=True)
        mem[n] = json.loads(r.stdout.strip().splitlines()[-1])
    med = {n: statistics.median(v) for n, v in times.items()}
    ce_t, ce_m, ce_s = med["ce"], mem["ce"]["peak_bytes"], mem["ce"]["step_bytes"]
    rows_out = []
    print(f"student: Llama hidden {args.hidden} x {args.layers} layers, vocab 50,257; batch {args.batch} x {args.seq} "
          f"tokens, all trained; k = {K}; {device.type}; medians of {args.repeats}")
    print(f"{'variant':<15} {'step s':>8} {'x ce':>6} {'peak MiB':>9} {'x ce':>6} {'step MiB':>9} {'x ce':>6}")
    for n in VARIANTS:
        r = {"variant": n, "step_s": med[n], "time_vs_ce": med[n] / ce_t, "peak_bytes": mem[n]["peak_bytes"],
             "peak_vs_ce": mem[n]["peak_bytes"] / ce_m, "step_bytes": mem[n]["step_bytes"],
             "step_mem_vs_ce": mem[n]["step_bytes"] / max(ce_s, 1)}
        rows_out.append(r)
        print(f"{n:<15} {r['step_s']:>8.3f} {r['time_vs_ce']:>6.2f} {r['peak_bytes'] / 2**20:>9.0f} {r['peak_vs_ce']:>6.2f} "
              f"{r['step_bytes'] / 2**20:>9.0f} {r['step_mem_vs_ce']:>6.2f}")
    adakd_over_base = med["adakd_rkl"] / med["rkl"]
    print(f"AdaKD over its base (reverse KL): {adakd_over_base:.3f}x at LATF ratio 1.0, "
          f"{med['adakd_rkl_r50'] / med['rkl']:.3f}x at ratio 0.5 (target <= 1.05)")
    print(f"KD step (AdaKD over RKL) vs CE step: {med['adakd_rkl'] / ce_t:.3f}x time, "
          f"{mem['adakd_rkl']['peak_bytes'] / ce_m:.3f}x peak memory (target <= 1.10)")
    print(json.dumps({"bench": "trainer", "device": device.type, "hidden": args.hidden, "layers": args.layers,
                      "batch": args.batch, "seq": args.seq, "k": K, "variants": rows_out,
                      "adakd_over_rkl": adakd_over_base, "adakd_r50_over_rkl": med["adakd_rkl_r50"] / med["rkl"]}))


if __name__ == "__main__":
    main()
