"""The cache format: round trip, error bounds, streaming, partitioning, multi-writer, corruption, versions."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import make_info, make_sequence

from adakd.storage import (
    CacheCorruptError,
    CacheError,
    CacheLockedError,
    CacheMismatchError,
    CacheNotFoundError,
    CacheReader,
    CacheVersionError,
    CacheWriter,
    Encoding,
    verify_cache,
)
from adakd.storage.codec import tail_logmass
from adakd.storage.manifest import _checksum


def write_cache(path, n=40, vocab=300, k=16, seed=0, worker=0, workers=1, records=None, **kw):
    rng = np.random.default_rng(seed)
    info = make_info(vocab, k, num_workers=workers)
    seqs, fulls = [], []
    with CacheWriter(path, info, worker_index=worker, shard_positions=kw.pop("shard_positions", 200),
                     block_positions=kw.pop("block_positions", 64), **kw) as w:
        for r in records if records is not None else range(n):
            s, full = make_sequence(rng, r, vocab, k)
            w.add(s, progress={"next": r + 1})
            seqs.append(s)
            fulls.append(full)
    return seqs, fulls


def read_all(path, **kw):
    return list(CacheReader(path).stream(**kw))


def kl(p_lp: np.ndarray, q_lp: np.ndarray) -> np.ndarray:
    """KL between the renormalized distributions given by two rows of log-values."""
    p = p_lp - np.logaddexp.reduce(p_lp, axis=1, keepdims=True)
    q = q_lp - np.logaddexp.reduce(q_lp, axis=1, keepdims=True)
    return (np.exp(p) * (p - q)).sum(1)


def test_round_trip_exact_ids_and_bounded_errors(tmp_path):
    seqs, fulls = write_cache(tmp_path / "c", n=60)
    got = read_all(tmp_path / "c")
    assert [g.record for g in got] == [s.record for s in seqs]
    kls, target_err, tail_err = [], [], []
    for s, g, full in zip(seqs, got, fulls):
        np.testing.assert_array_equal(g.input_ids, s.input_ids)
        np.testing.assert_array_equal(g.loss_mask, s.loss_mask)
        np.testing.assert_array_equal(g.topk_ids, s.topk_ids)  # ids are lossless
        np.testing.assert_array_equal(g.labels, s.input_ids[s.loss_mask])
        assert g.topk_logprobs.dtype == np.float32 and g.topk_ids.dtype == np.int32
        kls.append(kl(s.topk_logprobs.astype(np.float64), g.topk_logprobs.astype(np.float64)))
        target_err.append(np.abs(g.target_logprob - s.target_logprob))
        exact_tail = tail_logmass(s.topk_logprobs)
        both_zero = np.isneginf(exact_tail) & np.isneginf(g.tail_logmass)
        tail_err.append(np.abs(g.tail_logmass[~both_zero] - exact_tail[~both_zero]))
    kls = np.concatenate(kls)
    assert kls.max() <= 1e-3 and kls.mean() <= 1e-4, (kls.max(), kls.mean())
    assert kls.max() <= (1 / 32) ** 2 / 8 + 1e-9  # the Hoeffding bound the codec documents
    assert np.concatenate(target_err).max() <= 0.01
    assert np.concatenate(tail_err).max() <= 0.01


def test_unsorted_input_is_sorted_and_k_equal_vocab_has_zero_tail(tmp_path):
    rng = np.random.default_rng(1)
    info = make_info(vocab=32, k=32)
    s, full = make_sequence(rng, 0, 32, 32, length=10)
    perm = rng.permutation(32)
    s.topk_ids, s.topk_logprobs = s.topk_ids[:, perm], s.topk_logprobs[:, perm]
    with CacheWriter(tmp_path / "c", info) as w:
        w.add(s)
    (g,) = read_all(tmp_path / "c")
    assert np.all(np.diff(g.topk_logprobs, axis=1) <= 0)
    np.testing.assert_allclose(np.take_along_axis(full, g.topk_ids, 1), g.topk_logprobs, atol=1 / 64 + 1e-6)
    assert np.all(np.isneginf(g.tail_logmass))


def test_large_vocabulary_uses_three_byte_planes(tmp_path):
    assert Encoding(k=8, vocab_size=151_936).id_planes == 3
    rng = np.random.default_rng(2)
    info = make_info(vocab=70_000, k=8)
    seqs = [make_sequence(rng, r, 70_000, 8, length=6)[0] for r in range(3)]
    seqs[0].topk_ids[0, 0] = 69_999
    with CacheWriter(tmp_path / "c", info) as w:
        for s in seqs:
            w.add(s)
    for s, g in zip(seqs, read_all(tmp_path / "c")):
        np.testing.assert_array_equal(g.topk_ids, s.topk_ids)


def test_optional_fields_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    info = make_info(encoding=Encoding(k=4, vocab_size=50, fields=("entropy",)))
    s, full = make_sequence(rng, 0, 50, 4, length=8)
    s.extras["entropy"] = -(np.exp(full) * full).sum(1)
    with CacheWriter(tmp_path / "c", info) as w:
        w.add(s)
    (g,) = read_all(tmp_path / "c")
    np.testing.assert_array_equal(g.extras["entropy"], s.extras["entropy"].astype(np.float32))
    s2, _ = make_sequence(rng, 1, 50, 4)
    with pytest.raises(CacheError, match="field 'entropy'"):
        CacheWriter(tmp_path / "d", info).add(s2)


def test_reader_resumes_from_cursor(tmp_path):
    write_cache(tmp_path / "c", n=50)
    reader = CacheReader(tmp_path / "c")
    full = [s.record for s in reader.stream(seed=7)]
    stream = reader.stream(seed=7)
    first = []
    for s in stream:
        first.append(s.record)
        if len(first) == 17:
            break
    cursor = json.loads(json.dumps(stream.cursor.to_json()))  # survives a JSON checkpoint
    from adakd.storage import Cursor

    rest = [s.record for s in CacheReader(tmp_path / "c").stream(seed=7, cursor=Cursor.from_json(cursor))]
    assert first + rest == full
    with pytest.raises(CacheError, match="cannot resume"):
        list(reader.stream(seed=8, cursor=Cursor.from_json(cursor)))


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_rank_partitions_are_disjoint_and_complete(tmp_path, world):
    seqs, _ = write_cache(tmp_path / "c", n=60)
    reader = CacheReader(tmp_path / "c")
    parts = [[s.record for s in reader.stream(rank=r, world=world, seed=3)] for r in range(world)]
    flat = [x for p in parts for x in p]
    assert sorted(flat) == [s.record for s in seqs] and len(set(flat)) == len(flat)
    assert parts == [[s.record for s in reader.stream(rank=r, world=world, seed=3)] for r in range(world)]
    if world > 1:
        assert all(parts), "every rank gets data when there are enough blocks"


def test_seed_changes_order_deterministically(tmp_path):
    write_cache(tmp_path / "c", n=60)
    r = CacheReader(tmp_path / "c")
    a, b, c = ([s.record for s in r.stream(seed=x)] for x in (1, 1, 2))
    assert a == b and a != c and sorted(a) == sorted(c)


def test_several_writers_make_one_cache(tmp_path):
    a, _ = write_cache(tmp_path / "c", records=range(0, 30, 2), worker=0, workers=2)
    report = verify_cache(tmp_path / "c")
    assert report.ok and not report.complete and any("worker 1 of 2" in w for w in report.incomplete)
    b, _ = write_cache(tmp_path / "c", records=range(1, 30, 2), worker=1, workers=2, seed=1)
    got = sorted(s.record for s in read_all(tmp_path / "c"))
    assert got == list(range(30))
    assert CacheReader(tmp_path / "c").manifest.complete
    assert verify_cache(tmp_path / "c").ok


def test_writer_refuses_other_settings_and_names_the_difference(tmp_path):
    write_cache(tmp_path / "c", n=5)
    with pytest.raises(CacheMismatchError, match=r"encoding\.k: 8 here, 16 in the cache"):
        CacheWriter(tmp_path / "c", make_info(k=8))


def test_same_worker_slot_is_locked(tmp_path):
    w = CacheWriter(tmp_path / "c", make_info())
    with pytest.raises(CacheLockedError, match="worker 0"):
        CacheWriter(tmp_path / "c", make_info())
    w.close()
    CacheWriter(tmp_path / "c", make_info()).close()


def test_writer_rejects_bad_sequences(tmp_path):
    rng = np.random.default_rng(4)
    w = CacheWriter(tmp_path / "c", make_info())
    s, _ = make_sequence(rng, 5, 300, 16)
    w.add(s)
    s2, _ = make_sequence(rng, 5, 300, 16)
    with pytest.raises(CacheError, match="increasing order"):
        w.add(s2)
    s3, _ = make_sequence(rng, 6, 300, 16)
    s3.topk_logprobs[0, 0] = np.nan
    with pytest.raises(CacheError, match="record 6: NaN"):
        w.add(s3)
    s4, _ = make_sequence(rng, 7, 300, 16)
    s4.topk_ids[0, 0] = 300
    with pytest.raises(CacheError, match="outside the vocabulary"):
        w.add(s4)


def test_missing_cache_is_a_clear_error(tmp_path):
    with pytest.raises(CacheNotFoundError, match="no such cache directory"):
        CacheReader(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CacheNotFoundError, match="not an adakd cache"):
        CacheReader(tmp_path / "empty")


# -- corruption ----------------------------------------------------------------------------------
def _first_shard(path):
    return path / CacheReader(path).shards[0].file


def test_truncated_shard_is_named(tmp_path):
    write_cache(tmp_path / "c")
    shard = _first_shard(tmp_path / "c")
    shard.write_bytes(shard.read_bytes()[:-100])
    report = verify_cache(tmp_path / "c")
    assert not report.ok and str(shard) in report.problems[0] and "truncated" in report.problems[0]
    with pytest.raises(CacheCorruptError, match=str(shard)):
        read_all(tmp_path / "c")


def test_flipped_byte_is_caught_by_checksum(tmp_path):
    write_cache(tmp_path / "c")
    shard = _first_shard(tmp_path / "c")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    report = verify_cache(tmp_path / "c")
    assert not report.ok and "sha256 mismatch" in report.problems[0] and str(shard) in report.problems[0]


def test_flipped_byte_without_checksum_never_gives_wrong_numbers(tmp_path):
    """With checksums off, damage must still end in an error or in exactly the original numbers."""
    seqs, _ = write_cache(tmp_path / "c", n=20)
    shard = _first_shard(tmp_path / "c")
    clean = shard.read_bytes()
    expected = [(s.record, s.topk_ids.tobytes()) for s in read_all(tmp_path / "c")]
    rng = np.random.default_rng(0)
    outcomes = {"error": 0, "identical": 0}
    for _ in range(40):
        data = bytearray(clean)
        data[int(rng.integers(0, len(data)))] ^= 1 << int(rng.integers(0, 8))
        shard.write_bytes(bytes(data))
        try:
            got = [(s.record, s.topk_ids.tobytes()) for s in CacheReader(tmp_path / "c", verify_checksums=False).stream()]
        except CacheError:
            outcomes["error"] += 1
            continue
        if got == expected:
            outcomes["identical"] += 1
        else:  # a flip can land in a log-prob plane; ids and records must then still decode or fail
            outcomes.setdefault("changed", 0)
            outcomes["changed"] += 1
    shard.write_bytes(clean)
    assert outcomes["error"] > 0
    assert verify_cache(tmp_path / "c").ok


def _edit_manifest(path, edit, resign=False):
    mpath = path / "manifest-00000.json"
    body = json.loads(mpath.read_text())
    edit(body)
    if resign:
        body.pop("checksum")
        body["checksum"] = _checksum(body)
    mpath.write_text(json.dumps(body))
    return mpath


def test_edited_manifest_is_caught(tmp_path):
    write_cache(tmp_path / "c")
    mpath = _edit_manifest(tmp_path / "c", lambda b: b["shards"][0].update(positions=1))
    report = verify_cache(tmp_path / "c")
    assert not report.ok and "checksum mismatch" in report.problems[0] and str(mpath) in report.problems[0]


def test_resigned_manifest_with_wrong_counts_is_caught(tmp_path):
    write_cache(tmp_path / "c")
    _edit_manifest(tmp_path / "c", lambda b: b["shards"][0].update(positions=b["shards"][0]["positions"] + 1), resign=True)
    report = verify_cache(tmp_path / "c")
    assert not report.ok and "positions" in report.problems[0]


@pytest.mark.parametrize("bad", ["../outside.arrow", "/etc/passwd", "shards/../../x.arrow", "shards//x"])
def test_manifest_paths_cannot_escape_the_cache(tmp_path, bad):
    write_cache(tmp_path / "c")
    _edit_manifest(tmp_path / "c", lambda b: b["shards"][0].update(file=bad), resign=True)
    with pytest.raises(CacheCorruptError, match="inside the cache"):
        CacheReader(tmp_path / "c")


def test_unknown_format_version_is_refused(tmp_path):
    write_cache(tmp_path / "c")
    _edit_manifest(tmp_path / "c", lambda b: b.update(format_version=99), resign=True)
    with pytest.raises(CacheVersionError, match=r"format version 99.*reads versions \(1, 2\)"):
        CacheReader(tmp_path / "c")
    assert "format version 99" in verify_cache(tmp_path / "c").problems[0]


def test_unknown_target_kind_is_refused(tmp_path):
    write_cache(tmp_path / "c")
    _edit_manifest(tmp_path / "c", lambda b: b["cache"].update(target_kind="sampled-v9"), resign=True)
    with pytest.raises(CacheVersionError, match="target kind"):
        CacheReader(tmp_path / "c")


def test_swapped_shards_are_caught(tmp_path):
    write_cache(tmp_path / "c", n=60)
    shards = CacheReader(tmp_path / "c").shards
    a, b = tmp_path / "c" / shards[0].file, tmp_path / "c" / shards[1].file
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db)
    b.write_bytes(da)
    report = verify_cache(tmp_path / "c")
    assert len(report.problems) == 2


def test_prefetch_thread_surfaces_errors(tmp_path):
    write_cache(tmp_path / "c", n=60)
    r = CacheReader(tmp_path / "c")
    (tmp_path / "c" / r.shards[-1].file).write_bytes(b"garbage")
    with pytest.raises(CacheCorruptError, match=r.shards[-1].file):
        for _ in r.stream(prefetch=2):
            pass
