"""Damaged caches: hypothesis-drawn corruption (corruption.py) ends in a clear error naming the file or in
exactly the undamaged numbers, never in wrong numbers, a hang or another exception; plus the cases it found.
Top-k caches (format version 1) and sampled and hybrid ones (version 2) alike."""

from __future__ import annotations

import json
import shutil

import pytest
from adakd.storage import CacheCorruptError, CacheError, CacheReader, verify_cache
from corruption import (
    SAMPLE_ARRAYS,
    Damage,
    _fingerprint,
    apply,
    build_pristine,
    build_pristines,
    fuzz,
    judge,
    snapshot,
    time_limit,
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    path = tmp_path_factory.mktemp("pristine") / "cache"
    build_pristine(path)
    return path


def test_fuzzed_corruption_never_gives_wrong_numbers(pristine, tmp_path):
    result = fuzz(pristine, tmp_path, examples=300)
    assert result.cases == 300
    assert not result.failures, result.failures[:5]
    reads = {read for _, read in result.outcomes}
    assert {"error:CacheCorruptError", "correct", "incomplete"} <= reads, result.outcomes
    assert sum(n for (_, read), n in result.outcomes.items() if read.startswith("error")) > 150
    assert set(result.damages) >= {"flip", "truncate", "zero_page", "swap", "edit", "hostile_path", "special", "forge"}


@pytest.fixture(scope="module")
def pristines_v2(tmp_path_factory):
    return build_pristines(tmp_path_factory.mktemp("pristine-v2"), kinds=("sampled", "hybrid"))


def test_fuzzed_corruption_of_sampled_and_hybrid_caches_never_gives_wrong_numbers(pristines_v2, tmp_path):
    """Format version 2: the draws' columns, the manifests' sampling settings, and shards or manifests of the
    other kind put in place (`foreign`), re-signed or not."""
    result = fuzz(pristines_v2, tmp_path, examples=150, seed=2)
    assert result.cases == 150
    assert not result.failures, result.failures[:5]
    assert set(result.kinds) == {"sampled", "hybrid"}, result.kinds
    reads = {read for _, read in result.outcomes}
    assert {"error:CacheCorruptError", "correct"} <= reads, result.outcomes
    assert sum(n for (_, read), n in result.outcomes.items() if read.startswith("error")) > 75
    assert set(result.damages) >= {"flip", "truncate", "edit", "forge", "foreign"}, result.damages


def test_the_oracle_sees_every_draw_array(pristines_v2):
    """A read that differs from the pristine one only in its draws (ids, counts, sizes, log-probabilities, rest
    mass) is not taken for a correct read; nor is a top-k read of the same head."""
    import copy

    import numpy as np

    for kind, path in pristines_v2.items():
        s = next(iter(CacheReader(path).stream()))
        base = _fingerprint(s)
        for f in SAMPLE_ARRAYS:
            t = copy.deepcopy(s)
            a = getattr(t, f)
            a[0] = a[0] + 1 if a.dtype.kind == "i" else np.nextafter(a[0], np.float32(1))
            assert _fingerprint(t) != base, (kind, f)
        t = copy.deepcopy(s)
        t.sample_sizes = t.sample_ids = t.sample_counts = t.sample_logprobs = t.rest_logmass = None
        assert _fingerprint(t) != base, kind


@pytest.mark.parametrize("kind,other", [("sampled", "topk"), ("sampled", "hybrid"), ("hybrid", "topk"),
                                        ("hybrid", "sampled")])
def test_a_resigned_shard_of_another_kind_is_a_clear_error(pristines_v2, tmp_path, kind, other):
    """A shard of another cache kind put in place and re-signed: its header (format version, encoding) says so."""
    sources = dict(pristines_v2)
    if other == "topk":
        build_pristine(tmp_path / "topk")
        sources["topk"] = tmp_path / "topk"
    victim = CacheReader(pristines_v2[kind]).shards[0].file
    donor = CacheReader(sources[other]).shards[0].file
    root = tmp_path / "c"
    shutil.copytree(pristines_v2[kind], root)
    apply(root, Damage("foreign", victim, {"source": other, "file": donor, "resign": True}), sources)
    outcome = judge(root, snapshot(pristines_v2[kind]), [], encoding=CacheReader(pristines_v2[kind]).manifest.info.encoding)
    assert outcome.ok and outcome.read.startswith("error") and victim in outcome.detail, outcome


def _damaged(pristine, tmp_path, *case: Damage):
    root = tmp_path / "c"
    shutil.copytree(pristine, root)
    for d in case:
        apply(root, d)
    return root


def _edit(path: list, value, manifest: str = "manifest-00000.json") -> Damage:
    return Damage("edit", manifest, {"path": path, "op": "set", "value": value, "resign": True})


@pytest.mark.parametrize("path,value", [
    (["cache", "num_workers"], "2"),  # found by the fuzzer: a TypeError out of load_manifest and verify_cache
    (["cache", "num_workers"], [2]),
    (["cache", "encoding", "lp_step"], float("nan")),
    (["shards", 0, "records"], []),  # a resuming writer indexed records[-1]
    (["shards", 0, "rows"], "7"),
])
def test_resigned_manifest_with_wrong_types_is_a_clear_error(pristine, tmp_path, path, value):
    root = _damaged(pristine, tmp_path, _edit(path, value))
    with pytest.raises(CacheCorruptError, match=r"manifest-00000.json: (shard \S+: )?malformed"):
        CacheReader(root)
    report = verify_cache(root)
    assert not report.ok and "manifest-00000.json" in report.problems[0]


@pytest.mark.parametrize("what", ["fifo", "/dev/zero", "dir"])
def test_special_file_in_place_of_a_shard_is_refused_without_hanging(pristine, tmp_path, what):
    shard = CacheReader(pristine).shards[0].file
    root = _damaged(pristine, tmp_path, Damage("special", shard, {"what": what}))
    with time_limit(20):
        with pytest.raises(CacheCorruptError, match=shard):
            list(CacheReader(root).stream())
        report = verify_cache(root)
    assert not report.ok and shard in report.problems[0]
    if what != "dir":
        assert "not a regular file" in report.problems[0]


def test_a_shard_listed_twice_is_named(pristine, tmp_path):
    other = json.loads((pristine / "manifest-00000.json").read_text())["shards"][0]["file"]
    root = _damaged(pristine, tmp_path, Damage("hostile_path", "manifest-00001.json", {"shard": 0, "path": other, "resign": True}))
    with pytest.raises(CacheCorruptError, match=f"shard file {other} is listed twice"):
        CacheReader(root)


def test_judge_catches_wrong_numbers(pristine, tmp_path):
    """The oracle itself: a re-signed value change is reported as wrong numbers, not as a correct read."""
    root = _damaged(pristine, tmp_path, Damage("forge", CacheReader(pristine).shards[0].file, {"flips": [], "truncate": None}))
    expected = snapshot(pristine)
    expected[min(expected)] = tuple(b"x" for _ in expected[min(expected)])
    outcome = judge(root, expected, [Damage("flip", "x")])
    assert not outcome.ok and outcome.read == "wrong numbers"


@pytest.mark.parametrize("meta", [b"[]", b"not json", b'{"format_version": 1}', b'{"format_version": 1, "encoding": 5}',
                                  b'{"format_version": 2}'])
def test_forged_shard_header_is_a_clear_error(pristine, tmp_path, meta):
    """A shard whose checksum was re-signed (or read with checksums off) but whose header is damaged."""
    import pyarrow as pa

    root = _damaged(pristine, tmp_path)
    entry = CacheReader(root).shards[0]
    shard = root / entry.file
    table = pa.ipc.open_file(pa.BufferReader(shard.read_bytes())).read_all()
    schema = table.schema.with_metadata({**table.schema.metadata, b"adakd.shard": meta})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, schema) as w:
        w.write_table(table.replace_schema_metadata(schema.metadata))
    shard.write_bytes(sink.getvalue().to_pybytes())
    apply(root, Damage("forge", entry.file, {"flips": [], "truncate": None}))  # re-sign size and sha256
    with pytest.raises(CacheError, match=entry.file):
        list(CacheReader(root).stream())
    report = verify_cache(root)
    assert not report.ok and entry.file in report.problems[0]
