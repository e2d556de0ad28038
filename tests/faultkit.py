"""Fault-injection harness shared by the tests and `python -m bench.faults`.

Runs the real command line in a child process (`fault_child.py`), kills it (SIGKILL at an armed call or
after a delay) or limits its file size (RLIMIT_FSIZE), and checks what it leaves behind: a cache whose
listed shards are byte-identical to an uninterrupted run's, a checkpoint directory whose `latest` is
complete, a training log whose losses match an uninterrupted run's.

Caches on an object store (s3://, tests/s3server.py) are written with no local system calls to arm, so
their faults are armed one level up, on the cache's uploads (`child_main`, run instead of fault_child.py
when they are used):
  put:K[:NAME]     the K-th upload has sent half its bytes into the store's output stream, then SIGKILL
                   (an upload never completed: a store publishes an object only on completion)
  putted:K[:NAME]  SIGKILL just after the K-th upload completed (a shard published, its manifest not yet)
and, with $ADAKD_STORE_MARK set, the child creates that file when its first upload begins (what a kill at a
random moment of the writing waits for).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CHILD = HERE / "fault_child.py"


@dataclass
class Run:
    rc: int
    out: str
    err: str
    wall: float
    hit: list[str] = field(default_factory=list)  # what the armed fault hit (fault_child's log)

    @property
    def killed(self) -> bool:
        return self.rc == -signal.SIGKILL


def run_cli(argv: list[str], arms: tuple[str, ...] = (), kill_after: float | None = None,
            kill_when: Callable[[], bool] | None = None, fsize: int | None = None, timeout: float = 300,
            env: dict | None = None) -> Run:
    """One child process running `adakd ARGV` with faults armed (see fault_child.py); SIGKILLed
    `kill_after` seconds after it starts, or after `kill_when()` first holds; file sizes capped at `fsize`."""
    with tempfile.TemporaryDirectory() as tmp:
        log, out_path, err_path = (Path(tmp) / n for n in ("faults", "stdout", "stderr"))
        full_env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE)]), ADAKD_FAULT_LOG=str(log),
                        OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
        entry = [str(CHILD)]
        if any(a.split(":")[0] in STORE_FAULTS for a in arms) or "ADAKD_STORE_MARK" in (env or {}):
            entry = ["-c", "import sys, faultkit; faultkit.child_main(sys.argv[1:])"]
        cmd = [sys.executable, *entry] + [x for a in arms for x in ("--arm", a)] + ["--", *argv]

        def limit() -> None:
            if fsize is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

        t0 = time.monotonic()
        with open(out_path, "w") as fo, open(err_path, "w") as fe:
            proc = subprocess.Popen(cmd, env=full_env, cwd=ROOT, stdout=fo, stderr=fe, preexec_fn=limit)
            timed = kill_after is not None or kill_when is not None
            armed_at = None if kill_when else t0
            while proc.poll() is None:
                now = time.monotonic()
                if now - t0 > timeout:
                    proc.kill()
                    proc.wait()
                    raise TimeoutError(f"{argv[0]} ran over {timeout} s: {cmd}")
                if timed and armed_at is None and kill_when():
                    armed_at = now
                if timed and armed_at is not None and now - armed_at >= (kill_after or 0.0):
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    break
                time.sleep(0.002)
        wall = time.monotonic() - t0
        hit = log.read_text().splitlines() if log.exists() else []
        out, err = out_path.read_text(), err_path.read_text()
    if timed and proc.returncode == -signal.SIGKILL and not hit:
        hit = [f"time: {wall:.2f} s after start"]
    return Run(proc.returncode, out, err, wall, hit)


# -- faults on an object store's uploads (in the child) -------------------------------------------
STORE_FAULTS = ("put", "putted")


def child_main(argv: list[str]) -> None:
    """fault_child.py's main, with the object-store arms (`put`, `putted`) and $ADAKD_STORE_MARK added."""
    import fault_child
    from adakd.storage.fs import CacheDir

    split = argv.index("--")
    opts, rest = argv[:split], []
    store = []
    for i in range(0, len(opts), 2):
        (store if opts[i + 1].split(":")[0] in STORE_FAULTS else rest).append(opts[i + 1])
    real = CacheDir.write_atomic
    mark = os.environ.get("ADAKD_STORE_MARK")
    calls: dict[str, int] = {}

    def write_atomic(self, rel: str, data: bytes) -> None:
        if self.is_local:
            return real(self, rel, data)
        if mark and not os.path.exists(mark):
            open(mark, "w").close()
        name = os.path.basename(rel)
        for spec in store:
            kind, at, *match = spec.split(":", 2)
            if match and match[0] not in name:
                continue
            calls[spec] = calls.get(spec, 0) + 1
            if calls[spec] != int(at):
                continue
            if kind == "put":
                stream = self.fs.open_output_stream(self.path(rel))
                stream.write(data[: max(1, len(data) // 2)])
                fault_child.die(f"put #{at}: {name} half uploaded")
            out = real(self, rel, data)
            fault_child.die(f"put #{at}: just after uploading {name}")
            return out
        return real(self, rel, data)

    CacheDir.write_atomic = write_atomic
    fault_child.main([x for a in rest for x in ("--arm", a)] + argv[split:])


# -- meetings (fault_child's `meet` arm) ----------------------------------------------------------
def meet_env(folder: Path) -> dict[str, str]:
    """The environment of processes armed with `meet:K:N` that are to meet in `folder`."""
    return {"ADAKD_MEET_DIR": str(folder)}


def at_meeting(folder: Path, n: int) -> list[str]:
    """Who has reached the n-th meeting in `folder` (a writer: the shard it holds back)."""
    try:
        return sorted(name.split("@")[0] for name in os.listdir(folder / f"meet-{n}"))
    except FileNotFoundError:
        return []


def arrive(folder: Path, n: int, who: str = "test") -> None:
    """Join the n-th meeting as a party; the processes waiting there go on once all parties are in."""
    (folder / f"meet-{n}").mkdir(parents=True, exist_ok=True)
    (folder / f"meet-{n}" / f"{who}@{os.getpid()}").touch()


# -- capture -------------------------------------------------------------------------------------
@dataclass
class CaptureSetup:
    """A tiny teacher, a small dataset and the arguments every capture run shares."""

    teacher: Path
    data: Path
    extra: tuple[str, ...] = ("--top-k", "16", "--engine", "hf", "--shard-positions", "60", "--batch-tokens", "512")

    def argv(self, out: Path, *more: str) -> list[str]:
        return ["cache-teacher", "--no-progress", "--teacher", str(self.teacher), "--data", str(self.data),
                "--out", str(out), *self.extra, *more]


def capture_setup(root: Path, records: int = 40, seed: int = 5) -> CaptureSetup:
    from tiny import build_teacher, instruction_rows, write_jsonl

    root.mkdir(parents=True, exist_ok=True)
    return CaptureSetup(build_teacher(root / "teacher"), write_jsonl(root / "data.jsonl", instruction_rows(records, seed)))


def shard_files(cache: Path | str) -> dict[str, bytes]:
    """The bytes of every shard the cache's manifests list, by name (a local cache or a store URI)."""
    from adakd.storage import CacheReader
    from adakd.storage.fs import CacheDir

    d = CacheDir.open(cache)
    return {s.file: d.read_bytes(s.file) for s in CacheReader(cache).shards}


def _read(cache: Path | str, rel: str) -> bytes | None:
    from adakd.storage import CacheError
    from adakd.storage.fs import CacheDir

    try:
        return CacheDir.open(cache).read_bytes(rel)
    except CacheError:
        return None


def stored_files(cache: Path | str) -> list[str]:
    """Every file (object) under a cache, relative to it; lock files aside."""
    import pyarrow.fs as pafs
    from adakd.storage.fs import CacheDir

    d = CacheDir.open(cache)
    if d.fs.get_file_info(d.root).type != pafs.FileType.Directory:
        return []
    infos = d.fs.get_file_info(pafs.FileSelector(d.root, recursive=True))
    return sorted(i.path[len(d.root) + 1:] for i in infos
                  if i.type == pafs.FileType.File and not i.base_name.startswith(".lock"))


def partial_cache_problems(cache: Path | str, reference: dict[str, bytes]) -> list[str]:
    """What is wrong with a cache left by a killed writer: it must verify, and every shard it lists must
    be the reference's shard of the same name (so what is there is final and a prefix of the data)."""
    from adakd.storage import CacheNotFoundError, CacheReader, verify_cache

    try:
        reader = CacheReader(cache)
    except CacheNotFoundError:
        return []  # killed before its first manifest: nothing is published, nothing to check
    report = verify_cache(cache)
    problems = list(report.problems)
    names = sorted(reference)
    listed = [s.file for s in reader.shards]
    if listed != names[: len(listed)]:
        problems.append(f"listed shards {listed} are not a prefix of {names}")
    problems += [f"{f}: differs from the uninterrupted run's" for f in listed if _read(cache, f) != reference.get(f)]
    if reader.manifest.complete and listed != names:
        problems.append("marked complete with shards missing")
    return problems


def final_cache_problems(cache: Path | str, reference: dict[str, bytes]) -> list[str]:
    """A finished cache must be complete, verify without warnings, and hold exactly the reference shards (and on
    a store, no other shard objects: one left by a killed run is rewritten, never forgotten)."""
    from adakd.storage import CacheReader, verify_cache

    report = verify_cache(cache)
    problems = report.problems + [f"warning: {w}" for w in report.warnings]
    if not problems:
        if not CacheReader(cache).manifest.complete:
            problems.append("not complete")
        got = shard_files(cache)
        if got != reference:
            problems.append(f"shards differ from the uninterrupted run: {sorted(set(got) ^ set(reference)) or 'content'}")
    files = stored_files(cache)
    leftovers = [f for f in files if os.path.basename(f).startswith(".tmp-")]
    if leftovers:
        problems.append(f"temporary files left: {leftovers}")
    strays = [f for f in files if f.startswith("shards/") and f not in reference]
    if strays:
        problems.append(f"shard files no manifest lists: {strays}")
    return problems


def listed_shards(cache: Path | str) -> int:
    from adakd.storage import CacheError, CacheReader

    try:
        return len(CacheReader(cache).shards)
    except CacheError:
        return 0


@dataclass
class Kill:
    """One crash point: what was armed, whether the process died there, what it hit, what was wrong after."""

    arm: str
    killed: bool
    hit: str
    problems: list[str]


def writing_since(cache: Path, t: float) -> Callable[[], bool]:
    """Holds once a shard, manifest or temporary file of the cache was modified after wall-clock time `t`."""
    def check() -> bool:
        try:
            files = [p for p in (cache / "shards").iterdir()] + [p for p in cache.iterdir()
                                                                 if p.name.startswith(("manifest-", ".tmp-"))]
            return any(p.stat().st_mtime >= t for p in files)
        except OSError:  # not there yet, or renamed while we looked
            return False
    return check


CAPTURE_FAULTS = ("write", "replace", "replaced", "fsync")


@dataclass
class Campaign:
    """Crash points tried, and per resumed cache (one chain of kills) what was wrong with it at the end."""

    kills: list[Kill] = field(default_factory=list)
    finals: list[list[str]] = field(default_factory=list)

    @property
    def survived(self) -> int:
        return sum(k.killed and not k.problems for k in self.kills)

    @property
    def tried(self) -> int:
        return sum(k.killed for k in self.kills)


def capture_campaign(setup: CaptureSetup, reference: dict[str, bytes], root: Path, kills: int, rng,
                     first: tuple[str, ...] = (), time_share: float = 0.25, max_call: int = 4,
                     store: Callable[[str], str] | None = None, env: dict | None = None,
                     window: float = 3.0) -> Campaign:
    """SIGKILL `cache-teacher` at `kills` moments: the `first` armed faults, then at the K-th low-level
    write / rename / fsync of a run (K drawn among the calls it has left) or at a random moment once it
    writes. Each run resumes the cache the last one left, which is checked after every kill; once a run
    finishes, the cache is compared with the uninterrupted one and a new chain starts in a fresh directory.

    With `store` (chain name -> a store URI, e.g. S3Server.uri) the caches live on an object store: the kills
    come at the K-th upload, half sent (`put`) or just completed (`putted`), or at a random moment within
    `window` seconds after the run's first upload began; `env` reaches the store. Local files `root` holds
    only the random moments' marks."""
    c = Campaign()
    out = None
    planned = list(first)
    faults = STORE_FAULTS if store else CAPTURE_FAULTS
    root.mkdir(parents=True, exist_ok=True)
    while c.tried < kills:
        if out is None:
            name = f"chain-{len(c.finals)}"
            out = store(name) if store else root / name
        left = len(reference) - listed_shards(out)  # each shard: about 2 writes, 2 renames, 4 fsyncs (2 uploads)
        if planned:
            arm = planned.pop(0)
            r = run_cli(setup.argv(out), arms=(arm,), env=env)
        elif rng.random() < time_share:
            arm = "time"
            if store:
                mark = root / f"mark-{c.tried}-{len(c.kills)}-{time.monotonic_ns()}"
                r = run_cli(setup.argv(out), kill_when=mark.exists, kill_after=rng.uniform(0.0, window),
                            env={**(env or {}), "ADAKD_STORE_MARK": str(mark)})
            else:
                r = run_cli(setup.argv(out), kill_when=writing_since(out, time.time()), kill_after=rng.uniform(0.0, 0.1))
        else:
            arm = f"{rng.choice(faults)}:{rng.randint(1, max(1, min(max_call, 2 * left)))}"
            r = run_cli(setup.argv(out), arms=(arm,), env=env)
        if r.killed:
            c.kills.append(Kill(arm, True, r.hit[-1] if r.hit else "", partial_cache_problems(out, reference)))
        elif r.rc != 0:
            raise RuntimeError(f"{arm}: exit {r.rc}\n{r.err[-3000:]}")
        else:  # the run got to the end before its fault: this chain is done
            c.finals.append(final_cache_problems(out, reference))
            out = None
    if out is not None:
        final = run_cli(setup.argv(out), env=env)
        c.finals.append(final_cache_problems(out, reference) if final.rc == 0 else [f"resume failed: {final.err[-2000:]}"])
    return c


# -- training ------------------------------------------------------------------------------------
@dataclass
class TrainSetup:
    """A cache, a tiny random-init student and the arguments every training run shares."""

    cache: Path
    student: Path
    steps: int = 12
    save_every: int = 3

    def argv(self, out: Path, *more: str) -> list[str]:
        return ["train-student", "--no-progress", "--cache", str(self.cache), "--student", str(self.student),
                "--out", str(out), "--batch-tokens", "512", "--max-steps", str(self.steps), "--save-every",
                str(self.save_every), "--lr", "3e-3", "--seed", "5", *more]


def train_setup(cap: CaptureSetup, cache: Path, root: Path) -> TrainSetup:
    """Training on a cache of `cap`'s teacher: a student config made from the teacher's, smaller."""
    cfg = json.loads((cap.teacher / "config.json").read_text())
    cfg.update(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=1, num_key_value_heads=1)
    root.mkdir(parents=True, exist_ok=True)
    student = root / "student.json"
    student.write_text(json.dumps(cfg))
    return TrainSetup(cache, student)


def train_losses(out: Path) -> dict[int, float]:
    """step -> loss, the last record of each step (a resumed run appends the steps it redoes)."""
    log = out / "train_log.jsonl"
    if not log.exists():
        return {}
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows}


def logged_steps(out: Path) -> list[int]:
    log = out / "train_log.jsonl"
    if not log.exists():
        return []
    steps = []
    for line in log.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line torn by the kill (the re-run drops it)
    return steps


def resume_step(out: Path) -> int:
    """The step a re-run continues from (0: from scratch)."""
    from adakd.trainer.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(out)
    return int(ckpt.name.split("-")[1]) if ckpt else 0


def checkpoint_problems(out: Path, store: bool = False) -> list[str]:
    """The checkpoint a re-run would resume from must be complete: every file readable, the step it says;
    so must every other `step-*` directory (they appear only by an atomic rename). On a store (`out`: a local
    copy of it) a step folder appears file by file, `state.json` last: one without it is an interrupted upload,
    never resumed from, and every one with it must be complete."""
    from safetensors.torch import load_file

    problems = []
    for ckpt in sorted((out / "checkpoints").glob("step-*")):
        if store and not (ckpt / "state.json").exists():
            continue
        try:
            state = json.loads((ckpt / "state.json").read_text())
            for f in ("optimizer.safetensors", "rng.safetensors", "model/model.safetensors"):
                if not load_file(str(ckpt / f)):
                    problems.append(f"{ckpt / f}: empty")
            json.loads((ckpt / "model" / "config.json").read_text())
            if f"step-{state['step']:06d}" != ckpt.name:
                problems.append(f"{ckpt.name} holds step {state['step']}")
        except Exception as e:  # noqa: BLE001 - any failure means a half-written checkpoint
            problems.append(f"{ckpt.name}: incomplete ({type(e).__name__}: {e})")
    ptr = out / "checkpoints" / "latest"
    if ptr.exists() and not (out / "checkpoints" / ptr.read_text().strip()).is_dir():
        problems.append(f"latest names {ptr.read_text().strip()!r}, which is not there")
    return problems


def train_final_problems(out: Path, reference: Path, store: bool = False) -> list[str]:
    """A finished run must hold the uninterrupted run's losses at every step, bit for bit, and its weights."""
    from safetensors.torch import load_file

    problems = checkpoint_problems(out, store)
    got, want = train_losses(out), train_losses(reference)
    if got != want:
        diff = [s for s in sorted(set(got) | set(want)) if got.get(s) != want.get(s)]
        problems.append(f"losses differ from the uninterrupted run at steps {diff[:10]}")
    try:
        a, b = load_file(str(out / "final" / "model.safetensors")), load_file(str(reference / "final" / "model.safetensors"))
        if a.keys() != b.keys() or any(not a[k].equal(b[k]) for k in a):
            problems.append("final weights differ from the uninterrupted run's")
    except Exception as e:  # noqa: BLE001
        problems.append(f"final student unreadable ({type(e).__name__}: {e})")
    leftovers = [p.name for p in (out / "checkpoints").glob(".tmp-*")]
    if leftovers:
        problems.append(f"temporary checkpoint directories left: {leftovers}")
    return problems


TRAIN_FAULTS = ("step", "save", "rename", "replace", "fsync")


STORE_TRAIN_FAULTS = ("step", "put", "putted")


def download(uri: str, local: Path) -> Path:
    """A fresh local copy of every object under a store folder (what the checks read)."""
    import shutil

    shutil.rmtree(local, ignore_errors=True)
    local.mkdir(parents=True)
    for rel in stored_files(uri):
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_bytes(_read(uri, rel) or b"")
    return local


def train_campaign(setup: TrainSetup, reference: Path, root: Path, kills: int, rng, first: tuple[str, ...] = (),
                   time_share: float = 0.15, store: Callable[[str], str] | None = None, env: dict | None = None,
                   window: float = 6.0) -> Campaign:
    """SIGKILL `train-student` at `kills` moments: the `first` armed faults, then before a random optimizer
    step, inside a random checkpoint file write, rename, `latest` replacement or fsync, or at a random
    moment once it logs. After each kill the checkpoints must be complete; each re-run must continue from
    the last complete one; a finished run must match the uninterrupted one bit for bit.

    With `store` (run name -> a store URI) --out is on an object store: the kills come before a random optimizer
    step, at the K-th upload half sent (`put`) or just completed (`putted`), or at a random moment within
    `window` seconds of the run's first upload; the checks read a fresh local copy of the store's folder."""
    c = Campaign()
    out = None
    planned = list(first)
    root.mkdir(parents=True, exist_ok=True)
    view = (lambda o: download(o, root / "view")) if store else (lambda o: o)
    while c.tried < kills:
        if out is None:
            name = f"run-{len(c.finals)}"
            out = store(name) if store else root / name
        start = resume_step(view(out))
        left = setup.steps - start
        ckpts = left // setup.save_every + 1  # checkpoints (and the final student) this run has to write
        if planned:
            arm = planned.pop(0)
            r = run_cli(setup.argv(out), arms=(arm,), env=env)
        elif rng.random() < time_share:
            arm = "time"
            if store:
                mark = root / f"mark-{len(c.kills)}-{time.monotonic_ns()}"
                r = run_cli(setup.argv(out), kill_when=mark.exists, kill_after=rng.uniform(0.0, window),
                            env={**(env or {}), "ADAKD_STORE_MARK": str(mark)})
            else:
                r = run_cli(setup.argv(out), kill_when=writing_since_log(out, time.time()), kill_after=rng.uniform(0.0, 0.5))
        else:
            kind = rng.choice(STORE_TRAIN_FAULTS if store else TRAIN_FAULTS)
            top = {"step": left, "save": 3 * ckpts, "rename": ckpts, "replace": ckpts, "fsync": 10 * ckpts,
                   "put": 10 * ckpts, "putted": 10 * ckpts}[kind]
            arm = f"{kind}:{rng.randint(1, max(1, top))}"
            r = run_cli(setup.argv(out), arms=(arm,), env=env)
        seen = view(out)
        steps = logged_steps(seen)
        # train-student drops the log lines past its checkpoint before it continues, so the log holds each step
        # once: lines past `start` are this run's, and a wrong resume point shows as a gap or a repeat
        new = [x for x in steps if x > start]
        problems = [] if not new or new[0] == start + 1 else [f"resumed at step {new[0]}, not {start + 1}"]
        if steps != list(range(1, len(steps) + 1)):
            problems.append(f"the step log is not 1..n, each once: {steps}")
        if r.killed:
            c.kills.append(Kill(arm, True, r.hit[-1] if r.hit else "", problems + checkpoint_problems(seen, bool(store))))
        elif r.rc != 0:
            raise RuntimeError(f"{arm}: exit {r.rc}\n{r.err[-3000:]}")
        else:
            c.finals.append(problems + train_final_problems(seen, reference, bool(store)))
            out = None
    if out is not None:
        final = run_cli(setup.argv(out), env=env)
        c.finals.append(train_final_problems(view(out), reference, bool(store)) if final.rc == 0
                        else [f"resume failed: {final.err[-2000:]}"])
    return c


def writing_since_log(out: Path, t: float) -> Callable[[], bool]:
    """Holds once the run has logged a step after wall-clock time `t`."""
    def check() -> bool:
        try:
            return (out / "train_log.jsonl").stat().st_mtime >= t
        except OSError:
            return False
    return check
