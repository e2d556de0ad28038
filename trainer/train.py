"""`train-student` as a plain recipe: cache(s) -> packed batches -> student hidden states -> chunked KD loss -> AdamW.

Single process, `torchrun` data parallelism (DDP; NCCL on GPU, gloo on CPU) or FSDP2 (`fully_shard`).
bfloat16 autocast on GPU, float32 on CPU. Resuming from a checkpoint continues exactly.
Several caches (on-policy rounds) are read as one stream of sequences mixed by weight (trainer/mix.py).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from adakd.common.packing import DEFAULT_ROW_TOKENS
from adakd.storage import CacheError, CacheReader, redact

from . import distributed as dist
from .adakd import AdaKDConfig, LATFState, latf_update, past_warmup
from .batches import Batch, batches
from .checkpoint import CheckpointError, latest_checkpoint, load_training_state, save_checkpoint
from .errors import TrainError
from .head import base_model
from .kd_loss import LossConfig
from .mix import check_compatible, cursor_from_json, describe, open_stream, parse_weights
from .outdir import OutDir, redacted_config
from .runlog import RunLog
from .step import StudentLoss, forward_backward
from .student import (StudentError, cache_tokenizer, check_context, check_vocabulary, load_student, packed_rows,
                      student_tokenizer, target_vocab)


@dataclass
class TrainConfig:
    cache: str | list[str]  # one cache, or several mixed sequence by sequence (trainer/mix.py)
    student: str
    out: str
    loss: LossConfig = field(default_factory=LossConfig)
    lr: float = 3e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_fraction: float = 0.05
    min_lr_fraction: float = 0.1
    max_steps: int | None = None
    epochs: int = 1
    batch_tokens: int = 8192  # computed tokens (rows x width) per micro-batch and process
    packing: bool = True  # several whole sequences per row (False: one sequence per row, padded)
    row_tokens: int = DEFAULT_ROW_TOKENS  # a packed row's length (longer sequences get a row of their own length)
    gradient_checkpointing: bool = False  # recompute each layer's activations in the backward pass (non-reentrant)
    grad_accum: int = 1
    clip: float = 1.0
    seed: int = 0
    save_every: int = 0  # optimizer steps; 0: only at the end
    keep_last: int = 0  # checkpoints kept on disk (the newest); 0: all
    stop_after: int | None = None  # stop (with a checkpoint) after this many steps in this run: time-sliced jobs
    log_every: int = 1
    fsdp: bool = False
    allow_incomplete_cache: bool = False
    tensorboard: bool = False
    plot: bool = False
    progress: bool = True
    trust_remote_code: bool = False
    live_teacher: str | None = None  # teacher dir: exact full-vocabulary targets computed live (measurement only)
    max_length: int | None = None  # cut longer cache sequences to this many tokens (a student with a shorter context)
    router_aux_loss: bool = True  # an MoE student's router load-balancing loss, as its family's training adds it (trainer.router)
    cache_weights: list[float] | str | None = None  # several caches: their shares of the sequences (default equal)

    @property
    def caches(self) -> list[str]:
        return [self.cache] if isinstance(self.cache, str) else list(self.cache)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    warm = max(1, int(cfg.warmup_fraction * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return cfg.lr * (cfg.min_lr_fraction + (1 - cfg.min_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


def _count_batches(readers: list[CacheReader], weights: list[float], rank: int, world: int, cfg: TrainConfig,
                   vocab: int, row_tokens) -> int:
    """Micro-batches in one epoch of this rank (decodes the rank's whole share: only for --epochs)."""
    stream = open_stream(readers, weights, rank=rank, world=world, seed=cfg.seed, prefetch=0)
    return sum(1 for _ in batches(stream, cfg.batch_tokens, vocab, cfg.max_length,
                                  readers[0].info.encoding.sample_temperature, row_tokens))


def open_caches(cfg: TrainConfig) -> tuple[list[CacheReader], list[float], int]:
    """The caches (each complete, unless --allow-incomplete-cache), their normalized weights, and the top-k width
    of every batch (`mix.check_compatible`: caches that cannot share a batch are refused here, before any work)."""
    readers = []
    weights = parse_weights(cfg.cache_weights, len(cfg.caches))
    twice = sorted({u for u in cfg.caches if cfg.caches.count(u) > 1})
    if twice:
        raise TrainError(f"--cache {redact(twice[0])} is given more than once; give each cache once and set its share "
                         "with --cache-weights")
    for uri in cfg.caches:
        try:
            reader = CacheReader(uri)
        except CacheError as e:
            raise TrainError(str(e)) from e
        if not reader.manifest.complete and not cfg.allow_incomplete_cache:
            done = sum(w.complete for w in reader.manifest.workers.values())
            raise TrainError(f"{redact(uri)}: the cache is incomplete ({done}/{reader.info.num_workers} workers done); "
                             "finish cache-teacher, or pass --allow-incomplete-cache to train on what is there")
        readers.append(reader)
    k = check_compatible(readers, [redact(u) for u in cfg.caches])
    return readers, weights, k


def enable_checkpointing(model: torch.nn.Module, spec: str) -> None:
    """Non-reentrant activation checkpointing of every decoder layer (transformers' own), or a clear refusal."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise TrainError(f"--gradient-checkpointing: the student {spec} ({type(model).__name__}) does not support "
                         "activation checkpointing in transformers; drop the option or lower --batch-tokens")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def check_ids(b: Batch, outputs: int, cache: str) -> None:
    """Every cached id must be a student output (caches from before the padding rule may hold padded ids)."""
    top = int(b.targets.topk_ids.max()) if b.targets.topk_ids.numel() else -1
    if top >= outputs:
        raise TrainError(f"{cache}: the cache holds teacher id {top}, beyond the student's {outputs} outputs (a padded "
                         "id, stored by an adakd before 0.2); rebuild the cache with this cache-teacher")


NOT_ENOUGH_DATA = "{cache}: not enough data for one optimizer step on each of {world} rank(s)"


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train; --out is a local directory or a store URI (trainer/outdir.py stages and uploads it)."""
    rank, world, local = dist.init()
    try:
        outdir = OutDir(cfg.out, rank)  # refuses an --out another live run holds; stages a store's last checkpoint
        try:
            return _train(cfg, outdir, rank, world, local)
        finally:
            outdir.close()
    finally:
        dist.shutdown()  # the group init joined, ended here (not at interpreter exit): see distributed.shutdown


def _train(cfg: TrainConfig, outdir: OutDir, rank: int, world: int, local: int) -> dict[str, Any]:
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    out = outdir.local
    readers, weights, k = open_caches(cfg)
    reader = readers[0]
    cache_name = describe([redact(u) for u in cfg.caches], weights)
    try:
        model = load_student(cfg.student, cfg.trust_remote_code, seed=cfg.seed)
        teacher_tok = cache_tokenizer(reader)
        tok = student_tokenizer(cfg.student, teacher_tok, cfg.trust_remote_code)
        for r in readers:
            check_vocabulary(model, tok, teacher_tok if r is reader else cache_tokenizer(r), r)
            check_context(model, r, cfg.max_length)
    except StudentError as e:
        raise TrainError(str(e)) from e
    outputs = model.get_output_embeddings().weight.shape[0]
    vocab = target_vocab(k, reader.info.vocab_size, outputs)
    model.to(device).train()
    live = None
    if cfg.live_teacher:
        from .live_teacher import LiveTeacher

        try:
            live = LiveTeacher(cfg.live_teacher, reader.info, outputs, device, cfg.trust_remote_code)
        except StudentError as e:
            raise TrainError(str(e)) from e
    row_tokens = packed_rows(cfg.row_tokens if cfg.packing else None, ("--student", model),
                             *([("--live-teacher", live.model)] if live else []), quiet=rank != 0)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model, cfg.student)
    net = StudentLoss(model, cfg.loss, cfg.router_aux_loss)
    if world > 1:
        if cfg.fsdp:
            from torch.distributed.fsdp import fully_shard

            for layer in getattr(base_model(model), "layers", []):
                fully_shard(layer)
            fully_shard(net)
        else:
            net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[local] if device.type == "cuda" else None)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=cfg.betas)
    if cfg.max_steps:  # no need to read the cache once just to count
        total = cfg.max_steps
    else:
        per_epoch = dist.all_min(_count_batches(readers, weights, rank, world, cfg, vocab, row_tokens), world,
                                 device) // cfg.grad_accum
        if per_epoch == 0:
            raise TrainError(NOT_ENOUGH_DATA.format(cache=cache_name, world=world))
        total = per_epoch * cfg.epochs
    latf = LATFState()
    step, epoch, cursor = 0, 0, None
    ckpt = latest_checkpoint(out)
    if ckpt is not None:
        st, opt_state = load_training_state(ckpt)
        _load_states(model, opt, _load_model_weights(ckpt / "model"), opt_state, cfg.fsdp and world > 1, ckpt)
        if st.get("world") != world:
            raise TrainError(f"{ckpt}: saved with {st.get('world')} process(es), resumed with {world}; use the same world size")
        step, epoch, latf = st["step"], st["epoch"], LATFState.from_json(st["latf"])
        cursor = cursor_from_json(st["cursors"][rank])  # a storage.Cursor, or a mix.MixCursor for several caches
    log = RunLog(out, rank, cfg, total, step, name=outdir.name())
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _nullcontext()
    t_last, tokens_since, computed_since = time.perf_counter(), 0, 0
    stop_at = min(total, step + cfg.stop_after) if cfg.stop_after else total
    finished = False
    try:
        while step < stop_at:
            seed = cfg.seed + epoch
            resume_at = cursor if cursor and cursor.seed == seed else None
            stream = open_stream(readers, weights, rank=rank, world=world, seed=seed, cursor=resume_at)
            it = batches(stream, cfg.batch_tokens, vocab, cfg.max_length, reader.info.encoding.sample_temperature,
                         row_tokens)
            epoch_steps = 0
            while step < stop_at:
                micro = []
                for _ in range(cfg.grad_accum):
                    b = next(it, None)
                    if b is None:
                        break
                    micro.append(b)
                if not dist.all_have(len(micro) == cfg.grad_accum, world, device):
                    break
                lr = lr_at(step, total, cfg)
                for g in opt.param_groups:
                    g["lr"] = lr
                for b in micro:
                    check_ids(b, outputs, cache_name)
                res = forward_backward(net, micro, cfg.loss, latf.ratio, world, device, autocast, step, live)
                kd, ce = res.kd, res.ce
                tokens_since += res.tokens
                computed_since += res.computed
                gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip) if cfg.clip > 0 else torch.tensor(0.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if cfg.loss.kd_weight > 0 and cfg.loss.adakd.latf:
                    latf_update(latf, kd, past_warmup=past_warmup(step, total, cfg.warmup_fraction), cfg=cfg.loss.adakd)
                step += 1
                epoch_steps += 1
                cursor = micro[-1].cursor
                now = time.perf_counter()
                t = res.temperatures
                a = cfg.loss.kd_weight
                record = {
                    "step": step, "epoch": epoch, "loss": (1 - a) * ce + a * kd, "kd": kd,
                    "ce": ce, "lr": lr, "grad_norm": float(gnorm),
                    "latf_ratio": latf.ratio, "latf_ema": latf.ema, "latf_reference": latf.reference,
                    "selected": res.selected, "valid": res.valid,
                    "temp_mean": float(t.mean()) if len(t) else None, "temp_min": float(t.min()) if len(t) else None,
                    "temp_max": float(t.max()) if len(t) else None,
                    "tokens_per_s": tokens_since / max(now - t_last, 1e-9) * world,
                    "real_fraction": tokens_since / max(computed_since, 1),
                    "router_aux": res.router_aux,  # None: the student has no router loss
                    **res.diagnostics(),
                }
                t_last, tokens_since, computed_since = now, 0, 0
                log.step(record, t)
                if cfg.save_every and step % cfg.save_every == 0 and step < stop_at:
                    _save(outdir, step, epoch, model, tok, opt, latf, cursor, cfg, rank, world, device)
            if step < stop_at:  # this epoch's data ran out
                if epoch_steps == 0 and resume_at is None:
                    raise TrainError(NOT_ENOUGH_DATA.format(cache=cache_name, world=world))
                epoch += 1
                cursor = None
        model_state = _save(outdir, step, epoch, model, tok, opt, latf, cursor, cfg, rank, world, device)
        if rank == 0 and step >= total:
            from .student import save_student

            save_student(model, tok, str(out / "final"), model_state)
            outdir.publish_final()
        finished = True
    finally:
        log.close()
    if rank == 0 and finished:
        outdir.publish_logs()  # the log, --plot's files, TensorBoard's (a store's copy; local ones are in place)
    done = step >= total
    return {"steps": step, "total": total, "final": outdir.uri("final") if done else None,
            "log": outdir.uri("train_log.jsonl"), "last": log.last}


def _full_states(model, opt, sharded: bool):
    """Model and optimizer state dicts, gathered in full (a collective on every rank) under FSDP."""
    if not sharded:
        return None, opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, opt, options=opts)


