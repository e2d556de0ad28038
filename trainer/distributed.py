"""The few collectives the training loop needs (torchrun: NCCL on GPU, gloo on CPU); each is a no-op alone."""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from adakd.storage import Cursor


def init() -> tuple[int, int, int]:
    """(rank, world size, local rank), joining the process group when torchrun started several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


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
