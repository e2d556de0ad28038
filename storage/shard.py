"""One shard: an Arrow IPC file (zstd-compressed buffers) holding blocks of sequences.

Each record batch is a block: one row per sequence, position-level data as list columns whose values
are the byte planes of `codec`. The schema metadata carries the shard's id table and its counts, so a
shard can be checked against the manifest on its own.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Iterator

import numpy as np
import pyarrow as pa
import zstandard

from . import codec
from .errors import CacheCorruptError
from .sequence import SequenceTargets

FORMAT_VERSION = 2  # the newest this adakd writes; top-k caches are still written as version 1
READ_VERSIONS = (1, 2)
KINDS = ("topk", "sampled", "hybrid")


def format_version_for(kind: str) -> int:
    """Top-k caches keep version 1 (readable by older adakd); sampled and hybrid ones need version 2."""
    return 1 if kind == "topk" else 2


@dataclass(frozen=True)
class Encoding:
    """How targets are coded; identical for every shard of a cache (recorded in the manifest)."""

    k: int
    vocab_size: int
    lp_step: float = codec.LP_STEP
    aux_step: float = codec.AUX_STEP
    fields: tuple[str, ...] = ()  # optional per-position float32 fields, e.g. ("entropy",)
    zstd_level: int = 3
    kind: str = "topk"  # topk | sampled | hybrid (the manifest's target_kind)
    samples: int = 0  # N draws per trained position (sampled, hybrid)
    sample_temperature: float = 1.0  # the proposal: draws from softmax(logits / this)
    sample_lp_step: float = codec.SAMPLE_LP_STEP  # drawn ids' log-probabilities: multiples of this (nats)

    @property
    def id_planes(self) -> int:
        return codec.id_planes_for(self.vocab_size)

    @property
    def sampled(self) -> bool:
        return self.kind != "topk"

    @property
    def sample_id_planes(self) -> int:
        return codec.id_planes_for(self.vocab_size + 1)  # code 0: the position's actual next token

    @property
    def size_planes(self) -> int:
        return codec.id_planes_for(self.samples + 1)  # distinct ids per position: 0..N

    @property
    def count_planes(self) -> int:
        return codec.id_planes_for(2 * self.samples + 1)  # zigzag residuals within -N..N

    def to_json(self) -> dict:
        d = asdict(self)
        d["fields"] = list(self.fields)
        d["id_planes"] = self.id_planes
        if not self.sampled:  # top-k headers stay byte-identical to format version 1
            for key in ("kind", "samples", "sample_temperature", "sample_lp_step"):
                del d[key]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Encoding":
        return cls(
            k=int(d["k"]), vocab_size=int(d["vocab_size"]), lp_step=float(d["lp_step"]),
            aux_step=float(d["aux_step"]), fields=tuple(d.get("fields", ())),
            zstd_level=int(d.get("zstd_level", 3)), kind=str(d.get("kind", "topk")), samples=int(d.get("samples", 0)),
            sample_temperature=float(d.get("sample_temperature", 1.0)),
            sample_lp_step=float(d.get("sample_lp_step", codec.SAMPLE_LP_STEP)),
        )


@dataclass
class ShardStats:
    rows: int = 0
    tokens: int = 0
    positions: int = 0
    records: list[int] = field(default_factory=list)  # first and last record index
    blocks: list[int] = field(default_factory=list)  # rows per block


def _schema(enc: Encoding, metadata: dict[bytes, bytes]) -> pa.Schema:
    u8 = pa.list_(pa.uint8())
    cols = [("record", pa.uint64()), ("input_ids", pa.list_(pa.int32())), ("loss_mask", pa.list_(pa.bool_()))]
    cols += [(f"topk_id_{p}", u8) for p in range(enc.id_planes)]
    cols += [(f"topk_lp_{p}", u8) for p in range(2)]
    cols += [("target_lp", pa.list_(pa.uint16())), ("tail_lp", pa.list_(pa.uint16()))]
    cols += [(f"x_{name}", pa.list_(pa.float32())) for name in enc.fields]
    if enc.sampled:
        cols += [(f"sample_n_{p}", u8) for p in range(enc.size_planes)]
        cols += [(f"sample_id_{p}", u8) for p in range(enc.sample_id_planes)]
        cols += [(f"sample_lp_{p}", u8) for p in range(2)]
        cols += [(f"sample_count_{p}", u8) for p in range(enc.count_planes)]
        cols += [("rest_lp", pa.list_(pa.uint16()))]
    return pa.schema(cols, metadata=metadata)


def _list(lengths: np.ndarray, values: np.ndarray, typ: pa.DataType) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=typ))


def _split_blocks(seqs: list[SequenceTargets], block_positions: int) -> list[list[SequenceTargets]]:
    blocks, cur, n = [], [], 0
    for s in seqs:
        cur.append(s)
        n += s.num_positions
        if n >= block_positions:
            blocks.append(cur)
            cur, n = [], 0
    if cur:
        blocks.append(cur)
    return blocks


def encode_shard(seqs: list[SequenceTargets], enc: Encoding, block_positions: int) -> tuple[bytes, ShardStats]:
    """Encode validated sequences into the bytes of one shard file."""
    all_ids = np.concatenate([s.topk_ids.reshape(-1) for s in seqs] + [s.sample_ids for s in seqs if s.sampled]
                             ) if seqs else np.zeros(0, np.int32)
    table, inverse = codec.frequency_table(all_ids, enc.vocab_size)
    del all_ids
    blocks = _split_blocks(seqs, block_positions)
    stats = ShardStats(
        rows=len(seqs), tokens=sum(len(s.input_ids) for s in seqs),
        positions=sum(s.num_positions for s in seqs),
        records=[seqs[0].record, seqs[-1].record] if seqs else [], blocks=[len(b) for b in blocks],
    )
    meta = {
        "format_version": format_version_for(enc.kind), "encoding": enc.to_json(), "rows": stats.rows,
        "tokens": stats.tokens, "positions": stats.positions, "block_rows": stats.blocks,
    }
    metadata = {
        b"adakd.shard": json.dumps(meta, sort_keys=True).encode(),
        b"adakd.id_table": zstandard.ZstdCompressor(level=9).compress(table.astype("<u4").tobytes()),
    }
    schema = _schema(enc, metadata)
    sink = pa.BufferOutputStream()
    opts = pa.ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level=enc.zstd_level))
    with pa.ipc.new_file(sink, schema, options=opts) as writer:
        for block in blocks:
            writer.write_batch(_encode_block(block, enc, inverse, schema))
    return sink.getvalue().to_pybytes(), stats


def _encode_block(block: list[SequenceTargets], enc: Encoding, inverse: np.ndarray, schema: pa.Schema) -> pa.RecordBatch:
    tok_len = np.array([len(s.input_ids) for s in block], dtype=np.int64)
    npos = np.array([s.num_positions for s in block], dtype=np.int64)
    n = int(npos.sum())
    ids = np.concatenate([s.topk_ids for s in block]).reshape(n, enc.k)
    lps = np.concatenate([s.topk_logprobs for s in block]).reshape(n, enc.k)
    codes = inverse[ids]
    gaps = codec.quantize_topk(lps, enc.lp_step)
    target = codec.quantize_neglog(np.concatenate([s.target_logprob for s in block]), enc.aux_step)
    tail = codec.quantize_neglog(np.concatenate([
        s.tail_logmass if s.tail_logmass is not None else codec.tail_logmass(s.topk_logprobs) for s in block
    ]), enc.aux_step)
    cols: list[pa.Array] = [
        pa.array(np.array([s.record for s in block], dtype=np.uint64)),
        _list(tok_len, np.concatenate([s.input_ids for s in block]).astype(np.int32), pa.int32()),
        _list(tok_len, np.concatenate([s.loss_mask for s in block]).astype(bool), pa.bool_()),
    ]
    cols += [_list(npos * enc.k, plane, pa.uint8()) for plane in codec.to_planes(codes, enc.id_planes)]
    cols += [_list(npos * enc.k, plane, pa.uint8()) for plane in codec.to_planes(gaps, 2)]
    cols += [_list(npos, target, pa.uint16()), _list(npos, tail, pa.uint16())]
    cols += [_list(npos, np.concatenate([s.extras[f] for s in block]).astype(np.float32), pa.float32()) for f in enc.fields]
    if enc.sampled:
        cols += _encode_samples(block, enc, inverse, npos, tail)
    return pa.RecordBatch.from_arrays(cols, schema=schema)


def _expected_counts(gaps: np.ndarray, sizes: np.ndarray, tail_q: np.ndarray, enc: Encoding) -> np.ndarray:
    codes = codec.dequantize_sorted_runs(gaps, sizes, -1.0).astype(np.int64)  # step -1: the integer codes
    tails = np.repeat(tail_q, sizes) if enc.kind == "hybrid" else None
    return codec.predicted_counts(codes, tails, enc.samples, enc.sample_lp_step, enc.aux_step, enc.sample_temperature)


def _encode_samples(block: list[SequenceTargets], enc: Encoding, inverse: np.ndarray, npos: np.ndarray,
                    tail_q: np.ndarray) -> list[pa.Array]:
    """Per position the number of distinct ids drawn; per drawn id its frequency code, its log-probability (gaps
    within a position) and its count, stored as the difference from the count its log-probability predicts
    (N * p, or N * p / tail in a hybrid cache), which is mostly 0 or small. All as byte planes."""
    sizes = np.concatenate([s.sample_sizes for s in block])
    per_row = np.array([len(s.sample_ids) for s in block], dtype=np.int64)
    ids = np.concatenate([s.sample_ids for s in block])
    labels = np.repeat(np.concatenate([s.labels for s in block]), sizes)
    codes = np.where(ids == labels, 0, inverse[ids] + 1)
    gaps = codec.quantize_sorted_runs(np.concatenate([s.sample_logprobs for s in block]), sizes, enc.sample_lp_step)
    residual = codec.zigzag(np.concatenate([s.sample_counts for s in block]) - _expected_counts(gaps, sizes, tail_q, enc))
    cols = [_list(npos, plane, pa.uint8()) for plane in codec.to_planes(sizes, enc.size_planes)]
    cols += [_list(per_row, plane, pa.uint8()) for plane in codec.to_planes(codes, enc.sample_id_planes)]
    cols += [_list(per_row, plane, pa.uint8()) for plane in codec.to_planes(gaps, 2)]
    cols += [_list(per_row, plane, pa.uint8()) for plane in codec.to_planes(residual, enc.count_planes)]
    rest = codec.quantize_neglog(np.concatenate([s.rest_logmass for s in block]), enc.lp_step)
    return cols + [_list(npos, rest, pa.uint16())]


@dataclass
class DecodedBlock:
    """A block decoded into flat arrays; `tok_offsets`/`pos_offsets` delimit its rows."""

    records: np.ndarray  # (rows,) int64
    input_ids: np.ndarray  # (tokens,) int32
    loss_mask: np.ndarray  # (tokens,) bool
    tok_offsets: np.ndarray  # (rows + 1,) int64
    pos_offsets: np.ndarray  # (rows + 1,) int64
    topk_ids: np.ndarray  # (positions, k) int32
    topk_logprobs: np.ndarray  # (positions, k) float32
    target_logprob: np.ndarray  # (positions,) float32
    tail_logmass: np.ndarray  # (positions,) float32
    extras: dict[str, np.ndarray]
    sample_sizes: np.ndarray | None = None  # sampled and hybrid kinds: as in SequenceTargets, flat over the block
    sample_ids: np.ndarray | None = None
    sample_counts: np.ndarray | None = None
    sample_logprobs: np.ndarray | None = None
    rest_logmass: np.ndarray | None = None

    @cached_property
    def sample_offsets(self) -> np.ndarray:
        """(positions + 1,) where each position's draws start in the flat sample arrays."""
        out = np.zeros(self.positions + 1, dtype=np.int64)
        np.cumsum(self.sample_sizes, out=out[1:])
        return out

    @property
    def rows(self) -> int:
        return len(self.records)

    @property
    def positions(self) -> int:
        return len(self.target_logprob)

    def sequence(self, i: int) -> SequenceTargets:
        t0, t1 = self.tok_offsets[i], self.tok_offsets[i + 1]
        p0, p1 = self.pos_offsets[i], self.pos_offsets[i + 1]
        samples = {}
        if self.sample_sizes is not None:
            s0, s1 = self.sample_offsets[p0], self.sample_offsets[p1]
            samples = dict(sample_sizes=self.sample_sizes[p0:p1], sample_ids=self.sample_ids[s0:s1],
                           sample_counts=self.sample_counts[s0:s1], sample_logprobs=self.sample_logprobs[s0:s1],
                           rest_logmass=self.rest_logmass[p0:p1])
        return SequenceTargets(
            record=int(self.records[i]), input_ids=self.input_ids[t0:t1], loss_mask=self.loss_mask[t0:t1],
            topk_ids=self.topk_ids[p0:p1], topk_logprobs=self.topk_logprobs[p0:p1],
            target_logprob=self.target_logprob[p0:p1], tail_logmass=self.tail_logmass[p0:p1],
            extras={k: v[p0:p1] for k, v in self.extras.items()}, **samples,
        )


