"""Chat records masked with real chat templates (tests/data/chat_templates, verbatim from the model repositories),
and chat records in `adakd eval --data`.

The tokenizer is a byte-level BPE trained here; every template's markers are single special tokens and bos/eos
are set as each model's tokenizer_config.json sets them, so the masks are checked token by token.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from tiny import build_teacher, corpus, write_jsonl

from adakd import cli
from adakd.common.data import DataError, Record
from adakd.common.tokens import RecordTokenizer

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|end_of_text|>",
            "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<bos>", "<eos>", "<pad>", "<start_of_turn>",
            "<end_of_turn>", "<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
CONFIGS = {  # special tokens as in each model's tokenizer_config.json
    "qwen2.5-instruct": dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
    "qwen3": dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
    "llama-3-instruct": dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"),
    "mistral-v0.3": dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>"),
    "gemma-2-it": dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"),
}
SYSTEM = {"role": "system", "content": "the cat sat on the mat"}
CHAT = [{"role": "user", "content": "what is two plus two"}, {"role": "assistant", "content": "four"},
        {"role": "user", "content": "and three plus two"}, {"role": "assistant", "content": "five quickly"}]


@pytest.fixture(scope="module")
def bpe() -> str:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in ("<think>", "</think>")])  # as Qwen3's
    return tok.to_str()


@pytest.fixture(scope="module")
def make(bpe):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    def make(name: str):
        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(bpe), **CONFIGS[name])
        tok.chat_template = (TEMPLATES / f"{name}.jinja").read_text()
        return tok
    return make


def runs(tok, msgs: list[dict], index: int = 0) -> list[str]:
    """The trained tokens, decoded run by run; checks what must hold for every template on the way."""
    t = RecordTokenizer(tok, max_length=4096)(Record(index, "chat", messages=msgs))
    ids, mask = t.input_ids.tolist(), t.loss_mask.tolist()
    last = max(j for j, m in enumerate(msgs) if m["role"] == "assistant")
    full = tok.apply_chat_template(msgs[: last + 1], tokenize=False)
    assert ids == tok(full, add_special_tokens=False)["input_ids"]  # the rendering as it is: no EOS appended
    assert not mask[0]
    out, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            out.append(cur)
            cur = []
    out += [cur] if cur else []
    return [tok.decode(r, skip_special_tokens=False, clean_up_tokenization_spaces=False) for r in out]


def test_chatml_qwen25(make):
    tok = make("qwen2.5-instruct")
    assert runs(tok, [SYSTEM, *CHAT]) == ["four<|im_end|>", "five quickly<|im_end|>"]
    assert runs(tok, CHAT) == ["four<|im_end|>", "five quickly<|im_end|>"]  # the template's default system prompt


def test_nothing_after_the_last_end_of_turn_is_trained(make):
    tok = make("qwen2.5-instruct")
    msgs = [SYSTEM, *CHAT, {"role": "user", "content": "and then"}]  # a trailing user turn is not part of the sequence
    t = RecordTokenizer(tok, max_length=4096)(Record(0, "chat", messages=msgs))
    ids, mask = t.input_ids.tolist(), t.loss_mask.tolist()
    end = tok.convert_tokens_to_ids("<|im_end|>")
    last = len(ids) - 1 - ids[::-1].index(end)
    assert mask[last] and not any(mask[last + 1:]) and tok.decode(ids[last + 1:]) == "\n"
    assert tok.eos_token_id == end and ids.count(end) == 5  # system, 2 user, 2 assistant turns: nothing appended


def test_llama3(make):
    tok = make("llama-3-instruct")
    assert runs(tok, [SYSTEM, *CHAT]) == ["four<|eot_id|>", "five quickly<|eot_id|>"]
    t = RecordTokenizer(tok, max_length=4096)(Record(0, "chat", messages=CHAT))
    assert t.input_ids[0] == tok.bos_token_id and t.input_ids.tolist().count(tok.bos_token_id) == 1
    assert t.input_ids[-1] == tok.convert_tokens_to_ids("<|eot_id|>") and tok.eos_token_id not in t.input_ids


def test_mistral_v03_with_a_system_message(make):
    """v0.3 writes the system prompt into the last user turn of a prompt, so no rendering of the conversation
    extends the rendering of its prefixes; ` four</s>`: the template's space merges into the first word."""
    tok = make("mistral-v0.3")
    assert runs(tok, [SYSTEM, *CHAT]) == [" four</s>", " five quickly</s>"]
    assert runs(tok, CHAT) == [" four</s>", " five quickly</s>"]


def test_gemma(make):
    assert runs(make("gemma-2-it"), CHAT) == ["four<end_of_turn>", "five quickly<end_of_turn>"]


@pytest.mark.parametrize("msgs,words", [
    ([SYSTEM, *CHAT], ["row 8:", "System role not supported", "this template does not accept a system message: "
                       "fold it into the first user message or drop it"]),
    ([CHAT[0], CHAT[2], CHAT[1]], ["row 8:", "Conversation roles must alternate", "merge consecutive messages"]),
])
def test_gemma_refusals_are_data_errors(make, msgs, words):
    with pytest.raises(DataError) as e:
        RecordTokenizer(make("gemma-2-it"), max_length=4096)(Record(7, "chat", messages=msgs))
    for w in words:
        assert w in str(e.value)


def test_qwen3_drops_earlier_reasoning(make):
    """Qwen3 renders an earlier turn without its reasoning: its visible answer and <|im_end|> are trained."""
    tok = make("qwen3")
    reasoned = {"role": "assistant", "content": "<think>\nit was two and two\n</think>\n\nfour"}
    msgs = [SYSTEM, CHAT[0], reasoned, *CHAT[2:]]
    full = tok.apply_chat_template(msgs, tokenize=False)
    assert "it was two and two" not in full and "<think>\n\n</think>\n\nfive quickly" in full
    assert runs(tok, msgs) == ["four<|im_end|>", "five quickly<|im_end|>"]  # not the template's empty <think></think>


