"""Caches and training outputs on a real S3-compatible server (moto, tests/s3server.py): capture by two workers
with a SIGKILL and a resume, verify's exit status, train-student --out s3:// killed and resumed from the store to
the uninterrupted run's weights, eval from the store, one live run per --out, and no credential in any message."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from adakd import cli
from adakd.storage import CacheDir, CacheReader, redact
from adakd.trainer.errors import TrainError
from adakd.trainer.outdir import LEASE_FILE, Lease, LocalLock, OutDir
from click.testing import CliRunner
from faultkit import CaptureSetup
from s3server import S3Server

HERE = Path(__file__).resolve().parent
SECRET = "SUPERSECRETVALUE42"


@pytest.fixture(scope="module")
def s3():
    server = S3Server()
    yield server
    server.stop()


def run(argv: list[str], s3: S3Server, *arms: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`adakd ARGV` in a child process with store faults armed (tests/store_child.py)."""
    cmd = [sys.executable, str(HERE / "store_child.py"), *[x for a in arms for x in ("--arm", a)], "--", *argv]
    full = dict(os.environ, **s3.env(), PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]), OMP_NUM_THREADS="1",
                TOKENIZERS_PARALLELISM="false", **(env or {}))
    return subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=timeout, check=False)


def invoke(*args: str):
    return CliRunner().invoke(cli.main, list(args))


