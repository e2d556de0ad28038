"""Tiny random-weight models of real Hugging Face families, all on one locally trained tokenizer.

`build(family, out)` writes a loadable Hugging Face directory (config.json, model.safetensors, tokenizer
files): hidden 64, 2 layers, intermediate 128, 128 positions, float32, head_dim 32 where the family
lets us choose, tied embeddings as each family defaults, and each family's logit post-processing switched
on (Phi's and GPT-J's lm_head bias non-zero, Gemma 2's final soft-cap, Cohere's logit_scale, Granite's and
GraniteMoE's logits_scaling and multipliers, Falcon-H1's lm_head_multiplier). A teacher's final norm is
scaled up so that its distributions are peaked (OLMo's norm has no weights: its output rows instead).
`vocab_size` wider than the tokenizer makes a padded output layer (Qwen2.5, Llama-style multiples of 64);
a padded teacher's padded rows are scaled up so that it puts real mass on them.

The families (`FAMILIES`, every one a teacher and a student): dense decoders (`DENSE`: Llama, Qwen 2/3,
Mistral, Phi 3, Phi, Gemma 1/2/3, GPT-2, OPT, GPT-NeoX, Cohere, Granite, StarCoder 2, OLMo 1/2/3, StableLM,
Falcon, BLOOM, MPT, GPT-J, GPT-BigCode, GLM, GLM-4, EXAONE 4, SmolLM 3, Nemotron, ERNIE 4.5, Hunyuan dense,
Seed-OSS), mixtures of experts (`MOE`: 4 experts of 32, top-2; Qwen2-MoE, Qwen3-MoE, Mixtral, OLMoE,
GraniteMoE, GPT-OSS, DeepSeek V2/V3, GLM-4 MoE, Llama 4's text model) and state-space models and hybrids
(`SSM`: Mamba, Mamba 2, Jamba, Zamba 2, GraniteMoE-hybrid, Falcon-H1; transformers' torch paths, no
kernels). `ROUTER_LOSS`: the MoE families whose own training adds a router load-balancing loss (their
configs here: router_aux_loss_coef 0.02). `TEACHER_ONLY`: Gemma 3's multimodal wrapper.

As a script: builds every family, loads it with AutoModelForCausalLM and generates a few tokens.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from tiny import CHAT_TEMPLATE, WORDS

# Families trained and cached; "gemma3" is the text model (Gemma3ForCausalLM), "llama4" the text model
# (Llama4ForCausalLM). Exaone 4 stands for EXAONE: the first EXAONE is remote code only, not in transformers.
DENSE = ["llama", "qwen2", "qwen3", "mistral", "phi3", "phi", "gemma2", "gemma3", "gpt2", "opt", "gpt_neox", "cohere",
         "granite", "starcoder2", "olmo", "olmo2", "olmo3", "stablelm", "falcon", "bloom", "mpt", "gptj", "gpt_bigcode",
         "gemma", "glm", "glm4", "exaone4", "smollm3", "nemotron", "ernie4_5", "hunyuan_v1_dense", "seed_oss"]
# Mixtures of experts; those marked in ROUTER_LOSS add a router load-balancing loss in their own training.
MOE = ["qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "granitemoe", "gpt_oss", "deepseek_v2", "deepseek_v3", "glm4_moe",
       "llama4"]
# State-space models and hybrids (transformers' torch paths: no mamba-ssm / causal-conv1d kernels here).
SSM = ["mamba", "mamba2", "jamba", "zamba2", "granitemoehybrid", "falcon_h1"]
FAMILIES = DENSE + MOE + SSM
# The families whose CausalLM forward adds coef * load_balancing_loss_func(router logits) with output_router_logits;
# DeepSeek V2/V3 and GLM-4 MoE balance their routers without an auxiliary loss, Llama 4's forward has none.
ROUTER_LOSS = ["qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "granitemoe", "gpt_oss", "jamba", "granitemoehybrid"]
# Gemma 3's multimodal wrapper (Gemma3ForConditionalGeneration, tiny SigLIP vision tower): a teacher only.
TEACHER_ONLY = ["gemma3_mm"]
ALL = FAMILIES + TEACHER_ONLY

VOCAB = 1000  # the shared tokenizer's size
BOS, EOS, PAD = 0, 1, 2  # its special tokens, in training order: <s>, </s>, <pad>, then <|endoftext|>
# <|endoftext|> (id 3) is there because transformers 5 loads any qwen2-type directory's tokenizer as
# Qwen2Tokenizer, whatever tokenizer_config.json says, and that class adds <|endoftext|> (its default unk) when
# the vocabulary lacks it: one token more than the model's outputs (see test_families.py, the xfail test).
SPECIALS = ["<s>", "</s>", "<pad>", "<|endoftext|>"]
HIDDEN, LAYERS, INTERMEDIATE, HEADS, HEAD_DIM, POSITIONS = 64, 2, 128, 2, 32, 128
TEACHER_SCALE = 20.0  # a teacher's final norm scaled by this: peaked distributions, as a trained model's
PAD_BOOST = 1.6  # a padded teacher's padded output rows scaled by this: the padded ids take real mass

SYLLABLES = ("ka ko ki ru ra ro mi ma mo te ta to su sa si ne na no lu li pe po be bo de da ge gu fi fa zo "
             "zu ve vi ho ha ye ya we wo qua tri str ch sh th").split()


def corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """Sentences over tiny.WORDS and the instruction template (frequent, so each becomes one or two tokens), and
    over ~600 made-up words (enough merges for a 1,000-token BPE)."""
    rng = np.random.default_rng(seed)
    made_up = sorted({"".join(rng.choice(SYLLABLES, size=int(rng.integers(2, 5)))) for _ in range(700)})
    template = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n### Instruction:\n\n### Input:\n\n"
                "### Response:\n<|user|> <|assistant|> <|system|>")
    lines = [template] * 200
    for words in (list(WORDS), made_up):
        for _ in range(n):
            lines.append(" ".join(rng.choice(words, size=int(rng.integers(4, 20)))) + str(rng.choice([".", "?", "!", ","])))
    return lines


def build_tokenizer(out: Path, vocab_size: int = VOCAB):
    """A byte-level BPE of exactly `vocab_size` tokens (ids 0..3: SPECIALS), with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out = Path(out)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    assert len(fast) == vocab_size, f"the BPE has {len(fast)} tokens, not {vocab_size}"
    assert (fast.bos_token_id, fast.eos_token_id, fast.pad_token_id) == (BOS, EOS, PAD)
    fast.save_pretrained(out)
    return fast