def _tied_aliases(model: torch.nn.Module) -> dict[str, set[str]]:
    """Each state-dict key -> the other keys sharing its storage (tied embeddings are saved once)."""
    by_ptr: dict[int, set[str]] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        by_ptr.setdefault(t.data_ptr(), set()).add(key)
    return {key: keys - {key} for keys in by_ptr.values() for key in keys}


def load_weights(model: torch.nn.Module, sd: dict[str, torch.Tensor], where: Path) -> None:
    """Load saved weights; a key missing only because its tensor is tied to a saved one (lm_head = embeddings)
    is fine, anything else is a damaged checkpoint."""
    missing, unexpected = model.load_state_dict(sd, strict=False)
    aliases = _tied_aliases(model)
    lost = [k for k in missing if not aliases.get(k, set()) & sd.keys()]
    if lost or unexpected:
        raise TrainError(f"{where}: the checkpoint's weights do not fit the student (missing {lost[:4]}, unexpected "
                         f"{list(unexpected)[:4]}); resume with the same --student, or --out a new directory")


def _load_states(model, opt, model_sd, opt_sd, sharded: bool, where: Path) -> None:
    if not sharded:
        load_weights(model, model_sd, where)
        opt.load_state_dict(opt_sd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_sd, options=opts)
    set_optimizer_state_dict(model, opt, opt_sd, options=opts)


def _save(outdir: OutDir, step, epoch, model, tok, opt, latf, cursor, cfg, rank, world, device):
    cursors = dist.gather_cursors(cursor, world, device)
    model_state, opt_state = _full_states(model, opt, cfg.fsdp and world > 1)
    if rank == 0:
        state = {"epoch": epoch, "latf": latf.to_json(), "world": world, "config": redacted_config(cfg.to_json())}
        try:
            ckpt = save_checkpoint(outdir.local, step, model, tok, opt_state, state, cursors, model_state)
            outdir.publish_checkpoint(ckpt, cfg.keep_last)  # a store: upload, then mark complete; prune
        except CheckpointError as e:
            raise TrainError(str(e)) from e
    dist.barrier(world)
    return model_state


def _load_model_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        try:
            sd.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise TrainError(f"{f}: cannot read the checkpoint's weights ({e}); remove {path.parent} to resume from the "
                             "checkpoint before it, or --out a new directory to start over") from e
    if not sd:
        raise TrainError(f"{path}: the checkpoint has no weights; remove {path.parent} to resume from the one before it")
    return sd


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


__all__ = ["AdaKDConfig", "Batch", "LossConfig", "TrainConfig", "TrainError", "train"]
