"""Child process for tests/test_object_stores.py: arms faults, then runs the real `adakd` command line.

usage: python store_child.py [--arm KIND:K[:ARG]]... -- COMMAND ARGS...

Besides fault_child.py's arms (`step:K`: SIGKILL before the K-th optimizer step, ...), two for object stores,
where nothing goes through os.replace or os.fsync:
  upload:K:NAME  SIGKILL right after the K-th object written to a store whose path contains NAME (a cache
                 shard published but not yet listed, a checkpoint half uploaded)
  hold:K         before the K-th optimizer step, create $ADAKD_HOLD_DIR/held and wait until
                 $ADAKD_HOLD_DIR/release exists (a live run a test can meet); after 120 s it exits with status 3
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from fault_child import arm as fault_arm
from fault_child import main as fault_main


def arm(kind: str, at: int, arg: str = "") -> None:
    if kind == "upload":
        from adakd.storage.fs import CacheDir

        real, calls = CacheDir.write_atomic, {"n": 0}

        def counted(self, rel: str, data: bytes) -> None:
            real(self, rel, data)
            if not self.is_local and arg in rel:
                calls["n"] += 1
                if calls["n"] == at:
                    os.kill(os.getpid(), signal.SIGKILL)

        CacheDir.write_atomic = counted
    elif kind == "hold":
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        folder, steps = Path(os.environ["ADAKD_HOLD_DIR"]), {"n": 0}

        def hook(opt, args, kwargs) -> None:
            steps["n"] += 1
            if steps["n"] != at:
                return
            (folder / "held").touch()
            deadline = time.monotonic() + 120
            while not (folder / "release").exists():
                if time.monotonic() > deadline:
                    sys.stderr.write("store_child: never released\n")
                    os._exit(3)
                time.sleep(0.01)

        register_optimizer_step_pre_hook(hook)
    else:
        fault_arm(kind, at, arg)


def main(argv: list[str]) -> None:
    fault_main(argv, arm)


if __name__ == "__main__":
    main(sys.argv[1:])
