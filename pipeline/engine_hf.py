"""The transformers engine: the reference, and the embedded default where vLLM is absent.

Batched forward with the output projection applied only at the positions needed (`logits_to_keep`),
then log_softmax in float32 and top-k on the device, a chunk of positions at a time.
"""

from __future__ import annotations

import numpy as np
import torch

from .engine import EngineError, Scored, trained_rows
from .tokens import Tokenized

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise EngineError(f"--dtype must be auto or one of {sorted(DTYPES)}, not {dtype!r}")
    return DTYPES[dtype]


class HFEngine:
    name = "hf"

    def __init__(self, model: str, k: int, dtype: str = "auto", device: str | None = None,
                 batch_tokens: int = 8192, chunk_positions: int = 2048, trust_remote_code: bool = False):
        import transformers
        from transformers import AutoModelForCausalLM

        self.version = transformers.__version__
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = resolve_dtype(dtype, self.device)
        try:
            self.model = AutoModelForCausalLM.from_pretrained(model, dtype=self.dtype, trust_remote_code=trust_remote_code)
        except Exception as e:
            raise EngineError(f"cannot load the teacher {model!r} with transformers ({type(e).__name__}: {e})") from e
        self.model.to(self.device).eval()
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        if k > self.vocab_size:
            raise EngineError(f"--top-k {k} is larger than the teacher's vocabulary ({self.vocab_size})")
        self.k = k
        self.batch_tokens = batch_tokens
        self.chunk_positions = chunk_positions

    @torch.inference_mode()
    def score(self, batch: list[Tokenized]) -> list[Scored]:
        T = max(len(s.input_ids) for s in batch)
        ids = torch.zeros(len(batch), T, dtype=torch.long)
        attn = torch.zeros(len(batch), T, dtype=torch.long)
        for b, s in enumerate(batch):
            ids[b, : len(s.input_ids)] = torch.from_numpy(s.input_ids.astype(np.int64))
            attn[b, : len(s.input_ids)] = 1
        rows = [trained_rows(s) for s in batch]
        keep = np.unique(np.concatenate(rows))
        where = [np.searchsorted(keep, r) for r in rows]
        ids, attn = ids.to(self.device), attn.to(self.device)
        keep_t = torch.from_numpy(keep).to(self.device)
        logits = self.model(input_ids=ids, attention_mask=attn, logits_to_keep=keep_t).logits
        b_idx = torch.from_numpy(np.concatenate([np.full(len(w), b) for b, w in enumerate(where)])).to(self.device)
        p_idx = torch.from_numpy(np.concatenate(where)).to(self.device)
        labels = torch.from_numpy(np.concatenate([s.input_ids[s.loss_mask] for s in batch]).astype(np.int64)).to(self.device)
        top_v, top_i, tgt = [], [], []
        for c in range(0, len(b_idx), self.chunk_positions):
            sl = slice(c, c + self.chunk_positions)
            lp = logits[b_idx[sl], p_idx[sl]].float().log_softmax(-1)
            v, i = lp.topk(self.k, dim=-1)
            top_v.append(v)
            top_i.append(i)
            tgt.append(lp.gather(1, labels[sl, None])[:, 0])
        v = torch.cat(top_v).cpu().numpy()
        i = torch.cat(top_i).to(torch.int32).cpu().numpy()
        t = torch.cat(tgt).cpu().numpy()
        out, o = [], 0
        for s, r in zip(batch, rows):
            out.append(Scored(s.record, i[o:o + len(r)], v[o:o + len(r)], t[o:o + len(r)]))
            o += len(r)
        return out

    def close(self) -> None:
        self.model = None
