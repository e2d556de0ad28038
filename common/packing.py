"""Padding-free batches: whole sequences side by side in rows, positions restarting at each sequence.

A batch is a (rows x width) block of tokens. Padded (the old layout): one sequence per row, right-padded
to the longest; on real instruction data most of the block is padding (dolly with GPT-2: 38% real tokens
at 8,192 tokens per batch). Packed: sequences are placed whole (never split) into rows by first fit, each
one's positions counting from 0, and the model is given `position_ids` and no 2-D attention mask.
transformers then builds the mask itself (`masking_utils.find_packed_sequence_indices`: a position that
does not follow the previous one starts a new sequence; attention stays causal within a sequence and never
crosses into another), for sdpa, eager and flex attention alike; its flash-attention path reads the same
position ids as variable-length sequences. A row's trailing padding is one more short "sequence" that no
real token attends to.

Rows are bounded (`row_tokens`, or the longest sequence when longer): with a dense mask, attention costs
rows x width^2, so one row as long as the whole micro-batch would make attention grow with the square of the
batch. Whether a model's forward really confines attention this way is checked, not assumed
(`packing_error`): families that derive positions from the attention mask (OPT), recurrent state (Mamba),
or mask kernels that only honour packing for one row are run on padded rows instead.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np
import torch

DEFAULT_ROW_TOKENS = 1024  # the fastest in bench.throughput's sweep on CPU, 96% real tokens (docs/train-student.md)


@dataclass
class Layout:
    """Where each sequence of a batch sits: its row and first column, and the block's shape."""

    row: np.ndarray  # (S,) int64
    start: np.ndarray  # (S,) int64
    lengths: np.ndarray  # (S,) int64
    rows: int
    width: int
    packed: bool

    @property
    def tokens(self) -> int:
        """Real tokens."""
        return int(self.lengths.sum())

    @property
    def computed(self) -> int:
        """Tokens the model computes: rows x width, padding included."""
        return self.rows * self.width

    def block(self, seqs: list[np.ndarray], pad_id: int = 0) -> dict[str, torch.Tensor]:
        """The model's inputs: input_ids and, padded, attention_mask; packed, position_ids (no attention mask)."""
        ids = np.full((self.rows, self.width), pad_id, dtype=np.int64)
        out: dict[str, np.ndarray] = {"input_ids": ids}
        if self.packed:
            pos = np.zeros((self.rows, self.width), dtype=np.int64)
            fill = np.zeros(self.rows, dtype=np.int64)
            for s, r, a, n in zip(seqs, self.row, self.start, self.lengths):
                ids[r, a:a + n] = s
                pos[r, a:a + n] = np.arange(n)
                fill[r] = max(fill[r], a + n)
            for r in range(self.rows):  # the row's padding: a run of its own, attended by no real token
                pos[r, fill[r]:] = np.arange(self.width - fill[r])
            out["position_ids"] = pos
        else:
            mask = np.zeros((self.rows, self.width), dtype=np.int64)
            for s, r, n in zip(seqs, self.row, self.lengths):
                ids[r, :n] = s
                mask[r, :n] = 1
            out["attention_mask"] = mask
        return {k: torch.from_numpy(v) for k, v in out.items()}

    def real_mask(self) -> torch.Tensor:
        """(rows, width) bool: true where a sequence's token is, false on the padding."""
        mask = np.zeros((self.rows, self.width), dtype=bool)
        for r, a, n in zip(self.row, self.start, self.lengths):
            mask[r, a:a + n] = True
        return torch.from_numpy(mask)

    def place(self, i: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, columns) in the block of sequence i's positions."""
        return np.full(len(positions), self.row[i], dtype=np.int64), positions.astype(np.int64) + self.start[i]


@dataclass(frozen=True)
class Rows:
    """How a model takes packed rows: `tokens` per row, and `shared`, the widest row several sequences may share
    (None: any). Chunked attention (Llama 4's `attention_chunk_size`) counts its chunks from the row's start, not
    from each sequence's, so there sequences may share a row only within one chunk (`rows_for`)."""

    tokens: int
    shared: int | None = None


