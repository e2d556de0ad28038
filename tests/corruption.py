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
from hypothesis import strategies as st

from adakd.storage import CacheError, CacheReader, CacheWriter, SequenceTargets, verify_cache
from adakd.storage.manifest import _checksum

PAGE = 4096
HOSTILE_PATHS = ("../x.arrow", "../../etc/passwd", "/etc/passwd", "shards/../../outside.arrow", "shards/./a.arrow",
                 "shards//a.arrow", "", "shards\\a.arrow", ".", "shards/", "shards/a.arrow\x00", "~/a.arrow",
                 "shards/ü.arrow", "manifest-00000.json", "shards/00000-000000.arrow/..")


def build_pristine(path: Path, records: int = 30) -> None:
    """Two workers, six shards of several blocks each: every kind of file a cache has."""
    from helpers import make_info, make_sequence

    rng = np.random.default_rng(0)
    info = make_info(num_workers=2)
    for worker in (0, 1):
        with CacheWriter(path, info, worker_index=worker, shard_positions=150, block_positions=50) as w:
            for r in range(worker, records, 2):
                w.add(make_sequence(rng, r, 300, 16)[0], progress={"next": r + 1})


def snapshot(path: Path) -> dict[int, tuple[bytes, ...]]:
    """record -> every decoded array's bytes: what a correct read must give back."""
    return {s.record: _fingerprint(s) for s in CacheReader(path).stream()}


def _fingerprint(s: SequenceTargets) -> tuple[bytes, ...]:
    arrays = [s.input_ids, s.loss_mask, s.topk_ids, s.topk_logprobs, s.target_logprob, s.tail_logmass]
    return tuple(np.ascontiguousarray(a).tobytes() for a in arrays) + tuple(
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
def damages(draw, files: list[str], manifest_paths: dict[str, list[tuple]]) -> Damage:
    shards = [f for f in files if f.startswith("shards/")]
    manifests = sorted(manifest_paths)
    kind = draw(st.sampled_from(["flip", "flip", "truncate", "zero_page", "append", "delete", "swap", "copy_over",
                                 "special", "stray", "edit", "edit", "edit", "edit", "hostile_path", "forge"]))
    target = draw(st.sampled_from(files))
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
def cases(draw, files: list[str], manifest_paths: dict[str, list[tuple]]) -> list[Damage]:
    one = damages(files, manifest_paths)  # single damages half the time: a second one can mask the first
    return draw(st.one_of(st.lists(one, min_size=1, max_size=1), st.lists(one, min_size=2, max_size=3)))


def apply(root: Path, d: Damage) -> None:
    """Do one damage to the cache at `root`."""
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
    for m in root.glob("manifest-*.json"):
        body = _read_json(m)
        try:
            entries = [e for e in body["shards"] if e.get("file") == d.target]
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


def judge(root: Path, expected: dict[int, tuple[bytes, ...]], case: list[Damage], timeout: float = 20.0) -> Outcome:
    """Run verify and a full read on a damaged cache; classify both against the oracle."""
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
        if got == expected:
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


def fuzz(pristine: Path, work: Path, examples: int, seed: int | None = None) -> FuzzResult:
    """Run `examples` hypothesis-drawn cases against copies of the pristine cache; collect the outcomes."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hypothesis_seed

    expected = snapshot(pristine)
    files = files_of(pristine)
    manifest_paths = {f: json_paths(json.loads((pristine / f).read_bytes())) for f in files if f.startswith("manifest-")}
    result = FuzzResult()

    @settings(max_examples=examples, deadline=None, database=None, derandomize=seed is None,
              suppress_health_check=list(HealthCheck), phases=("generate",))
    @given(cases(files, manifest_paths))
    def one(case: list[Damage]) -> None:
        root = work / f"case-{result.cases}"
        shutil.copytree(pristine, root, symlinks=True)
        try:
            for d in case:
                apply(root, d)
            outcome = judge(root, expected, case)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        result.cases += 1
        result.outcomes[(outcome.verify, outcome.read)] += 1
        result.damages.update(d.kind for d in case)
        if not outcome.ok:
            result.failures.append((" + ".join(map(str, case)), outcome.failure))

    (hypothesis_seed(seed)(one) if seed is not None else one)()
    return result
