"""The few collectives the training loop needs (torchrun: NCCL on GPU, gloo on CPU); each is a no-op alone."""

from __future__ import annotations

import functools
import gc
import importlib
import json
import os
import sys

import torch
import torch.distributed as dist

from adakd.storage import Cursor

_joined = False  # this process's group was created by `init` (and so is `shutdown`'s to destroy)


def init() -> tuple[int, int, int]:
    """(rank, world size, local rank), joining the process group when torchrun started several processes."""
    global _joined
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        # Before the group exists: imported after it (DDP imports torch._dynamo, which imports it), its functions'
        # defaults `group=group.WORLD` would hold the group for good, and `shutdown` could not end it.
        importlib.import_module("torch.distributed.nn")

        dist.init_process_group(backend)
        _joined = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


def shutdown() -> None:
    """Destroy the group `init` created, while the interpreter is fully alive (a group someone else created is
    theirs to end).

    gloo runs each collective on a worker thread that drops its reference to the finished operation, and so to
    the operation's tensors, only after the caller's wait has returned. A tensor made in Python is freed with the
    GIL, and a thread that asks for the GIL while the interpreter finalizes is ended by pthread_exit, which inside
    that C++ destructor aborts the process ("terminate called without an active exception", SIGABRT) after the
    run had finished. Destroying the group joins those threads, with the GIL released, before that can happen.
    The caller must hold no module or optimizer that keeps the group (DDP, FSDP): the garbage collection here
    frees what is left of them, and FSDP2's DTensor caches (their device mesh holds the group) are emptied.
    """
    global _joined
    if _joined:
        _joined = False
        destroy()


def destroy() -> None:
    """Destroy the current process group and join gloo's worker threads now (see `shutdown`): for a script that
    created the group itself (or had Accelerate / the HF Trainer create it), at its end, once it has dropped its
    models and trainers."""
    if not dist.is_initialized():
        return
    dist.destroy_process_group()
    if "torch.distributed.tensor" in sys.modules:
        _clear_dtensor_caches()
    gc.collect()  # the last references to the group may sit in reference cycles (a wrapped module's hooks)


def _clear_dtensor_caches() -> None:
    """DTensor's caches (sharding propagation, redistribution plans, mesh topology) keep each device mesh seen,
    and so its process group, for the life of the process: emptied here (private torch API where it has one)."""
    try:
        from torch.distributed.tensor.debug import _clear_sharding_prop_cache

        _clear_sharding_prop_cache()  # the Python cache and the C++ fast path's
    except (ImportError, AttributeError, RuntimeError):
        pass
    for obj in gc.get_objects():  # every lru_cache of torch.distributed (their keys and values hold meshes)
        if isinstance(obj, functools._lru_cache_wrapper) and str(getattr(obj, "__module__", "")).startswith(
                "torch.distributed"):
            obj.cache_clear()
    planners = getattr(sys.modules.get("torch.distributed.tensor._redistribute"), "clear_redistribute_planner_cache",
                       None)
    if planners is not None:
        planners()


def collective_device(world: int) -> torch.device:
    """Where a collective's tensor lives when the caller has no device at hand (the Python API, the HF
    integration): the current GPU under NCCL, else the CPU (gloo, or no group at all)."""
    if world > 1 and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_sum(values: list[float], world: int, device) -> list[float]:
    """Element-wise sums over ranks, in float64 (token counts and loss sums: exact for counts below 2^53)."""
    if world == 1:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_have(ok: bool, world: int, device) -> bool:
    """True when every rank says True (e.g. every rank still has a full optimizer step of data)."""
    if world == 1:
        return ok
    t = torch.tensor([1 if ok else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def all_min(n: int, world: int, device) -> int:
    if world == 1:
        return n
    t = torch.tensor([n], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def gather_cursors(cursor: Cursor | None, world: int, device) -> list[dict | None]:
    """Every rank's cursor, as JSON via a byte tensor (no pickle)."""
    data = json.dumps(cursor.to_json() if cursor else None).encode()
    if world == 1:
        return [json.loads(data)]
    size = torch.tensor([len(data)], device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    cap = int(max(s.item() for s in sizes))
    buf = torch.zeros(cap, dtype=torch.uint8, device=device)
    buf[: len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    bufs = [torch.zeros_like(buf) for _ in range(world)]
    dist.all_gather(bufs, buf)
    return [json.loads(bytes(b[: int(s.item())].tolist())) for b, s in zip(bufs, sizes)]


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()
