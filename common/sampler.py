"""The student's sampler: the one rule `adakd generate --engine hf` and `adakd eval --generate` both draw with.

- Seeding: sample j of prompt record r draws its uniforms from its own CPU generator seeded from (seed, r, j)
  alone (`sample_seed`), one uniform per step (drawn even when greedy), so a sample never depends on the batch,
  the worker, the resume point or the other samples.
- Distribution: softmax(logits[:real] / temperature) in float64 on the CPU, over the real vocabulary only
  (`real`: the tokenizer's size; a model's padded output rows are never sampled); with top_p < 1 cut to its
  nucleus: the most likely ids, in decreasing probability (ties by id), until their mass reaches top_p, then
  renormalized. temperature 0 is greedy: the most likely real id (the lowest id on a tie).
- The draw: inverse CDF over the kept probabilities in decreasing order, at the row's uniform.
- The log-probability returned: the sampled id's, under the distribution sampled from (the renormalized nucleus
  at `temperature`); greedy: the plain log-softmax over the real ids (T = 1), as vLLM reports for greedy requests.

vLLM (`adakd generate --engine vllm`) samples with its own sampler and seeds: its samples differ from these.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a draw is made: `adakd generate --merge` never needs it
    import torch


def sample_seed(seed: int, record: int, sample: int) -> int:
    """The seed of sample `sample` of prompt record `record`: a function of the three numbers alone."""
    digest = hashlib.sha256(f"adakd-generate:{seed}:{record}:{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def sample_generator(seed: int, record: int, sample: int) -> torch.Generator:
    """The CPU generator that draws sample `sample` of record `record`."""
    import torch

    return torch.Generator().manual_seed(sample_seed(seed, record, sample))


def real_vocab(tokenizer, outputs: int) -> int:
    """The ids that can be sampled: the tokenizer's (`len(tokenizer)`), within the model's `outputs` logits."""
    return min(len(tokenizer), outputs) if tokenizer is not None else outputs


def _scaled(logits: torch.Tensor, real: int, temperature: float) -> torch.Tensor:
    import torch

    x = logits[..., :real].detach().to(device="cpu", dtype=torch.float64)
    return torch.log_softmax(x if temperature == 0 else x / temperature, dim=-1)


def processed_logprobs(logits: torch.Tensor, real: int, temperature: float, top_p: float) -> torch.Tensor:
    """(rows, real) log-probabilities of the distribution each row is sampled from (float64, CPU; -inf outside
    the nucleus). temperature 0: the plain log-softmax (T = 1) the greedy pick's log-probability comes from."""
    import torch

    lp = _scaled(logits, real, temperature)
    if temperature == 0 or top_p >= 1:
        return lp
    p, order = torch.sort(lp.exp(), dim=-1, descending=True, stable=True)
    keep = (torch.cumsum(p, dim=-1) - p) < top_p
    keep = torch.zeros_like(keep).scatter(-1, order, keep)
    lp = lp.masked_fill(~keep, -float("inf"))
    return lp - torch.logsumexp(lp, dim=-1, keepdim=True)


def draw(logits: torch.Tensor, generators: list[torch.Generator], real: int, temperature: float,
         top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of `logits` (rows, outputs), row i with one uniform from `generators[i]`: (ids (rows,)
    int64, their log-probabilities (rows,) float64 under the distribution sampled from), both on the CPU."""
    import torch

    if logits.shape[0] != len(generators):
        raise ValueError(f"{logits.shape[0]} rows of logits and {len(generators)} generators")
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators]) if generators \
        else torch.zeros(0, dtype=torch.float64)
    lp = _scaled(logits, real, temperature)
    if temperature == 0:
        token = lp.argmax(dim=-1)
        return token, lp.gather(-1, token.unsqueeze(-1)).squeeze(-1)
    p, order = torch.sort(lp.exp(), dim=-1, descending=True, stable=True)
    if top_p < 1:
        p = torch.where(torch.cumsum(p, dim=-1) - p < top_p, p, torch.zeros_like(p))
    cum = torch.cumsum(p, dim=-1)
    idx = torch.searchsorted(cum, (u * cum[:, -1]).unsqueeze(-1), right=True)
    last = ((p > 0).sum(-1, keepdim=True) - 1).clamp_(min=0)  # u * mass rounded up to the mass: the last kept id
    token = order.gather(-1, torch.minimum(idx, last)).squeeze(-1)
    logp = lp.gather(-1, token.unsqueeze(-1)).squeeze(-1) - torch.log(cum[:, -1])
    return token, logp


__all__ = ["draw", "processed_logprobs", "real_vocab", "sample_generator", "sample_seed"]
