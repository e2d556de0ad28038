"""adakd: offline knowledge distillation for LLMs.

The installed distribution provides this one import name. Its parts: `adakd.storage` (the cache format),
`adakd.pipeline` (stage one, the teacher), `adakd.trainer` (stage two, the student), `adakd.common` (what both
stages need), `adakd.integrations.hf` (a Hugging Face / TRL `Trainer` fed from a cache), `adakd.cli` (the
commands).

The public Python API (docs/python-api.md) is the names below, imported on first use so that `import adakd`
and the commands' --help stay free of torch:

    open_cache(uri)                     a teacher cache (local or s3://, gs://, ...)
    batches(cache, model, ...)          this rank's packed batches, as train-student takes them
    Distiller(loss, adakd=True, ...)    the sparse KD loss with AdaKD's state (state_dict / load_state_dict)
    AdaKDConfig                         AdaKD's knobs (LATF and IDTS)
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_PUBLIC = {
    "open_cache": "adakd.trainer.api",
    "batches": "adakd.trainer.api",
    "Distiller": "adakd.trainer.api",
    "DistillOutput": "adakd.trainer.api",
    "Batch": "adakd.trainer.api",
    "hidden_states": "adakd.trainer.api",
    "AdaKDConfig": "adakd.trainer.adakd",
    "CacheReader": "adakd.storage",
    "CacheError": "adakd.storage",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'adakd' has no attribute {name!r}")
