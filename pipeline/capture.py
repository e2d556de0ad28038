"""`cache-teacher` as a plain function: dataset -> tokens -> teacher engine -> sparse targets -> cache.

Three stages run concurrently with bounded queues so the teacher never waits on us: a thread reads and
tokenizes records, the calling thread drives the engine, a thread builds and encodes shards (numpy and
zstd release the GIL). Records reach the writer in dataset order, so shards are deterministic and a
re-run resumes from the writer's saved progress with byte-identical results.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from adakd.common.data import DataError, DataSpec, iter_records, load_dataset, resolve_mapping, validate_records
from adakd.common.data import fingerprint as data_fingerprint
from adakd.common.packing import DEFAULT_ROW_TOKENS, grouped, planner
from adakd.common.tokens import RecordTokenizer, Skipped, Tokenized
from adakd.storage import CacheError, CacheInfo, CacheWriter, Encoding, SequenceTargets

from .engine import EngineError, Scored, TeacherEngine, check_vocab, vllm_available
from .identity import package_version, teacher_fingerprint, tokenizer_fingerprint
from .sampling import Sampler

ENGINES = ("auto", "hf", "vllm")
TARGETS = ("topk", "sampled", "hybrid")
SAMPLED_ZSTD_LEVEL = 19  # draws are 2-3x the bytes of a top-k head: level 19 takes about 8% off them at N = 64 (bench.storage)


@dataclass
class CaptureConfig:
    teacher: str
    data: DataSpec
    out: str
    k: int = 64  # the exact head; 0 for `sampled`
    engine: str = "auto"
    targets: str = "topk"  # topk | sampled | hybrid (top-k head + draws from the tail)
    samples: int = 64  # N draws per trained position (sampled, hybrid)
    sample_temperature: float = 1.0  # the proposal the draws come from: softmax(logits / this)
    sample_seed: int = 0
    tokenizer: str | None = None
    dtype: str = "auto"
    max_length: int | None = None
    length_policy: str = "truncate"
    num_workers: int = 1
    worker_index: int = 0
    batch_tokens: int | None = None
    packing: bool = True  # hf engine: several whole sequences per row (False: one sequence per row, padded)
    row_tokens: int = DEFAULT_ROW_TOKENS
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    shard_positions: int = 65536
    trust_remote_code: bool = False
    vllm_fast_path: bool = True
    show_progress: bool = True


@dataclass
class Counts:
    kept: int = 0
    truncated: int = 0
    skipped_too_long: int = 0
    skipped_no_trained_token: int = 0
    tokens: int = 0
    positions: int = 0

    def add(self, item: Tokenized | Skipped) -> None:
        if isinstance(item, Skipped):
            setattr(self, f"skipped_{item.reason}", getattr(self, f"skipped_{item.reason}") + 1)
            return
        self.kept += 1
        self.truncated += int(item.truncated)
        self.tokens += len(item.input_ids)
        self.positions += item.num_positions


@dataclass
class Summary:
    cache: str
    worker_index: int
    num_workers: int
    engine: str
    counts: Counts
    run_tokens: int = 0
    run_positions: int = 0
    wall_s: float = 0.0
    bytes: int = 0
    already_complete: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.run_tokens / self.wall_s if self.wall_s else 0.0

    def format(self) -> str:
        c = self.counts
        skipped = c.skipped_too_long + c.skipped_no_trained_token
        lines = [
            f"cache            {self.cache}  (worker {self.worker_index} of {self.num_workers}, engine {self.engine})",
            f"records          {c.kept:,} kept ({c.truncated:,} truncated), {skipped:,} skipped "
            f"({c.skipped_too_long:,} too long, {c.skipped_no_trained_token:,} with no trained token)",
            f"tokens           {c.tokens:,}",
            f"trained pos.     {c.positions:,}",
            f"bytes            {self.bytes:,}  ({self.bytes / max(c.positions, 1):.1f} per trained position)",
        ]
        if self.already_complete:
            lines.append("status           already complete: nothing to do")
        else:
            lines.append(f"this run         {self.run_tokens:,} tokens in {self.wall_s:.1f} s = {self.tokens_per_s:,.0f} tokens/s")
        return "\n".join(lines)


def check_writable(out: str) -> bool:
    """Refuse an unwritable output before any expensive work; True when this created the directory."""
    if "://" in out and not out.startswith("file://"):
        return False
    path = out[len("file://"):] if out.startswith("file://") else out
    created = not os.path.exists(path)
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-probe-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.unlink(probe)
    except OSError as e:
        raise CacheError(f"{out}: the output path is not writable ({e.strerror or e}); choose another --out") from e
    return created


def _remove_if_empty(out: str) -> None:
    """An --out this run created and wrote nothing into goes again (a failed first start leaves no litter)."""
    path = out[len("file://"):] if out.startswith("file://") else out
    try:
        os.rmdir(path)
    except OSError:
        pass


def _load(what: str, cls_name: str, name: str, trust_remote_code: bool, hint: str):
    import transformers

    try:
        return getattr(transformers, cls_name).from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise EngineError(f"cannot load the {what} {name!r} ({type(e).__name__}: {e}); {hint}") from e


def load_tokenizer(name: str, trust_remote_code: bool):
    tok = _load("tokenizer", "AutoTokenizer", name, trust_remote_code,
                "pass a local directory with tokenizer files (--tokenizer) or a model name available offline")
    # lengths are ours to police (--max-length); transformers' "(554 > 512) ... indexing errors" would mislead
    getattr(tok, "deprecation_warnings", {})["sequence-length-is-longer-than-the-specified-maximum"] = True
    return tok


def _missing_path(option: str, name: str) -> None:
    """A local path that is not there is a typo, not a hub name: say so before transformers tries the hub."""
    first = name.split("/", 1)[0]
    looks_local = name.startswith((".", "/", "~")) or ("/" in name and os.path.isdir(first))  # not "org/model"
    if looks_local and not os.path.exists(os.path.expanduser(name)):
        raise EngineError(f"{option} {name}: no such directory; pass a local model directory (config.json + "
                          "weights) or a model name available offline")


def load_teacher_config(name: str, trust_remote_code: bool):
    _missing_path("--teacher", name)
    return _load("teacher", "AutoConfig", name, trust_remote_code,
                 "pass a local model directory (config.json + weights) or a model name available offline")


def choose_engine(name: str, teacher_cfg) -> str:
    """auto: vLLM when installed and not known to refuse this teacher on this machine, else transformers."""
    if name not in ENGINES:
        raise EngineError(f"--engine must be one of {ENGINES}, not {name!r}")
    if name == "hf" or (name == "auto" and not vllm_available()):
        return "hf"
    import torch

    from .engine_vllm import cpu_refusal

    reason = None if torch.cuda.is_available() else cpu_refusal(teacher_cfg)
    if reason and name == "vllm":
        raise EngineError(f"--engine vllm: {reason}; use --engine hf")
    if reason:
        _note(f"{reason}: using --engine hf")
        return "hf"
    return "vllm"


def _note(message: str) -> None:
    import sys

    print(f"note: {message}", file=sys.stderr, flush=True)


def resolved_dtype(cfg: CaptureConfig, engine: str) -> str:
    if cfg.dtype != "auto":
        return cfg.dtype
    import torch

    return "bfloat16" if torch.cuda.is_available() else "float32"


def text_config(teacher_cfg):
    """The language model's config: itself, or the text part of a multimodal wrapper (Gemma 3, LLaVA, ...)."""
    getter = getattr(teacher_cfg, "get_text_config", None)
    return getter() if callable(getter) else teacher_cfg


