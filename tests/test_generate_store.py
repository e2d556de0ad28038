"""`adakd generate --out s3://...` on a real S3-compatible server (moto, tests/s3server.py): chunks uploaded as it goes,
the finished object byte-identical to a local run, workers merged in the store, a SIGKILL after the first chunk
resumed from the store to the same bytes, cache-teacher reading the object as --data."""

from __future__ import annotations

import pyarrow.fs as pafs
import pytest
from click.testing import CliRunner
from faultkit import run_cli
from s3server import S3Server
from tiny import build_teacher, instruction_rows, write_jsonl

from adakd import cli
from adakd.storage import CacheDir, CacheReader

ROWS = 6
NEW = 10
OPTS = ["--engine", "hf", "--max-new-tokens", str(NEW), "--no-progress", "--samples", "2", "--seed", "7"]


@pytest.fixture(scope="module")
def s3():
    server = S3Server()
    server.make_bucket("gen")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("genstore")
    model = build_teacher(root / "model")
    data = write_jsonl(root / "prompts.jsonl", instruction_rows(ROWS, seed=3))
    return root, model, data


def argv(model, data, out, *more: str) -> list[str]:
    return ["generate", "--model", str(model), "--data", str(data), "--out", str(out), *OPTS, *more]


def invoke(args: list[str], ok: bool = True):
    r = CliRunner().invoke(cli.main, args)
    if ok:
        assert r.exit_code == 0, r.output
    return r


