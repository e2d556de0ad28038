"""An architecture matrix through the real CLI, on tiny random-weight models of real families (tests/families.py).

1. The output head (`trainer.head`) reproduces every family's own logits (bias, logit scale/scaling, final
   soft-cap, Gemma 3's multimodal wrapper) on a padded batch; a forward that post-processes its logits in a
   way the head does not know is refused by name.
2. Every family is a teacher once and a student once: `cache-teacher --engine hf`, `train-student`,
   `adakd eval --cache` and `adakd eval --data`, in-process through click's CliRunner.
3. Padded output layers: teacher logits wider than the shared 1,000-token tokenizer (1024, 1056), students
   wider, exact, or narrower (refused before training, naming the missing ids); padded ids never stored,
   their mass in the tail.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from families import ALL, BOS, EOS, FAMILIES, PAD, VOCAB, build, build_tokenizer
from tiny import instruction_rows, write_jsonl

import cli
from storage import CacheReader
from trainer.head import HeadError, check_head, final_hidden, output_head

K = 16
MAX_LENGTH = 96
RECORDS = 12


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    """zoo(family, role="teacher", vocab=None, seed=0) -> a model directory, built once per session."""
    root = tmp_path_factory.mktemp("families")
    tok = root / "tokenizer"
    build_tokenizer(tok)
    made: dict[tuple, Path] = {}

    def get(family: str, role: str = "teacher", vocab: int | None = None, seed: int = 0) -> Path:
        key = (family, role, vocab or VOCAB, seed)
        if key not in made:
            made[key] = build(family, root / f"{family}-{role}-{key[2]}-{seed}", vocab, tok, role, seed)
        return made[key]

    get.root = root
    return get


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("family-data")
    rows = instruction_rows(RECORDS, seed=5)
    train = write_jsonl(root / "train.jsonl", rows)
    prompts = write_jsonl(root / "prompts.jsonl", [
        {"prompt": f"Below is an instruction.\n\n### Instruction:\n{r['instruction']}\n\n### Response:\n",
         "output": r["output"]} for r in rows[:4]
    ])
    chat = write_jsonl(root / "chat.jsonl", [
        {"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]},
                      {"role": "user", "content": "and then?"}, {"role": "assistant", "content": r["input"] or "so it was."}]}
        for r in rows
    ])
    return {"train": train, "prompts": prompts, "chat": chat}


def invoke(*args):
    """The real CLI, in-process."""
    return CliRunner().invoke(cli.main, [str(a) for a in args])


def ok(r, what: str):
    """r, or a failure with the command's output and, for an uncaught exception, its traceback."""
    if r.exit_code != 0:
        import traceback

        crashed = r.exception is not None and not isinstance(r.exception, SystemExit)
        tb = "".join(traceback.format_exception(*r.exc_info)) if crashed else ""
        pytest.fail(f"{what}: exit {r.exit_code}\n{r.output[-4000:]}\n{tb[-6000:]}")
    return r


@pytest.fixture(scope="session")
def caches(zoo, data, tmp_path_factory):
    """caches(teacher, vocab=None, records="train"|"chat") -> a cache of the teacher over those records, made once."""
    root = tmp_path_factory.mktemp("family-caches")
    made: dict[tuple, Path] = {}

    def get(teacher: str, vocab: int | None = None, records: str = "train") -> Path:
        key = (teacher, vocab or VOCAB, records)
        if key not in made:
            out = root / f"{teacher}-{key[1]}-{records}"
            ok(invoke("cache-teacher", "--teacher", zoo(teacher, "teacher", vocab), "--data", data[records],
                      "--out", out, "--top-k", K, "--engine", "hf", "--max-length", MAX_LENGTH, "--no-progress"),
               f"cache-teacher {teacher} (vocab {key[1]})")
            made[key] = out
        return made[key]

    return get


def last_json(r) -> dict:
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    assert lines, r.output
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------- 1. the head

# What each family's head must carry: (has a bias, scale, soft-cap); the others: (False, 1.0, None).
POST = {"phi": (True, 1.0, None), "gemma2": (False, 1.0, 30.0), "cohere": (False, 0.25, None),
        "granite": (False, 0.25, None)}