def vocab_sizes(cfg: CaptureConfig, tok, teacher_cfg) -> tuple[int, int]:
    """(the teacher's logit width, the tokenizer's real size), checked before the teacher loads.

    Ids from the real size up to the width are padding (Qwen2.5, Llama-family multiples of 64/128): never
    stored in the top-k; the mass the teacher puts on them goes to the tail.
    """
    width = getattr(text_config(teacher_cfg), "vocab_size", None)
    if not isinstance(width, int) or width < 1:
        raise EngineError(
            f"the teacher {cfg.teacher!r} ({type(teacher_cfg).__name__}) states no output vocabulary size (vocab_size "
            "in its config or its text_config); adakd needs it to size the cache. Pass a causal language model, or "
            "set vocab_size in its config.json"
        )
    real = check_vocab(cfg.k, width, len(tok))
    if cfg.engine == "vllm" or (cfg.engine == "auto" and vllm_available()):
        from .engine_vllm import logprobs_to_request

        logprobs_to_request(cfg.k, width, real)  # too much padding for vLLM: refused before any work
    return width, real


def build_info(cfg: CaptureConfig, engine: str, tok, teacher_cfg, ds, max_length: int) -> CacheInfo:
    vocab, _ = vocab_sizes(cfg, tok, teacher_cfg)
    mapping = resolve_mapping(cfg.data, list(ds.column_names), cfg.data.source)
    template = cfg.data.prompt_template
    if mapping.shape == "chat":
        template = f"chat_template {tokenizer_fingerprint(tok)}"
    elif mapping.shape == "instruction" and mapping.prompt:
        template = f"pre-rendered column {mapping.prompt!r}"
    elif mapping.shape == "instruction" and not template:
        template = "default (MiniLLM / Alpaca)"
    return CacheInfo(
        teacher={"name_or_path": cfg.teacher, "fingerprint": teacher_fingerprint(cfg.teacher),
                 "dtype": resolved_dtype(cfg, engine)},
        tokenizer={"name_or_path": cfg.tokenizer or cfg.teacher, "fingerprint": tokenizer_fingerprint(tok),
                   "vocab_size": len(tok)},
        engine={"name": engine, "version": package_version("vllm" if engine == "vllm" else "transformers")},
        dataset={"spec": cfg.data.to_json(), "fingerprint": data_fingerprint(cfg.data, ds), "shape": mapping.shape,
                 "rows": len(ds)},
        encoding=_encoding(cfg, vocab), prompt_template=template, max_length=max_length,
        num_workers=cfg.num_workers, target_kind=cfg.targets,
        extra={"length_policy": cfg.length_policy, **({"sample_seed": cfg.sample_seed} if cfg.targets != "topk" else {})},
    )


