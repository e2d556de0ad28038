"""Fingerprints that tie a cache to its teacher, tokenizer and engine."""

from __future__ import annotations

import hashlib
import json
import os
from importlib.metadata import PackageNotFoundError, version

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


def tokenizer_fingerprint(tok) -> str:
    """The full token -> id map, the special tokens and the chat template: what decides the ids."""
    body = {
        "vocab": sorted(tok.get_vocab().items(), key=lambda kv: kv[1]),
        "special": {k: str(v) for k, v in sorted(tok.special_tokens_map.items())},
        "chat_template": getattr(tok, "chat_template", None),
    }
    return "sha256:" + hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def package_version(name: str) -> str:
    for dist in (name, f"{name}-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return "unknown"
