"""A Hugging Face `Trainer` (and so TRL's trainers built on it) that distils from a teacher cache.

    from transformers import TrainingArguments
    import adakd
    from adakd.integrations.hf import CacheDataset, DistillationTrainer

    cache = adakd.open_cache("runs/cache")
    trainer = DistillationTrainer(
        model=student,
        args=TrainingArguments("runs/hf-student", max_steps=200, learning_rate=3e-3, per_device_train_batch_size=1),
        train_dataset=CacheDataset(cache, student, batch_tokens=8192),
        distiller=adakd.Distiller("rkl", adakd=True),
    )
    trainer.train()          # trainer.train(resume_from_checkpoint=True) resumes, AdaKD's state included

What it changes in the Trainer, and why:
- Data: a `CacheDataset` yields whole token-budget batches (packed rows, the trained positions' targets), so
  the dataloader takes them one at a time (batch size is the cache's `batch_tokens`, not
  `per_device_train_batch_size`). Each rank reads its own share of the cache (`rank`/`world` from
  torch.distributed), so the dataloader is not sharded again. Resuming replays the stream and skips the batches
  already trained (the Trainer's own skip), which gives exactly the batches an uninterrupted run takes.
- Loss: `compute_loss` is the `Distiller`'s chunked sparse loss on the student's final hidden states, averaged
  per trained token over the whole optimizer step (gradient accumulation and ranks), as `train-student` does;
  `loss_is_scaled_for_ga` tells the Trainer not to divide it again.
- AdaKD's state: LATF's controller moves after each optimizer step (a callback) and is written as
  `adakd_state.json` into every `checkpoint-N` folder; `train(resume_from_checkpoint=...)` reads it back.
- Logs: `kd`, `ce`, `latf_ratio` and `temp_mean` join the Trainer's `loss` in every log.
Needs `accelerate` (the `hf` extra: pip install 'adakd[hf]').
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from adakd.common.packing import DEFAULT_ROW_TOKENS
from adakd.storage import CacheReader
from adakd.trainer.api import Batch, Distiller, batches
from adakd.trainer.distributed import all_have, all_sum, collective_device

STATE_FILE = "adakd_state.json"
BATCH_KEY = "adakd_batch"


class CacheDataset(IterableDataset):
    """This rank's batches of a cache as a torch IterableDataset, one epoch per iteration (seed + epoch).

    Each item is a dict: the batch's model inputs (so the Trainer can count input tokens) and the whole
    `Batch` under "adakd_batch" (rows, columns and targets of the trained positions)."""

    def __init__(self, cache: CacheReader, model: torch.nn.Module, *, batch_tokens: int = 8192,
                 row_tokens: int | None = DEFAULT_ROW_TOKENS, max_length: int | None = None, seed: int = 0) -> None:
        self.cache, self.model = cache, model
        self.batch_tokens, self.row_tokens, self.max_length, self.seed = batch_tokens, row_tokens, max_length, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer at each epoch: the next pass shuffles with seed + epoch, as train-student."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """One epoch of this rank's batches; under data parallelism every rank stops at the same count (a rank
        whose share runs out first ends the epoch for all, as in train-student), so their steps stay paired."""
        ready = torch.distributed.is_available() and torch.distributed.is_initialized()
        world = torch.distributed.get_world_size() if ready else 1
        device = collective_device(world)
        it = iter(batches(self.cache, self.model, seed=self.seed + self.epoch, batch_tokens=self.batch_tokens,
                          row_tokens=self.row_tokens, max_length=self.max_length, quiet=self.epoch > 0))
        while True:
            b = next(it, None)
            if not all_have(b is not None, world, device) or b is None:
                return
            yield {**b.model_inputs(), BATCH_KEY: b}


def _one(items):
    """The dataloader's collate: the dataset's items are whole batches already."""
    return items


class _AdaKDCallback(TrainerCallback):
    """After each optimizer step: LATF's update with the step's KD; at each save: AdaKD's state beside the
    Trainer's own files in the checkpoint folder."""

    def __init__(self, trainer: "DistillationTrainer") -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._end_step(state.max_steps)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            tmp = os.path.join(folder, STATE_FILE + ".tmp")
            with open(tmp, "w") as f:
                json.dump(self.trainer.distiller.state_dict(), f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(folder, STATE_FILE))