def padded_batch(vocab: int = VOCAB) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, vocab, (2, 14), generator=g)
    mask = torch.ones_like(ids)
    ids[1, 8:] = PAD  # right-padded, as train-student's batches are
    mask[1, 8:] = 0
    return ids, mask


def load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", ALL)
def test_head_reproduces_the_family_logits(zoo, family):
    model = load(zoo(family))
    text = model.config.get_text_config()
    assert (text.bos_token_id, text.eos_token_id, text.pad_token_id) == (BOS, EOS, PAD)
    assert text.vocab_size == model.get_output_embeddings().weight.shape[0] == VOCAB
    head = check_head(model)
    bias, scale, softcap = POST.get(family, (False, 1.0, None))
    assert (head.bias is not None) == bias and head.scale == scale and head.softcap == softcap
    if bias:
        assert head.bias.abs().max() > 0.1  # a non-zero bias: the head really has to add it
    ids, mask = padded_batch()
    with torch.no_grad():
        h = final_hidden(model, ids, mask)
        ours = output_head(model).logits(h)
        theirs = model(input_ids=ids, attention_mask=mask).logits.float()
        plain = h @ head.weight.t()
    assert ours.shape == theirs.shape == (2, 14, VOCAB)
    keep = mask.bool()
    assert torch.isfinite(theirs[keep]).all()
    scale_of = max(1.0, theirs[keep].abs().max().item())
    err = (ours[keep] - theirs[keep]).abs().max().item()
    tol = 1e-5 * scale_of
    assert err <= tol, f"{family}: head differs from the forward by {err:.3g} (logits up to {scale_of:.3g})"
    if family in POST:  # the post-processing is really on: without it the logits differ far beyond the tolerance
        assert (plain[keep] - theirs[keep]).abs().max().item() > 100 * tol


