"""The student: a pretrained Hugging Face directory or a config (random init), checked against the cache's ids."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from storage import CacheReader


class StudentError(Exception):
    """The student cannot be trained on this cache; the message says why and what to do."""


def load_student(spec: str, trust_remote_code: bool = False, seed: int = 0) -> torch.nn.Module:
    """A directory with weights -> pretrained; a config.json (or a directory with only one) -> random init."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(spec)
    has_weights = path.is_dir() and any(p.suffix in (".safetensors", ".bin") for p in path.iterdir())
    try:
        if has_weights:
            model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32, trust_remote_code=trust_remote_code)
        else:
            cfg_file = path / "config.json" if path.is_dir() else path
            if not cfg_file.is_file():
                raise StudentError(f"--student {spec!r}: neither a model directory nor a config file")
            config = AutoConfig.from_pretrained(str(cfg_file if path.is_dir() else path), trust_remote_code=trust_remote_code)
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except StudentError:
        raise
    except Exception as e:
        raise StudentError(f"cannot load the student {spec!r} ({type(e).__name__}: {e})") from e
    for attr in ("final_logit_softcapping", "logit_scale"):
        if getattr(model.config, attr, None) not in (None, 0, 1, 1.0):
            raise StudentError(f"students with {attr} are not supported by the chunked loss yet")
    return model


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


def student_tokenizer(spec: str, fallback, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = Path(spec)
    if path.is_dir() and any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code)  # never a prompt
    return fallback


def check_vocabulary(student: torch.nn.Module, student_tok, teacher_tok, reader: CacheReader) -> None:
    """Same token -> id map, and enough student outputs for every id the cache can hold."""
    info = reader.info
    n_out = student.get_output_embeddings().weight.shape[0]
    if teacher_tok is not None and student_tok is not None and student_tok is not teacher_tok:
        a, b = teacher_tok.get_vocab(), student_tok.get_vocab()
        differ = sorted({tok for tok in a.keys() | b.keys() if a.get(tok) != b.get(tok)}, key=lambda t: a.get(t, b.get(t, 0)))
        if differ:
            sample = ", ".join(f"{t!r}: teacher {a.get(t)} / student {b.get(t)}" for t in differ[:8])
            raise StudentError(
                f"the student's tokenizer maps {len(differ)} tokens to other ids than the teacher's ({sample}"
                f"{', ...' if len(differ) > 8 else ''}); distillation on cached ids needs the same vocabulary"
            )
    elif teacher_tok is None and student_tok is not None:
        from storage.fingerprint import tokenizer_fingerprint

        if tokenizer_fingerprint(student_tok) != info.tokenizer.get("fingerprint"):
            raise StudentError("the cache holds no tokenizer and the student's differs from the teacher's fingerprint")
    vocab = len(teacher_tok) if teacher_tok is not None else int(info.tokenizer.get("vocab_size", info.vocab_size))
    if n_out < vocab:
        raise StudentError(
            f"the student has {n_out} outputs but the teacher's tokenizer has {vocab} tokens; the student's "
            "embedding must cover the teacher's vocabulary (larger, padded embeddings are fine)"
        )


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
