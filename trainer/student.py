"""The student: a pretrained Hugging Face directory or a config (random init), checked against the cache's ids."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

from adakd.common.packing import Rows, packing_error, rows_for
from adakd.storage import CacheInfo, CacheReader

from .head import HeadError, check_head


class StudentError(Exception):
    """The student cannot be trained on this cache; the message says why and what to do."""


def has_weights(path: Path) -> bool:
    """A model directory with weights (pretrained), as opposed to a config alone (random init)."""
    return path.is_dir() and any(p.suffix in (".safetensors", ".bin") for p in path.iterdir())


def load_student(spec: str, trust_remote_code: bool = False, seed: int = 0, option: str = "--student") -> torch.nn.Module:
    """A directory with weights -> pretrained; a config.json (or a directory with only one) -> random init.

    The model's output layer is checked against its own forward once (`check_head`): a family whose logits
    the chunked loss cannot reproduce is refused here, before any training.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(spec)
    try:
        if has_weights(path):
            model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32, trust_remote_code=trust_remote_code)
        else:
            cfg_file = path / "config.json" if path.is_dir() else path
            if not cfg_file.is_file():
                raise StudentError(f"{option} {spec!r}: neither a model directory nor a config file{out_dir_hint(spec)}")
            config = AutoConfig.from_pretrained(str(cfg_file if path.is_dir() else path), trust_remote_code=trust_remote_code)
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except StudentError:
        raise
    except Exception as e:
        raise StudentError(f"{option} {spec!r}: cannot load the model ({type(e).__name__}: {e})") from e
    try:
        check_head(model, {"--student": "student", "--teacher": "teacher"}.get(option, "model"))
    except HeadError as e:
        raise StudentError(f"{option} {spec}: {e}") from e
    return model


def out_dir_hint(spec: str) -> str:
    """A pointer to final/ when `spec` is a train-student --out directory rather than a model."""
    final = Path(spec) / "final"
    if (final / "config.json").is_file():
        return f" (it is a train-student output directory: the trained model is {final})"
    return ""


def real_vocab_size(info: CacheInfo, teacher_tok=None) -> int:
    """Tokens the teacher's tokenizer really has; ids from here to the logit width are padding."""
    if teacher_tok is not None:
        return len(teacher_tok)
    return int(info.tokenizer.get("vocab_size") or info.vocab_size)


def target_vocab(k: int, teacher_width: int, student_outputs: int) -> int:
    """The vocabulary size the tail bucket is measured against (`Targets.vocab_size`).

    Outputs outside the cached top-k form one tail bucket on both sides: the teacher's tail includes any
    mass it put on its padded ids, the student's includes its own padded outputs, so their logits stay in
    the softmax and are pushed down like any other unlikely token. When the top-k already covers every
    student output, the student has no tail to match and the teacher's (padding-only) tail is dropped.
    """
    if student_outputs <= k:
        return k
    return max(teacher_width, student_outputs)


def _token_names(tok, ids: range, limit: int = 4) -> str:
    if tok is None:
        return ""
    names = tok.convert_ids_to_tokens(list(ids[:limit]))
    return " (" + ", ".join(repr(n) for n in names) + (", ..." if len(ids) > limit else "") + ")"


def cache_tokenizer(reader: CacheReader):
    """The teacher tokenizer stored in the cache, or None for caches made without it."""
    from transformers import AutoTokenizer

    files = reader.tokenizer_files()
    if not files:
        return None
    with tempfile.TemporaryDirectory() as d:
        for name, data in files.items():
            Path(d, name).write_bytes(data)
        return AutoTokenizer.from_pretrained(d, trust_remote_code=False)  # a cache's files are data, never code


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "vocab.txt", "spiece.model", "sentencepiece.bpe.model")


def dir_tokenizer(spec: str, option: str, trust_remote_code: bool = False, hint: str = ""):
    """The tokenizer saved in a model directory, or None when it has no tokenizer files; files that do not load
    are an error (never silently replaced by another tokenizer)."""
    from transformers import AutoTokenizer

    path = Path(spec)
    present = [f for f in TOKENIZER_FILES if (path / f).exists()] if path.is_dir() else []
    if not present:
        return None
    try:
        tok = AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code)  # never a prompt
    except Exception as e:
        raise StudentError(f"{option} {spec}: has tokenizer files ({', '.join(present)}) that do not load as a "
                           f"tokenizer ({type(e).__name__}: {e}){hint}") from e
    # lengths are policed by adakd (--max-length); transformers' "(554 > 512) ... indexing errors" would mislead
    getattr(tok, "deprecation_warnings", {})["sequence-length-is-longer-than-the-specified-maximum"] = True
    return tok


