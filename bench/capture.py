"""Teacher-capture benchmark: does `cache-teacher` keep the teacher busy, and how fast is our side?

    python -m bench.capture [--records 96] [--repeats 5] [--engines hf,vllm]

Teacher: Llama-shaped, the real 50,257-token GPT-2 tokenizer (../shared/tokenizers/gpt2), hidden 256,
4 layers, random weights (output layer scaled so distributions are peaked), float32. Data: dolly train
records (MiniLLM prompt + response; response tokens trained). k = 64. Per engine, in one process with
one loaded teacher:
  - reference: the engine computing log-probabilities at every position with the least output
    (vLLM: prompt_logprobs=1, flat, no detokenization; transformers: forward + log_softmax, nothing kept);
  - `cache-teacher` end to end (the library call the CLI makes) on the same records, and the ratio.
Then the post-processing ceiling on one core: engine output -> encoded shard bytes, for our array path
and for vLLM's stock path (its conversion of the prompt top-k into Python lists, then ours from those).
Then the cost of sampled targets: per engine, `cache-teacher` end to end with top-64, sampled (N = 64) and
hybrid (top-8 + 32 draws) on the first `--sampling-records` records, in turns in one process, and each
kind's speed as a ratio to top-64's within the same turn.
Speeds are medians over repeats; the last line is a JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import SHARED, gpt2_tokenizer

K = 64


def build_teacher(out: Path, hidden: int = 256, layers: int = 4, max_positions: int = 1024) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = gpt2_tokenizer()
    tok.save_pretrained(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, max_position_embeddings=max_positions,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(25.0)
    model.save_pretrained(out, safe_serialization=True)
    return out


def dolly(out: Path, n: int) -> Path:
    rows = [json.loads(line) for line in open(SHARED / "data" / "dolly" / "train.jsonl")][:n]
    out.write_text("".join(json.dumps({"prompt": r["prompt"], "output": r["output"]}) + "\n" for r in rows))
    return out


def tokenized(teacher: Path, data: Path, max_length: int):
    from transformers import AutoTokenizer

    from adakd.common.data import DataSpec, iter_records, load_dataset
    from adakd.common.tokens import RecordTokenizer, Tokenized

    spec = DataSpec(source=str(data))
    tok = RecordTokenizer(AutoTokenizer.from_pretrained(teacher), max_length)
    return [t for t in map(tok, iter_records(spec, load_dataset(spec))) if isinstance(t, Tokenized)]


def reference_hf(engine, seqs) -> float:
    """Forward + log_softmax over every position, nothing kept: the least transformers can do."""
    import torch

    t = time.perf_counter()
    with torch.inference_mode():
        budget = engine.batch_tokens
        i = 0
        while i < len(seqs):
            j, longest = i, 0
            while j < len(seqs) and max(longest, len(seqs[j].input_ids)) * (j - i + 1) <= budget:
                longest = max(longest, len(seqs[j].input_ids))
                j += 1
            j = max(j, i + 1)
            T = max(len(s.input_ids) for s in seqs[i:j])
            ids = torch.zeros(j - i, T, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for b, s in enumerate(seqs[i:j]):
                ids[b, : len(s.input_ids)] = torch.from_numpy(s.input_ids.astype(np.int64))
                attn[b, : len(s.input_ids)] = 1
            engine.model(input_ids=ids, attention_mask=attn).logits.float().log_softmax(-1)
            i = j
    return time.perf_counter() - t


def reference_vllm(engine, seqs) -> float:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from adakd.pipeline.engine_vllm import _FastPath

    params = SamplingParams(max_tokens=1, prompt_logprobs=1, flat_logprobs=True, detokenize=False)
    prompts = [TokensPrompt(prompt_token_ids=s.input_ids.tolist()) for s in seqs]
    _FastPath.enabled = False  # the stock output path, as a user of vLLM gets it
    t = time.perf_counter()
    engine.llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - t


def end_to_end(engine, teacher: Path, data: Path, max_length: int) -> tuple[float, int]:
    from adakd.pipeline.capture import CaptureConfig, cache_teacher
    from adakd.common.data import DataSpec

    out = Path(tempfile.mkdtemp(prefix="adakd-bench-"))
    try:
        cfg = CaptureConfig(teacher=str(teacher), data=DataSpec(source=str(data)), out=str(out / "c"), k=K,
                            engine=engine.name, max_length=max_length, show_progress=False)
        s = cache_teacher(cfg, engine=engine)
        return s.wall_s, s.run_tokens
    finally:
        shutil.rmtree(out, ignore_errors=True)


def measure_engine(name: str, teacher: Path, data: Path, seqs, max_length: int, repeats: int) -> tuple[dict, object]:
    if name == "hf":
        from adakd.pipeline.engine_hf import HFEngine

        engine = HFEngine(str(teacher), K)
        ref_fn = reference_hf
    else:
        from adakd.pipeline.engine_vllm import VLLMEngine

        engine = VLLMEngine(str(teacher), K, max_model_len=max_length + 1)
        ref_fn = reference_vllm
        engine.score(seqs[:2])  # warm-up (the first call compiles and allocates)
        reference_vllm(engine, seqs[:2])
    tokens = sum(len(s.input_ids) for s in seqs)
    refs, e2es = [], []
    for rep in range(repeats):  # alternate which goes first, so drift on a shared machine cancels out
        for which in ((0, 1) if rep % 2 == 0 else (1, 0)):
            if which == 0:
                refs.append(tokens / ref_fn(engine, seqs))
            else:
                wall, run_tokens = end_to_end(engine, teacher, data, max_length)
                assert run_tokens == tokens
                e2es.append(tokens / wall)
    sample = None
    if name == "vllm":
        from adakd.pipeline.engine_vllm import _FastPath

        from vllm import SamplingParams  # noqa: F401

        _FastPath.enabled = True
        outs = engine.llm.generate([__import__("vllm.inputs", fromlist=["TokensPrompt"]).TokensPrompt(
            prompt_token_ids=s.input_ids.tolist()) for s in seqs], engine.params, use_tqdm=False)
        sample = [(s, o.prompt_logprobs) for s, o in zip(seqs, outs)]
    engine.close()
    ratios = [e / r for e, r in zip(e2es, refs)]
    return {"engine": name, "tokens": tokens, "reference_tokens_s": statistics.median(refs),
            "end_to_end_tokens_s": statistics.median(e2es), "ratio": statistics.median(ratios),
            "ratios": ratios}, sample


def ceiling(sample, repeats: int) -> dict:
    """One core: engine output -> encoded shard bytes, our array path vs vLLM's stock list path."""
    import pyarrow as pa
    import torch
    from vllm.logprobs import create_prompt_logprobs
    from vllm.v1.engine.logprobs import LogprobsProcessor
    from vllm.v1.outputs import LogprobsTensors

    from adakd.pipeline.capture import _sequence
    from adakd.pipeline.engine_vllm import VLLMEngine, _FastPath
    from adakd.storage import Encoding
    from adakd.storage.shard import encode_shard
    from adakd.storage.writer import validate_sequence

    torch.set_num_threads(1)
    pa.set_cpu_count(1)
    enc = Encoding(k=K, vocab_size=50257)
    eng = VLLMEngine.__new__(VLLMEngine)  # only its output handling: k ranks of 50,257 real ids, no draws
    eng.k = eng.K = K
    eng.real_vocab, eng.sampler = 50257, None
    positions = sum(s.num_positions for s, _ in sample)
    arrays = [(np.concatenate(p.token_ids), np.concatenate(p.logprobs)) for _, p in sample]

    def ours() -> None:
        seqs = [_sequence(s, eng._scored(s, p)) for s, p in sample]
        for seq in seqs:
            validate_sequence(seq, enc)
        encode_shard(seqs, enc, 16384)

    _FastPath.enabled = False

    def stock() -> None:
        seqs = []
        for (s, _), (ids, lps) in zip(sample, arrays):
            proc = LogprobsProcessor(tokenizer=None, logprobs=None, prompt_logprobs=create_prompt_logprobs(True),
                                     cumulative_logprob=None, num_logprobs=None, num_prompt_logprobs=K)
            ranks = torch.ones(len(ids), dtype=torch.long)
            proc._update_prompt_logprobs(LogprobsTensors(torch.from_numpy(ids), torch.from_numpy(lps), ranks))
            seqs.append(_sequence(s, eng._scored(s, proc.pop_prompt_logprobs())))
        for seq in seqs:
            validate_sequence(seq, enc)
        encode_shard(seqs, enc, 16384)

    def timed(fn) -> float:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    rows = sum(len(a[0]) for a in arrays)  # every scored position the engine hands back
    t_ours, t_stock = timed(ours), timed(stock)
    return {"engine_rows": rows, "trained_positions": positions,
            "ours_rows_s": rows / t_ours, "ours_trained_positions_s": positions / t_ours,
            "stock_rows_s": rows / t_stock, "stock_trained_positions_s": positions / t_stock, "speedup": t_stock / t_ours}


