"""`adakd eval --generate`: the metric on-policy distillation optimizes, on the student's own samples.

For each prompt the student samples `samples` responses (at most `max_new_tokens` tokens each, ending at its
first stop token); the teacher, run live, then scores every sampled token on the student's own prefix (prompt
+ the student's earlier samples). Averaged over all generated tokens:

- `rkl`: KL(student || teacher), exact over the whole vocabulary at every generated position, both models at
  T = 1: the reverse KL that on-policy training minimizes, measured where the student actually goes;
- `teacher_nll`: the teacher's negative log-likelihood of the sampled tokens (what exposure bias costs: a
  student drifting into text the teacher would not write shows here and nowhere in teacher-forced numbers);
- `student_nll`: the student's own NLL of its samples (at `temperature` 1 and `top_p` 1, an unbiased
  estimate of its per-token entropy);
- `kl` (forward KL on the same positions), `top1_agreement`, and the padded-vocabulary fields of
  `teacher_eval` (`kl_real`, `rkl_real`, `*_padding_mass`), computed by the same code.

The sampled sequences are scored exactly as `eval --teacher` scores held-out sequences (`teacher_eval`: the
same token-budget batches, packed or padded, the same output-layer logits, float64 softmaxes a chunk of
positions at a time); the generated tokens are its "trained positions". The samples themselves come from
the student's softmax(logits / temperature) restricted to its top-p nucleus and to the real vocabulary (ids
below the teacher tokenizer's size; a padded student's extra outputs are never sampled, but their mass is
still in the metrics). Each (prompt, sample) draws its uniforms from its own torch generator seeded from
(seed, prompt index, sample index), inverse-CDF over the probabilities sorted in decreasing order, so a
sample does not depend on the batch it was generated in, on `--limit`, or on the other samples. The sampler
is `adakd.common.sampler`, the one `adakd generate --engine hf` uses: on the same prompts with the same
model, seed, temperature and top-p the two commands draw the same token ids.

The teacher and the student must map tokens to the same ids (the teacher scores the student's ids): checked
with the teacher's tokenizer as the reference, as `eval --teacher` does.

Prompts (jsonl, one per line): `prompt` (already rendered; the tokenizer's special tokens are added), or
`instruction` with an optional `input` (rendered with the MiniLLM template, as cache-teacher does), or chat
`messages` (rendered with the student's chat template, ending with the assistant's prompt: the student
answers the last user turn; when the conversation ends with an assistant message, that message is the
reference and is left out of the prompt, as `eval --data` does). An `output` (or the final assistant
message) is the reference; when every row has one, the caller can score the reference text teacher-forced
(`teacher_eval.evaluate_teacher(data=...)`) next to the on-policy numbers: `report` does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import numpy as np
import torch

from adakd.common.packing import DEFAULT_ROW_TOKENS
from adakd.common.sampler import draw as sample_draw
from adakd.common.sampler import sample_generator

from .evaluate import EvalDataError, _chat_prompt, _chat_row
from .head import output_head
from .student import StudentError, context_size, dir_tokenizer, load_student, packed_rows, same_token_ids
from .teacher_eval import (_LOAD_LOCK, DEFAULT_CHUNK_ELEMENTS, _batches, _covers, _evaluate, check_teacher_dir,
                           devices, evaluate_teacher, format_line)

SAME_IDS = "the teacher scores the student's sampled token ids, so both need one vocabulary"


class OnPolicyError(Exception):
    """An option of `eval --generate` out of its range; the message names it."""


def _templates() -> tuple[str, str]:
    """cache-teacher's instruction templates (MiniLLM's), from the shared data module."""
    from adakd.common.data import DEFAULT_TEMPLATE, DEFAULT_TEMPLATE_WITH_INPUT

    return DEFAULT_TEMPLATE, DEFAULT_TEMPLATE_WITH_INPUT


# ---------------------------------------------------------------- prompts


def read_prompts(path: str, limit: int | None = None) -> list[dict]:
    """Rows {"prompt": str} or {"messages": [...]} (chat, rendered later with the student's template), each with
    "where" (file, line) and "output" (the reference, or None)."""
    rows: list[dict] = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise EvalDataError(f"{path}: cannot read ({e.strerror or e})") from e
    for i, line in enumerate(lines):
        if limit and len(rows) >= limit:
            break
        if not line.strip():
            continue
        where = f"{path}, line {i + 1}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalDataError(f"{where}: not JSON ({e})") from e
        if not isinstance(row, dict):
            raise EvalDataError(f"{where}: expected a JSON object")
        rows.append(_prompt_row(row, where))
    if not rows:
        raise EvalDataError(f"{path}: no rows")
    return rows


def _text(row: dict, key: str, where: str) -> str | None:
    value = row.get(key)
    if value is not None and not isinstance(value, str):
        raise EvalDataError(f"{where}: {key!r} must be text, not {type(value).__name__}")
    return value


def _prompt_row(row: dict, where: str) -> dict:
    if "messages" in row:
        msgs = row["messages"]
        if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
            return _chat_row(msgs, where)  # the final assistant turn is the reference
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                 and isinstance(m.get("content"), str) for m in msgs):
            raise EvalDataError(f"{where}: `messages` must be a list of {{'role': str, 'content': str}}")
        if not any(m["role"] == "user" for m in msgs):
            raise EvalDataError(f"{where}: a chat line needs a user message for the student to answer")
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in msgs], "output": None,
                "where": where}
    output = _text(row, "output", where)
    prompt = _text(row, "prompt", where)
    if prompt is None:
        instruction = _text(row, "instruction", where)
        if instruction is None:
            raise EvalDataError(f"{where}: needs a text field 'prompt', an 'instruction' (with an optional 'input') "
                                "or a chat 'messages' list")
        context = _text(row, "input", where) or ""
        plain, with_input = _templates()
        prompt = (with_input if context.strip() else plain).format(instruction=instruction, input=context)
    return {"prompt": prompt, "output": output, "where": where}


def encode_prompts(tok, rows: list[dict], model_dir: str, room: int) -> tuple[list[list[int]], int]:
    """Token ids of each prompt (chat rows through the student's chat template, without special tokens added
    again), cut from the left to the last `room` tokens; and how many were cut."""
    out, cut = [], 0
    for r in rows:
        chat = "messages" in r
        text = _chat_prompt(tok, r, model_dir) if chat else r["prompt"]
        ids = list(tok(text, add_special_tokens=not chat)["input_ids"])
        if not ids:
            raise EvalDataError(f"{r['where']}: the prompt is empty once tokenized; the student needs at least one "
                                "token to answer")
        if len(ids) > room:
            ids, cut = ids[-room:], cut + 1
        out.append(ids)
    return out, cut


# ---------------------------------------------------------------- sampling


def draw(logits: torch.Tensor, generators: list[torch.Generator], real: int, temperature: float,
         top_p: float) -> torch.Tensor:
    """One token per row of `logits` (rows, outputs), drawn by the sampler `adakd generate --engine hf` uses
    (`adakd.common.sampler.draw`: real ids only, top-p nucleus, inverse CDF at the row's generator's uniform)."""
    return sample_draw(logits, generators, real, temperature, top_p)[0]


class _Draw:
    """A logits processor for `generate` in greedy mode: each row's next token is `draw`n, then made the only one
    with a finite score (so the greedy pick is the draw)."""

    def __init__(self, generators: list[torch.Generator], real: int, temperature: float, top_p: float):
        self.generators, self.real, self.temperature, self.top_p = generators, real, temperature, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not torch.isfinite(scores[:, :self.real]).all():
            raise StudentError("the --model produced non-finite logits while generating; it cannot be sampled")
        token = draw(scores, self.generators, self.real, self.temperature, self.top_p).to(scores.device)
        out = torch.full_like(scores, -math.inf)
        out.scatter_(1, token.unsqueeze(-1), 0.0)
        return out


@torch.no_grad()
def generate_samples(model, encoded: list[list[int]], samples: int, seed: int, real: int, stop: set[int],
                     pad_id: int, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                     batch_size: int = 16) -> list[list[list[int]]]:
    """`samples` responses per prompt ([prompt][sample] -> token ids, ending with the first stop token if one
    was drawn), generated in left-padded batches of `batch_size` (prompt, sample) rows."""
    from transformers import GenerationConfig, LogitsProcessorList

    device = next(model.parameters()).device
    # a clean generation config: no processor of the model's defaults (repetition penalty, ...) may reshape the
    # distribution the samples are drawn from
    model.generation_config = GenerationConfig(pad_token_id=pad_id, eos_token_id=sorted(stop) or None)
    jobs = sorted((len(encoded[i]), i, s) for i in range(len(encoded)) for s in range(samples))
    out: list[list[list[int]]] = [[[] for _ in range(samples)] for _ in encoded]

    def run(batch: list[tuple[int, int, int]]) -> list[list[int]]:
        T = max(n for n, _, _ in batch)
        ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for r, (n, i, _) in enumerate(batch):
            ids[r, T - n:] = torch.tensor(encoded[i])
            attn[r, T - n:] = 1
        gens = [sample_generator(seed, i, s) for _, i, s in batch]
        res = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, min_new_tokens=0, pad_token_id=pad_id,
                             eos_token_id=sorted(stop) or None,
                             logits_processor=LogitsProcessorList([_Draw(gens, real, temperature, top_p)]))
        return [_until_stop(row.tolist(), stop) for row in res[:, T:]]

    alone = False
    for b in range(0, len(jobs), batch_size):
        batch = jobs[b:b + batch_size]
        try:
            new = [g for j in batch for g in run([j])] if alone else run(batch)
        except RuntimeError:
            if len({n for n, _, _ in batch}) == 1:
                raise
            # a family whose generate cannot take a left-padded batch (see evaluate_generation): one row at a time
            alone = True
            new = [g for j in batch for g in run([j])]
        for (_, i, s), g in zip(batch, new):
            out[i][s] = g
    return out


def _until_stop(ids: list[int], stop: set[int]) -> list[int]:
    for j, t in enumerate(ids):
        if t in stop:
            return ids[:j + 1]
    return ids


# ---------------------------------------------------------------- the metric


def _check_options(samples: int, temperature: float, top_p: float, max_new_tokens: int) -> None:
    if samples < 1:
        raise OnPolicyError(f"--samples must be at least 1, not {samples}")
    if max_new_tokens < 1:
        raise OnPolicyError(f"--max-new-tokens must be at least 1, not {max_new_tokens}")
    if not temperature > 0 or not math.isfinite(temperature):
        raise OnPolicyError(f"--temperature must be above 0 with --generate, not {temperature} (the samples come "
                            "from softmax(logits / temperature))")
    if not 0 < top_p <= 1:
        raise OnPolicyError(f"--top-p must be in (0, 1], not {top_p}")


@torch.no_grad()
def evaluate_onpolicy(model_dir: str, teacher_dir: str, data: str, samples: int = 1, temperature: float = 1.0,
                      top_p: float = 1.0, max_new_tokens: int = 128, seed: int = 0, limit: int | None = None,
                      batch_size: int = 16, batch_tokens: int = 8192, packing: bool = True,
                      row_tokens: int = DEFAULT_ROW_TOKENS, chunk: int = 1024,
                      chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, trust_remote_code: bool = False,
                      out_file: str | None = None) -> dict:
    """The student `model_dir` samples `samples` responses per prompt of `data` (first `limit` rows); the teacher
    `teacher_dir`, run live, scores every generated token. See the module's docstring for the numbers.
    `out_file`: a jsonl of the samples (prompt index, sample index, text, token count, whether it stopped, the
    sampled token ids)."""
    _check_options(samples, temperature, top_p, max_new_tokens)
    rows = read_prompts(data, limit)
    check_teacher_dir(teacher_dir)
    teacher_tok = dir_tokenizer(teacher_dir, "--teacher", trust_remote_code)
    if teacher_tok is None:
        raise StudentError(f"--teacher {teacher_dir}: no tokenizer in this directory; --generate checks with it that "
                           "the teacher reads the student's token ids")
    student_tok = dir_tokenizer(model_dir, "--model", trust_remote_code)
    same_token_ids(teacher_tok, student_tok, "--teacher", "--model", SAME_IDS)
    tok = student_tok if student_tok is not None else teacher_tok  # a student without one trained on the teacher's
    s_dev, t_dev = devices()
    with _LOAD_LOCK:
        student = load_student(model_dir, trust_remote_code, option="--model")
        teacher = load_student(teacher_dir, trust_remote_code, option="--teacher")
    real = len(teacher_tok)
    _covers(output_head(student).vocab_size, real, "--model", model_dir)
    _covers(output_head(teacher).vocab_size, real, "--teacher", teacher_dir)
    contexts = [c for c in (context_size(student), context_size(teacher)) if c]
    window = min(contexts) if contexts else None
    room = (window - max_new_tokens) if window else 1 << 30
    if room < 1:
        raise OnPolicyError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the models' context "
                            f"({window} positions); use --max-new-tokens {window - 1} or less")
    encoded, cut = encode_prompts(tok, rows, model_dir, room)
    extra = getattr(getattr(student, "generation_config", None), "eos_token_id", None)
    stop = {tok.eos_token_id, *(extra if isinstance(extra, list) else [extra])} - {None}
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (min(stop) if stop else 0)
    student.to(s_dev).eval()
    teacher.to(t_dev).eval()
    drawn = generate_samples(student, encoded, samples, seed, real, stop, pad_id, max_new_tokens, temperature,
                             top_p, batch_size)
    if out_file:
        with open(out_file, "w", encoding="utf-8") as f:
            for i, per in enumerate(drawn):
                f.writelines(json.dumps({"prompt_index": i, "sample": s, "where": rows[i]["where"],
                                        "response": tok.decode(g, skip_special_tokens=True), "tokens": len(g),
                                        "stopped": bool(g) and g[-1] in stop, "token_ids": g}) + "\n"
                            for s, g in enumerate(per))
    rows_t = packed_rows(row_tokens if packing else None, ("--model", student), ("--teacher", teacher),
                         doing="evaluating")
    batches = _batches(_sequences(encoded, drawn), batch_tokens, rows_t)
    try:
        r = _evaluate(student, teacher, s_dev, batches, real, chunk, chunk_elements, None)
    finally:
        batches.close()
    n = len(rows) * samples
    lengths = [len(g) for per in drawn for g in per]
    stopped = sum(1 for per in drawn for g in per if g and g[-1] in stop)
    out = {"prompts": len(rows), "samples": n, "generated_tokens": r.pop("positions"),
           "mean_length": sum(lengths) / n, "stopped": stopped / n, "truncated_prompts": cut}
    out["rkl"] = r.pop("rkl")
    out["teacher_nll"] = r.pop("teacher_nll")
    out["student_nll"] = r.pop("nll")
    out.update(r)
    out.update({"samples_per_prompt": samples, "temperature": temperature, "top_p": top_p,
                "max_new_tokens": max_new_tokens, "seed": seed})
    return out


def _sequences(encoded: list[list[int]], drawn: list[list[list[int]]]) -> Iterator[tuple[np.ndarray, np.ndarray, str]]:
    """(prompt + sample, mask of the sampled tokens, name) for teacher_eval's batches."""
    for i, per in enumerate(drawn):
        for s, g in enumerate(per):
            ids = np.asarray(encoded[i] + g, dtype=np.int64)
            mask = np.zeros(len(ids), dtype=bool)
            mask[len(encoded[i]):] = True
            yield ids, mask, f"prompt {i + 1}, sample {s + 1}"


# ---------------------------------------------------------------- the command's report


def report(model_dir: str, teacher_dir: str, data: str, cache: str | None = None, **options) -> dict:
    """`eval --generate`: {"onpolicy": ...} and, teacher-forced (`teacher_eval.evaluate_teacher`), "teacher_forced"
    on the reference text of `data` when every row has one, "teacher_forced_cache" on `cache` when given."""
    out = {"onpolicy": evaluate_onpolicy(model_dir, teacher_dir, data, **options)}
    tf = {k: options[k] for k in ("batch_tokens", "packing", "trust_remote_code") if k in options}
    limit = options.get("limit")
    if all(r["output"] is not None for r in read_prompts(data, limit)):
        out["teacher_forced"] = evaluate_teacher(model_dir, teacher_dir, data=data, limit=limit, **tf)
    if cache:
        out["teacher_forced_cache"] = evaluate_teacher(model_dir, teacher_dir, cache=cache, **tf)
    return out


def format_onpolicy(r: dict) -> str:
    """One line (two with padded vocabularies) for the on-policy numbers."""
    line = (f"on-policy: {r['prompts']:,} prompts x {r['samples_per_prompt']} samples, {r['generated_tokens']:,} "
            f"generated tokens (mean {r['mean_length']:.1f}, {r['stopped']:.0%} stopped)  KL(student||teacher) "
            f"{r['rkl']:.4f}  NLL of the samples: teacher {r['teacher_nll']:.4f} / student {r['student_nll']:.4f}  "
            f"top-1 agreement {r['top1_agreement']:.2%}")
    if r["teacher_outputs"] != r["real_vocab"] or r["student_outputs"] != r["real_vocab"]:
        line += (f"\n  padded outputs (real vocabulary {r['real_vocab']:,}): mass on padding teacher "
                 f"{r['teacher_padding_mass']:.3g}, student {r['student_padding_mass']:.3g}; over real tokens only "
                 f"KL(student||teacher) {r['rkl_real']:.4f}")
    return line


def format_report(result: dict) -> str:
    lines = [format_onpolicy(result["onpolicy"])]
    if "teacher_forced" in result:
        lines.append("teacher-forced, reference outputs: " + format_line(result["teacher_forced"]))
    if "teacher_forced_cache" in result:
        lines.append("teacher-forced, --cache: " + format_line(result["teacher_forced_cache"]))
    return "\n".join(lines)
