"""Tiny real models for tests: a BPE tokenizer trained here and a Llama-shaped teacher with random weights.

head_dim is 32 so vLLM's CPU attention accepts it; weights are scaled up so the teacher's distributions
are peaked (few near-ties), as a trained model's are.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

WORDS = ("the a cat dog sat ran on under mat tree big small red blue quickly slowly and then it was happy sad "
         "what is why how answer question one two three four five plus minus equals because so").split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% if m['role'] == 'assistant' %}</s>{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 25)))) + "." for _ in range(n)]


def build_tokenizer(out: Path, vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def build_teacher(out: Path, vocab_size: int = 512, hidden: int = 64, layers: int = 2, heads: int = 2,
                  seed: int = 0, scale: float = 25.0, max_positions: int = 256) -> Path:
    """A LlamaForCausalLM directory (safetensors + tokenizer) with peaked random-weight distributions."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    tok = build_tokenizer(out, vocab_size)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_positions,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False, torch_dtype="float32")
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    model.save_pretrained(out, safe_serialization=True)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def instruction_rows(n: int = 24, seed: int = 1) -> list[dict]:
    texts = corpus(3 * n, seed)
    return [{"instruction": texts[3 * i], "input": texts[3 * i + 1] if i % 2 else "", "output": texts[3 * i + 2]} for i in range(n)]


def cached_teacher(root: Path, records: int = 24, seed: int = 5, k: int = 8) -> tuple[Path, Path, Path, dict]:
    """A tiny teacher, instruction data, its cache made by the real `cache-teacher`, and the config of a student
    one layer deep and half as wide: what most training tests start from."""
    from click.testing import CliRunner

    from adakd import cli

    teacher = build_teacher(root / "teacher")
    data = write_jsonl(root / "d.jsonl", instruction_rows(records, seed=seed))
    cache = root / "cache"
    r = CliRunner().invoke(cli.main, ["cache-teacher", "--teacher", str(teacher), "--data", str(data), "--out", str(cache),
                                      "--top-k", str(k), "--engine", "hf", "--no-progress"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((teacher / "config.json").read_text())
    cfg.update(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=1, num_key_value_heads=1)
    return teacher, data, cache, cfg