def objects(uri: str) -> dict[str, int]:
    fs, root = pafs.FileSystem.from_uri(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return {i.path[len(root) + 1:]: i.size for i in infos if i.type == pafs.FileType.File}


def read(uri: str) -> bytes:
    base, _, query = uri.partition("?")
    folder, _, name = base.rpartition("/")
    return CacheDir.open(f"{folder}?{query}").read_bytes(name)


@pytest.fixture(scope="module")
def local(setup):
    """The uninterrupted local run (in this process, as the store runs below)."""
    root, model, data = setup
    out = root / "local.jsonl"
    invoke(argv(model, data, out))
    return out.read_bytes()


def test_generate_to_s3_equals_a_local_run_and_feeds_cache_teacher(s3, setup, local, tmp_path):
    root, model, data = setup
    out = s3.uri("gen", "one/gen.jsonl")
    staging = tmp_path / "staging"
    r = invoke(argv(model, data, out, "--chunk-records", "2", "--staging", str(staging)))
    assert "6 records" in r.output
    assert read(out) == local  # one PUT of the whole file, the local run's bytes
    assert sorted(objects(s3.uri("gen", "one"))) == ["gen.jsonl"] + [
        f"gen.jsonl.parts/worker-00000-of-00001/chunk-{n:06d}.jsonl" for n in range(3)]
    assert not any(staging.rglob("*.jsonl"))  # the staging file goes once everything is up
    r = invoke(argv(model, data, out, "--staging", str(staging)))  # finished: nothing to do
    assert "already complete (6 records)" in r.output and read(out) == local
    r = invoke(argv(model, data, out, "--samples", "3"), ok=False)  # other settings: refused, naming the chunks
    assert r.exit_code == 1 and "gen.jsonl.parts/worker-00000-of-00001 was written with other settings" in r.output
    assert "samples 2 -> 3" in r.output and read(out) == local
    # cache-teacher reads the object as --data, the records of the local file
    caches = []
    for source, name in ((out, "s3cache"), (root / "local.jsonl", "localcache")):
        r = invoke(["cache-teacher", "--teacher", str(model), "--data", str(source), "--out", str(tmp_path / name),
                    "--top-k", "4", "--engine", "hf", "--no-progress"])
        caches.append([(s.input_ids.tolist(), s.loss_mask.tolist()) for s in CacheReader(tmp_path / name).stream()])
    assert caches[0] == caches[1] and len(caches[0]) == 2 * ROWS


def test_two_workers_merged_in_the_store(s3, setup, local):
    root, model, data = setup
    out = s3.uri("gen", "two/gen.jsonl")
    for i in (0, 1):
        invoke(argv(model, data, out, "--num-workers", "2", "--worker-index", str(i)))
    listed = objects(s3.uri("gen", "two"))
    assert "gen.jsonl" not in listed and {k.split("/")[1] for k in listed} == {
        "worker-00000-of-00002", "worker-00001-of-00002"}
    r = invoke(["generate", "--data", str(data), "--out", out, "--num-workers", "2", "--merge"])
    assert "12 lines from 2 worker files" in r.output
    assert read(out) == local


def test_a_worker_killed_after_its_first_chunk_resumes_from_the_store(s3, setup, tmp_path):
    """SIGKILL just after the first chunk's upload completed; the re-run (another staging folder, as on another
    machine) rebuilds its staging file from the store and ends byte-identical (all runs in child processes with one
    thread, as floats depend on the thread count)."""
    root, model, data = setup
    whole = tmp_path / "whole.jsonl"
    assert run_cli(argv(model, data, whole), timeout=300).rc == 0
    reference = whole.read_bytes()
    out = s3.uri("gen", "killed/gen.jsonl")
    run = run_cli(argv(model, data, out, "--chunk-records", "2", "--staging", str(tmp_path / "a")),
                  arms=("putted:1:chunk",), env=s3.env(), timeout=300)
    assert run.killed, run.err
    listed = objects(s3.uri("gen", "killed"))
    assert list(listed) == ["gen.jsonl.parts/worker-00000-of-00001/chunk-000000.jsonl"]  # no --out object yet
    first = read(s3.uri("gen", "killed/gen.jsonl.parts/worker-00000-of-00001/chunk-000000.jsonl"))
    assert reference.startswith(first) and first.count(b"\n") == 4  # two records, two samples each
    run = run_cli(argv(model, data, out, "--chunk-records", "2", "--staging", str(tmp_path / "b")), env=s3.env(),
                  timeout=300)
    assert run.rc == 0, run.err
    assert read(out) == reference
    assert "4 this run" in run.out


def test_store_out_errors_name_the_uri(s3, setup, tmp_path):
    root, model, data = setup
    r = invoke(argv(model, data, s3.uri("gen")), ok=False)  # a bucket, no object name
    assert r.exit_code == 1 and "name the object to write" in r.output and "s3://bucket/runs/gen.jsonl" in r.output
    r = invoke(["generate", "--data", str(data), "--out", s3.uri("gen", "none/gen.jsonl"), "--num-workers", "2",
                "--merge"], ok=False)
    assert r.exit_code == 1 and "no chunks of worker 0" in r.output and "run (or finish) worker 0" in r.output
    parts = CacheDir.open(s3.uri("gen", "gap/gen.jsonl.parts"))
    parts.write_atomic("worker-00000-of-00001/chunk-000001.jsonl", b"{}\n")  # chunk 0 deleted by hand
    r = invoke(argv(model, data, s3.uri("gen", "gap/gen.jsonl")), ok=False)
    assert r.exit_code == 1 and "gen.jsonl.parts/worker-00000-of-00001: chunk 000000 is missing" in r.output
    assert "delete s3://gen/gap/gen.jsonl.parts/worker-00000-of-00001 and re-run this worker" in r.output
    r = invoke(argv(model, data, "s3://gen/x/gen.jsonl?endpoint_override=127.0.0.1:1&scheme=http"), ok=False)
    assert r.exit_code == 1 and "cannot list" in r.output and "check the bucket, the credentials and the endpoint" in r.output
    r = invoke(["cache-teacher", "--teacher", str(model), "--data", s3.uri("gen", "none/gen.jsonl"), "--out",
                str(tmp_path / "c"), "--engine", "hf", "--no-progress"], ok=False)
    assert r.exit_code == 1 and "--data s3://gen/none/gen.jsonl" in r.output and "cannot be read from the store" in r.output