def store_files(uri: str) -> dict[str, int]:
    fs, root = pafs.FileSystem.from_uri(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return {i.path[len(root) + 1:]: i.size for i in infos if i.type == pafs.FileType.File}


def read_object(uri: str, rel: str) -> bytes:
    return CacheDir.open(uri).read_bytes(rel)


def with_secret(uri: str) -> str:
    """The same location with credentials in it (moto takes any), as a careless user would write it."""
    return uri.replace("s3://", f"s3://AKIAEXAMPLE:{SECRET}@", 1)


# -- redaction -----------------------------------------------------------------------------------
@pytest.mark.parametrize("uri", [f"s3://AK:{SECRET}@bucket/x?region=r", f"s3://b/x?secret_key={SECRET}&region=r",
                                 f"gs://b/x?access_token={SECRET}", f"s3://b/x?session_token={SECRET}",
                                 f"error at 'gs://user:{SECRET}@b/x': denied", f"hdfs://b/x?access_key={SECRET}&x=1"])
def test_redact_removes_every_credential(uri):
    assert SECRET not in redact(uri) and "***" in redact(uri)
    for plain in ("s3://bucket/x?region=r&endpoint_override=h:1", "abfs://container@account.dfs.core.windows.net/x",
                  "/data/runs/x"):
        assert redact(plain) == plain


def test_failing_commands_never_print_the_secret(s3, tmp_path):
    s3.make_bucket("redact")
    missing = with_secret(s3.uri("redact", "nothing"))
    r = invoke("verify", missing)
    assert r.exit_code == 1 and "no such cache directory" in r.output and SECRET not in r.output, r.output
    r = invoke("inspect", missing)
    assert r.exit_code == 1 and "***@" in r.output and SECRET not in r.output, r.output
    bad = s3.uri("redact", "x") + f"&secret_key={SECRET}"  # pyarrow refuses the parameter, quoting the URI
    r = invoke("verify", bad)
    assert r.exit_code == 1 and "secret_key=***" in r.output and SECRET not in r.output, r.output
    (tmp_path / "s.json").write_text("{}")
    r = invoke("train-student", "--cache", missing, "--student", str(tmp_path / "s.json"), "--out",
               with_secret(s3.uri("redact", "student")), "--no-progress")
    assert r.exit_code == 1 and "no such cache directory" in r.output and SECRET not in r.output, r.output
    assert not store_files(s3.uri("redact", "student")).get(LEASE_FILE)  # the refused run released its lease
    r = invoke("train-student", "--cache", missing, "--student", str(tmp_path / "s.json"), "--out",
               with_secret(s3.uri("nosuchbucket", "student")), "--no-progress")
    assert r.exit_code == 1 and "the output location is not writable" in r.output and SECRET not in r.output, r.output


# -- verify --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_workers_on_s3_killed_resumed_and_verified(s3, fault_capture):
    setup = CaptureSetup(fault_capture[0].teacher, fault_capture[0].data)  # shards of 60 positions: ~6 per worker
    s3.make_bucket("capture")
    uri = s3.uri("capture", "cache")
    argv = lambda i, where=uri: setup.argv(where, "--num-workers", "2", "--worker-index", str(i))
    killed = run(argv(0), s3, "upload:2:shards/")  # its second shard is in the bucket, not yet in its manifest
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    done = run(argv(1, with_secret(uri)), s3)
    assert done.returncode == 0, done.stderr[-3000:]
    assert SECRET not in done.stdout + done.stderr and "s3://***@capture/cache" in done.stdout
    r = invoke("verify", uri)
    assert r.exit_code == 1, r.output
    assert "problem: worker 0 of 2 is not complete" in r.output and "the cache is incomplete (1/2 workers done)" in r.output
    r = invoke("verify", uri, "--allow-incomplete")
    assert r.exit_code == 0 and "warning: worker 0 of 2 is not complete" in r.output, r.output
    resumed = run(argv(0), s3)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    r = invoke("verify", uri)
    assert r.exit_code == 0 and "2/2 workers done, 0 problem(s), 0 warning(s)" in r.output, r.output
    reader = CacheReader(uri)
    assert reader.manifest.complete and reader.manifest.totals()["sequences"] == 40


# -- train-student --out s3:// -------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3_training(s3, fault_training, fault_capture):
    """The fault suite's cache copied to the bucket, and its training setup reading it from there."""
    setup, reference = fault_training
    s3.make_bucket("train")
    cache = s3.uri("train", "cache")
    fs, root = pafs.FileSystem.from_uri(cache)
    pafs.copy_files(str(fault_capture[1]), root, destination_filesystem=fs)
    return dataclasses.replace(setup, cache=cache), reference


@pytest.mark.slow
def test_training_to_s3_killed_twice_resumes_from_the_store_to_the_same_weights(s3, s3_training, tmp_path):
    from safetensors.torch import load, load_file

    setup, reference = s3_training
    out = s3.uri("train", "student")
    first = run(setup.argv(out), s3, "step:5")  # checkpoint step 3 is in the bucket
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    assert read_object(out, "checkpoints/latest") == b"step-000003"
    second = run(setup.argv(out), s3, "upload:1:optimizer")  # step 6's weights are up, its state.json is not
    assert second.returncode == -signal.SIGKILL, second.stderr[-3000:]
    files = store_files(out)
    assert "checkpoints/step-000006/optimizer.safetensors" in files and "checkpoints/step-000006/state.json" not in files
    assert read_object(out, "checkpoints/latest") == b"step-000003"
    d = OutDir(out)  # what a re-run sees: it takes over the killed run's lease (a dead pid on this host)
    try:
        assert d.newest_complete() == "step-000003"
        assert (d.local / "checkpoints" / "step-000003" / "state.json").exists()  # staged for the resume
    finally:
        d.close()

    last = run(setup.argv(out, "--plot", "--keep-last", "1"), s3)
    assert last.returncode == 0, last.stderr[-3000:]
    assert "student in s3://train/student/final?" in last.stdout
    log = [json.loads(line) for line in read_object(out, "train_log.jsonl").decode().splitlines()]
    want = [json.loads(line) for line in (reference / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, setup.steps + 1))
    assert [r["loss"] for r in log] == [r["loss"] for r in want]  # resumed exactly, step for step
    got = load(read_object(out, "final/model.safetensors"))
    ref = load_file(str(reference / "final" / "model.safetensors"))
    assert got.keys() == ref.keys() and all(got[k].equal(ref[k]) for k in ref)
    files = store_files(out)
    for f in ("final/config.json", "final/tokenizer_config.json", "train_plot.png", "temperatures.json"):
        assert f in files, sorted(files)
    assert sorted({f.split("/")[1] for f in files if f.startswith("checkpoints/step-")}) == ["step-000012"]  # --keep-last 1
    assert LEASE_FILE not in files  # released at the end
    assert SECRET not in read_object(out, "checkpoints/step-000012/state.json").decode()

    r = invoke("eval", "--model", s3.uri("train", "student/final"), "--cache", setup.cache, "--batch-tokens", "512")
    assert r.exit_code == 0 and "cache: positions" in r.output, r.output


# -- one live run per --out ----------------------------------------------------------------------
@pytest.mark.slow
def test_a_second_live_run_on_the_same_s3_out_is_refused_with_pid_and_host(s3, s3_training, tmp_path):
    setup, _ = s3_training
    out = s3.uri("train", "held")
    hold = tmp_path / "hold"
    hold.mkdir()
    cmd = [sys.executable, str(HERE / "store_child.py"), "--arm", "hold:2", "--", *setup.argv(out)]
    env = dict(os.environ, **s3.env(), PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]),
               ADAKD_HOLD_DIR=str(hold), OMP_NUM_THREADS="1")
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while not (hold / "held").exists():  # it holds the lease and waits for us before its second step
            assert first.poll() is None, first.stderr.read()[-3000:]
            time.sleep(0.01)
        r = invoke(*setup.argv(out))
        assert r.exit_code == 1, r.output
        assert f"another train-student (pid {first.pid} on host {socket.gethostname()})" in r.output, r.output
    finally:
        first.kill()
        first.wait()
    OutDir(out).close()  # a killed run's lease (this host, a dead pid) is taken over at once


