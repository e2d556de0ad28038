"""One optimizer step's gradients from fixed micro-batches, in one process or under torchrun (tests/test_step.py).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/step_child.py OUT.safetensors [ddp|fsdp]

Rank r of W takes micro-batches r*M/W .. (r+1)*M/W - 1 of `micro_batches()`; the gradients of the step (a full
tensor per parameter) are written by rank 0. Run alone, `gradients(micro_batches(), 1)` is the reference.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adakd.storage import SequenceTargets  # noqa: E402
from adakd.trainer.adakd import AdaKDConfig  # noqa: E402
from adakd.trainer.batches import Batch, collate  # noqa: E402
from adakd.trainer.kd_loss import LossConfig  # noqa: E402

V = 300
K = 8


def sequences(lengths: list[int], seed: int = 0) -> list[SequenceTargets]:
    rng = np.random.default_rng(seed)
    out = []
    for r, n in enumerate(lengths):
        ids = rng.integers(3, V, n).astype(np.int32)
        mask = np.zeros(n, bool)
        mask[int(rng.integers(1, n // 2 + 1)):] = True
        m = int(mask.sum())
        lp = torch.from_numpy(rng.standard_normal((m, V)) * 2).log_softmax(-1).float()
        v, i = lp.topk(K, -1)
        out.append(SequenceTargets(r, ids, mask, i.numpy().astype(np.int32), v.numpy(), lp[np.arange(m), ids[mask]].numpy(),
                                   torch.log1p(-v.exp().sum(-1).clamp(max=1 - 1e-6)).numpy()))
    return out


GROUPS = [[5, 9, 40], [12], [30, 8, 7, 6, 25, 11], [60, 3]]  # micro-batches of very different sizes


def micro_batches(packed: bool = True) -> list[Batch]:
    """Four micro-batches of different numbers of trained positions, packed (or padded) as train-student lays them."""
    from adakd.common.packing import layout_of

    seqs = sequences([n for g in GROUPS for n in g])
    out, i = [], 0
    for g in GROUPS:
        part = seqs[i:i + len(g)]
        i += len(g)
        layout = layout_of([len(s.input_ids) for s in part], 256, 64 if packed else None)
        out.append(collate(part, V, None, layout=layout))
    return out


def one_batch(packed: bool = True) -> Batch:
    """The same sequences as `micro_batches`, all in one micro-batch."""
    from adakd.common.packing import layout_of

    seqs = sequences([n for g in GROUPS for n in g])
    return collate(seqs, V, None, layout=layout_of([len(s.input_ids) for s in seqs], 1024, 64 if packed else None))


def student() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                        tie_word_embeddings=False)).train()


LOSS = LossConfig(loss="rkl", kd_weight=0.6, adakd=AdaKDConfig(latf=False, idts=False))


def gradients(micro: list[Batch], world: int, net: torch.nn.Module | None = None, model=None,
              loss: LossConfig = LOSS) -> tuple[dict[str, torch.Tensor], object]:
    """The step's gradients (full tensors, by parameter name) and its StepResult."""
    from adakd.trainer.step import StudentLoss, forward_backward

    if net is None:
        model = student()
        net = StudentLoss(model, loss)
    res = forward_backward(net, micro, loss, 1.0, world, torch.device("cpu"), torch.autocast("cpu", enabled=False), 0)
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        if hasattr(g, "full_tensor"):  # FSDP2: a sharded DTensor
            g = g.full_tensor()
        grads[name] = g.detach().clone().contiguous()
    return grads, res


def main() -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from adakd.trainer.distributed import init
    from adakd.trainer.step import StudentLoss

    out, mode = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "ddp"
    rank, world, _ = init()
    model = student()
    net = StudentLoss(model, LOSS)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(net)
    else:
        net = torch.nn.parallel.DistributedDataParallel(net)
    micro = micro_batches()
    per = len(micro) // world
    grads, res = gradients(micro[rank * per:(rank + 1) * per], world, net, model)
    if rank == 0:
        save_file(grads, out, metadata={"kd": repr(res.kd), "ce": repr(res.ce)})
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
