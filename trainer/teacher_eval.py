"""`adakd eval --teacher`: a student against the live teacher's exact full-vocabulary distribution.

On held-out sequences, either a cache's (`--cache`: its tokens and trained positions, in cache order) or a
data file read as `cache-teacher` reads it (`--data`: the same records, prompt template, chat masks, EOS
and truncation, through `common.data` and `common.tokens.RecordTokenizer` with the teacher's
tokenizer), both models run on the same token-budget batches and, averaged over the trained positions:

- `kl`: KL(teacher || student), exact over the whole vocabulary;
- `rkl`: KL(student || teacher), the same way;
- `nll`, `teacher_nll`: the student's and the teacher's negative log-likelihood of the true tokens;
- `top1_agreement`: how often the two models' most likely tokens are the same.

Both models' logits come from `trainer.head` (checked against each model's own forward when it loads):
output bias, logit scale/scaling and final soft-cap included. The logits are the models' float32 ones; the
softmaxes and divergences are computed in float64, a chunk of positions at a time (at most
`chunk_elements` vocabulary entries per buffer), so memory does not grow with the data or the vocabulary.

Padded vocabularies. Ids at or beyond the teacher tokenizer's real size R are padding (the rule of both
stages). Each model's distribution is its own softmax over all of its outputs; the two are compared over
the union of their outputs, an output the narrower model does not have being probability zero there.
With the student wider than the teacher (a padded student), KL(teacher || student) is exact and finite
(the teacher has no mass on the extra outputs), while KL(student || teacher) is infinite as soon as the
student puts any mass on outputs the teacher lacks (and the other way round for a teacher wider than the
student). Because that is true but says nothing about the real tokens, the report also gives
`teacher_padding_mass` / `student_padding_mass` (mean mass on ids >= R) and `kl_real` / `rkl_real`: the
same divergences between the two distributions conditioned on a real token (renormalized over ids < R),
always finite. Without padding on either side they equal `kl` / `rkl`. The student must have an output
for every real id (as for training); so must the teacher.

Devices: the student on cuda:0 and the teacher on cuda:1 when two GPUs exist, both on the one GPU when
one does, else the CPU.

The `--data` input uses `pipeline` (stage one's reader and tokenizer): this entry reads a raw data file as
stage one does, and re-implementing that reading would let the two drift apart. It is imported only on
that path; `train-student` never imports it.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from adakd.common.packing import DEFAULT_ROW_TOKENS, Layout, grouped, planner

from .head import final_hidden, output_head
from .student import (StudentError, context_size, dir_tokenizer, has_weights, load_student, packed_rows,
                      same_token_ids)

DEFAULT_CHUNK_ELEMENTS = 1 << 24  # vocabulary entries per float64 buffer (128 MiB)
# transformers' from_pretrained builds models under a process-wide meta-device context: two loads in two
# threads at once can see each other's (empty) tensors. Loads are serialized; the evaluation itself is not.
_LOAD_LOCK = threading.Lock()
SAME_IDS = "the comparison needs one vocabulary"


def devices() -> tuple[torch.device, torch.device]:
    """(student's, teacher's): two GPUs -> cuda:0 and cuda:1; one -> both on it; none -> the CPU."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n >= 2:
        return torch.device("cuda:0"), torch.device("cuda:1")
    if n == 1:
        return torch.device("cuda:0"), torch.device("cuda:0")
    return torch.device("cpu"), torch.device("cpu")


def _covers(outputs: int, real: int, option: str, spec: str) -> None:
    if outputs < real:
        raise StudentError(f"{option} {spec} has {outputs} outputs but the teacher's tokenizer has {real} tokens: ids "
                           f"{outputs}..{real - 1} have no output. Its output layer must cover the real vocabulary "
                           "(larger, padded ones are fine)")


# ---------------------------------------------------------------- held-out sequences


def _cache_sequences(reader, max_length: int | None) -> Iterator[tuple[np.ndarray, np.ndarray, str]]:
    from .batches import truncate

    it = iter(reader.stream())
    try:
        for seq in it:
            if max_length is not None:
                seq = truncate(seq, max_length)
                if seq is None:
                    continue
            yield seq.input_ids, seq.loss_mask, f"record {seq.record}"
    finally:
        it.close()  # stops the reader's prefetch thread when the evaluation stops early (--max-positions)


