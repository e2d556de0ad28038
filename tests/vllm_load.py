"""Child process: vLLM loads a trained student directory and scores one prompt (then os._exit, see vllm_probe)."""

import json
import os
import sys

import numpy as np


def main() -> None:
    from adakd.common.tokens import Tokenized
    from adakd.pipeline.engine_vllm import VLLMEngine

    model_dir = sys.argv[1]
    engine = VLLMEngine(model_dir, 4, max_model_len=64)
    ids = np.arange(1, 12, dtype=np.int32)
    mask = np.zeros(len(ids), bool)
    mask[5:] = True
    (scored,) = engine.score([Tokenized(0, ids, mask)])
    engine.close()
    print(json.dumps({"rows": int(scored.topk_ids.shape[0]), "finite": bool(np.isfinite(scored.topk_logprobs).all())}))
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
