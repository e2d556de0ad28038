"""Targets from a teacher run beside the student, over its whole vocabulary (no cached top-k).

The reference point for what the sparse cache costs: the batches (tokens, trained positions, order) still
come from the cache, but each position's target is the live teacher's exact distribution over its real
vocabulary (k = the tokenizer's size; the tail holds only what it puts on padded ids, empty when it has
none), so every loss is computed exactly. It needs the teacher in the training job's memory, which is
what the cache exists to avoid; use it to measure, not to train at scale.
"""

from __future__ import annotations

import torch

from adakd.storage import CacheInfo

from .batches import Batch
from .head import HeadError, check_head, final_hidden
from .kd_loss import Targets
from .losses import NEG_INF
from .student import StudentError, real_vocab_size, target_vocab


class LiveTeacher:
    def __init__(self, path: str, info: CacheInfo, student_outputs: int, device: torch.device,
                 trust_remote_code: bool = False):
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=trust_remote_code)
            self.head = check_head(model, "live teacher")
        except HeadError as e:
            raise StudentError(f"--live-teacher {path}: {e}") from e
        except (OSError, ValueError) as e:
            raise StudentError(f"--live-teacher {path}: cannot load the teacher ({e})") from e
        width = self.head.vocab_size
        if width != info.vocab_size:
            raise StudentError(f"--live-teacher {path}: its output vocabulary has {width} entries, the cache's teacher "
                               f"{info.vocab_size}; use the teacher that wrote the cache")
        self.model = model.to(device).eval().requires_grad_(False)  # moves the checked head's parameters with it
        self.real = real_vocab_size(info)
        self.vocab_size = target_vocab(self.real, width, student_outputs)

    @torch.no_grad()
    def targets(self, b: Batch) -> Targets:
        """The teacher's log-probabilities of every real token at the batch's trained positions, sorted."""
        hidden = final_hidden(self.model, **b.model_inputs())[b.rows, b.cols]
        lp = torch.log_softmax(self.head.logits(hidden), dim=-1)
        values, ids = lp[:, :self.real].sort(dim=-1, descending=True)
        if lp.shape[-1] > self.real:  # padded ids: their mass is the tail, as in a cache
            tail = torch.logsumexp(lp[:, self.real:], dim=-1)
        else:
            tail = torch.full((lp.shape[0],), NEG_INF, device=lp.device)
        return Targets(ids, values, tail, b.targets.labels, self.vocab_size)
