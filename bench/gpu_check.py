"""The prepared GPU check of packed batches (one script, at most 8 minutes on one H100/H200; `--dry-run`: seconds on CPU).

    python -m bench.gpu_check [--dry-run] [--lengths FILE.json] [--budget-s 420]

bfloat16 autocast, as train-student runs on GPU. On dolly-shaped lengths (the real GPT-2 lengths of the shared
dolly training set: from --lengths, a JSON list written here beforehand by `--write-lengths FILE`, or from
../shared; else a log-normal stand-in, flagged in the output):
  1. packed = padded: a student's logits at the trained positions of the same sequences in both layouts, the
     largest difference relative to the largest logit, in bfloat16 (and in float32 for scale);
  2. training (StudentLoss + AdamW, one step per micro-batch of --batch-tokens): real tokens/s padded vs packed,
     CE and AdaKD over reverse KL, peak GPU memory, the KD step against the CE step on the same packed batches;
  3. --gradient-checkpointing on two 4,096-token sequences: peak memory and step time with and without;
  4. the hf engine (`cache-teacher --engine hf`'s scorer, top-64, the same model as teacher in bfloat16): tokens/s
     padded vs packed.
Each part stops early when the time budget runs out (said in its figures). The last line is one JSON object.

On a lent device (the image has torch, transformers, pyarrow, click, safetensors, tqdm; not zstandard, which
`storage` needs), prepared here:
    echo /.whl/ >> .git/info/exclude; echo /runs/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl zstandard==0.25.0
    python -m bench.gpu_check --write-lengths runs/dolly_lengths.json
then run (carry [".whl", "runs"], timeout_s 540):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:. &&
    PYTHONUNBUFFERED=1 python -m bench.gpu_check --lengths runs/dolly_lengths.json | tee $OUT/gpu_check.log
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SIZES = {  # a ~1B-parameter Llama student (fp32 weights + AdamW: ~15 GB), and the dry run's toy
    "gpu": dict(hidden=2048, layers=16, heads=16, vocab=32000, batch_tokens=16384, tokens=65536, long=4096),
    "dry": dict(hidden=64, layers=2, heads=2, vocab=512, batch_tokens=1024, tokens=1500, long=256),
}


class Clock:
    """The script's time budget: parts check `left()` and stop early rather than overrun the lease."""

    def __init__(self, budget_s: float):
        self.t0, self.budget = time.perf_counter(), budget_s

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)


def lengths(args) -> tuple[list[int], str]:
    """Dolly's real GPT-2 lengths in a seeded shuffled order, and where they came from."""
    rng = np.random.default_rng(0)
    if args.lengths:
        src, ls = args.lengths, np.array(json.loads(Path(args.lengths).read_text()))
    else:
        try:
            from .throughput import real_lengths

            src, ls = "../shared dolly train", real_lengths("dolly")
        except Exception:  # no ../shared on the device machine: a stand-in with dolly's median and spread
            src, ls = "log-normal stand-in (median 120)", np.clip(rng.lognormal(np.log(120), 0.6, 11435), 8, 4096).astype(int)
    return ls[rng.permutation(len(ls))].tolist(), src


def model(spec: dict, max_positions: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=spec["vocab"], hidden_size=spec["hidden"],
                                        intermediate_size=spec["hidden"] * 11 // 4, num_hidden_layers=spec["layers"],
                                        num_attention_heads=spec["heads"], num_key_value_heads=spec["heads"],
                                        max_position_embeddings=max_positions, tie_word_embeddings=False))


def slice_of(ls: list[int], tokens: int) -> list[int]:
    return ls[: int(np.searchsorted(np.cumsum(ls), tokens)) + 1]


