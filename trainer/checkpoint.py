"""Checkpoints: the student as a Hugging Face directory (safetensors) plus the training state, no pickle.

OUT/checkpoints/step-000100/
  model/            save_pretrained output (+ tokenizer): loads with AutoModelForCausalLM and vLLM
  optimizer.safetensors, rng.safetensors
  state.json        step, epoch, LATF state, optimizer param groups, per-rank data cursors, config
OUT/checkpoints/latest   the name of the newest complete checkpoint

A checkpoint is written into a temporary directory, fsynced, and renamed into place; `latest` is replaced
atomically after that. A crash or a full disk mid-write leaves the previous checkpoint as `latest`; the
temporary directories a crash leaves are removed by the next save.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
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
    name = f"step-{step:06d}"
    tmp = root / f".tmp-{uuid.uuid4().hex}-{name}"
    final, old = root / name, None
    try:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):  # left by a run killed mid-write (rank 0 is the only writer)
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
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
        if final.exists():  # this step again (a finished run re-run): move the old copy aside, never delete it first
            old = root / f".tmp-{uuid.uuid4().hex}-old-{name}"
            os.rename(final, old)
        os.rename(tmp, final)
        _write_text_atomic(root / "latest", name)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return final
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not final.exists():
            os.rename(old, final)  # the new copy did not make it: put the old one back
        if isinstance(e, (OSError, SafetensorError)):  # safetensors reports a full disk as SafetensorError
            why = getattr(e, "strerror", None) or e
            raise CheckpointError(
                f"checkpoint at step {step} could not be written to {root} ({why}); the previous "
                f"checkpoint ({latest_checkpoint(out) or 'none'}) is intact"
            ) from e
        raise


def prune_checkpoints(out: Path, keep: int) -> list[Path]:
    """Remove all but the `keep` newest complete checkpoints (never the one `latest` names); returns the removed."""
    if keep < 1:
        return []
    latest = latest_checkpoint(out)
    done = sorted((p for p in (out / "checkpoints").glob("step-*") if p.name[5:].isdigit()), key=lambda p: int(p.name[5:]))
    removed = [p for p in done[:-keep] if p != latest]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def check_writable(out: str | os.PathLike) -> None:
    """Refuse an output directory that cannot be written, before any training work."""
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"{out}: the output directory is not writable ({e.strerror or e}); choose another --out") from e


def latest_checkpoint(out: Path) -> Path | None:
    """The checkpoint `latest` names; when a crash left it naming none, the newest complete one.

    Every `step-*` directory is complete: it appears only by renaming a fully written, fsynced one.
    """
    root = out / "checkpoints"
    ptr = root / "latest"
    if ptr.exists():
        path = root / ptr.read_text().strip()
        if (path / "state.json").exists():
            return path
    done = [p for p in root.glob("step-*") if p.name[5:].isdigit() and (p / "state.json").exists()]
    return max(done, key=lambda p: int(p.name[5:])) if done else None


def load_training_state(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state.json, the optimizer state dict); restores the RNG states."""
    try:
        state = json.loads((path / "state.json").read_text())
        opt_state = optimizer_state(load_file(str(path / "optimizer.safetensors")), state["param_groups"])
        rng = load_file(str(path / "rng.safetensors"))
    except (OSError, KeyError, ValueError, SafetensorError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint ({e}); delete this directory to resume from the one "
                              "before, or train into another --out") from e
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state, opt_state
