"""`verify` (is every byte of the cache what the manifest says?) and `inspect` (what does it hold?)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from .errors import CacheError
from .fs import CacheDir, redact
from .manifest import CacheManifest, load_manifest
from .reader import load_shard
from .writer import SHARD_DIR


@dataclass
class VerifyReport:
    cache: str
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)  # workers not finished (a problem for `adakd verify`)
    shards_ok: int = 0
    shards: int = 0
    positions: int = 0
    workers: int = 0
    workers_done: int = 0

    @property
    def ok(self) -> bool:
        """Every byte listed is right (a cache still being written can be ok; see `complete`)."""
        return not self.problems

    @property
    def complete(self) -> bool:
        """Every worker finished: the cache holds all of its data."""
        return not self.incomplete and self.workers_done == self.workers


def verify_cache(uri: str | os.PathLike) -> VerifyReport:
    """Check checksums, schema, decodability and counts of every shard; never raises on bad data."""
    try:
        cache = CacheDir.open(uri)
    except CacheError as e:  # a URI pyarrow cannot open
        return VerifyReport(cache=redact(os.fspath(uri)), problems=[str(e)])
    report = VerifyReport(cache=cache.uri)
    try:
        manifest = load_manifest(cache)
    except CacheError as e:
        report.problems.append(str(e))
        return report
    report.shards = len(manifest.shards)
    seen: dict[int, str] = {}
    for entry in manifest.shards:
        try:
            shard = load_shard(cache, entry, manifest.info, verify=True)
            rows = tokens = positions = 0
            records = []
            for block in shard.blocks():
                rows += block.rows
                tokens += len(block.input_ids)
                positions += block.positions
                records.append(block.records)
                _check_values(block, cache.path(entry.file))
            recs = np.concatenate(records) if records else np.zeros(0, np.int64)
            if (rows, tokens, positions) != (entry.rows, entry.tokens, entry.positions):
                raise CacheError(f"{cache.path(entry.file)}: decoded counts differ from the manifest")
            for r in recs.tolist():
                if r in seen:
                    raise CacheError(f"{cache.path(entry.file)}: record {r} is also in {seen[r]}")
                seen[r] = entry.file
            report.shards_ok += 1
            report.positions += positions
        except CacheError as e:
            report.problems.append(str(e))
    listed = {e.file for e in manifest.shards}
    for name in cache.listdir(SHARD_DIR):
        rel = f"{SHARD_DIR}/{name}"
        if name.startswith(".tmp-"):
            report.warnings.append(f"{cache.path(rel)}: temporary file of an interrupted write (ignored)")
        elif rel not in listed:
            report.warnings.append(f"{cache.path(rel)}: not in any manifest (left by a crash; ignored, rewritten on resume)")
    report.workers = manifest.info.num_workers
    for i in range(manifest.info.num_workers):
        w = manifest.workers.get(i)
        if w is None:
            report.incomplete.append(f"worker {i} of {manifest.info.num_workers} has not written anything yet")
        elif not w.complete:
            report.incomplete.append(f"worker {i} of {manifest.info.num_workers} is not complete (resume it)")
        else:
            report.workers_done += 1
    return report


def _check_values(block, where: str) -> None:
    if block.positions and not np.all(np.isfinite(block.topk_logprobs)):
        raise CacheError(f"{where}: non-finite top-k log-probabilities")
    if block.sample_ids is not None and block.sample_ids.size:
        pos = np.repeat(np.arange(block.positions), block.sample_sizes)
        key = pos.astype(np.int64) * (int(block.sample_ids.max()) + 1) + block.sample_ids
        if len(np.unique(key)) != len(key):
            raise CacheError(f"{where}: an id is stored twice among one position's draws")


@dataclass
class Summary:
    manifest: CacheManifest
    totals: dict[str, int]
    topk_mass: np.ndarray  # per sampled position: the head's mass (sampled caches: the drawn ids' exact mass)
    top1_prob: np.ndarray
    target_in_topk: float  # the actual token in the head (sampled caches: among the drawn ids)
    target_stored: float = float("nan")  # sampled and hybrid: the actual token in the head or among the drawn ids
    distinct: np.ndarray | None = None  # sampled and hybrid: distinct ids drawn per position
    ess: np.ndarray | None = None  # their importance weights' effective sample size (Kish) per position
    support_mass: np.ndarray | None = None  # the teacher's exact mass on the head and the drawn ids


def summarize(uri: str | os.PathLike, max_positions: int | None = None) -> Summary:
    """Totals from the manifest; distribution statistics from (up to `max_positions`) decoded positions."""
    from .reader import CacheReader

    reader = CacheReader(uri)
    enc = reader.info.encoding
    masses, top1, hits, stored, n = [], [], 0, 0, 0
    draws: dict[str, list] = {"distinct": [], "ess": [], "support_mass": []}
    for block in _all_blocks(reader):
        lp = block.topk_logprobs.astype(np.float64)
        head_mass = np.exp(lp).sum(1)
        labels = block.input_ids[block.loss_mask]
        found = (block.topk_ids == labels[:, None]).any(1)
        if enc.sampled:
            stats = _draw_stats(block, enc.sample_temperature, labels)
            for key in draws:
                draws[key].append(stats[key])
            stored += int((found | stats["label_drawn"]).sum())
            found = found if enc.k else stats["label_drawn"]
            draws["support_mass"][-1] = head_mass + stats["support_mass"]
        if enc.k:
            masses.append(head_mass)
            top1.append(np.exp(lp[:, 0]))
        else:  # no head: the drawn ids' mass, and the most likely drawn id (the mode, at any useful N)
            masses.append(draws["support_mass"][-1])
            top1.append(stats["first"])
        hits += int(found.sum())
        n += block.positions
        if max_positions is not None and n >= max_positions:
            break
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0)
    return Summary(
        manifest=reader.manifest, totals=reader.manifest.totals(), topk_mass=cat(masses), top1_prob=cat(top1),
        target_in_topk=hits / n if n else float("nan"), target_stored=stored / n if n else float("nan"),
        **({key: cat(v) for key, v in draws.items()} if enc.sampled else {}),
    )


def _draw_stats(block, temperature: float, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per position: distinct ids, the exact teacher mass they hold, the Kish effective sample size of the
    self-normalized weights for the teacher at T = 1 (c * p^(1 - 1/tau); N^2 / sum c^2 at tau = 1), the
    most likely drawn id's probability, and whether the actual token was drawn."""
    sizes = block.sample_sizes
    pos = np.repeat(np.arange(len(sizes)), sizes)
    lp = block.sample_logprobs.astype(np.float64)
    w = block.sample_counts * np.exp(lp * (1.0 - 1.0 / temperature))
    sum_w = np.bincount(pos, weights=w, minlength=len(sizes))
    sum_w2 = np.bincount(pos, weights=w * w, minlength=len(sizes))
    with np.errstate(invalid="ignore", divide="ignore"):
        ess = np.where(sum_w2 > 0, sum_w ** 2 / np.maximum(sum_w2, 1e-300), 0.0)
    first = np.zeros(len(sizes))
    starts = block.sample_offsets[:-1][sizes > 0]
    first[sizes > 0] = np.exp(lp[starts])
    drawn = np.zeros(len(sizes), dtype=bool)
    drawn[pos[block.sample_ids == labels[pos]]] = True
    return {"distinct": sizes.astype(np.float64), "ess": ess, "first": first, "label_drawn": drawn,
            "support_mass": np.bincount(pos, weights=np.exp(lp), minlength=len(sizes))}