def config(family: str, vocab_size: int = VOCAB):
    """The tiny config of a family, logit post-processing switched on, special ids those of the shared tokenizer."""
    import transformers as tf

    ids = dict(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    common = dict(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, max_position_embeddings=POSITIONS, **ids)
    if family == "llama":
        return tf.LlamaConfig(**common, num_key_value_heads=1)  # grouped-query attention
    if family == "qwen2":
        return tf.Qwen2Config(**common, num_key_value_heads=1)
    if family == "qwen3":
        return tf.Qwen3Config(**common, num_key_value_heads=1, head_dim=HEAD_DIM)
    if family == "mistral":
        return tf.MistralConfig(**common, num_key_value_heads=1, head_dim=HEAD_DIM, sliding_window=48)
    if family == "phi3":
        return tf.Phi3Config(**common, num_key_value_heads=HEADS, original_max_position_embeddings=POSITIONS)
    if family == "phi":  # lm_head has a bias (made non-zero in `build`), partial rotary
        return tf.PhiConfig(**common, partial_rotary_factor=0.5)
    if family == "gemma2":  # final tanh soft-cap; attention soft-cap as default (50)
        return tf.Gemma2Config(**common, num_key_value_heads=1, head_dim=HEAD_DIM, final_logit_softcapping=30.0,
                               query_pre_attn_scalar=HEAD_DIM, sliding_window=48)
    if family in ("gemma3", "gemma3_mm"):
        text = tf.Gemma3TextConfig(**common, num_key_value_heads=1, head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM,
                                   sliding_window=48, layer_types=["sliding_attention", "full_attention"])
        if family == "gemma3":
            return text
        vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=28, patch_size=14)
        return tf.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                               **ids)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=vocab_size, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=INTERMEDIATE,
                             n_positions=POSITIONS, **ids)
    if family == "opt":
        return tf.OPTConfig(vocab_size=vocab_size, hidden_size=HIDDEN, num_hidden_layers=LAYERS, ffn_dim=INTERMEDIATE,
                            num_attention_heads=HEADS, max_position_embeddings=POSITIONS, word_embed_proj_dim=HIDDEN,
                            **ids)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(**common)
    if family == "cohere":  # logits multiplied by logit_scale
        return tf.CohereConfig(**common, num_key_value_heads=1, logit_scale=0.25)
    if family == "granite":  # logits divided by logits_scaling; non-default multipliers
        return tf.GraniteConfig(**common, num_key_value_heads=1, logits_scaling=4.0, embedding_multiplier=6.0,
                                residual_multiplier=0.5, attention_multiplier=0.05)
    moe = dict(num_experts_per_tok=2, router_aux_loss_coef=0.02)  # few small experts, top-2, a visible router loss
    kv1 = dict(num_key_value_heads=1)
    if family == "starcoder2":  # biases everywhere (use_bias), sliding window
        return tf.Starcoder2Config(**common, **kv1, sliding_window=48)
    if family == "olmo":  # a LayerNorm without weights; clipped q/k/v
        return tf.OlmoConfig(**common, **kv1, clip_qkv=8.0)
    if family == "olmo2":
        return tf.Olmo2Config(**common, **kv1)
    if family == "olmo3":
        return tf.Olmo3Config(**common, **kv1, sliding_window=48, layer_types=["sliding_attention", "full_attention"])
    if family == "stablelm":  # partial rotary, q/k layer norms, q/k/v biases
        return tf.StableLmConfig(**common, **kv1, qk_layernorm=True, use_qkv_bias=True)
    if family == "falcon":  # Falcon 40B/180B's decoder: grouped kv heads, two layer norms in parallel, rotary
        return tf.FalconConfig(vocab_size=vocab_size, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                               num_kv_heads=1, new_decoder_architecture=True, ffn_hidden_size=INTERMEDIATE,
                               max_position_embeddings=POSITIONS, **ids)
    if family == "bloom":  # ALiBi positions
        return tf.BloomConfig(vocab_size=vocab_size, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS, **ids)
    if family == "mpt":  # ALiBi
        return tf.MptConfig(vocab_size=vocab_size, d_model=HIDDEN, n_heads=HEADS, n_layers=LAYERS, expansion_ratio=2,
                            max_seq_len=POSITIONS, **ids)
    if family == "gptj":  # lm_head has a bias (made non-zero in `build`), partial rotary
        return tf.GPTJConfig(vocab_size=vocab_size, n_positions=POSITIONS, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                             rotary_dim=16, n_inner=INTERMEDIATE, **ids)
    if family == "gpt_bigcode":  # multi-query attention
        return tf.GPTBigCodeConfig(vocab_size=vocab_size, n_positions=POSITIONS, n_embd=HIDDEN, n_layer=LAYERS,
                                   n_head=HEADS, n_inner=INTERMEDIATE, **ids)
    if family == "gemma":  # embeddings scaled by sqrt(hidden), RMSNorm of (1 + weight)
        return tf.GemmaConfig(**common, **kv1, head_dim=HEAD_DIM)
    if family == "glm":
        return tf.GlmConfig(**common, **kv1, head_dim=HEAD_DIM)
    if family == "glm4":
        return tf.Glm4Config(**common, **kv1, head_dim=HEAD_DIM)
    if family == "exaone4":
        return tf.Exaone4Config(**common, **kv1, sliding_window=48, layer_types=["sliding_attention", "full_attention"])
    if family == "smollm3":  # a layer without rotary positions
        return tf.SmolLM3Config(**common, **kv1, no_rope_layers=[1, 0], layer_types=["full_attention"] * LAYERS)
    if family == "nemotron":  # LayerNorm of (1 + weight), squared ReLU
        return tf.NemotronConfig(**common, **kv1, head_dim=HEAD_DIM)
    if family == "ernie4_5":
        return tf.Ernie4_5Config(**common, **kv1, head_dim=HEAD_DIM)
    if family == "hunyuan_v1_dense":  # q/k norms
        return tf.HunYuanDenseV1Config(**common, **kv1, head_dim=HEAD_DIM)
    if family == "seed_oss":  # q/k/v biases
        return tf.SeedOssConfig(**common, **kv1, head_dim=HEAD_DIM)
    # mixtures of experts: 4 experts of 32, top-2; a shared expert and dense first layers where the family has them
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(**common, **kv1, **moe, num_experts=4, moe_intermediate_size=32,
                                 shared_expert_intermediate_size=64)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(**common, **kv1, **moe, num_experts=4, moe_intermediate_size=32)
    if family == "mixtral":
        return tf.MixtralConfig(**common, **kv1, **moe, head_dim=HEAD_DIM, num_local_experts=4)
    if family == "olmoe":
        return tf.OlmoeConfig(**common, **kv1, **moe, num_experts=4)
    if family == "granitemoe":  # Granite's logits_scaling and multipliers
        return tf.GraniteMoeConfig(**common, **kv1, **moe, num_local_experts=4, logits_scaling=4.0,
                                   embedding_multiplier=6.0, residual_multiplier=0.5, attention_multiplier=0.05)
    if family == "gpt_oss":  # attention sinks, sliding window; no router loss of its own in the sinks
        return tf.GptOssConfig(**common, **kv1, **moe, head_dim=HEAD_DIM, num_local_experts=4, sliding_window=48,
                               layer_types=["sliding_attention", "full_attention"])
    if family in ("deepseek_v2", "deepseek_v3", "glm4_moe"):  # routers balanced without an auxiliary loss
        shape = dict(n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32,
                     first_k_dense_replace=1)
        if family == "glm4_moe":
            return tf.Glm4MoeConfig(**common, **kv1, **shape, head_dim=HEAD_DIM, n_group=1, topk_group=1)
        mla = dict(kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=HEAD_DIM)
        if family == "deepseek_v2":
            return tf.DeepseekV2Config(**common, num_key_value_heads=HEADS, **shape, **mla)
        return tf.DeepseekV3Config(**common, num_key_value_heads=HEADS, **shape, **mla, n_group=1, topk_group=1)
    if family == "llama4":  # the text model (Llama4ForCausalLM): an MoE layer, a layer without rotary, chunked attention
        # at the family's chunk (8192 tokens, beyond these models' 128 positions and the packed rows' 1024 tokens)
        return tf.Llama4TextConfig(**common, **kv1, **moe, head_dim=HEAD_DIM, intermediate_size_mlp=INTERMEDIATE,
                                   num_local_experts=4, moe_layers=[1], no_rope_layers=[1, 0],
                                   layer_types=["chunked_attention", "full_attention"])
    # state-space models and hybrids (no CUDA kernels here: transformers' torch paths)
    ssm = dict(vocab_size=vocab_size, hidden_size=HIDDEN, num_hidden_layers=LAYERS, **ids)
    if family == "mamba":
        return tf.MambaConfig(**ssm, state_size=8, expand=2, conv_kernel=4, time_step_rank=8)
    if family == "mamba2":
        return tf.Mamba2Config(**ssm, num_heads=4, head_dim=HEAD_DIM, state_size=16, n_groups=1, expand=2, chunk_size=32)
    if family == "jamba":  # attention then Mamba + MoE
        # initializer_range 0.1: at 0.02 this init's Mamba layer moves the logits by ~1e-3, so little that the state
        # it carries across packed sequences is at the edge of what packing_error can see
        return tf.JambaConfig(**ssm, intermediate_size=INTERMEDIATE, num_attention_heads=HEADS, **kv1, **moe,
                              num_experts=4, expert_layer_period=2, expert_layer_offset=1, attn_layer_period=2,
                              attn_layer_offset=0, mamba_d_state=8, mamba_dt_rank=8, use_mamba_kernels=False,
                              max_position_embeddings=POSITIONS, initializer_range=0.1)
    if family == "zamba2":  # Mamba 2, then a hybrid layer with the shared attention block
        return tf.Zamba2Config(**ssm, layers_block_type=["mamba", "hybrid"], intermediate_size=INTERMEDIATE,
                               num_attention_heads=HEADS, num_key_value_heads=HEADS, mamba_d_state=16, n_mamba_heads=4,
                               mamba_ngroups=1, chunk_size=32, use_mamba_kernels=False, max_position_embeddings=POSITIONS)
    if family == "granitemoehybrid":  # Mamba 2 and attention layers, MoE, Granite's multipliers and logits_scaling
        return tf.GraniteMoeHybridConfig(**common, **kv1, **moe, num_local_experts=4, shared_intermediate_size=64,
                                         layer_types=["mamba", "attention"], mamba_n_heads=4, mamba_d_head=HEAD_DIM,
                                         mamba_d_state=16, mamba_chunk_size=32, logits_scaling=4.0,
                                         embedding_multiplier=6.0, residual_multiplier=0.5, attention_multiplier=0.05)
    if family == "falcon_h1":  # attention and Mamba 2 side by side; logits multiplied by lm_head_multiplier.
        # mamba_rms_norm (the gated-RMSNorm variant) keeps the SSM's output at a trained model's scale: without it this
        # init's SSM adds ~1e-4 to the logits, too little for packing_error to see the state carried across sequences
        return tf.FalconH1Config(**common, **kv1, mamba_d_ssm=128, mamba_n_heads=4, mamba_d_head=HEAD_DIM,
                                 mamba_d_state=16, mamba_chunk_size=32, mamba_rms_norm=True, lm_head_multiplier=0.25)
    raise ValueError(f"unknown family {family!r}; known: {ALL}")