class ShardFile:
    """A shard opened from its bytes: checks its header against the cache's encoding."""

    def __init__(self, name: str, data: bytes | pa.Buffer, enc: Encoding):
        self.name = name
        self.enc = enc
        try:
            self._reader = pa.ipc.open_file(pa.BufferReader(data))
            md = self._reader.schema.metadata or {}
            self.meta = json.loads(md[b"adakd.shard"])
            table_bytes = zstandard.ZstdDecompressor().decompress(md[b"adakd.id_table"])
        except KeyError as e:
            raise CacheCorruptError(f"{name}: not an adakd shard (missing {e.args[0]!r} metadata)") from e
        except Exception as e:
            raise CacheCorruptError(f"{name}: unreadable shard ({type(e).__name__}: {e})") from e
        try:
            self._check_header(table_bytes)
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # reachable with checksums off or forged
            raise CacheCorruptError(f"{name}: malformed shard header ({type(e).__name__}: {e})") from e

    def _check_header(self, table_bytes: bytes) -> None:
        name, enc = self.name, self.enc
        version = self.meta.get("format_version")
        if version not in READ_VERSIONS:
            from .errors import CacheVersionError

            raise CacheVersionError(
                f"{name}: shard format version {version!r}; this adakd reads versions {READ_VERSIONS}. "
                "Upgrade adakd or rebuild the cache with this version."
            )
        if version != format_version_for(enc.kind):
            raise CacheCorruptError(f"{name}: shard format version {version} does not hold {enc.kind} targets")
        if Encoding.from_json(self.meta["encoding"]) != enc:
            raise CacheCorruptError(f"{name}: shard encoding {self.meta['encoding']} differs from the manifest's")
        self.table = np.frombuffer(table_bytes, dtype="<u4").astype(np.int32)
        if len(self.table) and (self.table.max() >= enc.vocab_size or self.table.min() < 0):
            raise CacheCorruptError(f"{name}: id table holds ids outside the vocabulary ({enc.vocab_size})")
        self.block_rows: list[int] = list(self.meta["block_rows"])
        if self._reader.num_record_batches != len(self.block_rows):
            raise CacheCorruptError(
                f"{name}: {self._reader.num_record_batches} blocks, header says {len(self.block_rows)}"
            )
        expected = _schema(enc, {})
        if not self._reader.schema.remove_metadata().equals(expected):
            raise CacheCorruptError(f"{name}: schema does not match format version {version} ({enc.kind} targets)")

    @property
    def num_blocks(self) -> int:
        return len(self.block_rows)

    def decode(self, b: int) -> DecodedBlock:
        try:
            batch = self._reader.get_batch(b)
            return _decode_block(batch, self.enc, self.table)
        except CacheCorruptError as e:
            raise CacheCorruptError(f"{self.name}, block {b}: {e}") from None
        except Exception as e:
            raise CacheCorruptError(f"{self.name}, block {b}: undecodable ({type(e).__name__}: {e})") from e

    def blocks(self) -> Iterator[DecodedBlock]:
        for b in range(self.num_blocks):
            yield self.decode(b)