def test_qwen3_final_reasoning_is_trained(make):
    tok = make("qwen3")
    msgs = [*CHAT[:3], {"role": "assistant", "content": "<think>so it is</think>five"}]
    assert runs(tok, msgs) == ["four<|im_end|>", "<think>\nso it is\n</think>\n\nfive<|im_end|>"]


def test_repeated_answers_are_each_found_in_place(make):
    tok = make("qwen3")
    msgs = [CHAT[0], {"role": "assistant", "content": "four"}, CHAT[2], {"role": "assistant", "content": "four"}]
    assert runs(tok, msgs) == ["four<|im_end|>", "four<|im_end|>"]


def test_a_template_that_renders_turns_out_of_order(make):
    tok = make("qwen2.5-instruct")
    tok.chat_template = "{% for m in messages|reverse %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    with pytest.raises(DataError, match=r"source\.jsonl, row 3, message 1 \(assistant\): cannot locate this turn"):
        RecordTokenizer(tok, max_length=4096, source="source.jsonl")(Record(2, "chat", messages=CHAT[:2]))


def test_chat_records_need_a_fast_tokenizer(make, monkeypatch):
    tok = make("qwen2.5-instruct")
    monkeypatch.setattr(type(tok), "is_fast", property(lambda self: False))
    with pytest.raises(DataError, match="row 5 is chat data, which needs a fast"):
        RecordTokenizer(tok, max_length=4096)(Record(4, "chat", messages=CHAT))


# -- through the command line ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return build_teacher(tmp_path_factory.mktemp("chat") / "tiny")


def _with_template(model: Path, dest: Path, template: str | None) -> Path:
    shutil.copytree(model, dest)
    conf = json.loads((dest / "tokenizer_config.json").read_text())
    conf.pop("chat_template", None)
    (dest / "tokenizer_config.json").write_text(json.dumps(conf))
    (dest / "chat_template.jinja").unlink(missing_ok=True)
    if template is not None:
        (dest / "chat_template.jinja").write_text(template)
    return dest


def _fails(args: list[str], *words: str) -> None:
    r = CliRunner().invoke(cli.main, args)
    assert r.exit_code == 1 and "Traceback" not in r.output, (r.exit_code, r.output, r.exception)
    assert "Error: " in r.output, r.output
    for w in words:
        assert w in r.output, (w, r.output)


def test_a_template_refusal_ends_cache_teacher_with_one_message(model, tmp_path):
    teacher = _with_template(model, tmp_path / "gemma", (TEMPLATES / "gemma-2-it.jinja").read_text())
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, {"messages": [SYSTEM, *CHAT]}])
    _fails(["cache-teacher", "--teacher", str(teacher), "--data", str(data), "--out", str(tmp_path / "c"),
            "--engine", "hf", "--top-k", "8", "--no-progress"],
           "chat.jsonl, row 2: the teacher's chat template rejects this conversation (System role not supported)",
           "fold it into the first user message or drop it")


def test_eval_generates_for_chat_and_prompt_lines(model, tmp_path, monkeypatch):
    from transformers import AutoTokenizer
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    from adakd.trainer.evaluate import evaluate_generation

    calls: list[tuple[str, bool]] = []
    call = PreTrainedTokenizerBase.__call__

    def spy(self, text=None, *args, **kw):
        calls.append((text, kw.get("add_special_tokens", True)))
        return call(self, text, *args, **kw)
    monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", spy)
    data = write_jsonl(tmp_path / "eval.jsonl", [
        {"messages": [*CHAT, {"role": "user", "content": "a trailing question"}]},
        {"prompt": "the cat sat on", "output": "the mat"},
    ])
    out = tmp_path / "gen.jsonl"
    r = evaluate_generation(str(model), str(data), str(out), max_new_tokens=4, batch_size=2)
    assert r["n"] == 2
    gens = [json.loads(line) for line in out.read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(model)
    prompt = tok.apply_chat_template(CHAT[:3], tokenize=False, add_generation_prompt=True)
    assert gens[0]["prompt"] == prompt and gens[0]["reference"] == "five quickly"
    assert gens[1]["prompt"] == "the cat sat on" and gens[1]["reference"] == "the mat"
    assert (prompt, False) in calls and ("the cat sat on", True) in calls  # the template already wrote BOS


def test_eval_chat_line_without_an_assistant_turn(model, tmp_path):
    data = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "a", "output": "b"}, {"messages": CHAT[:1]}])
    _fails(["eval", "--model", str(model), "--data", str(data)],
           f"{data}, line 2: a chat line needs an assistant message")


def test_eval_chat_lines_need_a_chat_template(model, tmp_path):
    plain = _with_template(model, tmp_path / "plain", None)
    data = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "a", "output": "b"}, {"messages": CHAT}])
    _fails(["eval", "--model", str(plain), "--data", str(data), "--max-new-tokens", "2"],
           f"{data}, line 2: a chat line, but the tokenizer of --model {plain} has no chat template")


def test_eval_chat_line_the_template_rejects(model, tmp_path):
    gemma = _with_template(model, tmp_path / "gemma", (TEMPLATES / "gemma-2-it.jinja").read_text())
    data = write_jsonl(tmp_path / "eval.jsonl", [{"messages": CHAT}, {"messages": [SYSTEM, *CHAT]}])
    _fails(["eval", "--model", str(gemma), "--data", str(data), "--max-new-tokens", "2"],
           f"{data}, line 2: the model's chat template rejects this conversation (System role not supported)")
