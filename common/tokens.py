"""Records -> token ids and loss masks with the teacher's tokenizer.

A record written by `adakd generate` (a `generation` column with token ids that spell its response) keeps those
ids: the prompt as the student saw it, then exactly the generated tokens, trained (docs/on-policy.md).
Instruction data: prompt tokens (not trained) + response tokens + EOS (trained). Chat data: the chat
template's rendering up to the last assistant turn; each assistant turn's content and end-of-turn tokens are
trained, and no EOS is appended (the template ends turns itself). Plain text: every token after the first,
then EOS. Sequences longer than `max_length` are truncated or skipped, as the user chose.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .data import DataError, Record, row_name

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
    def __init__(self, tokenizer, max_length: int, policy: str = "truncate", source: str | None = None):
        if policy not in POLICIES:
            raise ValueError(f"length policy must be one of {POLICIES}, not {policy!r}")
        if tokenizer.eos_token_id is None:
            raise DataError("the teacher's tokenizer has no EOS token; adakd appends EOS to every sequence")
        self.tok = tokenizer
        self.max_length = max_length
        self.policy = policy
        self.source = source  # the data's name, for errors that point at a row

    def __call__(self, r: Record) -> Tokenized | Skipped:
        generated = self._generated(r) if r.response_ids is not None else None
        if generated is not None:
            ids, mask = generated
        elif r.shape == "instruction":
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

    def _generated(self, r: Record) -> tuple[list[int], list[bool]] | None:
        """A record from `adakd generate`: the prompt as the student saw it, then the response's own token ids (no
        EOS appended; the stop token is there when it stopped), all of them trained and nothing else. None (the
        record is read as text) when the ids do not spell the response with this tokenizer (another tokenizer,
        or the text was edited)."""
        ids = list(r.response_ids or [])
        content = ids[:-1] if r.stopped else ids
        text = self.tok.decode(content, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if r.shape == "instruction":
            if text != r.response:
                return None
            prompt = generation_prompt(self.tok, r.prompt)
        elif r.shape == "chat":
            msgs = r.messages or []
            if (len(msgs) < 2 or msgs[-1]["role"] != "assistant" or msgs[-1]["content"] != text
                    or not getattr(self.tok, "chat_template", None)):
                return None
            self._render(self._where(r), msgs[:-1], generation=True)  # a template's refusal, as a DataError
            prompt = generation_prompt(self.tok, messages=msgs[:-1])
        else:
            return None
        return prompt + ids, [False] * len(prompt) + [True] * len(ids)

    def _encode(self, text: str, special: bool) -> list[int]:
        return list(self.tok(text, add_special_tokens=special)["input_ids"])

    def _where(self, r: Record) -> str:
        return f"{self.source}, {row_name(r.index)}" if self.source else row_name(r.index)

    def _chat(self, r: Record) -> tuple[list[int], list[bool]]:
        """Render the conversation up to its last assistant turn; mark each turn's characters via offsets.

        A token is trained when it overlaps a turn's span, so a token that merges the template's space
        before the content with its first word (`[/INST] a` -> ` a`) is trained too.
        """
        where = self._where(r)
        if not getattr(self.tok, "chat_template", None):
            raise DataError(
                f"{where} is chat data, but the teacher's tokenizer has no chat template; "
                "use a tokenizer with one, or map the data as instruction or text records"
            )
        if not getattr(self.tok, "is_fast", False):
            raise DataError(f"{where} is chat data, which needs a fast (Rust) tokenizer to find the assistant turns; "
                            "the teacher's tokenizer is a slow one: save a tokenizer.json with it")
        msgs = r.messages or []
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if last is None:
            raise DataError(f"{where}: no assistant message to train on")
        msgs = msgs[: last + 1]
        full = self._render(where, msgs)
        spans: list[tuple[int, int]] = []
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":
                spans.append(self._turn(where, msgs, i, full, spans[-1][1] if spans else 0))
        enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
        offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        mask = np.zeros(len(offsets), dtype=bool)
        for a, b in spans:
            mask |= (offsets[:, 0] < b) & (offsets[:, 1] > a)
        return list(enc["input_ids"]), mask.tolist()

    def _turn(self, where: str, msgs: list[dict], i: int, full: str, start: int) -> tuple[int, int]:
        """The characters of `full` to train for assistant message i: its content and its end-of-turn text.

        Templates rewrite earlier turns (Qwen3 drops their reasoning) or move text between turns (Mistral
        v0.3 puts the system prompt in the last user turn), so `full` is not assumed to extend the
        rendering of any prefix. First the content is found by rendering the conversation with a marker
        in its place; failing that (the content also changes text around it), the turn as rendered after
        its own prompt is found verbatim.
        """
        ended = self._render(where, [{**m, "content": _OTHER} for m in msgs[:i]] + [{**msgs[i], "content": _MARK}])
        p = ended.find(_MARK)
        if p < 0:
            raise _unlocatable(where, i, "the template leaves out this message's content")
        if _OTHER in ended[p:]:
            raise _unlocatable(where, i, "the chat template does not render turns as prefixes of the conversation "
                                         "(earlier messages come after this one)")
        eot = ended[p + len(_MARK):].rstrip()  # what ends the turn: <|im_end|>, <|eot_id|>, </s>, ...
        marked = self._render(where, msgs[:i] + [{**msgs[i], "content": _MARK}] + msgs[i + 1:])
        q = marked.find(_MARK)
        head, tail = marked[:q], marked[q + len(_MARK):]
        if (q >= 0 and _MARK not in tail and tail.startswith(eot) and full.startswith(head) and full.endswith(tail)
                and len(head) + len(tail) <= len(full)):
            return len(head), len(full) - len(tail) + len(eot)
        span = self._verbatim(where, msgs, i, full, start)
        if span is None:
            raise _unlocatable(where, i, "neither its content nor its rendered turn is found in the rendering of "
                                         "the whole conversation")
        return span

    def _verbatim(self, where: str, msgs: list[dict], i: int, full: str, start: int) -> tuple[int, int] | None:
        """Message i's turn as the template renders it after the generation prompt, found in `full`.

        Trains the whole turn (Qwen3's reasoning block built from the content included) except the text
        the template puts before any content (Qwen3's empty `<think></think>`).
        """
        before = self._render(where, msgs[:i], generation=True) if i else ""
        upto = self._render(where, msgs[: i + 1])
        if not upto.startswith(before):
            return None
        text = upto[len(before):]
        at = len(before) if full.startswith(upto) else full.find(text, start)
        if at < 0:
            return None
        marked = self._render(where, msgs[:i] + [{**msgs[i], "content": _MARK}])
        p = marked.find(_MARK)
        lead = marked[len(before):p] if marked.startswith(before) and p >= len(before) else ""
        return at + (len(lead) if lead and text.startswith(lead) else 0), at + len(text.rstrip())

    def _render(self, where: str, msgs: list[dict], generation: bool = False) -> str:
        """The chat template's text for `msgs`; a template's refusal becomes a DataError naming the row."""
        from jinja2 import (
            TemplateError,  # transformers renders chat templates with jinja2
        )

        try:
            return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation)
        except (TemplateError, ValueError, TypeError) as e:
            raise DataError(f"{where}: the teacher's chat template rejects this conversation ({e}); "
                            f"{_template_hint(str(e))}") from e


def generation_prompt(tok, prompt: str = "", messages: list[dict] | None = None) -> list[int]:
    """The token ids a model is given to answer a prompt: an instruction prompt tokenized as `RecordTokenizer`
    tokenizes it (special tokens added), or a conversation rendered by the chat template with the generation
    prompt (tokenized as the template wrote it). `adakd generate` feeds these ids to the student, and
    `RecordTokenizer` rebuilds them for the records it wrote: one function, so the two cannot differ."""
    if messages is None:
        return list(tok(prompt, add_special_tokens=True)["input_ids"])
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tok(text, add_special_tokens=False)["input_ids"])


# Stand-ins for message contents while locating turns: private-use characters no template alters.
_MARK, _OTHER = "\ue000adakd-turn\ue001", "\ue000adakd-other\ue001"


def _unlocatable(where: str, i: int, why: str) -> DataError:
    return DataError(f"{where}, message {i} (assistant): cannot locate this turn in the chat template's rendering: "
                     f"{why}; check that the template renders every message in order, or map the data as "
                     "instruction records")


def _template_hint(message: str) -> str:
    """What to do about the usual template refusals."""
    low = message.lower()
    if "system" in low:
        return "this template does not accept a system message: fold it into the first user message or drop it"
    if "alternate" in low:
        return "this template needs user and assistant messages to alternate: merge consecutive messages of one role"
    return "fix the record to fit the template, or map the data as instruction records"
