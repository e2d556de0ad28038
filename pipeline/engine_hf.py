"""The transformers engine: the reference, and the embedded default where vLLM is absent.

Batched forward on packed rows (`common.packing`: whole sequences side by side, positions restarting at
each; padded rows for a teacher whose forward cannot take them exactly, with a note) in which the output
layer sees only the (row, position) pairs that are trained: a forward pre-hook on the model's output
embeddings gathers those hidden states as one (1, N, H) row, so the model's own post-processing
(softcapping, logit scales, biases) applies to those N rows only and no logits are computed for padding
or for untrained positions. Then log_softmax in float32 and top-k on the device, a chunk of positions at
a time.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch

from adakd.common.packing import DEFAULT_ROW_TOKENS, forward_options, layout_of, packing_error, rows_for
from adakd.common.tokens import Tokenized

from .engine import EngineError, Scored, check_vocab, trained_rows
from .sampling import Draws, Sampler, draw

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise EngineError(f"--dtype must be auto or one of {sorted(DTYPES)}, not {dtype!r}")
    return DTYPES[dtype]


def _forward_options(model) -> dict:
    """All logits to the output layer (our hook narrows them), no KV cache (`common.packing.forward_options`: also
    where `forward` takes it through **kwargs, as GraniteMoE's does: with a KV cache transformers ignores packed
    position ids, and packed sequences would attend to each other)."""
    params = inspect.signature(model.forward).parameters
    return {**({"logits_to_keep": 0} if "logits_to_keep" in params else {}), **forward_options(model)}


class HFEngine:
    name = "hf"

    def __init__(self, model: str, k: int, dtype: str = "auto", device: str | None = None,
                 batch_tokens: int = 8192, chunk_positions: int = 2048, trust_remote_code: bool = False,
                 real_vocab: int | None = None, sampler: Sampler | None = None,
                 row_tokens: int | None = DEFAULT_ROW_TOKENS):
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
        self.real_vocab = check_vocab(k, self.vocab_size, real_vocab)
        self.k = k
        self.sampler = sampler
        self.batch_tokens = batch_tokens
        self.chunk_positions = chunk_positions
        self._options = _forward_options(self.model)
        # packed rows of this length (shared within the teacher's attention chunks, if any); None: padded rows
        self.row_tokens = rows_for(row_tokens, self.model) if row_tokens is not None else None
        if row_tokens is not None:
            why = packing_error(self.model)
            if why is not None:
                import sys

                print(f"note: the teacher {type(self.model).__name__} ({self.model.config.model_type}): {why}; scoring "
                      "on padded rows, one sequence each", file=sys.stderr, flush=True)
                self.row_tokens = None

    def layout(self, batch: list[Tokenized]):
        """The batch's rows: as `capture` grouped it (`planner(batch_tokens, row_tokens)`), or wider when a caller
        hands more than one budget's worth."""
        lengths = [len(s.input_ids) for s in batch]
        try:
            return layout_of(lengths, self.batch_tokens, self.row_tokens)
        except ValueError:
            return layout_of(lengths, len(lengths) * max(lengths), self.row_tokens)

    @torch.inference_mode()
    def score(self, batch: list[Tokenized]) -> list[Scored]:
        layout = self.layout(batch)
        inputs = {k: v.to(self.device) for k, v in layout.block([s.input_ids for s in batch]).items()}
        rows = [trained_rows(s) for s in batch]
        placed = [layout.place(i, r) for i, r in enumerate(rows)]
        b_idx = torch.from_numpy(np.concatenate([b for b, _ in placed])).to(self.device)
        p_idx = torch.from_numpy(np.concatenate([p for _, p in placed])).to(self.device)
        labels = torch.from_numpy(np.concatenate([s.input_ids[s.loss_mask] for s in batch]).astype(np.int64)).to(self.device)
        logits = self._logits(inputs, b_idx, p_idx)
        u = None if self.sampler is None else self.sampler.uniforms([s.record for s in batch], [len(r) for r in rows],
                                                                     self.device)
        v, i, t, d = self._topk(logits, labels, u)
        out, o = [], 0
        for s, r in zip(batch, rows):
            n = len(r)
            out.append(Scored(s.record, i[o:o + n], v[o:o + n], t[o:o + n], d.rows(o, o + n) if d else None))
            o += n
        return out

    def _logits(self, inputs: dict[str, torch.Tensor], b_idx: torch.Tensor, p_idx: torch.Tensor) -> torch.Tensor:
        """(N, V) logits at the (row, position) pairs given, nothing else projected onto the vocabulary."""
        B, T = inputs["input_ids"].shape

        def gather(module, args):
            hidden = args[0]
            if hidden.dim() != 3 or tuple(hidden.shape[:2]) != (B, T):
                raise EngineError(f"the teacher's output layer got hidden states of shape {tuple(hidden.shape)}, "
                                  f"expected ({B}, {T}, hidden): this model family is not supported by --engine hf")
            return (hidden[b_idx, p_idx].unsqueeze(0), *args[1:])

        handle = self.model.get_output_embeddings().register_forward_pre_hook(gather)
        try:
            logits = self.model(**inputs, **self._options).logits
        finally:
            handle.remove()
        if tuple(logits.shape) != (1, len(b_idx), self.vocab_size):
            raise EngineError(f"the teacher returned logits of shape {tuple(logits.shape)} instead of going through its "
                              "output embeddings: this model family is not supported by --engine hf")
        return logits[0]

    def _topk(self, logits: torch.Tensor, labels: torch.Tensor, u: torch.Tensor | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, Draws | None]:
        """Float32 log_softmax over the full width (padded ids' mass stays in the tail), top-k over real ids, and
        the draws from the same log-probabilities when sampling."""
        top_v, top_i, tgt, draws = [], [], [], []
        for c in range(0, len(labels), self.chunk_positions):
            lp = logits[c:c + self.chunk_positions].float().log_softmax(-1)
            real = lp if self.real_vocab == self.vocab_size else lp[:, : self.real_vocab]
            v, i = real.topk(self.k, dim=-1)
            top_v.append(v)
            top_i.append(i)
            tgt.append(lp.gather(1, labels[c:c + self.chunk_positions, None])[:, 0])
            if u is not None:
                draws.append(draw(lp, u[c:c + self.chunk_positions], self.sampler, self.real_vocab,
                                  i if self.sampler.hybrid else None))
        v = torch.cat(top_v).cpu().numpy()
        i = torch.cat(top_i).to(torch.int32).cpu().numpy()
        t = torch.cat(tgt).cpu().numpy()
        return v, i, t, Draws.concat(draws) if draws else None

    def close(self) -> None:
        self.model = None