def _encoding(cfg: CaptureConfig, vocab: int) -> Encoding:
    if cfg.targets == "topk":
        return Encoding(k=cfg.k, vocab_size=vocab)
    return Encoding(k=cfg.k, vocab_size=vocab, kind=cfg.targets, samples=cfg.samples,
                    sample_temperature=float(cfg.sample_temperature), zstd_level=SAMPLED_ZSTD_LEVEL)


def _sampler(cfg: CaptureConfig) -> Sampler | None:
    if cfg.targets == "topk":
        return None
    return Sampler(cfg.samples, float(cfg.sample_temperature), cfg.sample_seed, hybrid=cfg.targets == "hybrid")


def check_targets(cfg: CaptureConfig) -> None:
    """The target kind and its numbers, refused before any work with the option to change."""
    if cfg.targets not in TARGETS:
        raise EngineError(f"--targets must be one of {', '.join(TARGETS)}, not {cfg.targets!r}")
    if cfg.targets == "sampled" and cfg.k != 0:
        raise EngineError(f"--targets sampled stores draws only; drop --top-k {cfg.k} (or use --targets hybrid for a "
                          "top-k head plus draws from the tail)")
    if cfg.targets != "sampled" and cfg.k < 1:
        raise EngineError(f"--top-k must be at least 1, not {cfg.k}")
    if cfg.targets != "topk":
        if not 1 <= cfg.samples <= 65535:
            raise EngineError(f"--samples must be within 1..65535, not {cfg.samples}")
        t = cfg.sample_temperature
        if not (isinstance(t, (int, float)) and t == t and 0.05 <= t <= 20):
            raise EngineError(f"--sample-temperature must be within [0.05, 20], not {t}")


def make_engine(cfg: CaptureConfig, engine: str, max_length: int, info: CacheInfo) -> TeacherEngine:
    real = info.tokenizer["vocab_size"]
    if engine == "hf":
        from .engine_hf import HFEngine

        return HFEngine(cfg.teacher, cfg.k, dtype=cfg.dtype, batch_tokens=cfg.batch_tokens or 8192,
                        trust_remote_code=cfg.trust_remote_code, real_vocab=real, sampler=_sampler(cfg),
                        row_tokens=cfg.row_tokens if cfg.packing else None)
    from .engine_vllm import VLLMEngine

    return VLLMEngine(cfg.teacher, cfg.k, max_model_len=max_length + 1, dtype=cfg.dtype,
                      tensor_parallel_size=cfg.tensor_parallel_size, gpu_memory_utilization=cfg.gpu_memory_utilization,
                      batch_tokens=cfg.batch_tokens or vllm_batch_tokens(cfg, info.vocab_size), fast=cfg.vllm_fast_path,
                      trust_remote_code=cfg.trust_remote_code, real_vocab=real, sampler=_sampler(cfg))


