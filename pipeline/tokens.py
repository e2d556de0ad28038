"""Records -> token ids and loss masks with the teacher's tokenizer.

Instruction data: prompt tokens (not trained) + response tokens + EOS (trained). Chat data: the chat
template's rendering; the assistant turns' tokens are trained. Plain text: every token after the first,
then EOS. Sequences longer than `max_length` are truncated or skipped, as the user chose.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .data import DataError, Record

POLICIES = ("truncate", "skip")


@dataclass
class Tokenized:
    record: int
    input_ids: np.ndarray  # (L,) int32
    loss_mask: np.ndarray  # (L,) bool
    truncated: bool = False

    @property
    def num_positions(self) -> int:
        return int(self.loss_mask.sum())


@dataclass
class Skipped:
    record: int
    reason: str  # "too_long" | "no_trained_token"


class RecordTokenizer:
    def __init__(self, tokenizer, max_length: int, policy: str = "truncate"):
        if policy not in POLICIES:
            raise ValueError(f"length policy must be one of {POLICIES}, not {policy!r}")
        if tokenizer.eos_token_id is None:
            raise DataError("the teacher's tokenizer has no EOS token; adakd appends EOS to every sequence")
        self.tok = tokenizer
        self.max_length = max_length
        self.policy = policy

    def __call__(self, r: Record) -> Tokenized | Skipped:
        if r.shape == "instruction":
            prompt = self._encode(r.prompt, special=True)
            response = self._encode(r.response, special=False) + [self.tok.eos_token_id]
            ids = prompt + response
            mask = [False] * len(prompt) + [True] * len(response)
        elif r.shape == "chat":
            ids, mask = self._chat(r)
        else:
            ids = self._encode(r.text, special=True) + [self.tok.eos_token_id]
            mask = [True] * len(ids)
        mask[0] = False
        truncated = False
        if len(ids) > self.max_length:
            if self.policy == "skip":
                return Skipped(r.index, "too_long")
            ids, mask, truncated = ids[: self.max_length], mask[: self.max_length], True
        if not any(mask):
            return Skipped(r.index, "no_trained_token")
        return Tokenized(r.index, np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=bool), truncated)

    def _encode(self, text: str, special: bool) -> list[int]:
        return list(self.tok(text, add_special_tokens=special)["input_ids"])

    def _chat(self, r: Record) -> tuple[list[int], list[bool]]:
        """Render the whole conversation once; mark the characters of assistant turns via offsets."""
        if not getattr(self.tok, "chat_template", None):
            raise DataError(
                f"record {r.index} is chat data, but the teacher's tokenizer has no chat template; "
                "use a tokenizer with one, or map the data as instruction or text records"
            )
        msgs = r.messages or []
        full = self.tok.apply_chat_template(msgs, tokenize=False)
        spans = []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            before = self.tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True) if i else ""
            upto = self.tok.apply_chat_template(msgs[: i + 1], tokenize=False)
            if not full.startswith(upto) or not upto.startswith(before):
                raise DataError(f"record {r.index}: the chat template does not render turns as prefixes; cannot mask")
            spans.append((len(before), len(upto)))
        enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        mask = [any(a <= s < b for a, b in spans) for s, _ in enc["offset_mapping"]]
        if ids and ids[-1] != self.tok.eos_token_id:
            ids.append(self.tok.eos_token_id)
            mask.append(bool(mask[-1]) if mask else False)
        return ids, mask