def _data_sequences(data: str, tok, max_length: int, limit: int | None,
                    data_options: dict | None) -> Iterator[tuple[np.ndarray, np.ndarray, str]]:
    """The records as cache-teacher tokenizes them (--length-policy truncate, its default)."""
    from adakd.common.data import DataError, DataSpec, iter_records, load_dataset, row_name
    from adakd.common.tokens import RecordTokenizer, Tokenized

    from .evaluate import EvalDataError

    try:
        spec = DataSpec(source=data, limit=limit, **(data_options or {}))
        ds = load_dataset(spec)
        rt = RecordTokenizer(tok, max_length, "truncate", source=data)
        for r in iter_records(spec, ds):
            t = rt(r)
            if isinstance(t, Tokenized):
                yield t.input_ids, t.loss_mask, f"{data}, {row_name(t.record)}"
    except DataError as e:
        raise EvalDataError(str(e)) from e


def _batches(seqs: Iterator[tuple[np.ndarray, np.ndarray, str]], batch_tokens: int, row_tokens: int | None):
    """Token-budget batches laid out as training's (`common.packing`: packed rows of `row_tokens`, or padded when
    None): (model inputs, rows, cols, labels, [(length, where)])."""
    try:
        for group, layout in grouped(seqs, lambda s: len(s[0]), planner(batch_tokens, row_tokens)):
            yield _collate(group, layout)
    finally:
        seqs.close()


def _collate(seqs: list, layout: Layout):
    block = layout.block([s[0] for s in seqs])
    placed = [layout.place(i, np.flatnonzero(mask) - 1) for i, (_, mask, _) in enumerate(seqs)]  # j - 1 predicts j
    rows_t = torch.from_numpy(np.concatenate([r for r, _ in placed]))
    cols_t = torch.from_numpy(np.concatenate([c for _, c in placed]))
    labels = block["input_ids"][rows_t, cols_t + 1]
    return block, rows_t, cols_t, labels, [(len(s[0]), s[2]) for s in seqs]


# ---------------------------------------------------------------- the metrics


class _Sums:
    KEYS = ("kl", "rkl", "nll", "teacher_nll", "top1_agreement", "kl_real", "rkl_real", "teacher_padding_mass",
            "student_padding_mass")

    def __init__(self) -> None:
        self.s = dict.fromkeys(self.KEYS, 0.0)

    def add(self, key: str, x: torch.Tensor) -> None:
        self.s[key] += float(x.sum().item())