KINDS = {"topk": dict(k=K), "sampled": dict(k=0, targets="sampled", samples=64),
         "hybrid": dict(k=8, targets="hybrid", samples=32)}


def sampling_cost(name: str, teacher: Path, data: Path, max_length: int, repeats: int) -> dict:
    """tokens/s of cache-teacher per target kind with one engine per kind kept loaded, and ratios to top-k."""
    from adakd.pipeline.capture import CaptureConfig, _sampler, cache_teacher, vllm_batch_tokens
    from adakd.common.data import DataSpec

    cfgs = {kind: CaptureConfig(teacher=str(teacher), data=DataSpec(source=str(data)), out="", engine=name,
                                max_length=max_length, show_progress=False, **o) for kind, o in KINDS.items()}
    engines = {}
    for kind, cfg in cfgs.items():
        if name == "hf":
            from adakd.pipeline.engine_hf import HFEngine

            engines[kind] = HFEngine(str(teacher), cfg.k, sampler=_sampler(cfg))
        else:
            from adakd.pipeline.engine_vllm import VLLMEngine

            engines[kind] = VLLMEngine(str(teacher), cfg.k, max_model_len=max_length + 1, sampler=_sampler(cfg),
                                       batch_tokens=vllm_batch_tokens(cfg, 50257))
    speeds: dict[str, list[float]] = {kind: [] for kind in cfgs}
    ratios: dict[str, list[float]] = {kind: [] for kind in cfgs if kind != "topk"}
    try:
        for rep in range(repeats + 1):  # turn 0 warms every engine up and is not counted
            order = list(cfgs) if rep % 2 == 0 else list(reversed(cfgs))
            turn = {}
            for kind in order:
                out = Path(tempfile.mkdtemp(prefix="adakd-bench-"))
                try:
                    cfgs[kind].out = str(out / "c")
                    s = cache_teacher(cfgs[kind], engine=engines[kind])
                    turn[kind] = s.run_tokens / s.wall_s
                finally:
                    shutil.rmtree(out, ignore_errors=True)
            if rep:
                for kind, v in turn.items():
                    speeds[kind].append(v)
                for kind in ratios:
                    ratios[kind].append(turn[kind] / turn["topk"])
    finally:
        for e in engines.values():
            e.close()
    return {"engine": name, **{f"{kind}_tokens_s": statistics.median(v) for kind, v in speeds.items()},
            **{f"{kind}_vs_topk": statistics.median(v) for kind, v in ratios.items()}, "ratios": ratios}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--engines", default="hf,vllm")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--sampling-records", type=int, default=24, help="records for the sampled-targets cost (0: skip)")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(tempfile.mkdtemp(prefix="adakd-capture-"))
    try:
        teacher = build_teacher(work / "teacher")
        data = dolly(work / "dolly.jsonl", args.records)
        seqs = tokenized(teacher, data, args.max_length)
        results, sample = [], None
        for name in args.engines.split(","):
            r, s = measure_engine(name, teacher, data, seqs, args.max_length, args.repeats)
            results.append(r)
            sample = s or sample
        ceil = ceiling(sample, args.repeats) if sample else None
        sampling = []
        if args.sampling_records:
            few = dolly(work / "few.jsonl", args.sampling_records)
            sampling = [sampling_cost(name, teacher, few, args.max_length, args.repeats) for name in args.engines.split(",")]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n_pos = sum(s.num_positions for s in seqs)
    print(f"teacher: Llama hidden 256 x 4 layers, vocab 50,257 (GPT-2), float32; {args.records} dolly records, "
          f"{results[0]['tokens']:,} tokens, {n_pos:,} trained positions; k = {K}; medians of {args.repeats}")
    print(f"{'engine':<8} {'reference tok/s':>16} {'cache-teacher tok/s':>20} {'ratio':>7}  (target >= 0.95)")
    for r in results:
        print(f"{r['engine']:<8} {r['reference_tokens_s']:>16,.0f} {r['end_to_end_tokens_s']:>20,.0f} {r['ratio']:>7.2f}")
    if ceil:
        print(f"post-processing ceiling, one core, k = {K} (engine output -> encoded shard bytes), per second:")
        print(f"  {'path':<22} {'engine positions':>17} {'trained positions':>18}")
        print(f"  {'ours (arrays)':<22} {ceil['ours_rows_s']:>17,.0f} {ceil['ours_trained_positions_s']:>18,.0f}   (target >= 200,000)")
        print(f"  {'vLLM stock (lists)':<22} {ceil['stock_rows_s']:>17,.0f} {ceil['stock_trained_positions_s']:>18,.0f}")
        print(f"  speed-up {ceil['speedup']:.1f}x")
    if sampling:
        print(f"sampled targets: cache-teacher tokens/s on {args.sampling_records} records, ratio to top-{K} in the same turn")
        print(f"  {'engine':<8} {'top-64':>9} {'sampled N=64':>13} {'hybrid 8+32':>12} {'sampled/top-k':>14} {'hybrid/top-k':>13}")
        for r in sampling:
            print(f"  {r['engine']:<8} {r['topk_tokens_s']:>9,.0f} {r['sampled_tokens_s']:>13,.0f} {r['hybrid_tokens_s']:>12,.0f} "
                  f"{r['sampled_vs_topk']:>14.2f} {r['hybrid_vs_topk']:>13.2f}")
    print(json.dumps({"bench": "capture", "k": K, "records": args.records, "engines": results, "ceiling": ceil,
                      "sampling_records": args.sampling_records, "sampling": sampling}))


if __name__ == "__main__":
    main()
    import sys

    if "vllm" in sys.modules:  # vLLM's CPU build can abort in interpreter teardown; the figures are out (not a library)
        sys.stdout.flush()
        os._exit(0)
