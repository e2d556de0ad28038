"""Checkpoints: the student as a Hugging Face directory (safetensors) plus the training state, no pickle.

OUT/checkpoints/step-000100/
  model/            save_pretrained output (+ tokenizer): loads with AutoModelForCausalLM and vLLM
  optimizer.safetensors, rng.safetensors
  state.json        step, epoch, LATF state, optimizer param groups, per-rank data cursors, config
OUT/checkpoints/latest   the name of the newest complete checkpoint

A checkpoint is written into a temporary directory, fsynced, and renamed into place; `latest` is replaced
atomically after that. A crash or a full disk mid-write leaves the previous checkpoint as `latest`.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


class CheckpointError(Exception):
    pass


def _fsync_tree(d: Path) -> None:
    for root, _, files in os.walk(d):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def optimizer_tensors(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """An optimizer state dict -> flat tensors ("<param>.<name>") and JSON-able param groups."""
    tensors = {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            tensors[f"{idx}.{name}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    return tensors, sd["param_groups"]


def optimizer_state(tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> dict[str, Any]:
    """The inverse of `optimizer_tensors` (params are indices, or names under FSDP)."""
    state: dict[Any, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        idx, name = key.rsplit(".", 1)
        state.setdefault(int(idx) if idx.isdigit() else idx, {})[name] = value
    return {"state": state, "param_groups": groups}


def save_checkpoint(out: Path, step: int, model: torch.nn.Module, tokenizer, opt_state: dict[str, Any],
                    state: dict[str, Any], cursors: list[dict], model_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write step-<step> completely, then point `latest` at it. Returns its path."""
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    tmp = root / f".tmp-{uuid.uuid4().hex}-{name}"
    try:
        if model_state is None:
            model.save_pretrained(tmp / "model", safe_serialization=True)
        else:
            model.save_pretrained(tmp / "model", state_dict=dict(model_state), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "model")
        tensors, groups = optimizer_tensors(opt_state)
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp / "optimizer.safetensors"))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "param_groups": groups, "cursors": cursors},
                                                   indent=1, default=str))
        _fsync_tree(tmp)
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _write_text_atomic(root / "latest", name)
        return final
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise CheckpointError(
                f"checkpoint at step {step} could not be written to {root} ({e.strerror or e}); the previous "
                f"checkpoint ({latest_checkpoint(out) or 'none'}) is intact"
            ) from e
        raise


def latest_checkpoint(out: Path) -> Path | None:
    ptr = out / "checkpoints" / "latest"
    if not ptr.exists():
        return None
    path = out / "checkpoints" / ptr.read_text().strip()
    return path if (path / "state.json").exists() else None


def load_training_state(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state.json, the optimizer state dict); restores the RNG states."""
    try:
        state = json.loads((path / "state.json").read_text())
        opt_state = optimizer_state(load_file(str(path / "optimizer.safetensors")), state["param_groups"])
        rng = load_file(str(path / "rng.safetensors"))
    except (OSError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint ({e}); remove it or point --resume elsewhere") from e
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state, opt_state
