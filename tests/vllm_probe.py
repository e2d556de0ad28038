"""Child process for the vLLM tests: scores one batch with transformers and with vLLM (fast and stock
paths) and saves the arrays. vLLM runs here, not in pytest's process, because its CPU build can abort
at interpreter exit; this process ends with os._exit once the results are on disk.

usage: python vllm_probe.py TEACHER DATA K OUT.npz
"""

import os
import sys

import numpy as np


def main() -> None:
    teacher, data, k, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    from transformers import AutoTokenizer

    from adakd.common.data import DataSpec, iter_records, load_dataset
    from adakd.pipeline.engine_hf import HFEngine
    from adakd.pipeline.engine_vllm import VLLMEngine
    from adakd.common.tokens import RecordTokenizer, Tokenized

    spec = DataSpec(source=data)
    tok = RecordTokenizer(AutoTokenizer.from_pretrained(teacher), max_length=255)
    batch = [t for t in map(tok, iter_records(spec, load_dataset(spec))) if isinstance(t, Tokenized)]
    results = {"hf": HFEngine(teacher, k).score(batch)}
    v = VLLMEngine(teacher, k, max_model_len=256)
    results["fast"] = v.score(batch)
    v.fast = False
    results["stock"] = v.score(batch)
    v.close()
    arrays = {}
    for name, scored in results.items():
        arrays[f"{name}_ids"] = np.concatenate([s.topk_ids for s in scored])
        arrays[f"{name}_lp"] = np.concatenate([s.topk_logprobs for s in scored])
        arrays[f"{name}_tgt"] = np.concatenate([s.target_logprob for s in scored])
        arrays[f"{name}_records"] = np.array([s.record for s in scored])
    np.savez(out, **arrays)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
