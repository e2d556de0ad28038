"""Run under torchrun by tests/test_api.py: a DistillationTrainer on every rank, the log written by rank 0.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/hf_child.py CACHE STUDENT OUT STEPS ACCUM
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from transformers import AutoModelForCausalLM, TrainingArguments

import adakd
from adakd.integrations.hf import CacheDataset, DistillationTrainer
from adakd.trainer.distributed import destroy


def main() -> None:
    cache, student, out, steps, accum = sys.argv[1:6]
    model = AutoModelForCausalLM.from_pretrained(student)
    args = TrainingArguments(out, max_steps=int(steps), gradient_accumulation_steps=int(accum), learning_rate=1e-3,
                             per_device_train_batch_size=1, logging_steps=1, save_strategy="no", report_to=[],
                             use_cpu=True, seed=0, lr_scheduler_type="constant", disable_tqdm=True)
    trainer = DistillationTrainer(model=model, args=args, distiller=adakd.Distiller("rkl", adakd=True),
                                  train_dataset=CacheDataset(adakd.open_cache(cache), model, batch_tokens=512))
    trainer.train()
    if trainer.is_world_process_zero():
        Path(out, "hf_log.json").write_text(json.dumps(trainer.state.log_history))
    del trainer, model
    destroy()  # the group Accelerate created, ended before interpreter exit (gloo's threads joined: no SIGABRT)


if __name__ == "__main__":
    main()