def _all_blocks(reader):
    for entry in reader.shards:
        yield from load_shard(reader.dir, entry, reader.info).blocks()


def _targets(enc) -> str:
    head = f"top-{enc.k}  (log-prob step {enc.lp_step:g} nats)"
    if not enc.sampled:
        return head
    draws = (f"{enc.samples} draws per position at proposal temperature {enc.sample_temperature:g} (log-prob step "
             f"{enc.sample_lp_step:g} nats)")
    return f"sampled: {draws}" if enc.kind == "sampled" else f"hybrid: {head} + {draws} from the tail"


def _padding(info) -> str:
    """How much of the teacher's logit width is padding beyond its tokenizer (the cache never stores those ids)."""
    real = info.tokenizer.get("vocab_size")
    if isinstance(real, int) and 0 < real < info.vocab_size:
        return f" (teacher logits; tokenizer {real}, {info.vocab_size - real} padded ids)"
    return ""


def format_summary(s: Summary) -> str:
    info, t = s.manifest.info, s.totals
    done = sum(w.complete for w in s.manifest.workers.values())
    longest = s.manifest.longest_sequence()
    lines = [
        f"teacher        {info.teacher.get('name_or_path')}  ({info.teacher.get('fingerprint') or 'no fingerprint'})",
        f"tokenizer      {info.tokenizer.get('name_or_path')}  vocab {info.vocab_size}{_padding(info)}  "
        f"({info.tokenizer.get('fingerprint')})",
        f"engine         {info.engine.get('name')} {info.engine.get('version', '')}  dtype {info.teacher.get('dtype', '?')}",
        f"targets        {_targets(info.encoding)}",
        f"workers        {done}/{info.num_workers} complete",
        f"shards         {t['shards']}",
        f"sequences      {t['sequences']:,}" + (f"  (longest {longest:,} tokens)" if longest else ""),
        f"tokens         {t['tokens']:,}",
        f"trained pos.   {t['positions']:,}",
        f"bytes          {t['bytes']:,}  ({t['bytes'] / max(t['tokens'], 1):.1f}/token, "
        f"{t['bytes'] / max(t['positions'], 1):.1f}/trained position)",
    ]
    if s.distinct is not None and len(s.distinct):
        enc = info.encoding
        lines += [
            f"draws          {s.distinct.mean():.1f} distinct ids per position of {enc.samples} draws (median "
            f"{np.median(s.distinct):.0f}, max {s.distinct.max():.0f}); effective sample size {s.ess.mean():.1f} "
            f"(median {np.median(s.ess):.1f})",
            f"support        mean teacher mass on the {'head and ' if enc.k else ''}drawn ids {s.support_mass.mean():.4f}; "
            f"actual token stored: {s.target_stored:.2%}",
        ]
        if not enc.k:
            return "\n".join(lines + [f"teacher top-1  mean probability of the most likely drawn id {s.top1_prob.mean():.4f}"])
    if len(s.topk_mass):
        lines += [
            f"coverage       mean top-{info.k} mass {s.topk_mass.mean():.4f}  (min {s.topk_mass.min():.4f}, "
            f"over {len(s.topk_mass):,} positions)",
            f"teacher top-1  mean probability {s.top1_prob.mean():.4f}; actual token in top-{info.k}: {s.target_in_topk:.2%}",
        ]
    return "\n".join(lines)