def rows_for(row_tokens: int, *models: torch.nn.Module) -> Rows:
    """`Rows` for these models: rows of `row_tokens`, shared only within the smallest attention chunk among them."""
    chunks = []
    for m in models:
        config = m.config.get_text_config() if hasattr(m.config, "get_text_config") else m.config
        chunk = getattr(config, "attention_chunk_size", None)
        if isinstance(chunk, int) and chunk > 0:
            chunks.append(chunk)
    return Rows(row_tokens, min(chunks) if chunks else None)


class Planner:
    """Decides, one sequence at a time and in order, whether it still fits the batch; then lays the batch out.

    `add(n)` takes a sequence of n tokens and returns True, or returns False (and takes nothing) when it does
    not fit: the caller then closes the batch and starts the next with that sequence. The first sequence of
    a batch always fits (a sequence longer than the budget goes alone).
    """

    packed = False

    def __init__(self, budget: int):
        if budget < 1:
            raise ValueError(f"the token budget must be at least 1, not {budget}")
        self.budget = budget
        self.reset()

    def reset(self) -> None:
        self.lengths: list[int] = []

    def __len__(self) -> int:
        return len(self.lengths)

    def add(self, n: int) -> bool:
        raise NotImplementedError

    def layout(self) -> Layout:
        raise NotImplementedError


class PaddedPlanner(Planner):
    """One sequence per row, right-padded: rows x longest <= budget."""

    def add(self, n: int) -> bool:
        if self.lengths and max(max(self.lengths), n) * (len(self.lengths) + 1) > self.budget:
            return False
        self.lengths.append(n)
        return True

    def layout(self) -> Layout:
        n = np.asarray(self.lengths, dtype=np.int64)
        return Layout(np.arange(len(n)), np.zeros(len(n), dtype=np.int64), n, len(n), int(n.max()), packed=False)


