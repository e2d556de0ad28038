"""Corruption cases for a cache and the oracle every one must meet; shared by the tests and `bench.faults`.

A case is one to three damages drawn by hypothesis: bit flips, truncation, a zeroed 4 KiB page, garbage
appended, a file deleted, swapped or replaced by another, a special file (FIFO, /dev/zero) in its place,
stray files, and manifest edits (JSON fields, checksums, hostile paths), re-signed or not. The oracle:
`verify_cache` never raises and names a file in every problem; a full `CacheReader(...).stream()` read
ends in a `CacheError` naming the file, or yields exactly the undamaged numbers (all of them, or a
subset the manifests themselves call incomplete); nothing else, and nothing takes longer than a timeout.

Forged cases (shard bytes damaged and the manifest's size and sha256 re-signed to match, what a checksum
cannot see by design) only have to end in a clear error or a read: never another exception or a hang.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import signal
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from adakd.storage import (
    CacheError,
    CacheReader,
    CacheWriter,
    Encoding,
    SequenceTargets,
    verify_cache,
)
from adakd.storage.manifest import _checksum
from hypothesis import strategies as st

PAGE = 4096
HOSTILE_PATHS = ("../x.arrow", "../../etc/passwd", "/etc/passwd", "shards/../../outside.arrow", "shards/./a.arrow",
                 "shards//a.arrow", "", "shards\\a.arrow", ".", "shards/", "shards/a.arrow\x00", "~/a.arrow",
                 "shards/ü.arrow", "manifest-00000.json", "shards/00000-000000.arrow/..")


KINDS = ("topk", "sampled", "hybrid")  # what a cache can hold: format version 1, then version 2 twice
SAMPLES = 16  # draws per trained position in the sampled and hybrid caches
HYBRID_K = 4


def build_pristine(path: Path, records: int = 30, kind: str = "topk") -> None:
    """Two workers, six shards of several blocks each: every kind of file a cache has. `kind`: top-k targets
    (format version 1), or the teacher's draws over the whole vocabulary (`sampled`) or over the tail outside
    a top-4 head (`hybrid`), both format version 2, with exact teacher distributions behind them."""
    from helpers import make_info, make_sequence

    rng = np.random.default_rng({"topk": 0, "sampled": 1, "hybrid": 2}[kind])
    if kind == "topk":
        info, k = make_info(num_workers=2), 16
    else:
        k = 0 if kind == "sampled" else HYBRID_K
        enc = Encoding(k=k, vocab_size=300, kind=kind, samples=SAMPLES)
        info = make_info(k=k, num_workers=2, encoding=enc, target_kind=kind)
    for worker in (0, 1):
        with CacheWriter(path, info, worker_index=worker, shard_positions=60, block_positions=20) as w:
            for r in range(worker, records, 2):
                seq, full = make_sequence(rng, r, 300, k)
                if kind != "topk":
                    _draw(rng, seq, full, SAMPLES)
                w.add(seq, progress={"next": r + 1})


def _draw(rng: np.random.Generator, seq: SequenceTargets, full: np.ndarray, n: int) -> None:
    """The teacher's N draws at each trained position, from its exact distribution outside the top-k head."""
    p = np.exp(full.astype(np.float64))
    np.put_along_axis(p, seq.topk_ids.astype(np.int64), 0.0, axis=1)
    tail = p.sum(1)
    sizes, ids, counts, lps = [], [], [], []
    for i in range(len(p)):
        c = rng.multinomial(n, p[i] / tail[i])
        drawn = np.flatnonzero(c)
        sizes.append(len(drawn))
        ids.append(drawn)
        counts.append(c[drawn])
        lps.append(full[i, drawn])
    seq.sample_sizes = np.array(sizes, np.int32)
    seq.sample_ids = np.concatenate(ids).astype(np.int32)
    seq.sample_counts = np.concatenate(counts).astype(np.int32)
    seq.sample_logprobs = np.concatenate(lps).astype(np.float32)
    if seq.topk_ids.shape[1]:
        seq.tail_logmass = np.log(tail).astype(np.float32)


def build_pristines(root: Path, kinds: tuple[str, ...] = KINDS) -> dict[str, Path]:
    """One pristine cache of each kind under `root`."""
    out = {}
    for kind in kinds:
        build_pristine(root / kind, kind=kind)
        out[kind] = root / kind
    return out


def snapshot(path: Path) -> dict[int, tuple[bytes, ...]]:
    """record -> every decoded array's bytes: what a correct read must give back."""
    return {s.record: _fingerprint(s) for s in CacheReader(path).stream()}