def _flat(col: pa.ListArray) -> tuple[np.ndarray, np.ndarray]:
    offsets = col.offsets.to_numpy().astype(np.int64)
    values = col.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
    return offsets - offsets[0], values.to_numpy(zero_copy_only=False)


def _decode_block(batch: pa.RecordBatch, enc: Encoding, table: np.ndarray) -> DecodedBlock:
    k = enc.k
    col = batch.column
    records = col(0).to_numpy().astype(np.int64)
    tok_off, input_ids = _flat(col(1))
    mask_off, loss_mask = _flat(col(2))
    if not np.array_equal(tok_off, mask_off):
        raise CacheCorruptError("input_ids and loss_mask lengths differ")
    pos_off, target_q = _flat(col(3 + enc.id_planes + 2))
    tail_off, tail_q = _flat(col(4 + enc.id_planes + 2))
    per_row = np.add.reduceat(loss_mask.astype(np.int64), tok_off[:-1]) if len(loss_mask) else np.zeros(0, np.int64)
    per_row[np.diff(tok_off) == 0] = 0
    if not np.array_equal(np.diff(pos_off), per_row) or not np.array_equal(pos_off, tail_off):
        raise CacheCorruptError("per-position column lengths do not match the loss masks")
    n = int(pos_off[-1])
    planes = []
    for p in range(enc.id_planes + 2):
        off, vals = _flat(col(3 + p))
        if off[-1] != n * k:
            raise CacheCorruptError(f"column {batch.schema.names[3 + p]} holds {off[-1]} entries, expected {n * k}")
        planes.append(vals)
    codes = codec.from_planes(planes[: enc.id_planes])
    if codes.size and int(codes.max()) >= len(table):
        raise CacheCorruptError("id codes outside the shard's id table")
    topk_ids = np.take(table, codes).reshape(n, k)
    topk_lp = codec.dequantize_topk(codec.from_planes(planes[enc.id_planes:]).reshape(n, k), enc.lp_step)
    extras = {}
    for i, f in enumerate(enc.fields):
        off, vals = _flat(col(5 + enc.id_planes + 2 + i))
        if not np.array_equal(off, pos_off):
            raise CacheCorruptError(f"field {f!r} length does not match the positions")
        extras[f] = vals
    samples = _decode_samples(batch, enc, table, pos_off, tail_q, input_ids[loss_mask]) if enc.sampled else {}
    return DecodedBlock(
        records=records, input_ids=input_ids, loss_mask=loss_mask, tok_offsets=tok_off, pos_offsets=pos_off,
        topk_ids=topk_ids, topk_logprobs=topk_lp, target_logprob=codec.dequantize_neglog(target_q, enc.aux_step),
        tail_logmass=codec.dequantize_neglog(tail_q, enc.aux_step), extras=extras, **samples,
    )


