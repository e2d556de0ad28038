"""`adakd eval` on a held-out cache: NLL of the true tokens, KL(teacher || student) on the cached support,
and top-1 agreement with the teacher, averaged over trained positions. On a sampled or hybrid cache the KL is
the weighted-support estimate of the forward KL and the agreement is with the support's first id (the head's
first id, or the drawn id of highest log-probability)."""

from __future__ import annotations

import torch

from adakd.storage import CacheReader

from adakd.common.packing import DEFAULT_ROW_TOKENS

from .batches import batches
from .head import final_hidden, output_head
from .kd_loss import Targets
from .losses import fkl, student_buckets, student_support, teacher_buckets, weighted_teacher
from .student import (StudentError, cache_tokenizer, check_context, check_vocabulary, load_student, packed_rows,
                      student_tokenizer, target_vocab)


def cached_kl(z: torch.Tensor, t: Targets) -> torch.Tensor:
    """KL(teacher || student) per position on the cached targets: on the top-k buckets, or the weighted
    forward-KL estimate on a sampled or hybrid cache's support."""
    if t.weights is not None:
        return fkl(weighted_teacher(t.topk_logprobs, t.weights), student_support(z, t.topk_ids), weights=t.weights)
    return fkl(teacher_buckets(t.topk_logprobs, t.tail_logmass, t.vocab_size), student_buckets(z, t.topk_ids))


@torch.no_grad()
def evaluate_cache(model_dir: str, cache: str, batch_tokens: int = 8192, chunk: int = 1024,
                   max_positions: int | None = None, max_length: int | None = None, packing: bool = True,
                   row_tokens: int = DEFAULT_ROW_TOKENS) -> dict[str, float]:
    """The model's own logits (bias, scaling, soft-cap included) against the cached targets, at most
    `max_positions` trained positions in cache order; batches packed as training's unless `packing` is off or
    the model cannot take packed rows exactly (then padded, with a note)."""
    reader = CacheReader(cache)
    model = load_student(model_dir, option="--model")
    teacher_tok = cache_tokenizer(reader)
    check_vocabulary(model, student_tokenizer(model_dir, teacher_tok), teacher_tok, reader)
    check_context(model, reader, max_length, option="--model")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    head = output_head(model)
    vocab = target_vocab(reader.info.k, reader.info.vocab_size, head.vocab_size)
    rows = packed_rows(row_tokens if packing else None, ("--model", model), doing="evaluating")
    nll = kl = agree = 0.0
    n = 0
    stream = reader.stream()
    for b in batches(stream, batch_tokens, vocab, max_length, reader.info.encoding.sample_temperature, rows):
        b = b.to(device)
        hidden = final_hidden(model, **b.model_inputs())[b.rows, b.cols]
        t = b.targets
        if max_positions and n + hidden.shape[0] > max_positions:  # exactly max_positions in all
            keep = torch.arange(max_positions - n, device=hidden.device)
            hidden, t = hidden[keep], t.index(keep)
        for c in range(0, hidden.shape[0], chunk):
            sl = slice(c, c + chunk)
            z = head.logits(hidden[sl])
            nll += torch.nn.functional.cross_entropy(z, t.labels[sl], reduction="sum").item()
            kl += cached_kl(z, t.index(torch.arange(sl.start, sl.start + z.shape[0], device=z.device))).sum().item()
            agree += (z.argmax(-1) == t.topk_ids[sl, 0]).sum().item()
        n += hidden.shape[0]
        if max_positions and n >= max_positions:
            break
    if n == 0:
        return {"positions": 0, "nll": float("nan"), "kl": float("nan"), "top1_agreement": float("nan")}
    return {"positions": n, "nll": nll / n, "kl": kl / n, "top1_agreement": agree / n}


class EvalDataError(Exception):
    """A problem with the evaluation data; the message names the file and row."""


def read_prompts(path: str, limit: int | None = None) -> list[dict]:
    """MiniLLM / DistiLLM jsonl: `prompt` (rendered) and `output` (the reference) per line; or chat lines
    (`messages`): the messages before the last assistant turn (rendered later with the model's chat
    template) and that turn's content as the reference."""
    import json

    rows = []
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError as e:
        raise EvalDataError(f"{path}: cannot read ({e.strerror or e})") from e
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalDataError(f"{path}, line {i + 1}: not JSON ({e})") from e
        if isinstance(row, dict) and "messages" in row:
            rows.append(_chat_row(row["messages"], f"{path}, line {i + 1}"))
            if limit and len(rows) >= limit:
                break
            continue
        for key in ("prompt", "output"):
            if not isinstance(row, dict) or not isinstance(row.get(key), str):
                raise EvalDataError(f"{path}, line {i + 1}: needs a text field {key!r} (or a chat `messages` list)")
        rows.append(row)
        if limit and len(rows) >= limit:
            break
    if not rows:
        raise EvalDataError(f"{path}: no rows")
    return rows