def vllm_batch_tokens(cfg: CaptureConfig, width: int) -> int:
    """vLLM hands every prompt position's log-probabilities to this process as arrays; for draws that is the whole
    distribution (about 16 bytes per id with its id and our dense copy), so a batch is capped at 1 GiB of it."""
    if cfg.targets == "topk":
        return 65536
    return max(256, (1 << 30) // (16 * width))


def cache_teacher(cfg: CaptureConfig, engine: TeacherEngine | None = None) -> Summary:
    """Run (or resume) one worker's part of a cache; returns its summary.

    `engine` lets a caller (benchmarks, notebooks) reuse a loaded teacher; it is then not closed here.
    """
    for opt, value, low in (("--num-workers", cfg.num_workers, 1), ("--max-length", cfg.max_length, 2),
                            ("--batch-tokens", cfg.batch_tokens, 1), ("--shard-positions", cfg.shard_positions, 1),
                            ("--row-tokens", cfg.row_tokens, 1)):
        if value is not None and value < low:
            raise EngineError(f"{opt} must be at least {low}, not {value}")
    if not 0 <= cfg.worker_index < cfg.num_workers:
        raise CacheError(f"--worker-index {cfg.worker_index} must be in 0..{cfg.num_workers - 1} (--num-workers {cfg.num_workers})")
    check_targets(cfg)
    created = check_writable(cfg.out)
    try:
        teacher_cfg = load_teacher_config(cfg.teacher, cfg.trust_remote_code)
        if cfg.tokenizer:
            _missing_path("--tokenizer", cfg.tokenizer)
        tok = load_tokenizer(cfg.tokenizer or cfg.teacher, cfg.trust_remote_code)
        engine_name = choose_engine(cfg.engine, teacher_cfg)
        if cfg.engine == "auto" and engine_name == "vllm" and cfg.targets != "topk":
            _note("draws need every prompt log-probability out of vLLM (about 8x slower than hf here, bench.capture): "
                  "using --engine hf; pass --engine vllm to insist")
            engine_name = "hf"
        positions = int(getattr(text_config(teacher_cfg), "max_position_embeddings", 0) or 2048)
        max_length = cfg.max_length or positions - 1
        if max_length >= positions + (engine_name == "hf"):
            raise EngineError(f"--max-length {max_length} exceeds what the teacher supports ({positions - 1})")
        ds = load_dataset(cfg.data)
        info = build_info(cfg, engine_name, tok, teacher_cfg, ds, max_length)
        writer = CacheWriter(cfg.out, info, worker_index=cfg.worker_index, shard_positions=cfg.shard_positions)
    except BaseException:
        if created:
            _remove_if_empty(cfg.out)
        raise
    progress = writer.progress
    counts = Counts(**progress.get("counts", {}))
    summary = Summary(cfg.out, cfg.worker_index, cfg.num_workers, engine_name, counts)
    if writer.complete:
        writer.close_lock()
        summary.already_complete = True
        summary.bytes = sum(s.bytes for s in writer.manifest.shards)
        return summary
    start = int(progress.get("next_index", 0))
    if cfg.worker_index == 0 and not progress:
        _save_tokenizer(tok, writer)
    try:
        todo = validate_records(cfg.data, ds, cfg.worker_index, cfg.num_workers, start)
    except BaseException:
        writer.close_lock()
        raise
    tokenizer = RecordTokenizer(tok, max_length, cfg.length_policy, source=cfg.data.source)
    owned = engine is None
    try:
        if engine is None:
            try:
                engine = make_engine(cfg, engine_name, max_length, info)
            except EngineError as e:
                if cfg.engine != "auto" or engine_name != "vllm":
                    raise
                _note(f"{e}; falling back to --engine hf")
                writer.close_lock()
                engine_name = summary.engine = "hf"
                info = build_info(cfg, engine_name, tok, teacher_cfg, ds, max_length)
                writer = CacheWriter(cfg.out, info, worker_index=cfg.worker_index, shard_positions=cfg.shard_positions)
                engine = make_engine(cfg, engine_name, max_length, info)
        t0 = time.perf_counter()
        before = (counts.tokens, counts.positions)
        _run(cfg, ds, start, tokenizer, engine, writer, counts, todo)
        summary.wall_s = time.perf_counter() - t0
        summary.run_tokens, summary.run_positions = counts.tokens - before[0], counts.positions - before[1]
    except BaseException:
        writer.close_lock()  # published shards stay; the buffered tail is redone on resume
        raise
    finally:
        if owned and engine is not None:
            engine.close()
    summary.bytes = sum(s.bytes for s in writer.manifest.shards)
    return summary


def _save_tokenizer(tok, writer: CacheWriter) -> None:
    """Keep the teacher's tokenizer with the cache, so trainers can check a student's ids against it."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        for name in sorted(os.listdir(d)):
            with open(os.path.join(d, name), "rb") as f:
                writer.put_file(f"tokenizer/{name}", f.read())


_END = object()


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _run(cfg: CaptureConfig, ds, start: int, tokenizer: RecordTokenizer, engine: TeacherEngine,
         writer: CacheWriter, counts: Counts, todo: int) -> None:
    stop = threading.Event()
    q_in: queue.Queue = queue.Queue(maxsize=4096)
    q_out: queue.Queue = queue.Queue(maxsize=8)
    errors: list[BaseException] = []
    bar = _progress_bar(cfg, todo)

    def produce() -> None:
        try:
            for rec in iter_records(cfg.data, ds, cfg.worker_index, cfg.num_workers, start):
                if not _put(q_in, tokenizer(rec), stop):
                    return
        except BaseException as e:
            errors.append(e)
        _put(q_in, _END, stop)

    t0, tokens0 = time.perf_counter(), counts.tokens

    def consume() -> None:
        progress = writer.progress
        try:
            while True:
                try:
                    item = q_out.get(timeout=0.1)
                except queue.Empty:
                    if stop.is_set():
                        return
                    continue
                if item is _END:
                    break
                for tokd, scored in item:
                    counts.add(tokd)
                    progress = _progress(counts, tokd.record + 1)
                    if isinstance(tokd, Tokenized):
                        writer.add(_sequence(tokd, scored), progress=progress, autoflush=False)
                    else:
                        writer.note_progress(progress)
                writer.flush_if_full()  # shards end with engine batches: a resume rebuilds the same batches
                if bar is not None:
                    bar.update(len(item))
                    rate = (counts.tokens - tokens0) / max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix_str(f"{counts.tokens:,} tokens, {rate:,.0f} tok/s", refresh=False)
            writer.close(progress=progress)
        except BaseException as e:
            errors.append(e)
            stop.set()

    producer = threading.Thread(target=produce, name="adakd-tokenize", daemon=True)
    consumer = threading.Thread(target=consume, name="adakd-encode", daemon=True)
    producer.start()
    consumer.start()
    try:
        for batch in _batches(q_in, engine, stop):
            seqs = [t for t in batch if isinstance(t, Tokenized)]
            scored = iter(engine.score(seqs)) if seqs else iter(())
            if not _put(q_out, [(t, next(scored) if isinstance(t, Tokenized) else None) for t in batch], stop):
                break
        if errors:  # the producer failed: publish nothing more, keep what is published
            stop.set()
        else:
            _put(q_out, _END, stop)
        consumer.join()
    finally:  # also on Ctrl-C: both threads end before we return, never inside zstd or the tokenizer at exit
        stop.set()
        consumer.join(timeout=60)
        producer.join(timeout=60)
        if bar is not None:
            bar.close()
    if errors:
        raise errors[0]


def _queued(q_in: queue.Queue, stop: threading.Event) -> Iterator:
    while not stop.is_set():
        item = q_in.get()
        if item is _END:
            return
        yield item


def _batches(q_in: queue.Queue, engine: TeacherEngine, stop: threading.Event) -> Iterator[list]:
    """Consecutive items in the batches the engine takes (`common.packing`: rows x width within its token budget,
    packed rows or padded ones); skipped records ride along."""
    plan = planner(engine.batch_tokens, getattr(engine, "row_tokens", None))
    for items, _ in grouped(_queued(q_in, stop), lambda t: len(t.input_ids) if isinstance(t, Tokenized) else 0, plan):
        yield items


def _sequence(t: Tokenized, s: Scored) -> SequenceTargets:
    d = s.draws
    return SequenceTargets(record=t.record, input_ids=t.input_ids, loss_mask=t.loss_mask, topk_ids=s.topk_ids,
                           topk_logprobs=s.topk_logprobs, target_logprob=s.target_logprob,
                           **({} if d is None else dict(sample_sizes=d.sizes, sample_ids=d.ids, sample_counts=d.counts,
                                                        sample_logprobs=d.logprobs, rest_logmass=d.rest)))


def _progress(counts: Counts, next_index: int) -> dict[str, Any]:
    return {"next_index": next_index, "counts": dict(counts.__dict__)}


def _progress_bar(cfg: CaptureConfig, total: int):
    if not cfg.show_progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="rec", desc=f"cache-teacher w{cfg.worker_index}", dynamic_ncols=True)


__all__ = ["CaptureConfig", "Counts", "DataError", "EngineError", "Summary", "cache_teacher"]
