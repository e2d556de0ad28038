"""Child process for fault-injection tests: arms faults, then runs the real `adakd` command line.

usage: python fault_child.py [--arm KIND:K[:NAME]]... -- COMMAND ARGS...   (e.g. cache-teacher --teacher ...)

Each fault fires at the K-th call of its kind in this process (a deterministic moment); with NAME, only
calls on files whose name contains NAME count (`write:2:manifest`: the second write of a manifest):
  write:K      half of the K-th os.write reaches the file, then SIGKILL (a torn temporary file)
  replace:K    SIGKILL just before the K-th os.replace (a complete file, not yet published)
  replaced:K   SIGKILL just after the K-th os.replace (published, directory not yet fsynced)
  rename:K     SIGKILL just before the K-th os.rename (a checkpoint directory not yet in place)
  fsync:K      SIGKILL just before the K-th os.fsync
  save:K       the K-th safetensors file is written, cut to half its size, then SIGKILL
  step:K       SIGKILL just before the K-th optimizer step
  pause:K:S    sleep S seconds before the K-th os.replace, then go on (holds the writer's lock)
  slow:0:S     sleep S seconds before every os.replace (stretches a run, for concurrent readers)
  meet:K:N     before the K-th os.replace of a shard, wait until N parties (this process included) have
               reached the K-th meeting: each marks its arrival in $ADAKD_MEET_DIR/meet-K (faultkit.arrive
               lets a test be a party); after $ADAKD_MEET_TIMEOUT s (default 120) it exits with status 3
               and says so, so a missing partner fails a test instead of hanging it
Before a fault fires it appends one line, what it hit, to $ADAKD_FAULT_LOG (if set).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

def note(what: str) -> None:
    path = os.environ.get("ADAKD_FAULT_LOG")
    if path:
        with open(path, "a") as f:
            f.write(what + "\n")


def die(what: str) -> None:
    note(what)
    os.kill(os.getpid(), signal.SIGKILL)


def _fd_name(fd: int) -> str:
    try:
        return os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return f"fd {fd}"


def _counted(real: Callable, at: int, name: Callable[[tuple], str], match: str = "",
             before: Callable[[int, tuple], None] | None = None,
             after: Callable[[int, tuple], None] | None = None) -> Callable:
    """`real` with hooks run at the `at`-th call on a file whose name contains `match` (`at` 0: every call)."""
    calls = {"n": 0}

    def patched(*args: Any, **kwargs: Any):
        hit = False
        if match in name(args):
            calls["n"] += 1
            hit = at == 0 or calls["n"] == at
        if hit and before:
            before(calls["n"], args)
        out = real(*args, **kwargs)
        if hit and after:
            after(calls["n"], args)
        return out

    return patched


def _dest(args: tuple) -> str:
    return os.path.basename(os.fspath(args[1]))


def meet(n: int, what: str, parties: int) -> None:
    """Wait before publishing `what` until `parties` processes are at the n-th meeting: what must overlap then
    provably does, however loaded the machine (no sleep decides it)."""
    folder = Path(os.environ["ADAKD_MEET_DIR"]) / f"meet-{n}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{what}@{os.getpid()}").touch()
    limit = float(os.environ.get("ADAKD_MEET_TIMEOUT", "120"))
    deadline = time.monotonic() + limit
    while len(here := sorted(name.split("@")[0] for name in os.listdir(folder))) < parties:
        if time.monotonic() > deadline:
            note(f"meet #{n}: gave up before publishing {what} after {limit:g} s, {len(here)} of {parties} here: "
                 f"{', '.join(here)}")
            sys.stderr.write(f"fault_child: meet #{n} timed out after {limit:g} s with {len(here)} of {parties} "
                             f"parties ({', '.join(here)})\n")
            sys.stderr.flush()
            os._exit(3)
        time.sleep(0.01)
    note(f"meet #{n}: before publishing {what}, {len(here)} of {parties} here: {', '.join(here)}")


def arm(kind: str, at: int, arg: str = "") -> None:
    match = "" if kind in ("pause", "slow") else arg
    if kind == "write":
        real_write = os.write

        def torn(n: int, args: tuple) -> None:
            fd, data = args[0], bytes(args[1])
            real_write(fd, data[: max(1, len(data) // 2)])
            die(f"write #{n}: {_fd_name(fd)} half written")

        os.write = _counted(real_write, at, lambda a: _fd_name(a[0]), match, before=torn)
    elif kind == "replace":
        os.replace = _counted(os.replace, at, _dest, match, before=lambda n, a: die(f"replace #{n}: before publishing {_dest(a)}"))
    elif kind == "replaced":
        os.replace = _counted(os.replace, at, _dest, match, after=lambda n, a: die(f"replace #{n}: just after publishing {_dest(a)}"))
    elif kind in ("pause", "slow"):
        seconds = float(arg or 1.0)
        os.replace = _counted(os.replace, at if kind == "pause" else 0, _dest, before=lambda n, a: time.sleep(seconds))
    elif kind == "meet":
        os.replace = _counted(os.replace, at, _dest, ".arrow", before=lambda n, a: meet(n, _dest(a), int(arg or 2)))
    elif kind == "rename":
        os.rename = _counted(os.rename, at, _dest, match, before=lambda n, a: die(f"rename #{n}: before {_dest(a)}"))
    elif kind == "fsync":
        os.fsync = _counted(os.fsync, at, lambda a: _fd_name(a[0]), match, before=lambda n, a: die(f"fsync #{n}: {_fd_name(a[0])}"))
    elif kind == "save":
        import safetensors.torch as st  # patched before transformers or the trainer import save_file

        def torn_file(n: int, args: tuple) -> None:
            path = os.fspath(args[1])
            os.truncate(path, os.path.getsize(path) // 2)
            die(f"save #{n}: {os.path.basename(path)} half written")

        st.save_file = _counted(st.save_file, at, lambda a: os.path.basename(os.fspath(a[1])), match, after=torn_file)
    elif kind == "step":
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        calls = {"n": 0}

        def hook(opt, args, kwargs) -> None:
            calls["n"] += 1
            if calls["n"] == at:
                die(f"step #{at}: before the optimizer step")

        register_optimizer_step_pre_hook(hook)
    else:
        raise SystemExit(f"unknown fault {kind!r}")


def main(argv: list[str], arm_one: Callable[[str, int, str], None] | None = None) -> None:
    """Arm every `--arm KIND:K[:NAME]` (with `arm_one`, default this module's `arm`), then run the command."""
    arm_one = arm_one or arm
    split = argv.index("--")
    opts, command = argv[:split], argv[split + 1:]
    for i in range(0, len(opts), 2):
        assert opts[i] == "--arm", opts
        kind, at, *rest = opts[i + 1].split(":", 2)
        arm_one(kind, int(at), rest[0] if rest else "")
    from adakd import cli

    cli.main(command, prog_name="adakd")


if __name__ == "__main__":
    main(sys.argv[1:])
