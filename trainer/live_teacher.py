"""Targets from a teacher run beside the student, over its whole vocabulary (no cached top-k).

The reference point for what the sparse cache costs: the batches (tokens, trained positions, order) still
come from the cache, but each position's target is the live teacher's exact distribution (k = V, empty
tail), so every loss is computed exactly. It needs the teacher in the training job's memory, which is
what the cache exists to avoid; use it to measure, not to train at scale.
"""

from __future__ import annotations

import torch

from .batches import Batch
from .kd_loss import Targets
from .losses import NEG_INF
from .student import StudentError


class LiveTeacher:
    def __init__(self, path: str, vocab_size: int, device: torch.device, trust_remote_code: bool = False):
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise StudentError(f"--live-teacher {path}: cannot load the teacher ({e})") from e
        size = model.get_output_embeddings().weight.shape[0]
        if size != vocab_size:
            raise StudentError(f"--live-teacher {path}: its vocabulary has {size} entries, the student's {vocab_size}; "
                               "use the teacher that wrote the cache")
        self.model = model.to(device).eval().requires_grad_(False)
        self.base = getattr(model, model.base_model_prefix)
        self.weight = model.get_output_embeddings().weight

    @torch.no_grad()
    def targets(self, b: Batch) -> Targets:
        """The teacher's full log-probabilities at the batch's trained positions, sorted (top-k with k = V)."""
        hidden = self.base(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state[b.rows, b.cols]
        lp = torch.log_softmax((hidden @ self.weight.t()).float(), dim=-1)
        values, ids = lp.sort(dim=-1, descending=True)
        tail = torch.full((lp.shape[0],), NEG_INF, device=lp.device)
        return Targets(ids, values, tail, b.targets.labels, b.targets.vocab_size)