def _planes(batch: pa.RecordBatch, prefix: str, count: int, offsets: np.ndarray) -> np.ndarray:
    """The value planes `prefix`0..count-1, each checked to be laid out by `offsets`; joined into integers."""
    planes = []
    for p in range(count):
        off, vals = _flat(batch.column(f"{prefix}{p}"))
        if not np.array_equal(off, offsets):
            raise CacheCorruptError(f"column {prefix}{p} lengths do not match the draws")
        planes.append(vals)
    return codec.from_planes(planes)


def _decode_samples(batch: pa.RecordBatch, enc: Encoding, table: np.ndarray, pos_off: np.ndarray,
                    tail_q: np.ndarray, labels: np.ndarray) -> dict:
    sizes = _planes(batch, "sample_n_", enc.size_planes, pos_off).astype(np.int32)
    off = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])[pos_off]  # where each row's draws start
    codes = _planes(batch, "sample_id_", enc.sample_id_planes, off).astype(np.int64)
    if codes.size and int(codes.max()) > len(table):
        raise CacheCorruptError("sample id codes outside the shard's id table")
    ids = np.take(table, np.maximum(codes - 1, 0))
    ids = np.where(codes == 0, np.repeat(labels, sizes), ids)
    gaps = _planes(batch, "sample_lp_", 2, off)
    residual = codec.unzigzag(_planes(batch, "sample_count_", enc.count_planes, off))
    counts = residual + _expected_counts(gaps, sizes, tail_q, enc)
    if counts.size and (counts.min() < 1 or not np.all(np.add.reduceat(counts, codec.run_starts(sizes)) == enc.samples)):
        raise CacheCorruptError(f"draw counts do not add up to {enc.samples} at every position")
    rest_off, rest_q = _flat(batch.column("rest_lp"))
    if not np.array_equal(rest_off, pos_off):
        raise CacheCorruptError("rest_lp length does not match the positions")
    return dict(sample_sizes=sizes, sample_ids=ids.astype(np.int32), sample_counts=counts.astype(np.int32),
                sample_logprobs=codec.dequantize_sorted_runs(gaps, sizes, enc.sample_lp_step),
                rest_logmass=codec.dequantize_neglog(rest_q, enc.lp_step))
