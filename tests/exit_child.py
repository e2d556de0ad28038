"""Run a module under torchrun and say, at interpreter exit, how many gloo worker threads are still alive.

    python -m torch.distributed.run ... tests/exit_child.py -m adakd.cli train-student ...

A gloo worker still alive when the interpreter finalizes can free a Python tensor then and abort the process
("terminate called without an active exception"): a run must have destroyed its group, joining them, by then.
"""

import atexit
import os
import runpy
import sys


def _report() -> None:
    alive = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                alive += f.read().strip() == "pt_gloo_runloop"
        except OSError:
            pass
    print(f"gloo worker threads at exit: {alive}", file=sys.stderr, flush=True)


atexit.register(_report)  # first registered, so run last
assert sys.argv[1] == "-m", "usage: exit_child.py -m MODULE ARGS..."
sys.argv = sys.argv[2:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
