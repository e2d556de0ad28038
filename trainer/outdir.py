"""Where `train-student` writes (--out): a local directory, written in place, or a folder on an object store
(any URI a cache accepts: s3://, gs://, hdfs://, ...), staged in a local temporary directory and uploaded.

A store has no rename, so completeness is shown by the order of uploads instead:

  OUT/checkpoints/step-N/...     every file of the checkpoint, `state.json` last: a step folder without
                                 state.json is an interrupted upload and is never resumed from
  OUT/checkpoints/latest         replaced after state.json: the newest complete checkpoint's name
  OUT/train_log.jsonl            the whole step log, uploaded before each checkpoint is published and at the end
  OUT/final/                     the student in Hugging Face layout, `config.json` last
  OUT/train_plot.png, temperatures.json, tensorboard/   uploaded at the end of the run

A resumed run downloads the newest complete checkpoint and the log into its staging directory and goes on
exactly as from a local --out. One live run per --out: a local directory holds an fcntl lock file naming
`pid@host` (the kernel drops it when the process dies); a store holds a lease object that the run renews
(see `Lease`).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from adakd.storage import CacheDir, CacheError, is_uri, join_uri, redact

from .checkpoint import CheckpointError, check_writable, prune_checkpoints
from .errors import TrainError

LOCK_FILE = ".lock"
LEASE_FILE = ".lease"
LOG = "train_log.jsonl"
END_OUTPUTS = (LOG, "train_plot.png", "temperatures.json")  # written by RunLog.close; tensorboard/ goes too
LEASE_TTL_S = float(os.environ.get("ADAKD_LEASE_TTL", "120"))  # a lease not renewed for this long is taken over


def holder() -> dict[str, Any]:
    """Who this process is, for the message another run gets."""
    return {"pid": os.getpid(), "host": socket.gethostname()}


def _locked(where: str, pid: Any, host: Any, detail: str = "") -> TrainError:
    return TrainError(f"{where}: another train-student (pid {pid} on host {host}) is writing to this --out{detail}; "
                      "wait for it to finish (or stop it), or choose another --out")


def check_out(location: str) -> None:
    """Refuse an --out that cannot be written, before any training work (a probe file, then removed)."""
    if not is_uri(location):
        check_writable(location)
        return
    probe = f".write-probe-{uuid.uuid4().hex}"
    try:
        store = CacheDir.open(location)
        store.makedirs()
        store.write_atomic(probe, b"ok")
        store.remove(probe)
    except (CacheError, OSError) as e:
        raise CheckpointError(f"{redact(location)}: the output location is not writable ({redact(str(e))}); check "
                              "the bucket, the credentials and the endpoint (docs/object-stores.md), or choose "
                              "another --out") from e


class LocalLock:
    """An fcntl lock on OUT/.lock holding `pid@host`: refused while a live run holds it, free once it exits."""

    def __init__(self, folder: Path):
        import fcntl

        folder.mkdir(parents=True, exist_ok=True)
        path = folder / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, _, host = path.read_text().strip().partition("@")
            os.close(fd)
            raise _locked(str(folder), pid or "?", host or "?") from None
        os.ftruncate(fd, 0)
        os.write(fd, "{pid}@{host}".format(**holder()).encode())
        self.fd: int | None = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the lock; the file stays (its content is only a hint)
            self.fd = None


class Lease:
    """OUT/.lease on a store: {pid, host, token, heartbeat}, renewed every ttl/4 seconds by a thread.

    A store has no conditional create, so this is a lease, not a lock: a run refuses an --out whose lease is
    live (renewed within `ttl` seconds, or held by a live process on this host), takes over a stale one (a
    killed run's), and checks that the lease is still its own before it publishes each checkpoint, so of two
    runs started within the same moment the one that lost stops before it overwrites anything.
    """

    def __init__(self, store: CacheDir, where: str, ttl: float = LEASE_TTL_S):
        self.store, self.where, self.ttl = store, where, ttl
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        current = self.read()
        if current is not None and current.get("token") != self.token and self.live(current):
            age = time.time() - float(current.get("heartbeat", 0))
            raise _locked(where, current.get("pid", "?"), current.get("host", "?"),
                          f" (its lease {LEASE_FILE} was renewed {max(age, 0):.0f} s ago; a lease not renewed for "
                          f"{ttl:g} s is taken over)")
        self._write()
        self._thread = threading.Thread(target=self._beat, name="adakd-lease", daemon=True)
        self._thread.start()

    def read(self) -> dict[str, Any] | None:
        if not self.store.exists(LEASE_FILE):
            return None
        try:
            lease = json.loads(self.store.read_bytes(LEASE_FILE))
        except (CacheError, ValueError):
            return None  # unreadable: as good as none
        return lease if isinstance(lease, dict) else None

    def live(self, lease: dict[str, Any]) -> bool:
        """On this host the process itself answers; elsewhere, the heartbeat's age."""
        if lease.get("host") == socket.gethostname() and isinstance(lease.get("pid"), int):
            return _pid_alive(lease["pid"])
        return time.time() - float(lease.get("heartbeat", 0)) < self.ttl

    def check(self) -> None:
        """Still ours? Called before publishing, so a run that lost its lease writes nothing more."""
        current = self.read()
        if current is None or current.get("token") != self.token:
            who = current or {}
            raise TrainError(f"{self.where}: this run's lease was taken over by pid {who.get('pid', '?')} on host "
                             f"{who.get('host', '?')}; two runs were writing to one --out: stop one of them and re-run "
                             "the other (it resumes from the last complete checkpoint)")

    def _write(self) -> None:
        self.store.write_atomic(LEASE_FILE, json.dumps({**holder(), "token": self.token, "heartbeat": time.time(),
                                                         "ttl_s": self.ttl}).encode())

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                current = self.read()
                if current is not None and current.get("token") != self.token:
                    return  # taken over: `check` stops the run at its next checkpoint
                self._write()
            except Exception:
                continue

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        try:
            current = self.read()
            if current is not None and current.get("token") == self.token:
                self.store.remove(LEASE_FILE)
        except (CacheError, OSError):
            pass  # left behind, it goes stale and is taken over


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutDir:
    """train-student's output: `local` is where the trainer writes; on a store, publishing uploads it."""

    def __init__(self, location: str, rank: int = 0):
        self.location, self.rank = location, rank
        self.remote = is_uri(location)
        self.store = CacheDir.open(location) if self.remote else None
        self.local = Path(tempfile.mkdtemp(prefix="adakd-out-")) if self.remote else Path(location)
        self._lock: LocalLock | Lease | None = None
        try:
            if rank == 0:  # the only writer
                self._lock = Lease(self.store, self.name()) if self.remote else LocalLock(self.local)
            self.pull()
        except BaseException:
            self.close()
            raise

    def name(self, rel: str = "") -> str:
        """`rel` under --out, for messages (credentials redacted)."""
        return redact(join_uri(self.location, rel))

    def uri(self, rel: str = "") -> str:
        """`rel` under --out, to open (credentials kept)."""
        return join_uri(self.location, rel)

    # -- resuming ----------------------------------------------------------------------------------
    def pull(self) -> None:
        """Stage the newest complete checkpoint and the step log from the store (every rank reads it)."""
        if not self.remote:
            return
        try:
            name = self.newest_complete()
            if name is not None:
                rel = f"checkpoints/{name}"
                for f in self.store.files(rel):
                    self.store.download(f"{rel}/{f}", self.local / rel / f)
                (self.local / "checkpoints" / "latest").write_text(name)
            if self.store.exists(LOG):
                self.store.download(LOG, self.local / LOG)
        except (CacheError, OSError) as e:
            raise TrainError(f"{self.name()}: cannot read the last checkpoint from the store ({redact(str(e))}); "
                             "check the store and re-run") from e

    def newest_complete(self) -> str | None:
        """The checkpoint `latest` names if complete (it has state.json), else the newest complete one."""
        complete = [n for n in self._steps() if self.store.exists(f"checkpoints/{n}/state.json")]
        latest = self.store.read_bytes("checkpoints/latest").decode().strip() if self.store.exists("checkpoints/latest") else None
        if latest in complete:
            return latest
        return max(complete, key=_step_number) if complete else None

    def _steps(self) -> list[str]:
        return sorted((n for n in self.store.listdir("checkpoints") if n.startswith("step-") and n[5:].isdigit()),
                      key=_step_number)

    # -- publishing (rank 0) -----------------------------------------------------------------------
    def publish_checkpoint(self, ckpt: Path, keep_last: int) -> None:
        """After `save_checkpoint` wrote `ckpt` locally: make it the one a re-run resumes from, and prune."""
        if not self.remote:
            prune_checkpoints(self.local, keep_last)
            return
        self._lock.check()
        try:
            self._upload(LOG)  # first: the log then holds every step up to this checkpoint
            rel = f"checkpoints/{ckpt.name}"
            if not self.store.exists(f"{rel}/state.json"):  # complete already (a finished run re-run): never touched
                files = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file())
                for f in [f for f in files if f != "state.json"] + ["state.json"]:
                    self.store.upload(ckpt / f, f"{rel}/{f}")
            self.store.write_atomic("checkpoints/latest", ckpt.name.encode())
            self._prune_store(keep_last, ckpt.name)
        except (CacheError, OSError) as e:
            raise CheckpointError(f"checkpoint {ckpt.name} could not be uploaded to {self.name('checkpoints')} "
                                  f"({redact(str(e))}); the previous complete checkpoint there is intact") from e
        for old in (self.local / "checkpoints").glob("step-*"):  # the staging keeps only the newest
            if old.name != ckpt.name:
                shutil.rmtree(old, ignore_errors=True)

    def _prune_store(self, keep: int, newest: str) -> None:
        """All but the `keep` newest step folders go, each made incomplete (state.json) before its files."""
        if keep < 1:
            return
        for name in self._steps()[:-keep]:
            if name == newest:
                continue
            if self.store.exists(f"checkpoints/{name}/state.json"):
                self.store.remove(f"checkpoints/{name}/state.json")
            self.store.remove_tree(f"checkpoints/{name}")

    def publish_final(self) -> None:
        """Upload OUT/final (Hugging Face layout), config.json last: a final/ with config.json is whole."""
        if not self.remote:
            return
        final = self.local / "final"
        files = sorted(p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file())
        try:
            for f in [f for f in files if f != "config.json"] + ["config.json"]:
                self.store.upload(final / f, f"final/{f}")
        except (CacheError, OSError) as e:
            raise CheckpointError(f"the student could not be uploaded to {self.name('final')} ({redact(str(e))}); "
                                  "re-run the same command to upload it again") from e

    def publish_logs(self) -> None:
        """Upload the step log, --plot's files and TensorBoard's event files (end of a run)."""
        if not self.remote:
            return
        try:
            for rel in END_OUTPUTS:
                self._upload(rel)
            board = self.local / "tensorboard"
            for p in sorted(board.rglob("*")) if board.is_dir() else []:
                if p.is_file():
                    self._upload(p.relative_to(self.local).as_posix())
        except (CacheError, OSError) as e:
            raise CheckpointError(f"the run's logs could not be uploaded to {self.name()} ({redact(str(e))}); the "
                                  "checkpoints there are intact: re-run to upload them again") from e

    def _upload(self, rel: str) -> None:
        if (self.local / rel).is_file():
            self.store.upload(self.local / rel, rel)

    def close(self) -> None:
        """Release the lock or lease, and drop the staging directory of a store."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)


def _step_number(name: str) -> int:
    return int(name[5:])


def redacted_config(config: dict[str, Any]) -> dict[str, Any]:
    """A run's configuration as saved in its checkpoints: locations without their credentials."""
    def clean(v: Any) -> Any:
        return redact(v) if isinstance(v, str) else [clean(x) for x in v] if isinstance(v, (list, tuple)) else v

    return {k: clean(v) for k, v in config.items()}