SAMPLE_ARRAYS = ("sample_sizes", "sample_ids", "sample_counts", "sample_logprobs", "rest_logmass")


def _fingerprint(s: SequenceTargets) -> tuple[bytes, ...]:
    """Every number a read gives back: the top-k head and, in sampled and hybrid caches, the draws (a missing
    array and an empty one differ, so a sampled read can never pass for a top-k one or back)."""
    arrays = [s.input_ids, s.loss_mask, s.topk_ids, s.topk_logprobs, s.target_logprob, s.tail_logmass]
    shapes = tuple(repr(np.shape(a)).encode() for a in arrays)
    draws = tuple(b"none" if getattr(s, f) is None else repr(np.shape(getattr(s, f))).encode()
                  + np.ascontiguousarray(getattr(s, f)).tobytes() for f in SAMPLE_ARRAYS)
    return tuple(np.ascontiguousarray(a).tobytes() for a in arrays) + shapes + draws + tuple(
        np.ascontiguousarray(s.extras[k]).tobytes() for k in sorted(s.extras))


# -- damages -------------------------------------------------------------------------------------
@dataclass
class Damage:
    kind: str
    target: str = ""  # a file of the cache, relative
    params: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        p = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{self.kind}({self.target}{', ' if p and self.target else ''}{p})"

    @property
    def forged(self) -> bool:
        return self.kind == "forge"

    @property
    def resigned(self) -> bool:
        return bool(self.params.get("resign")) or self.kind in ("hostile_path", "forge")


def files_of(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and not p.name.startswith(".lock"))


JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from([0, -1, 1, 2**31, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.sampled_from(HOSTILE_PATHS),
    st.lists(st.integers(-5, 10**6), max_size=4), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
    st.sampled_from(["1", "16", "300", "0", "true", 1.0, 16.0, True, [], {}]),  # the right value, the wrong type
)


def json_paths(body: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path in a JSON document, containers included."""
    out = [prefix] if prefix else []
    if isinstance(body, dict):
        for k, v in body.items():
            out += json_paths(v, prefix + (k,))
    elif isinstance(body, list):
        for i, v in enumerate(body):
            out += json_paths(v, prefix + (i,))
    return out


@st.composite
def damages(draw, files: list[str], manifest_paths: dict[str, list[tuple]],
            foreign: dict[str, list[str]] | None = None) -> Damage:
    """One damage to a cache of `files`; `foreign`: other kinds' caches (kind -> their files), whose shards and
    manifests a `foreign` damage puts in place of this cache's (re-signing the entry or not)."""
    shards = [f for f in files if f.startswith("shards/")]
    manifests = sorted(manifest_paths)
    kind = draw(st.sampled_from(["flip", "flip", "truncate", "zero_page", "append", "delete", "swap", "copy_over",
                                 "special", "stray", "edit", "edit", "edit", "edit", "hostile_path", "forge"]
                                + (["foreign"] if foreign else [])))
    target = draw(st.sampled_from(files))
    if kind == "foreign":  # a shard (or manifest) of a cache of another kind where this cache's is
        source = draw(st.sampled_from(sorted(foreign)))
        target = draw(st.sampled_from(shards + manifests))
        same = [f for f in foreign[source] if f.startswith("shards/") == target.startswith("shards/")]
        return Damage(kind, target, {"source": source, "file": draw(st.sampled_from(same)),
                                     "resign": target.startswith("shards/") and draw(st.booleans())})
    if kind == "flip":
        return Damage(kind, target, {"flips": draw(st.lists(st.tuples(st.floats(0, 1, exclude_max=True),
                                                                      st.integers(0, 7)), min_size=1, max_size=8))})
    if kind in ("truncate", "zero_page"):
        return Damage(kind, target, {"at": draw(st.floats(0, 1, exclude_max=True))})
    if kind == "append":
        return Damage(kind, target, {"data": draw(st.binary(min_size=1, max_size=64))})
    if kind in ("swap", "copy_over"):
        return Damage(kind, target, {"other": draw(st.sampled_from([f for f in files if f != target]))})
    if kind == "special":
        return Damage(kind, draw(st.sampled_from(shards + manifests)), {"what": draw(st.sampled_from(["fifo", "/dev/zero", "dir"]))})
    if kind == "stray":
        name = draw(st.sampled_from(["shards/00000-000099.arrow", "shards/.tmp-1-00001-000000.arrow", "manifest-00007.json",
                                     "manifest-00002.json", ".tmp-2-manifest-00000.json", "shards/notes.txt"]))
        return Damage(kind, name, {"copy_of": draw(st.sampled_from(files + [""]))})
    if kind == "forge":
        return Damage(kind, draw(st.sampled_from(shards)), {
            "flips": draw(st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)), min_size=1, max_size=4)),
            "truncate": draw(st.one_of(st.none(), st.floats(0, 1, exclude_max=True)))})
    manifest = draw(st.sampled_from(manifests))
    resign = draw(st.sampled_from([True, True, True, False])) if kind == "edit" else True  # unsigned: the checksum
    if kind == "hostile_path":
        n = len([p for p in manifest_paths[manifest] if len(p) == 2 and p[0] == "shards"])
        return Damage(kind, manifest, {"shard": draw(st.integers(0, n - 1)), "path": draw(st.sampled_from(HOSTILE_PATHS)),
                                       "resign": True})
    every = manifest_paths[manifest]
    settings = [q for q in every if q[0] != "shards" and q[0] != "progress"]
    entries = [q for q in every if q[0] == "shards"]
    paths = draw(st.sampled_from([settings, settings, entries, every]))  # the few settings as often as the entries
    op = draw(st.sampled_from(["set", "set", "set", "delete", "add", "drop_item", "dup_item"]))
    return Damage(kind, manifest, {"path": list(draw(st.sampled_from(paths))), "op": op,
                                   "value": draw(JSON_VALUES), "resign": resign})


