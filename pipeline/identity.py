"""Fingerprints that tie a cache to its teacher and engine (the tokenizer's is in `storage`)."""

from __future__ import annotations

import hashlib
import os
from importlib.metadata import PackageNotFoundError, version

from adakd.storage.fingerprint import tokenizer_fingerprint  # noqa: F401  (re-exported for stage one)

WEIGHT_EXTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
EDGE = 1 << 20


def teacher_fingerprint(path: str) -> str | None:
    """config.json in full, and per weight file its name, size and first and last MiB (fast on 100 GB teachers)."""
    if not os.path.isdir(path):
        return None
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name == "config.json":
            h.update(b"config\0" + open(full, "rb").read())
        elif name.endswith(WEIGHT_EXTS) and os.path.isfile(full):
            size = os.path.getsize(full)
            h.update(f"{name}\0{size}\0".encode())
            with open(full, "rb") as f:
                h.update(f.read(EDGE))
                if size > 2 * EDGE:
                    f.seek(size - EDGE)
                    h.update(f.read(EDGE))
    return "sha256:" + h.hexdigest()


def package_version(name: str) -> str:
    for dist in (name, f"{name}-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return "unknown"