@torch.no_grad()
def parity(m, seqs, vocab: int, device) -> dict:
    """Logits at the trained positions, packed vs padded, in bfloat16 autocast (device) and float32."""
    from adakd.common.packing import layout_of
    from adakd.trainer.batches import collate
    from adakd.trainer.head import final_hidden, output_head

    lens = [len(s.input_ids) for s in seqs]
    packed = collate(seqs, vocab, None, layout=layout_of(lens, 8 * 1024, 1024)).to(device)
    padded = collate(seqs, vocab, None).to(device)
    head = output_head(m)
    out = {}
    for name, ctx in (("bf16", torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")),
                      ("fp32", torch.autocast(device.type, enabled=False))):
        with ctx:
            a = head.logits(final_hidden(m, **packed.model_inputs())[packed.rows, packed.cols]).float()
            b = head.logits(final_hidden(m, **padded.model_inputs())[padded.rows, padded.cols]).float()
        scale = b.abs().max().item()
        out[name] = {"max_abs": (a - b).abs().max().item(), "scale": scale,
                     "relative": (a - b).abs().max().item() / max(scale, 1e-9),
                     "same_argmax": (a.argmax(-1) == b.argmax(-1)).float().mean().item()}
    out["positions"] = int(packed.rows.numel())
    out["ok"] = out["bf16"]["relative"] <= 2e-2 and out["fp32"]["relative"] <= 1e-4
    return out


def training(m, ls, spec, device, clock: Clock) -> dict:
    from .throughput import LOSSES, Trainer, batches, sequences

    seqs = sequences(slice_of(ls, spec["tokens"]), spec["vocab"])
    tr = Trainer(m, device)
    data = {"padded": batches(seqs, spec["vocab"], spec["batch_tokens"], None),
            "packed": batches(seqs, spec["vocab"], spec["batch_tokens"], 1024)}
    res: dict = {lay: {"batches": len(bs), "real_tokens": sum(b.tokens for b in bs),
                       "computed_tokens": sum(b.computed for b in bs)} for lay, bs in data.items()}
    for lay, bs in data.items():
        res[lay]["real_fraction"] = res[lay]["real_tokens"] / res[lay]["computed_tokens"]
        tr.step(bs[0], "adakd_rkl")  # warm-up
    times: dict = {(lay, loss): [] for lay in data for loss in LOSSES}
    peaks: dict = {}
    for rep in range(2):
        for key in times:
            if clock.left() < 60:
                res["stopped_early"] = True
                break
            torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
            times[key].append(sum(tr.timed(data[key[0]], key[1])))
            if device.type == "cuda":
                peaks[key] = torch.cuda.max_memory_allocated()
    for (lay, loss), ts in times.items():
        if ts:
            res[lay][f"{loss}_tokens_per_s"] = res[lay]["real_tokens"] / statistics.median(ts)
            res[lay][f"{loss}_peak_gib"] = peaks.get((lay, loss), 0) / 2**30
    for loss in LOSSES:
        if f"{loss}_tokens_per_s" in res["packed"] and f"{loss}_tokens_per_s" in res["padded"]:
            res[f"{loss}_speedup"] = res["packed"][f"{loss}_tokens_per_s"] / res["padded"][f"{loss}_tokens_per_s"]
    if times[("packed", "ce")] and times[("packed", "adakd_rkl")]:
        res["kd_over_ce_packed"] = statistics.median(times[("packed", "adakd_rkl")]) / statistics.median(times[("packed", "ce")])
    del tr
    return res


def checkpointing(spec, device, clock: Clock) -> dict:
    from .throughput import Trainer, batches, sequences

    seqs = sequences([spec["long"]] * 2, spec["vocab"])
    res = {}
    for mode in ("off", "on"):
        if clock.left() < 45:
            res["stopped_early"] = True
            break
        m = model(spec, spec["long"])
        tr = Trainer(m, device, checkpointing=mode == "on")
        b = batches(seqs, spec["vocab"], 2 * spec["long"], None)[0]
        tr.step(b, "adakd_rkl")
        if device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        ts = [tr.timed([b], "adakd_rkl")[0] for _ in range(3)]
        peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else 0
        res[mode] = {"step_s": statistics.median(ts), "step_gib": peak / 2**30}
        del tr, m
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "on" in res and "off" in res:
        res["time_ratio"] = res["on"]["step_s"] / res["off"]["step_s"]
        res["memory_ratio"] = res["on"]["step_gib"] / max(res["off"]["step_gib"], 1e-9)
    return res


def capture(m, ls, spec, device, clock: Clock) -> dict:
    from adakd.common.packing import grouped, planner
    from adakd.pipeline.engine_hf import HFEngine
    from adakd.common.tokens import Tokenized

    rng = np.random.default_rng(1)
    items = []
    for r, n in enumerate(slice_of(ls, spec["tokens"])):
        mask = np.ones(n, bool)
        mask[0] = False
        items.append(Tokenized(r, rng.integers(0, spec["vocab"], n).astype(np.int32), mask))
    res = {}
    with tempfile.TemporaryDirectory() as d:
        m.save_pretrained(d, safe_serialization=True)
        for lay, rt in (("padded", None), ("packed", 1024)):
            if clock.left() < 30:
                res["stopped_early"] = True
                break
            e = HFEngine(d, 64, dtype="auto", device=device.type, batch_tokens=8192, row_tokens=rt)
            groups = [g for g, _ in grouped(items, lambda t: len(t.input_ids), planner(8192, e.row_tokens))]
            e.score(groups[0])
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for g in groups:
                e.score(g)
            if device.type == "cuda":
                torch.cuda.synchronize()
            res[lay] = {"tokens_per_s": sum(len(i.input_ids) for i in items) / (time.perf_counter() - t),
                        "batches": len(groups)}
            e.close()
    if "padded" in res and "packed" in res:
        res["speedup"] = res["packed"]["tokens_per_s"] / res["padded"]["tokens_per_s"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="toy sizes on whatever device is here (CPU: seconds)")
    ap.add_argument("--lengths", default=None, help="JSON list of sequence lengths (see --write-lengths)")
    ap.add_argument("--write-lengths", default=None, help="write dolly's real GPT-2 lengths (from ../shared) here and stop")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop measuring after this many seconds")
    args = ap.parse_args()
    if args.write_lengths:
        from .throughput import real_lengths

        Path(args.write_lengths).parent.mkdir(parents=True, exist_ok=True)
        dolly = real_lengths("dolly").tolist()
        Path(args.write_lengths).write_text(json.dumps(dolly))
        print(json.dumps({"wrote": args.write_lengths, "sequences": len(dolly)}))
        return
    import transformers

    transformers.utils.logging.disable_progress_bar()
    clock = Clock(args.budget_s)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    spec = SIZES["dry" if args.dry_run else "gpu"]
    ls, src = lengths(args)
    res = {"bench": "gpu_check", "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "dry_run": args.dry_run, "lengths": src, "spec": spec}
    m = model(spec, 8192).to(device)
    from .throughput import sequences

    res["parity"] = parity(m, sequences(slice_of(ls, 3000 if not args.dry_run else 600), spec["vocab"]), spec["vocab"],
                           device)
    print(f"packed = padded logits: bf16 {res['parity']['bf16']['relative']:.2e} of the largest logit, fp32 "
          f"{res['parity']['fp32']['relative']:.2e} ({'ok' if res['parity']['ok'] else 'NOT within tolerance'})", flush=True)
    res["training"] = training(m, ls, spec, device, clock)
    t = res["training"]
    for lay in ("padded", "packed"):
        x = t[lay]
        print(f"train {lay:6s}: real/computed {x['real_fraction']:.3f}, CE {x.get('ce_tokens_per_s', 0):,.0f} tok/s, "
              f"AdaKD-RKL {x.get('adakd_rkl_tokens_per_s', 0):,.0f} tok/s, peak {x.get('adakd_rkl_peak_gib', 0):.1f} GiB",
              flush=True)
    print(f"packed speed-up CE {t.get('ce_speedup', 0):.2f}x, AdaKD-RKL {t.get('adakd_rkl_speedup', 0):.2f}x; KD/CE step "
          f"{t.get('kd_over_ce_packed', 0):.3f}", flush=True)
    m.cpu()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    res["checkpointing"] = checkpointing(spec, device, clock)
    c = res["checkpointing"]
    if "time_ratio" in c:
        print(f"gradient checkpointing, 2 x {spec['long']} tokens: {c['time_ratio']:.2f}x step time, "
              f"{c['memory_ratio']:.2f}x step memory", flush=True)
    res["capture"] = capture(m, ls, spec, device, clock)
    if "speedup" in res["capture"]:
        print(f"hf engine: {res['capture']['padded']['tokens_per_s']:,.0f} -> {res['capture']['packed']['tokens_per_s']:,.0f} "
              f"tokens/s ({res['capture']['speedup']:.2f}x)", flush=True)
    res["wall_s"] = time.perf_counter() - clock.t0
    print(json.dumps(res))


if __name__ == "__main__":
    main()