def build(family: str, out: Path, vocab_size: int | None = None, tokenizer_dir: Path | None = None,
          role: str = "teacher", seed: int = 0) -> Path:
    """Write a Hugging Face directory of `family` with random weights (seeded) and the shared tokenizer.

    vocab_size: the logit width (default: the tokenizer's size); wider is a padded output layer.
    tokenizer_dir: the shared tokenizer (built into `out` when not given). role "teacher": the output rows
    scaled up (peaked distributions, padded rows more so); "student": the plain initialisation.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if role not in ("teacher", "student"):
        raise ValueError(f"role must be teacher or student, not {role!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        real = len(build_tokenizer(out))
    else:  # its size read from its own directory: in a qwen2 one, transformers would load another class
        real = len(AutoTokenizer.from_pretrained(tokenizer_dir))
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file():
                shutil.copy(f, out / f.name)
    width = vocab_size or real
    if width < 1:
        raise ValueError(f"vocab_size must be positive, not {width}")
    cfg = config(family, width)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    head = model.get_output_embeddings()
    with torch.no_grad():
        if role == "teacher":
            # Granite divides its logits by logits_scaling (4), Falcon-H1 multiplies them by lm_head_multiplier (0.25):
            # compensated, or their teachers would be near-uniform
            text = cfg.get_text_config()
            _scale_final_norm(model, TEACHER_SCALE * (getattr(text, "logits_scaling", None) or 1.0)
                              / (getattr(text, "lm_head_multiplier", None) or 1.0))
            if width > real:
                head.weight[real:].mul_(PAD_BOOST)
        if getattr(head, "bias", None) is not None:  # Phi: a bias the head must add
            head.bias.copy_(torch.randn_like(head.bias) * 0.5)
    model.generation_config.pad_token_id = PAD
    model.save_pretrained(out, safe_serialization=True)
    return out


def _scale_final_norm(model, s: float) -> None:
    """Multiply the output of the norm before the output layer by s: the logits (less any bias) scale by s.

    The norm rather than the output rows, so that tied input embeddings stay as initialised; a norm without
    weights (OLMo's) leaves the output rows to scale (untied in that family)."""
    import torch

    base = getattr(model, model.base_model_prefix, None)
    if not isinstance(base, torch.nn.Module):  # Llama 4's text model: base_model_prefix names no module; it is `model`
        base = model.model
    base = getattr(base, "language_model", base)  # Gemma 3's multimodal wrapper
    base = getattr(base, "decoder", base)  # OPT
    for name in ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f"):
        norm = getattr(base, name, None)
        if norm is not None:
            break
    else:
        raise ValueError(f"{type(model).__name__}: no final norm found")
    weight = getattr(norm, "weight", None)
    if weight is None:  # OLMo's LayerNorm has no parameters: the output rows instead
        head = model.get_output_embeddings()
        if model.config.get_text_config().tie_word_embeddings:
            raise ValueError(f"{type(model).__name__}: a final norm without weights and tied embeddings")
        head.weight.mul_(s)
        return
    if type(norm).__name__.startswith("Gemma") or type(norm).__name__.endswith("1P"):  # scale (1 + weight): Gemma, Nemotron
        weight.copy_((1 + weight) * s - 1)
    else:
        weight.mul_(s)
    if getattr(norm, "bias", None) is not None:
        norm.bias.mul_(s)


def _sanity(root: Path) -> None:
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok_dir = root / "tokenizer"
    tok = build_tokenizer(tok_dir)
    print(f"tokenizer: {len(tok)} tokens; 'the cat sat' -> {tok('the cat sat')['input_ids']}")
    for family in ALL:
        t0 = time.perf_counter()
        d = build(family, root / family, tokenizer_dir=tok_dir)
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        tk = AutoTokenizer.from_pretrained(d)
        # Falcon-H1: one prompt at a time (transformers 5.19 fails on a left-padded batch; test_families.py, xfail)
        prompts = [["the cat sat on the mat"], ["a dog"]] if family == "falcon_h1" else [["the cat sat on the mat", "a dog"]]
        gen = []
        for batch in prompts:
            enc = tk(batch, return_tensors="pt", padding=True, padding_side="left")
            gen += model.generate(**enc, max_new_tokens=5, do_sample=False)[:, enc["input_ids"].shape[1]:].tolist()
        head = model.get_output_embeddings()
        params = sum(p.numel() for p in model.parameters())
        print(f"{family:10s} {type(model).__name__:34s} params {params:>8,}  tied {model.config.get_text_config().tie_word_embeddings!s:5s}  "
              f"bias {head.bias is not None!s:5s}  generated {gen}  "
              f"{time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    import sys
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    with tempfile.TemporaryDirectory() as d:
        _sanity(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(d))