def student_tokenizer(spec: str, fallback, trust_remote_code: bool = False):
    hint = ("; complete them (tokenizer_config.json) or remove them to train with the teacher's tokenizer from "
            "the cache")
    tok = dir_tokenizer(spec, "--student", trust_remote_code, hint)
    return fallback if tok is None else tok


def same_token_ids(ref, other, ref_name: str, other_name: str, why: str) -> None:
    """Every token maps to the same id in both tokenizers, or a StudentError with examples."""
    if ref is None or other is None or ref is other:
        return
    a, b = ref.get_vocab(), other.get_vocab()
    differ = sorted({t for t in a.keys() | b.keys() if a.get(t) != b.get(t)}, key=lambda t: a.get(t, b.get(t, 0)))
    if differ:
        sample = ", ".join(f"{t!r}: {ref_name} {a.get(t)} / {other_name} {b.get(t)}" for t in differ[:8])
        raise StudentError(f"the {other_name}'s tokenizer maps {len(differ)} tokens to other ids than the {ref_name}'s "
                           f"({sample}{', ...' if len(differ) > 8 else ''}); {why}")


def check_vocabulary(student: torch.nn.Module, student_tok, teacher_tok, reader: CacheReader) -> None:
    """Same token -> id map, and enough student outputs for every id the cache can hold."""
    info = reader.info
    n_out = student.get_output_embeddings().weight.shape[0]
    if teacher_tok is not None:
        same_token_ids(teacher_tok, student_tok, "teacher", "student", "distillation on cached ids needs the same vocabulary")
    elif student_tok is not None:
        from adakd.storage.fingerprint import tokenizer_fingerprint

        if tokenizer_fingerprint(student_tok) != info.tokenizer.get("fingerprint"):
            raise StudentError("the cache holds no tokenizer and the student's differs from the teacher's fingerprint")
    vocab = real_vocab_size(info, teacher_tok)
    if n_out < vocab:
        missing = range(n_out, vocab)
        raise StudentError(
            f"the student has {n_out} outputs but the teacher's tokenizer has {vocab} tokens: ids "
            f"{missing.start}..{missing.stop - 1}{_token_names(teacher_tok, missing)} have no student output. The "
            f"student's output layer must cover the teacher's real vocabulary ({vocab}); larger, padded ones are fine "
            f"(the cache's teacher logits are {info.vocab_size} wide)"
        )


def context_size(model: torch.nn.Module) -> int | None:
    """Positions the model was built for (max_position_embeddings / n_positions), when its config says."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = getattr(config, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def check_context(model: torch.nn.Module, reader: CacheReader, max_length: int | None, option: str = "--student") -> None:
    """A model shorter than the cache's sequences would index past its position table (absolute positions) or
    run past what it was trained for (RoPE): refuse before any work, unless --max-length truncates."""
    positions = context_size(model)
    if positions is None:
        return
    if max_length is not None:
        if max_length > positions:
            raise StudentError(f"--max-length {max_length} is longer than the {option} model's context ({positions} "
                               f"positions); use --max-length {positions} or less")
        return
    longest = reader.manifest.longest_sequence()
    known = longest is not None
    longest = longest if known else reader.info.max_length
    if longest is not None and longest > positions:
        size = f"has {longest:,} tokens" if known else f"may have up to {longest:,} tokens (its --max-length)"
        raise StudentError(
            f"the cache's longest sequence {size}, but the {option} model handles {positions:,} positions "
            f"(max_position_embeddings); pass --max-length {positions} to truncate longer sequences, or use a model "
            "with a longer context"
        )


def packed_rows(row_tokens: int | None, *models: tuple[str, torch.nn.Module], doing: str = "training",
                quiet: bool = False) -> Rows | None:
    """Rows of `row_tokens` (`common.packing.rows_for`: shared within the models' attention chunks, if any) when every
    model's forward takes packed rows exactly (`common.packing.packing_error`), else None (padded rows, one
    sequence each) with a one-line note naming the first model that cannot and why."""
    if row_tokens is None:
        return None
    for what, model in models:
        why = packing_error(model)
        if why is not None:
            if not quiet:
                print(f"note: {what} {type(model).__name__} ({model.config.model_type}): {why}; {doing} on padded rows, "
                      "one sequence each (as --no-packing)", file=sys.stderr, flush=True)
            return None
    return rows_for(row_tokens, *(m for _, m in models))


def save_student(model: torch.nn.Module, tokenizer, out: str, state_dict: dict | None = None) -> None:
    """A Hugging Face directory with safetensors weights: loads with AutoModelForCausalLM and vLLM.

    Written beside `out` and renamed into place, so a crash never leaves a torn directory that looks whole
    (at worst `out` is missing until the run is repeated, which writes it again).
    """
    import shutil

    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(out) + "-", dir=parent)
    try:
        if state_dict is None:
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            model.save_pretrained(tmp, state_dict=dict(state_dict), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