def _level_edges(step: float, min_width: float = 0.04) -> np.ndarray:
    """Bin edges for probabilities decoded from log-probabilities quantized to `step` nats: each edge lies
    midway between two representable values, so every bin holds whole quantization levels (no bin is
    empty or doubled only because of the coding); bins at least `min_width` wide."""
    edges, j = [1.0], 0
    while edges[-1] > min_width:
        j += 1
        edge = float(np.exp(-(j - 0.5) * step))
        if edges[-1] - edge >= min_width:
            edges.append(edge)
    edges.append(0.0)
    return np.array(edges[::-1])


def plot_summary(s: Summary, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    k = s.manifest.info.k
    mass = np.clip(s.topk_mass, 0.0, 1.0)  # quantized sums can pass 1 by a hair
    axes[0].hist(mass, bins=25, range=(0, 1), color="#3366aa")
    what = f"top-{k}" if k else "drawn ids'"
    axes[0].set(title=f"{what} probability mass per position", xlabel=f"teacher probability mass in the {what}",
                ylabel="trained positions")
    edges = _level_edges(s.manifest.info.encoding.lp_step)
    counts, _ = np.histogram(np.clip(s.top1_prob, 0.0, 1.0), bins=edges)
    widths = np.diff(edges)
    axes[1].bar(edges[:-1], counts / max(counts.sum(), 1) / widths, width=widths, align="edge", color="#aa6633")
    axes[1].set(title="teacher top-1 probability", xlabel="probability of the teacher's most likely token",
                ylabel="% of positions per 0.01 of probability", xlim=(0, 1))
    fig.suptitle(f"{s.manifest.info.teacher.get('name_or_path')}: {len(s.topk_mass):,} positions")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