def _doubled():
    """A Llama whose forward doubles its logits, with no config field saying so; registered as a model type."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if getattr(_doubled, "cls", None) is not None:
        return _doubled.cls

    class DoubledLlamaConfig(LlamaConfig):
        model_type = "adakd_test_doubled_llama"

    class DoubledLlama(LlamaForCausalLM):
        config_class = DoubledLlamaConfig

        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    AutoConfig.register(DoubledLlamaConfig.model_type, DoubledLlamaConfig)
    AutoModelForCausalLM.register(DoubledLlamaConfig, DoubledLlama)
    _doubled.cls = DoubledLlama
    return DoubledLlama


def test_head_refuses_an_unknown_post_processing(zoo):
    cls = _doubled()
    cfg = json.loads((zoo("llama") / "config.json").read_text())
    cfg["model_type"] = "adakd_test_doubled_llama"
    from transformers import AutoConfig

    torch.manual_seed(0)
    model = cls(AutoConfig.for_model(**cfg)).eval()
    with pytest.raises(HeadError, match="DoubledLlama"):
        check_head(model)


def test_cli_refuses_an_unknown_post_processing_before_training(zoo, caches, tmp_path):
    _doubled()
    cfg = json.loads((zoo("llama", "student") / "config.json").read_text())
    cfg["model_type"] = "adakd_test_doubled_llama"
    student = tmp_path / "doubled.json"
    student.write_text(json.dumps(cfg))
    out = tmp_path / "run"
    r = invoke("train-student", "--cache", caches("llama"), "--student", student, "--out", out, "--max-steps", 3,
               "--batch-tokens", 512, "--no-progress")
    assert r.exit_code == 1, r.output
    assert "DoubledLlama" in r.output and "not supported" in r.output
    assert not (out / "train_log.jsonl").exists() and not (out / "checkpoints").exists()


# ---------------------------------------------------------------------------------------- 2. the matrix

# Each family a teacher once and a student once (a rotation); one student is a pretrained directory
# (Phi, whose lm_head bias is then non-zero from the start); Gemma 3's multimodal wrapper as a teacher.
PRETRAINED = {("phi3", "phi")}
PAIRS = [(t, FAMILIES[(i + 1) % len(FAMILIES)]) for i, t in enumerate(FAMILIES)] + [("gemma3_mm", "llama")]


def student_spec(zoo, family: str, vocab: int | None = None, pretrained: bool = False) -> Path:
    d = zoo(family, "student", vocab, seed=1)
    return d if pretrained else d / "config.json"


def train_and_eval(cache: Path, student: Path, out: Path, prompts: Path, family: str, outputs: int) -> dict:
    r = ok(invoke("train-student", "--cache", cache, "--student", student, "--out", out, "--max-steps", 3,
                  "--batch-tokens", 512, "--no-progress"), f"train-student {family}")
    assert "trained 3/3 steps" in r.output
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [1, 2, 3] and all(math.isfinite(x["loss"]) for x in rows)
    final = out / "final"
    saved = json.loads((final / "config.json").read_text())
    assert saved["model_type"] == json.loads(((student / "config.json") if student.is_dir() else student).read_text())["model_type"]
    assert load(final).get_output_embeddings().weight.shape[0] == outputs
    r = ok(invoke("eval", "--model", final, "--cache", cache), f"eval --cache {family}")
    c = last_json(r)["cache"]
    assert c["positions"] > 0 and math.isfinite(c["nll"]) and math.isfinite(c["kl"]) and c["kl"] >= -1e-3
    r = ok(invoke("eval", "--model", final, "--data", prompts, "--limit", 2, "--max-new-tokens", 4), f"eval --data {family}")
    g = last_json(r)["generation"]
    assert g["n"] == 2 and math.isfinite(g["rougeL"])
    gens = [json.loads(line) for line in (final / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 2
    return {"nll": c["nll"], "kl": c["kl"], "rougeL": g["rougeL"]}


@pytest.mark.slow
@pytest.mark.parametrize("teacher,student", PAIRS, ids=[f"{t}->{s}" for t, s in PAIRS])
def test_matrix_teacher_to_student(zoo, caches, data, tmp_path, teacher, student):
    cache = caches(teacher)
    check_cache_against_teacher(cache, zoo(teacher), VOCAB)
    pretrained = (teacher, student) in PRETRAINED
    train_and_eval(cache, student_spec(zoo, student, pretrained=pretrained), tmp_path / "run", data["prompts"], student,
                   VOCAB)


def test_chat_records_through_a_family(zoo, caches, data, tmp_path):
    """Chat data (the shared tokenizer's template): assistant turns trained, through Gemma 3 -> Qwen 3."""
    cache = caches("gemma3", records="chat")
    seqs = list(CacheReader(str(cache)).stream())
    assert len(seqs) == RECORDS and all(0 < s.num_positions < len(s.input_ids) - 1 for s in seqs)
    train_and_eval(cache, student_spec(zoo, "qwen3"), tmp_path / "run", data["prompts"], "qwen3", VOCAB)


# ------------------------------------------------------------------------------------ 3. padded widths


def check_cache_against_teacher(cache: Path, teacher: Path, width: int, sequences: int = 2) -> float:
    """The cached targets of the first sequences against a direct full-width log_softmax of the teacher on each:
    the top-k of the real ids (never a padded one), their log-probabilities, the actual token's, and the tail
    (everything outside the stored ids, the padded ids' mass included). Returns the mean padded mass."""
    reader = CacheReader(str(cache))
    assert reader.info.vocab_size == width and reader.info.tokenizer["vocab_size"] == VOCAB and reader.info.k == K
    seqs = list(reader.stream())
    assert len(seqs) == RECORDS
    assert max(int(s.topk_ids.max()) for s in seqs) < VOCAB  # never a padded id, in the whole cache
    model = load(teacher)
    padded_mass = []
    for s in seqs[:sequences]:
        with torch.no_grad():
            logits = model(input_ids=torch.from_numpy(s.input_ids.astype(np.int64))[None]).logits[0]
        lp = logits.float().log_softmax(-1)[torch.from_numpy(s.positions)].double().numpy()  # (n, width)
        stored = np.take_along_axis(lp, s.topk_ids.astype(np.int64), 1)
        np.testing.assert_allclose(s.topk_logprobs, stored, atol=1 / 64 + 1e-4)  # quantized to 1/32 nat
        best = -np.sort(-lp[:, :VOCAB], 1)[:, :K]
        np.testing.assert_allclose(stored, best, atol=1e-4)  # the top-k of the real ids, in order (ties aside)
        np.testing.assert_allclose(s.target_logprob, lp[np.arange(len(lp)), s.labels], atol=1 / 512 + 1e-4)
        p = np.exp(lp)
        padded = p[:, VOCAB:].sum(1)
        tail = 1.0 - np.exp(stored).sum(1)  # the rest of the real ids + all the padded ids
        assert np.all(tail >= padded - 1e-6)
        np.testing.assert_allclose(np.exp(s.tail_logmass.astype(np.float64)), tail, rtol=1 / 128, atol=1e-4)
        padded_mass.append(padded.mean())
    return float(np.mean(padded_mass))


@pytest.mark.parametrize("teacher,width", [("llama", 1024), ("qwen2", 1056)])
def test_padded_teacher_cache_holds_real_ids_and_padded_mass_in_the_tail(zoo, caches, teacher, width):
    padded = check_cache_against_teacher(caches(teacher, width), zoo(teacher, "teacher", width), width, sequences=4)
    assert padded > 0.05  # the teacher really puts mass on its padded ids, and the cache has it in the tail


PADDED = [("llama", 1024, "qwen2", 1056), ("qwen2", 1056, "llama", 1024), ("qwen2", 1056, "mistral", 1000)]


@pytest.mark.slow
@pytest.mark.parametrize("teacher,tw,student,sw", PADDED, ids=[f"{t}{tw}->{s}{sw}" for t, tw, s, sw in PADDED])
def test_padded_widths_train_and_evaluate(zoo, caches, data, tmp_path, teacher, tw, student, sw):
    train_and_eval(caches(teacher, tw), student_spec(zoo, student, sw), tmp_path / "run", data["prompts"], student, sw)


@pytest.mark.parametrize("pretrained", [False, True], ids=["config", "pretrained"])
def test_student_narrower_than_the_tokenizer_is_refused_before_training(zoo, caches, tmp_path, pretrained):
    out = tmp_path / "run"
    r = invoke("train-student", "--cache", caches("qwen2", 1056), "--student",
               student_spec(zoo, "llama", 990, pretrained=pretrained), "--out", out, "--max-steps", 3,
               "--batch-tokens", 512, "--no-progress")
    assert r.exit_code == 1, r.output
    assert "990 outputs" in r.output and "ids 990..999" in r.output, r.output
    assert not (out / "train_log.jsonl").exists() and not (out / "checkpoints").exists() and not (out / "final").exists()


# ------------------------------------------------------------- 4. a known problem (transformers 5, qwen2)

QWEN2_TOKENIZER = (
    "transformers 5 loads the tokenizer of any directory whose config says model_type qwen2 as Qwen2Tokenizer, "
    "whatever its tokenizer_config.json says (qwen2 is in MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS); that class "
    "adds <|endoftext|> (its default unk) when the vocabulary lacks it, one id more than the model's outputs, and "
    "swaps in Qwen's normalizer and pre-tokenizer. adakd loads directories with plain AutoTokenizer.from_pretrained "
    "(pipeline/capture.load_tokenizer, trainer/student.student_tokenizer, trainer/evaluate.evaluate_generation)"
)


@pytest.mark.xfail(strict=True, reason=QWEN2_TOKENIZER)
@pytest.mark.parametrize("role", ["teacher", "student"])
def test_qwen2_model_with_a_tokenizer_without_endoftext(tmp_path, role):
    """A qwen2-architecture teacher or student that carries another tokenizer (no <|endoftext|>)."""
    from tiny import build_tokenizer as plain_tokenizer
    from tiny import corpus

    tok = tmp_path / "tok"
    n = len(plain_tokenizer(tok, 400))
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in corpus(8, seed=3)])
    teacher = build("qwen2" if role == "teacher" else "llama", tmp_path / "teacher", None, tok, "teacher")
    assert json.loads((teacher / "config.json").read_text())["vocab_size"] == n
    cache = tmp_path / "cache"
    ok(invoke("cache-teacher", "--teacher", teacher, "--data", data, "--out", cache, "--top-k", 8, "--engine", "hf",
              "--max-length", 64, "--no-progress"), f"cache-teacher ({role} qwen2)")
    student = build("qwen2" if role == "student" else "llama", tmp_path / "student", None, tok, "student") / "config.json"
    ok(invoke("train-student", "--cache", cache, "--student", student, "--out", tmp_path / "run", "--max-steps", 2,
              "--batch-tokens", 512, "--no-progress"), "train-student")
    ok(invoke("eval", "--model", tmp_path / "run" / "final", "--cache", cache), "eval --cache")