class PackedPlanner(Planner):
    """First fit into at most budget // C rows of C tokens, C = max(row_tokens, the batch's first sequence),
    capped by the budget: rows x width <= budget, and a sequence longer than the budget goes alone. With `shared`
    (`Rows.shared`), C is at most that, and a first sequence longer than it goes alone."""

    packed = True

    def __init__(self, budget: int, row_tokens: int = DEFAULT_ROW_TOKENS, shared: int | None = None):
        if row_tokens < 1:
            raise ValueError(f"the row length must be at least 1, not {row_tokens}")
        self.row_tokens = row_tokens
        self.shared = shared
        super().__init__(budget)

    def reset(self) -> None:
        super().reset()
        self.fill: list[int] = []
        self.row: list[int] = []
        self.start: list[int] = []
        self.capacity = 0
        self.max_rows = 0

    def add(self, n: int) -> bool:
        if not self.lengths:
            cap = min(self.row_tokens, self.budget, self.shared or self.budget)
            self.capacity = max(cap, n)
            self.max_rows = 1 if self.shared and n > self.shared else max(1, self.budget // self.capacity)
        elif self.shared and self.capacity > self.shared:
            return False  # a sequence longer than the shared width: alone in its batch
        r = next((r for r, f in enumerate(self.fill) if f + n <= self.capacity), None)
        if r is None:
            if len(self.fill) >= self.max_rows or n > self.capacity:
                return False
            r = len(self.fill)
            self.fill.append(0)
        self.lengths.append(n)
        self.row.append(r)
        self.start.append(self.fill[r])
        self.fill[r] += n
        return True

    def layout(self) -> Layout:
        return Layout(np.asarray(self.row, dtype=np.int64), np.asarray(self.start, dtype=np.int64),
                      np.asarray(self.lengths, dtype=np.int64), len(self.fill), max(self.fill), packed=True)


def planner(budget: int, rows: int | Rows | None) -> Planner:
    """Packed rows of `rows` tokens (a `Rows` for a model that limits sharing; None: padded rows, one sequence each)."""
    if rows is None:
        return PaddedPlanner(budget)
    if isinstance(rows, Rows):
        return PackedPlanner(budget, rows.tokens, rows.shared)
    return PackedPlanner(budget, rows)


T = TypeVar("T")


def grouped(items: Iterable[T], length: Callable[[T], int], plan: Planner) -> Iterator[tuple[list[T], Layout | None]]:
    """Consecutive items in batches that `plan` accepts, each with its layout. An item of length 0 takes no place
    and rides along with the batch it falls in (a record with nothing to score); a batch of only such items has no
    layout (None)."""
    plan.reset()
    cur: list[T] = []
    for item in items:
        n = length(item)
        if n and not plan.add(n):
            yield cur, plan.layout()
            cur = []
            plan.reset()
            plan.add(n)
        cur.append(item)
    if cur:
        yield cur, plan.layout() if len(plan) else None


def layout_of(lengths: list[int], budget: int, row_tokens: int | Rows | None) -> Layout:
    """The layout `planner(budget, row_tokens)` gives these lengths, which must fit one batch (as `grouped` made it)."""
    p = planner(budget, row_tokens)
    for n in lengths:
        if not p.add(n):
            raise ValueError(f"{len(lengths)} sequences of {sum(lengths)} tokens do not fit one batch of {budget} tokens")
    return p.layout()


def forward_options(module: torch.nn.Module) -> dict:
    """No KV cache (transformers honours packed position ids only without one), where `forward` takes the option."""
    params = inspect.signature(module.forward).parameters
    return {"use_cache": False} if "use_cache" in params or any(
        p.kind == p.VAR_KEYWORD for p in params.values()) else {}


@torch.no_grad()
def packing_error(model: torch.nn.Module, tokens: int = 24) -> str | None:
    """Why packed rows do not reproduce this causal LM's forward, or None when they do.

    Two rows, each holding two sequences of different lengths (the second longer than a sliding window,
    where the config has a short one) and a padding run, against every sequence run alone: logits must agree
    to float rounding. Catches positions taken from the attention mask, masks that only honour packing for
    one row, recurrent state carried across sequences, and forwards that refuse position ids. Recurrent (Mamba-style)
    layers are refused by kind too: a state that barely carries over in a freshly initialized model would pass the
    numbers and not a trained one.
    """
    recurrent = sorted({type(m).__name__ for m in model.modules() if "mamba" in type(m).__name__.lower()})
    if recurrent:
        return f"its recurrent layers ({', '.join(recurrent[:2])}) carry their state from one sequence into the next"
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    vocab = int(getattr(config, "vocab_size", 0) or model.get_output_embeddings().weight.shape[0])
    limit = int(getattr(config, "max_position_embeddings", 0) or 4096)
    window = getattr(config, "sliding_window", None) or getattr(config, "attention_window", None)
    long = tokens + 9
    if isinstance(window, int) and 0 < window < 1024:
        long = max(long, window + 9)
    long = min(long, limit)
    short = min(tokens // 2 + 1, limit)
    gen = torch.Generator().manual_seed(17)
    lengths = [short, long, long - 3, short + 2]
    seqs = [torch.randint(3, max(vocab, 4), (n,), generator=gen).numpy() for n in lengths]
    device = next(model.parameters()).device
    # two rows of two sequences each and a padding run of 3: the layout the trainer's batches use
    layout = Layout(np.array([0, 0, 1, 1]), np.array([0, short, 0, long - 3]), np.array(lengths), 2,
                    max(short + long, long - 3 + short + 2) + 3, packed=True)
    block = {k: v.to(device) for k, v in layout.block(seqs).items()}
    was_training = model.training
    model.eval()
    opts = forward_options(model)
    try:
        packed = model(**block, **opts).logits.float()
        alone = [model(input_ids=torch.from_numpy(s)[None].to(device), **opts).logits[0].float() for s in seqs]
    except Exception as e:  # a forward that refuses position ids or a mask-less call
        return f"its forward does not run on packed rows ({type(e).__name__}: {str(e)[:120]})"
    finally:
        model.train(was_training)
    err, scale = 0.0, 1.0
    for r, a, n, ref in zip(layout.row, layout.start, layout.lengths, alone):
        err = max(err, (packed[r, a:a + n] - ref).abs().max().item())
        scale = max(scale, ref.abs().max().item())
    dtype = next(model.parameters()).dtype
    tol = (2e-5 if dtype in (torch.float32, torch.float64) else 6e-2) * scale  # float32 rounding here: ~1e-6
    if not err <= tol:
        return f"packed rows change its logits (largest difference {err:.3g})"
    return None


__all__ = ["DEFAULT_ROW_TOKENS", "Layout", "PackedPlanner", "PaddedPlanner", "Planner", "Rows", "forward_options",
           "grouped", "layout_of", "packing_error", "planner", "rows_for"]