def _kl_rows(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """sum_i p_i (log p_i - log q_i) per row; 0 log 0 = 0; +inf where q_i = 0 < p_i."""
    p = lp.exp()
    diff = torch.where(p > 0, lp - lq, torch.zeros_like(lp))
    return (p * diff).sum(-1)


def _extra_mass(lp: torch.Tensor, start: int) -> torch.Tensor:
    """Mass on outputs from `start` on (zero when there are none)."""
    if lp.shape[-1] <= start:
        return torch.zeros(lp.shape[0], dtype=lp.dtype, device=lp.device)
    return torch.logsumexp(lp[:, start:], dim=-1).exp()


def _chunk_metrics(zt: torch.Tensor, zs: torch.Tensor, labels: torch.Tensor, real: int, sums: _Sums) -> None:
    """zt (n, Wt) teacher logits, zs (n, Ws) student logits, on one device; float64 from here on."""
    lpt = torch.log_softmax(zt.double(), dim=-1)
    del zt
    lqs = torch.log_softmax(zs.double(), dim=-1)
    del zs
    wt, ws = lpt.shape[-1], lqs.shape[-1]
    common = min(wt, ws)
    # over the union of outputs: the narrower model has probability 0 on the wider one's extra outputs
    kl = _kl_rows(lpt[:, :common], lqs[:, :common])
    rkl = _kl_rows(lqs[:, :common], lpt[:, :common])
    if wt > ws:
        kl = torch.where(_extra_mass(lpt, common) > 0, torch.full_like(kl, math.inf), kl)
    if ws > wt:
        rkl = torch.where(_extra_mass(lqs, common) > 0, torch.full_like(rkl, math.inf), rkl)
    sums.add("kl", kl)
    sums.add("rkl", rkl)
    idx = labels.unsqueeze(-1)
    sums.add("nll", -lqs.gather(-1, idx))
    sums.add("teacher_nll", -lpt.gather(-1, idx))
    sums.add("top1_agreement", (lpt.argmax(-1) == lqs.argmax(-1)).double())
    sums.add("teacher_padding_mass", _extra_mass(lpt, real))
    sums.add("student_padding_mass", _extra_mass(lqs, real))
    if wt == ws == real:  # nothing padded: conditioning on a real token changes nothing
        sums.add("kl_real", kl)
        sums.add("rkl_real", rkl)
        return
    lpt_r = lpt[:, :real] - torch.logsumexp(lpt[:, :real], dim=-1, keepdim=True)
    del lpt
    lqs_r = lqs[:, :real] - torch.logsumexp(lqs[:, :real], dim=-1, keepdim=True)
    del lqs
    sums.add("kl_real", _kl_rows(lpt_r, lqs_r))
    sums.add("rkl_real", _kl_rows(lqs_r, lpt_r))


@torch.no_grad()
def check_teacher_dir(teacher_dir: str) -> None:
    """A live teacher must be a trained model directory: refused by name before anything loads."""
    teacher_path = Path(teacher_dir)
    if not teacher_path.is_dir():
        raise StudentError(f"--teacher {teacher_dir}: no such model directory")
    if not has_weights(teacher_path):
        raise StudentError(f"--teacher {teacher_dir}: no weights in this directory (the teacher must be a trained "
                           "model: config.json + safetensors)")


def evaluate_teacher(model_dir: str, teacher_dir: str, cache: str | None = None, data: str | None = None,
                     batch_tokens: int = 8192, chunk: int = 1024, max_positions: int | None = None,
                     max_length: int | None = None, limit: int | None = None, data_options: dict | None = None,
                     chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, trust_remote_code: bool = False,
                     packing: bool = True, row_tokens: int = DEFAULT_ROW_TOKENS) -> dict:
    """The student `model_dir` against the teacher `teacher_dir` run live, on a held-out cache's sequences
    (`cache`) or a data file tokenized as cache-teacher does (`data`, first `limit` records when given; options
    of `common.data.DataSpec` in `data_options`), at most `max_positions` trained positions in input order
    (exactly that many when there are more), sequences cut to `max_length` tokens when given. See the module's
    docstring for the metrics and the padded-vocabulary rule."""
    if (cache is None) == (data is None):
        raise ValueError("give exactly one held-out input: a cache or a data file")
    check_teacher_dir(teacher_dir)
    s_dev, t_dev = devices()
    with _LOAD_LOCK:
        student = load_student(model_dir, trust_remote_code, option="--model")
        teacher = load_student(teacher_dir, trust_remote_code, option="--teacher")
    teacher_tok = dir_tokenizer(teacher_dir, "--teacher", trust_remote_code)
    student_tok = dir_tokenizer(model_dir, "--model", trust_remote_code)
    if cache is not None:
        from adakd.storage import CacheReader

        from .student import cache_tokenizer, check_context

        reader = CacheReader(cache)
        ref, ref_name = cache_tokenizer(reader), "cache's teacher"
        if ref is None:  # a cache made without its tokenizer: the teacher's own is the reference
            ref, ref_name = teacher_tok, "--teacher"
        same_token_ids(ref, teacher_tok, ref_name, "--teacher", SAME_IDS)
        real = len(ref) if ref is not None else int(reader.info.tokenizer.get("vocab_size") or reader.info.vocab_size)
        check_context(student, reader, max_length, option="--model")
        check_context(teacher, reader, max_length, option="--teacher")
        seqs = _cache_sequences(reader, max_length)
    else:
        if teacher_tok is None:
            raise StudentError(f"--teacher {teacher_dir}: no tokenizer in this directory; --data is tokenized with the "
                               "teacher's tokenizer, as cache-teacher does")
        ref, ref_name = teacher_tok, "--teacher"
        real = len(ref)
        positions = context_size(teacher) or 2048
        if max_length is not None and max_length > positions:
            raise StudentError(f"--max-length {max_length} is longer than the --teacher model's context ({positions} "
                               f"positions); use --max-length {positions} or less")
        seqs = _data_sequences(data, teacher_tok, max_length or positions - 1, limit, data_options)
    same_token_ids(ref, student_tok, ref_name, "--model", SAME_IDS)
    s_head, t_head = output_head(student), output_head(teacher)
    _covers(s_head.vocab_size, real, "--model", model_dir)
    _covers(t_head.vocab_size, real, "--teacher", teacher_dir)
    student.to(s_dev).eval()
    teacher.to(t_dev).eval()
    rows = packed_rows(row_tokens if packing else None, ("--model", student), ("--teacher", teacher), doing="evaluating")
    batches = _batches(seqs, batch_tokens, rows)
    try:
        return _evaluate(student, teacher, s_dev, batches, real, chunk, chunk_elements, max_positions)
    finally:
        batches.close()


def _evaluate(student, teacher, s_dev, batches, real: int, chunk: int, chunk_elements: int,
              max_positions: int | None) -> dict:
    s_head, t_head = output_head(student), output_head(teacher)  # the weights on their devices
    t_dev = t_head.weight.device
    s_context = context_size(student)
    rows_per_chunk = max(1, min(chunk, chunk_elements // max(s_head.vocab_size, t_head.vocab_size)))
    sums = _Sums()
    n = 0
    for inputs, rows, cols, labels, lengths in batches:
        length, where = max(lengths)
        if s_context is not None and length > s_context:
            raise StudentError(f"{where} has {length:,} tokens, but the --model handles {s_context:,} positions "
                               f"(max_position_embeddings); pass --max-length {s_context} to truncate longer sequences")
        hs = final_hidden(student, **{k: v.to(s_dev) for k, v in inputs.items()})[rows.to(s_dev), cols.to(s_dev)]
        ht = final_hidden(teacher, **{k: v.to(t_dev) for k, v in inputs.items()})[rows.to(t_dev), cols.to(t_dev)]
        labels = labels.to(s_dev)
        if max_positions and n + hs.shape[0] > max_positions:  # exactly max_positions in all
            keep = max_positions - n
            hs, ht, labels = hs[:keep], ht[:keep], labels[:keep]
        for c in range(0, hs.shape[0], rows_per_chunk):
            sl = slice(c, c + rows_per_chunk)
            zt = t_head.logits(ht[sl]).to(s_dev)
            _chunk_metrics(zt, s_head.logits(hs[sl]), labels[sl], real, sums)
        n += hs.shape[0]
        if max_positions and n >= max_positions:
            break
    out: dict = {"positions": n}
    out.update({k: (v / n if n else math.nan) for k, v in sums.s.items()})
    out.update({"real_vocab": real, "teacher_outputs": t_head.vocab_size, "student_outputs": s_head.vocab_size})
    return out


def format_line(r: dict) -> str:
    """One line for the command's output."""
    line = (f"teacher: positions {r['positions']:,}  KL(teacher||student) {r['kl']:.4f}  KL(student||teacher) "
            f"{r['rkl']:.4f}  NLL student {r['nll']:.4f} / teacher {r['teacher_nll']:.4f}  top-1 agreement "
            f"{r['top1_agreement']:.2%}")
    if r["teacher_outputs"] != r["real_vocab"] or r["student_outputs"] != r["real_vocab"]:
        line += (f"\n  padded outputs (real vocabulary {r['real_vocab']:,}; teacher {r['teacher_outputs']:,}, student "
                 f"{r['student_outputs']:,}): mass on padding teacher {r['teacher_padding_mass']:.3g}, student "
                 f"{r['student_padding_mass']:.3g}; over real tokens only KL {r['kl_real']:.4f}, reverse "
                 f"{r['rkl_real']:.4f}")
    return line