@st.composite
def cases(draw, files: list[str], manifest_paths: dict[str, list[tuple]],
          foreign: dict[str, list[str]] | None = None) -> list[Damage]:
    one = damages(files, manifest_paths, foreign)  # single damages half the time: a second one can mask the first
    return draw(st.one_of(st.lists(one, min_size=1, max_size=1), st.lists(one, min_size=2, max_size=3)))


@dataclass
class Layout:
    """What the strategies need to know of one pristine cache."""

    kind: str
    path: Path
    files: list[str]
    manifest_paths: dict[str, list[tuple]]

    @classmethod
    def of(cls, kind: str, path: Path) -> "Layout":
        files = files_of(path)
        return cls(kind, path, files, {f: json_paths(json.loads((path / f).read_bytes()))
                                       for f in files if f.startswith("manifest-")})


@st.composite
def kind_cases(draw, layouts: dict[str, Layout]) -> tuple[str, list[Damage]]:
    """A cache kind, then a case against a cache of that kind (other kinds' files as foreign material)."""
    kind = draw(st.sampled_from(sorted(layouts)))
    me = layouts[kind]
    foreign = {k: lay.files for k, lay in layouts.items() if k != kind}
    return kind, draw(cases(me.files, me.manifest_paths, foreign or None))


def apply(root: Path, d: Damage, sources: dict[str, Path] | None = None) -> None:
    """Do one damage to the cache at `root`; `sources`: kind -> a pristine cache, for `foreign` damages."""
    f = root / d.target
    p = d.params
    if d.kind in ("flip", "truncate", "zero_page", "append", "copy_over", "swap", "special", "forge") and (
            f.is_symlink() or not f.is_file()):
        return  # removed or replaced by an earlier damage of the same case
    if d.kind == "flip":
        data = bytearray(f.read_bytes())
        for at, bit in p["flips"]:
            if data:
                data[int(at * len(data))] ^= 1 << bit
        f.write_bytes(bytes(data))
    elif d.kind == "truncate":
        data = f.read_bytes()
        f.write_bytes(data[: int(p["at"] * len(data))])
    elif d.kind == "zero_page":
        data = bytearray(f.read_bytes())
        page = int(p["at"] * max(1, -(-len(data) // PAGE)))
        end = min(len(data), (page + 1) * PAGE)
        data[page * PAGE:end] = bytes(end - page * PAGE)
        f.write_bytes(bytes(data))
    elif d.kind == "append":
        f.write_bytes(f.read_bytes() + p["data"])
    elif d.kind == "delete":
        if f.is_dir() and not f.is_symlink():
            shutil.rmtree(f)
        elif f.exists() or f.is_symlink():
            f.unlink()
    elif d.kind == "swap":
        other = root / p["other"]
        if other.is_file() and not other.is_symlink():
            a, b = f.read_bytes(), other.read_bytes()
            f.write_bytes(b)
            other.write_bytes(a)
    elif d.kind == "copy_over":
        other = root / p["other"]
        if other.is_file() and not other.is_symlink():
            f.write_bytes(other.read_bytes())
    elif d.kind == "special":
        if f.is_file():
            f.unlink()
            if p["what"] == "fifo":
                os.mkfifo(f)
            elif p["what"] == "dir":
                f.mkdir()
            else:
                f.symlink_to(p["what"])
    elif d.kind == "stray":
        src = root / p["copy_of"] if p["copy_of"] else None
        f.parent.mkdir(parents=True, exist_ok=True)
        if f.is_symlink() or (f.exists() and not f.is_file()):
            return
        usable = src is not None and src.is_file() and not src.is_symlink()
        f.write_bytes(src.read_bytes() if usable else b"stray")
    elif d.kind == "forge":
        _forge(root, d)
    elif d.kind == "foreign":
        src = (sources or {})[p["source"]] / p["file"]
        if f.is_symlink() or (f.exists() and not f.is_file()):
            return
        data = src.read_bytes()
        f.write_bytes(data)
        if p["resign"]:
            _resign_entry(root, d.target, data)
    elif d.kind in ("edit", "hostile_path"):
        _edit_manifest(root, d)


def _forge(root: Path, d: Damage) -> None:
    """Damage a shard and re-sign its manifest entry (size, sha256, manifest checksum) to match."""
    f = root / d.target
    if not f.is_file():
        return
    data = bytearray(f.read_bytes())
    for at, bit in d.params["flips"]:
        if data:
            data[int(at * len(data))] ^= 1 << bit
    if d.params["truncate"] is not None:
        data = data[: int(d.params["truncate"] * len(data))]
    f.write_bytes(bytes(data))
    _resign_entry(root, d.target, bytes(data))


def _resign_entry(root: Path, target: str, data: bytes) -> None:
    """Make every manifest entry of shard `target` say `data`'s size and sha256, and re-sign the manifest."""
    for m in root.glob("manifest-*.json"):
        body = _read_json(m)
        try:
            entries = [e for e in body["shards"] if e.get("file") == target]
        except (KeyError, TypeError, AttributeError):
            continue
        for e in entries:
            e["bytes"], e["sha256"] = len(data), hashlib.sha256(data).hexdigest()
        if entries:
            _resign_and_write(m, body)


def _edit_manifest(root: Path, d: Damage) -> None:
    m = root / d.target
    body = _read_json(m)
    if body is None:
        return  # already destroyed by an earlier damage
    p = d.params
    if d.kind == "hostile_path":
        try:
            body["shards"][p["shard"]]["file"] = p["path"]
        except (KeyError, IndexError, TypeError):
            return
    else:
        *parents, last = p["path"]
        node = body
        try:
            for key in parents:
                node = node[key]
            op = p["op"]
            if op == "set":
                node[last] = copy.deepcopy(p["value"])
            elif op == "delete":
                del node[last]
            elif op == "add" and isinstance(node, dict):
                node[f"{last}_extra"] = copy.deepcopy(p["value"])
            elif op in ("drop_item", "dup_item") and isinstance(node[last], list) and node[last]:
                if op == "drop_item":
                    node[last].pop()
                else:
                    node[last].append(copy.deepcopy(node[last][0]))
        except (KeyError, IndexError, TypeError):
            return
    if p.get("resign"):
        _resign_and_write(m, body)
    else:
        m.write_text(json.dumps(body, indent=1, sort_keys=True))


def _read_json(m: Path) -> Any:
    """A manifest's JSON, or None when an earlier damage left no readable regular file."""
    if m.is_symlink() or not m.is_file():
        return None
    try:
        return json.loads(m.read_bytes())
    except ValueError:
        return None


def _resign_and_write(m: Path, body: dict) -> None:
    body.pop("checksum", None)
    body["checksum"] = _checksum(body)
    m.write_text(json.dumps(body, indent=1, sort_keys=True))


# -- the oracle ----------------------------------------------------------------------------------
class Hang(Exception):
    pass


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise Hang in the main thread after `seconds` (SIGALRM)."""
    def on_alarm(signum, frame):
        raise Hang(f"no answer in {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@dataclass
class Outcome:
    verify: str  # "ok", "problem" or a failure
    read: str  # "error:<class>", "correct", "incomplete", "subset (re-signed)", "altered (forged)" or a failure
    failure: str = ""  # empty when the case met the oracle
    detail: str = ""

    @property
    def ok(self) -> bool:
        return not self.failure


def judge(root: Path, expected: dict[int, tuple[bytes, ...]], case: list[Damage], timeout: float = 20.0,
          encoding: Any = None) -> Outcome:
    """Run verify and a full read on a damaged cache; classify both against the oracle. With `encoding` (the
    pristine cache's), a read must also come with it: the kind, k, N and steps the numbers are used with."""
    name = str(root)
    forged = any(d.forged for d in case)
    resigned = any(d.resigned for d in case)
    try:
        with time_limit(timeout):
            report = verify_cache(root)
        unnamed = [p for p in report.problems if name not in p]
        verify = "problem" if report.problems else "ok"
        v_fail = f"verify problem names no file: {unnamed[0]}" if unnamed else ""
    except Hang as e:
        verify, v_fail = "hang", f"verify: {e}"
    except Exception as e:  # noqa: BLE001 - the point: verify must never raise
        verify, v_fail = "raised", f"verify raised {type(e).__name__}: {e}"
    detail = ""
    try:
        with time_limit(timeout):
            reader = CacheReader(root)
            got = {s.record: _fingerprint(s) for s in reader.stream()}
        complete = reader.manifest.complete
        settings_changed = encoding is not None and reader.manifest.info.encoding != encoding
        if got and settings_changed and not forged:
            read, r_fail = "wrong settings", f"read with settings {reader.manifest.info.encoding}, not the cache's"
        elif got == expected:
            read, r_fail = "correct", ""
        elif all(expected.get(r) == v for r, v in got.items()) and set(got) < set(expected):
            read = "incomplete" if not complete else "subset (re-signed)"
            r_fail = "" if not complete or resigned else f"silently lost records {sorted(set(expected) - set(got))[:5]}"
        else:
            read = "altered (forged)" if forged else "wrong numbers"
            r_fail = "" if forged else "a read gave numbers that differ from the undamaged cache"
    except CacheError as e:
        read = f"error:{type(e).__name__}"
        r_fail = "" if name in str(e) else f"error names no file: {e}"
        detail = str(e)
    except Hang as e:
        read, r_fail = "hang", f"read: {e}"
    except Exception as e:  # noqa: BLE001 - the point: anything but a CacheError is a bug
        read, r_fail = "raised", f"read raised {type(e).__name__}: {e}"
    if not v_fail and not r_fail and verify == "ok" and read.startswith("error") and not forged:
        r_fail = f"verify passed but the read failed: {detail}"
    return Outcome(verify, read, v_fail or r_fail, detail)


@dataclass
class FuzzResult:
    cases: int = 0
    outcomes: Counter = field(default_factory=Counter)  # (verify, read) classes
    damages: Counter = field(default_factory=Counter)  # damage kinds tried
    failures: list[tuple[str, str]] = field(default_factory=list)  # (case, what went wrong)
    kinds: dict[str, Counter] = field(default_factory=dict)  # cache kind -> its (verify, read) classes


def fuzz(pristine: Path | dict[str, Path], work: Path, examples: int, seed: int | None = None) -> FuzzResult:
    """Run `examples` hypothesis-drawn cases against copies of the pristine cache, or of the pristine caches of
    several kinds (kind -> path: each case draws a kind, and may use the other kinds' files); collect the outcomes.

    Each cache's expected numbers are read once; a case costs a copy of one small cache, its damages, one
    verify and one full read."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hypothesis_seed

    pristines = pristine if isinstance(pristine, dict) else {"": pristine}
    layouts = {k: Layout.of(k, p) for k, p in pristines.items()}
    expected = {k: snapshot(p) for k, p in pristines.items()}
    encodings = {k: CacheReader(p).manifest.info.encoding for k, p in pristines.items()}
    result = FuzzResult()

    @settings(max_examples=examples, deadline=None, database=None, derandomize=seed is None,
              suppress_health_check=list(HealthCheck), phases=("generate",))
    @given(kind_cases(layouts))
    def one(drawn: tuple[str, list[Damage]]) -> None:
        kind, case = drawn
        root = work / f"case-{result.cases}"
        shutil.copytree(pristines[kind], root, symlinks=True)
        try:
            for d in case:
                apply(root, d, pristines)
            outcome = judge(root, expected[kind], case, encoding=encodings[kind])
        finally:
            shutil.rmtree(root, ignore_errors=True)
        result.cases += 1
        result.outcomes[(outcome.verify, outcome.read)] += 1
        result.kinds.setdefault(kind, Counter())[(outcome.verify, outcome.read)] += 1
        result.damages.update(d.kind for d in case)
        if not outcome.ok:
            result.failures.append(((f"{kind}: " if kind else "") + " + ".join(map(str, case)), outcome.failure))

    (hypothesis_seed(seed)(one) if seed is not None else one)()
    return result
