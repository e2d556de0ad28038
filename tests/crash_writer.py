"""Child process for crash tests: writes a deterministic cache, optionally SIGKILLing itself mid-write.

usage: python crash_writer.py CACHE N_RECORDS [replace|write] [CALL_NUMBER]
  replace K: die just before the K-th atomic rename (a complete temporary file exists, unpublished)
  write K:   die in the middle of the K-th low-level write (a half-written temporary file exists)
"""

import os
import signal
import sys

import numpy as np
from helpers import make_info, make_sequence

from adakd.storage import CacheWriter


def arm(kind: str, at: int) -> None:
    calls = {"n": 0}
    real = getattr(os, kind)

    def patched(*args):
        calls["n"] += 1
        if calls["n"] == at:
            if kind == "write":
                real(args[0], bytes(args[1])[: max(1, len(args[1]) // 2)])
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args)

    setattr(os, kind, patched)


def main() -> None:
    path, n = sys.argv[1], int(sys.argv[2])
    if len(sys.argv) > 3:
        arm(sys.argv[3], int(sys.argv[4]))
    with CacheWriter(path, make_info(), shard_positions=150, block_positions=50) as w:
        for r in range(w.progress.get("next", 0), n):
            seq, _ = make_sequence(np.random.default_rng(r), r, 300, 16)
            w.add(seq, progress={"next": r + 1})


if __name__ == "__main__":
    main()