def test_lease_refuses_a_fresh_holder_elsewhere_and_takes_over_a_stale_one(s3):
    s3.make_bucket("lease")
    store = CacheDir.open(s3.uri("lease", "out"))
    store.makedirs()
    put = lambda **kv: store.write_atomic(LEASE_FILE, json.dumps(kv).encode())
    put(pid=4242, host="node-7", token="x", heartbeat=time.time())
    with pytest.raises(TrainError, match="pid 4242 on host node-7"):
        Lease(store, "out", ttl=600)
    put(pid=4242, host="node-7", token="x", heartbeat=time.time() - 601)  # a run that died 10 minutes ago
    lease = Lease(store, "out", ttl=600)
    lease.check()
    put(pid=4242, host="node-7", token="x", heartbeat=time.time())  # someone else took it over meanwhile
    with pytest.raises(TrainError, match="taken over by pid 4242 on host node-7"):
        lease.check()
    lease.release()
    assert store.exists(LEASE_FILE)  # not ours any more: left alone


def test_a_second_run_on_a_local_out_is_refused_and_a_dead_ones_lock_is_free(fault_training, tmp_path):
    setup, _ = fault_training
    out = tmp_path / "out"
    lock = LocalLock(out)  # a live run holding --out
    try:
        r = invoke(*setup.argv(out))
        assert r.exit_code == 1, r.output
        assert f"another train-student (pid {os.getpid()} on host {socket.gethostname()})" in r.output
    finally:
        lock.release()
    LocalLock(out).release()  # released (as the kernel does when a process dies): free again
    assert (out / ".lock").read_text() == f"{os.getpid()}@{socket.gethostname()}"


def test_output_files_of_eval_and_inspect_go_to_the_store(s3, s3_training, tmp_path):
    setup, _ = s3_training
    plot = s3.uri("train", "plots/coverage.png")
    r = invoke("inspect", setup.cache, "--plot", plot, "--max-positions", "200")
    assert r.exit_code == 0 and "plot written to s3://train/plots/coverage.png?" in r.output, r.output
    assert read_object(s3.uri("train", "plots"), "coverage.png")[:8] == b"\x89PNG\r\n\x1a\n"
    r = invoke("eval", "--model", s3.uri("train", "nothing"), "--cache", setup.cache)
    assert r.exit_code == 1 and "no files there; give a model folder" in r.output, r.output
    r = invoke("demo", "--out", s3.uri("train", "demo"), "--fast")
    assert r.exit_code == 2 and "--out" in r.output and "local" in r.output, r.output