class DistillationTrainer(Trainer):
    """`transformers.Trainer` whose loss is the `Distiller`'s on batches of a `CacheDataset`."""

    loss_is_scaled_for_ga = True  # compute_loss returns this micro-batch's share of the step's per-token mean

    def __init__(self, *args, distiller: Distiller, **kwargs) -> None:
        kwargs.setdefault("data_collator", _one)
        super().__init__(*args, **kwargs)
        if not isinstance(self.train_dataset, CacheDataset):
            raise TypeError("DistillationTrainer: train_dataset must be an adakd.integrations.hf.CacheDataset")
        self.distiller = distiller
        self._denominators: tuple[float, float] | None = None
        self._sums = [0.0, 0.0]  # kd, ce sums of the step so far (this rank)
        self._last: dict[str, float] = {}
        self.add_callback(_AdaKDCallback(self))

    def get_train_dataloader(self) -> DataLoader:
        """The batches as they come: one cache batch per step of the dataloader, this rank's share only."""
        return DataLoader(self.train_dataset, batch_size=None, collate_fn=_one, num_workers=0)

    def get_batch_samples(self, epoch_iterator: Iterator, num_batches: int, device: torch.device):
        """The step's micro-batches, and the step's trained/distilled position counts over every micro-batch and
        rank: each micro-batch's loss is its share of the step's per-token means."""
        samples = []
        for _ in range(num_batches):
            try:
                samples.append(next(epoch_iterator))
            except StopIteration:
                break
        world = self.accelerator.num_processes
        self._denominators = self.distiller.denominators([s[BATCH_KEY] for s in samples], world) if samples else None
        return samples, None

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        batch: Batch = inputs[BATCH_KEY]
        out = self.distiller(model, batch, self._denominators)
        self._sums[0] += out.kd_sum
        self._sums[1] += out.ce_sum
        if out.temperatures.numel():
            self._last["temp_mean"] = float(out.temperatures.mean())
        loss = out.loss * self.accelerator.num_processes  # DDP averages gradients over ranks: undo it for a sum
        return (loss, {"kd": out.kd, "ce": out.ce}) if return_outputs else loss

    def _end_step(self, total_steps: int) -> None:
        """The step's KD and CE means (all ranks), then LATF's update, as train-student after its optimizer step."""
        world = self.accelerator.num_processes
        kd_sum, ce_sum = all_sum(self._sums, world, collective_device(world))
        trained, distilled = self._denominators or (1.0, 1.0)
        kd, ce = kd_sum / distilled, ce_sum / trained
        self._last.update(kd=kd, ce=ce, latf_ratio=self.distiller.latf_ratio)
        self.distiller.step(kd, total_steps)
        self._sums = [0.0, 0.0]

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:
            logs = {**logs, **self._last}
        super().log(logs, *args, **kwargs)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """The Trainer's train, AdaKD's state read back from the checkpoint it resumes from."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no checkpoint to resume from in {self.args.output_dir}")
        if resume_from_checkpoint:
            path = os.path.join(resume_from_checkpoint, STATE_FILE)
            if not os.path.exists(path):
                raise FileNotFoundError(f"{resume_from_checkpoint} has no {STATE_FILE} (AdaKD's state): it was not "
                                        "saved by a DistillationTrainer, or its save was cut off; resume from the "
                                        "checkpoint before it")
            with open(path) as f:
                self.distiller.load_state_dict(json.load(f))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)


__all__ = ["CacheDataset", "DistillationTrainer"]
