"""The tokenizer fingerprint: part of a cache's identity, computed the same way by both stages."""

from __future__ import annotations

import hashlib
import json


def tokenizer_fingerprint(tok) -> str:
    """The full token -> id map, the special tokens and the chat template: what decides the ids."""
    body = {
        "vocab": sorted(tok.get_vocab().items(), key=lambda kv: kv[1]),
        "special": {k: str(v) for k, v in sorted(tok.special_tokens_map.items())},
        "chat_template": getattr(tok, "chat_template", None),
    }
    return "sha256:" + hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()
