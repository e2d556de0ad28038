"""The Python API for a user's own training loop: a cache's packed batches, and the sparse KD loss with AdaKD.

    import adakd

    cache = adakd.open_cache("s3://bucket/cache")
    distiller = adakd.Distiller("rkl", adakd=True)
    for batch in adakd.batches(cache, model, batch_tokens=8192):
        out = distiller(model, batch)          # out.loss: differentiable; out.kd, out.ce: floats
        out.loss.backward()
        optimizer.step(); optimizer.zero_grad()
        distiller.step(out.kd, total_steps)    # LATF's controller, once per optimizer step

The same computation as `train-student` (tests/test_api.py checks a step's loss against it): batches come
from `trainer.batches`, the loss from `trainer.kd_loss` on the student's final hidden states and output
layer, never a (positions x vocabulary) tensor beyond one chunk. What `train-student` adds around it (the
LR schedule, checkpoints, logs, DDP/FSDP, the run's checks) stays in its recipe; docs/python-api.md says how
to do each in a loop of one's own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from adakd.common.packing import DEFAULT_ROW_TOKENS
from adakd.storage import CacheError, CacheReader, Cursor, redact

from .adakd import AdaKDConfig, LATFState, latf_update, past_warmup
from .batches import Batch, batches as _batches
from .distributed import all_sum, collective_device
from .errors import TrainError
from .head import base_model, final_hidden, output_head
from .kd_loss import LossConfig, kd_loss
from .mix import MixCursor, check_compatible, open_stream, parse_weights
from .step import step_counts
from .student import packed_rows, target_vocab
from .train import check_ids


def open_cache(uri: str | os.PathLike, allow_incomplete: bool = False) -> CacheReader:
    """A teacher cache (a local directory or any URI pyarrow reads: s3://, gs://, ...), checked as
    `train-student` checks it: a cache still being written is refused unless `allow_incomplete`."""
    reader = CacheReader(uri)
    if not reader.manifest.complete and not allow_incomplete:
        done = sum(w.complete for w in reader.manifest.workers.values())
        raise CacheError(f"{reader.dir.uri}: the cache is incomplete ({done}/{reader.info.num_workers} workers done); "
                         "finish cache-teacher, or pass allow_incomplete=True to train on what is there")
    return reader


def _rank_world(rank: int | None, world: int | None) -> tuple[int, int]:
    """This process's data-parallel rank and size: given, else torch.distributed's, else (0, 1)."""
    ready = torch.distributed.is_available() and torch.distributed.is_initialized()
    if rank is None:
        rank = torch.distributed.get_rank() if ready else 0
    if world is None:
        world = torch.distributed.get_world_size() if ready else 1
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not within a world of {world} process(es)")
    return rank, world


def batches(cache: CacheReader | Sequence[CacheReader], model: torch.nn.Module, *, rank: int | None = None,
            world: int | None = None, seed: int = 0, batch_tokens: int = 8192,
            row_tokens: int | None = DEFAULT_ROW_TOKENS, max_length: int | None = None,
            cursor: Cursor | MixCursor | None = None, quiet: bool = False,
            weights: Sequence[float] | str | None = None) -> Iterator[Batch]:
    """This rank's batches of one pass over the cache, in the order `train-student` takes them.

    `model`: the student; its output width sets the tail bucket's vocabulary, and its family decides whether
    rows are packed (a family whose forward cannot take packed rows exactly gets padded rows and a one-line
    note, unless `quiet`). `row_tokens=None` keeps padded rows, one sequence each. `seed`: the shuffle (use
    seed + epoch for later epochs, as train-student does). `cursor`: a batch's `.cursor`, to resume right after it.
    Each `Batch` has `.model_inputs()`, `.to(device)`, `.tokens` (real tokens) and `.computed` (rows x width).

    Several caches (a list, e.g. off-policy and on-policy rounds): their sequences mixed in the shares of `weights`
    (default equal; normalized), checked to fit together, as `train-student --cache A --cache B` does
    (trainer/mix.py); the pass ends when the cache drawn next runs out on this rank."""
    rank, world = _rank_world(rank, world)
    readers = [cache] if isinstance(cache, CacheReader) else list(cache)
    mix = parse_weights(weights, len(readers))
    k = check_compatible(readers, [redact(r.dir.uri) for r in readers])
    outputs = model.get_output_embeddings().weight.shape[0]
    vocab = target_vocab(k, readers[0].info.vocab_size, outputs)
    rows = packed_rows(row_tokens, ("the student", model), quiet=quiet or rank != 0)
    stream = open_stream(readers, mix, rank=rank, world=world, seed=seed, cursor=cursor)
    return _batches(stream, batch_tokens, vocab, max_length, readers[0].info.encoding.sample_temperature, rows)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel (or similar `.module`) wrapper."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def hidden_states(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """(B, T, H) final hidden states of the student on a batch.

    A bare model runs its base model only (no logits at all). A wrapped one (DDP, as a Hugging Face Trainer
    wraps it) must be called through its wrapper for gradient synchronization: it runs whole, the base
    model's output captured by a forward hook, with logits for one position per row (`logits_to_keep=1`)."""
    inner = unwrap(model)
    if inner is model:
        return final_hidden(model, **batch.model_inputs())
    captured: dict[str, torch.Tensor] = {}

    def keep(_module, _args, out) -> None:
        captured["h"] = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    handle = base_model(inner).register_forward_hook(keep)
    try:
        model(**batch.model_inputs(), use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    return captured["h"]


@dataclass
class DistillOutput:
    """One micro-batch's loss and what it measured."""

    loss: torch.Tensor  # differentiable: (1 - kd_weight) * CE + kd_weight * KD (this batch's share, with denominators)
    kd: float  # mean T_i^2 * D over the distilled positions of this batch
    ce: float  # mean CE over the trained positions of this batch (0 when kd_weight = 1)
    kd_sum: float  # the sums behind them, to average over several micro-batches or ranks
    ce_sum: float
    valid: int  # trained positions
    selected: int  # distilled positions (LATF keeps the hardest fraction)
    temperatures: torch.Tensor  # (selected,) per-position temperatures (IDTS), detached


class Distiller:
    """The sparse KD loss of `train-student` with its AdaKD state, for any training loop.

    `loss`: the base divergence (fkl, rkl, jsd, sfkl, srkl, tvd, akl, abkd); `kd_weight`: a in
    (1 - a) CE + a KD; `temperature`: the base T; `adakd`: True (LATF and IDTS, the published values), False,
    or an `AdaKDConfig`; `warmup_fraction`: LATF's warm-up, a fraction of the run's optimizer steps as in
    train-student's --warmup-fraction; other keyword options go to `LossConfig` (jsd_beta, skew, akl_mu,
    chunk_positions, sampled_estimator, ...). The state (`state_dict`) is LATF's controller and the step count:
    JSON-able, saved next to a checkpoint and loaded to resume exactly."""

    def __init__(self, loss: str = "fkl", *, kd_weight: float = 1.0, temperature: float = 1.0,
                 adakd: bool | AdaKDConfig = False, warmup_fraction: float = 0.05, **options) -> None:
        ada = adakd if isinstance(adakd, AdaKDConfig) else AdaKDConfig(latf=bool(adakd), idts=bool(adakd))
        self.config = LossConfig(loss=loss, kd_weight=kd_weight, temperature=temperature, adakd=ada, **options)
        if not 0.0 <= warmup_fraction <= 1.0:
            raise ValueError(f"warmup_fraction must be within [0, 1], not {warmup_fraction}")
        self.warmup_fraction = warmup_fraction
        self.latf = LATFState()
        self.steps = 0  # optimizer steps counted by `step`

    @property
    def latf_ratio(self) -> float:
        """The fraction of positions distilled now (1 without LATF)."""
        return self.latf.ratio

    def denominators(self, micro_batches: list[Batch], world: int = 1) -> tuple[float, float]:
        """(trained, distilled) positions of one optimizer step's micro-batches on this rank, summed over ranks
        when `world` > 1 (a collective): pass them to every micro-batch's call so the step's loss is one mean per
        trained token, as train-student's (docs/train-student.md, "Loss normalization")."""
        counts = all_sum(list(step_counts(micro_batches, self.config, self.latf.ratio)), world, collective_device(world))
        return max(counts[0], 1.0), max(counts[1], 1.0)

    def __call__(self, model: torch.nn.Module, batch: Batch,
                 denominators: tuple[float, float] | None = None) -> DistillOutput:
        """The loss of `model` (bare or DDP-wrapped) on `batch` (moved to the model's device here)."""
        inner = unwrap(model)
        head = output_head(inner)
        batch = batch.to(head.weight.device)
        check_ids(batch, head.weight.shape[0], "the cache")
        hidden = hidden_states(model, batch)
        out = kd_loss(hidden[batch.rows, batch.cols], head, batch.targets, self.config,
                      LATFState(ratio=self.latf.ratio), denominators)
        return DistillOutput(out.loss, out.kd, out.ce, out.kd_sum, out.ce_sum, out.valid, out.selected,
                             out.temperatures)

    def step(self, kd: float, total_steps: int) -> None:
        """After each optimizer step: LATF's controller moves the distilled fraction from the step's KD value
        (its mean over the step's micro-batches and ranks). `total_steps`: the run's optimizer steps (the
        warm-up is a fraction of them). Does nothing without LATF."""
        if self.config.kd_weight > 0 and self.config.adakd.latf:
            latf_update(self.latf, float(kd), past_warmup(self.steps, total_steps, self.warmup_fraction),
                        self.config.adakd)
        self.steps += 1

    def state_dict(self) -> dict:
        return {"latf": self.latf.to_json(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        try:
            self.latf, self.steps = LATFState.from_json(state["latf"]), int(state["steps"])
        except (KeyError, TypeError, ValueError) as e:
            raise TrainError(f"not a Distiller state ({type(e).__name__}: {e}); pass what state_dict() returned") from e


__all__ = ["Batch", "Distiller", "DistillOutput", "batches", "hidden_states", "open_cache", "unwrap"]