def _chat_row(msgs, where: str) -> dict:
    """A chat line: the conversation before its last assistant message is the prompt, that message the reference."""
    if not isinstance(msgs, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                             and isinstance(m.get("content"), str) for m in msgs):
        raise EvalDataError(f"{where}: `messages` must be a list of {{'role': str, 'content': str}}")
    last = max((j for j, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
    if last is None:
        raise EvalDataError(f"{where}: a chat line needs an assistant message (the last one is the reference)")
    if last == 0:
        raise EvalDataError(f"{where}: nothing comes before the last assistant message, so there is no prompt")
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in msgs[:last]],
            "output": msgs[last]["content"], "where": where}


def _chat_prompt(tok, row: dict, model_dir: str) -> str:
    """The model's chat template over the messages before the reference, ending with the assistant's prompt."""
    from jinja2 import TemplateError

    if not getattr(tok, "chat_template", None):
        raise EvalDataError(f"{row['where']}: a chat line, but the tokenizer of --model {model_dir} has no chat "
                            "template; give the model one (chat_template.jinja) or use `prompt`/`output` lines")
    try:
        return tok.apply_chat_template(row["messages"], tokenize=False, add_generation_prompt=True)
    except (TemplateError, ValueError, TypeError) as e:
        raise EvalDataError(f"{row['where']}: the model's chat template rejects this conversation ({e})") from e


@torch.no_grad()
def evaluate_generation(model_dir: str, data: str, out_file: str | None = None, max_new_tokens: int = 128,
                        batch_size: int = 16, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                        seed: int = 0, limit: int | None = None) -> dict[str, float]:
    """Generate a response per prompt (greedy unless sampling) and score ROUGE-L F1 (x100) against `output`."""
    import json

    from rouge_score import rouge_scorer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = read_prompts(data, limit)
    try:  # never model code from the directory, and never transformers' interactive prompt about it
        tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise StudentError(f"--model {model_dir}: cannot load a model and tokenizer from it ({e})") from e
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    max_prompt = max(8, int(getattr(model.config, "max_position_embeddings", 2048)) - max_new_tokens)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    torch.manual_seed(seed)
    for r in rows:  # chat lines: the template writes BOS and the turn markers, so no special tokens are added again
        r["special"] = "messages" not in r
        if "messages" in r:
            r["prompt"] = _chat_prompt(tok, r, model_dir)
    encoded = [tok(r["prompt"], add_special_tokens=r["special"])["input_ids"][-max_prompt:] for r in rows]
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stop = {tok.eos_token_id, *(extra if isinstance(extra, list) else [extra])} - {None}
    order = sorted(range(len(rows)), key=lambda i: len(encoded[i]))  # similar lengths together: little padding
    results: list[dict] = [{}] * len(rows)

    def generate(enc: list[list[int]]) -> list[torch.Tensor]:
        """The new tokens of each prompt, generated as one left-padded batch."""
        T = max(len(e) for e in enc)
        ids = torch.full((len(enc), T), tok.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, e in enumerate(enc):
            ids[i, T - len(e):] = torch.tensor(e)
            attn[i, T - len(e):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), max_new_tokens=max_new_tokens,
                             do_sample=do_sample, temperature=temperature if do_sample else None,
                             top_p=top_p if do_sample else None, pad_token_id=tok.pad_token_id,
                             eos_token_id=sorted(stop))  # chat models end turns with their own token (<|eot_id|>)
        return list(out[:, T:])

    alone = False  # set when the model's generate cannot take a padded batch
    for b in range(0, len(rows), batch_size):
        idx = order[b:b + batch_size]
        chunk = [rows[i] for i in idx]
        enc = [encoded[i] for i in idx]
        try:
            new = [g for e in enc for g in generate([e])] if alone else generate(enc)
        except RuntimeError as e:
            if len({len(x) for x in enc}) == 1:
                raise
            # transformers 5.19's Falcon-H1 fails on left-padded batches (its mask is one key short); one prompt at a
            # time has no padding and gives what a working padded batch would
            import sys

            print(f"note: --model {model_dir} ({model.config.model_type}) cannot generate a padded batch in this "
                  f"transformers ({type(e).__name__}: {str(e)[:100]}); generating one prompt at a time",
                  file=sys.stderr, flush=True)
            alone = True
            new = [g for e in enc for g in generate([e])]
        for i, r, seq in zip(idx, chunk, new):
            text = tok.decode(seq, skip_special_tokens=True).strip()
            score = scorer.score(r["output"], text)["rougeL"].fmeasure * 100
            results[i] = {"prompt": r["prompt"], "reference": r["output"], "generation": text, "rougeL": score,
                          "exact_match": text == r["output"].strip()}
    if out_file:
        with open(out_file, "w", encoding="utf-8") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    return {"n": len(results), "rougeL": sum(r["rougeL"] for r in results) / len(results),
            "exact_match": sum(r["exact_match"] for r in results) / len(results)}
