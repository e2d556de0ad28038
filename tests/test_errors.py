"""The bad-input catalogue (docs/errors.md): user errors not proven elsewhere end in status 1 and one message."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys

import pytest
from click.testing import CliRunner
from tiny import write_jsonl

from adakd import cli


def fails(args: list[str], *words: str, code: int = 1, input: str | None = None) -> str:
    r = CliRunner().invoke(cli.main, args, input=input)
    assert r.exit_code == code, (r.exit_code, r.output, r.exception)
    assert "Traceback" not in r.output and not isinstance(r.exception, (AssertionError, TypeError, KeyError)), r.output
    for w in words:
        assert w in r.output, (w, r.output)
    return r.output


# -- cache-teacher -------------------------------------------------------------------------------
@pytest.fixture
def capture(fault_capture, tmp_path):
    setup, _, _ = fault_capture

    def run(*extra: str, data=None, teacher=None, out=None) -> list[str]:
        return ["cache-teacher", "--teacher", str(teacher or setup.teacher), "--data", str(data or setup.data),
                "--out", str(out or tmp_path / "c"), "--engine", "hf", "--top-k", "8", "--no-progress", *extra]
    return run


def test_top_k_below_one(capture):
    fails(capture("--top-k", "0"), "--top-k must be at least 1, not 0")


def test_max_length_beyond_the_teacher(capture):
    fails(capture("--max-length", "400"), "--max-length 400 exceeds what the teacher supports (255)")


@pytest.mark.parametrize("option,value,low", [("--num-workers", "0", 1), ("--max-length", "-5", 2), ("--max-length", "1", 2),
                                              ("--batch-tokens", "0", 1), ("--shard-positions", "0", 1),
                                              ("--row-tokens", "0", 1)])
def test_capture_counts_below_their_minimum(capture, option, value, low):
    fails(capture(option, value), f"{option} must be at least {low}, not {value}")


def test_unknown_engine_is_a_usage_error(capture):
    fails(capture("--engine", "tgi"), "Invalid value for '--engine'", code=2)


def test_vllm_engine_without_vllm(capture, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if not installed; nothing imports it
    fails(capture("--engine", "vllm"), "--engine vllm needs vLLM: pip install")


@pytest.mark.parametrize("files,source,words", [
    ({}, "", "no .jsonl/.json/.parquet/.csv/.txt files in this directory"),
    ({}, "*.jsonl", "the pattern matches no file"),
    ({"a.jsonl": '{"text": "x"}\n', "b.csv": "text\ny\n"}, "", "data files must all be one of"),
    ({"a.jsonl": '{"text": "x"}\n{"text": "y"\n{"text": "z"}\n'}, "a.jsonl", "a.jsonl, line 2: not valid JSON ("),
    ({"a.jsonl": '{"text": "x"}\n["y"]\n'}, "a.jsonl", "a.jsonl, line 2: expected a JSON object per line, got list"),
    ({"a.csv": 'text\n"unterminated\n'}, "a.csv", "cannot load the dataset ("),
])
def test_data_files_that_cannot_be_read(capture, tmp_path, files, source, words):
    d = tmp_path / "data"
    d.mkdir()
    for name, text in files.items():
        (d / name).write_text(text)
    fails(capture(data=f"{d}/{source}" if source else d), words)


def test_no_rows(capture):
    fails(capture("--limit", "0"), "the dataset has no rows")


def test_shape_without_its_column(capture):
    fails(capture("--shape", "chat"), "--shape chat needs a messages column")


@pytest.mark.parametrize("messages,words", [
    ("hello", "expected a non-empty list of role/content messages"),
    ([{"role": "user"}], "message 0: expected {'role': str, 'content': str}"),
    ([{"role": "user", "content": "hi"}], "no assistant message to train on"),
])
def test_bad_chat_records(capture, tmp_path, messages, words):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                                {"role": "assistant", "content": "b"}]},
                                                  {"messages": messages}])
    fails(capture(data=data), "row 2", words)


def _teacher_copy(fault_capture, tmp_path, edit) -> str:
    setup, _, _ = fault_capture
    d = tmp_path / "teacher"
    shutil.copytree(setup.teacher, d)
    conf = json.loads((d / "tokenizer_config.json").read_text())
    edit(d, conf)
    (d / "tokenizer_config.json").write_text(json.dumps(conf))
    return str(d)


def test_tokenizer_without_eos(capture, fault_capture, tmp_path):
    def edit(d, conf):
        conf["eos_token"] = None
    fails(capture(teacher=_teacher_copy(fault_capture, tmp_path, edit)), "the teacher's tokenizer has no EOS token")


def test_chat_data_with_a_tokenizer_without_chat_template(capture, fault_capture, tmp_path):
    def edit(d, conf):
        (d / "chat_template.jinja").unlink()
        conf.pop("chat_template", None)
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                                {"role": "assistant", "content": "b"}]}])
    fails(capture(data=data, teacher=_teacher_copy(fault_capture, tmp_path, edit)), "has no chat template")


def test_chat_template_that_does_not_render_turns_as_prefixes(capture, fault_capture, tmp_path):
    def edit(d, conf):  # the newest turn first: a conversation's rendering is not its prefix's continuation
        (d / "chat_template.jinja").write_text("{% for m in messages|reverse %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}")
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                                {"role": "assistant", "content": "b"}]}])
    fails(capture(data=data, teacher=_teacher_copy(fault_capture, tmp_path, edit)),
          "the chat template does not render turns as prefixes")


def test_a_damaged_cache_at_the_output_is_named(capture, fault_capture, tmp_path):
    _, reference, _ = fault_capture
    out = tmp_path / "damaged"
    shutil.copytree(reference, out)
    m = out / "manifest-00000.json"
    m.write_text(m.read_text().replace('"complete": true', '"complete": false'))
    fails(capture(out=out), f"{m}: checksum mismatch")


# -- train-student -------------------------------------------------------------------------------
@pytest.fixture
def train(fault_training, tmp_path):
    setup, _ = fault_training

    def run(*extra: str, cache=None, student=None) -> list[str]:
        return ["train-student", "--cache", str(cache or setup.cache), "--student", str(student or setup.student),
                "--out", str(tmp_path / "run"), "--max-steps", "2", "--batch-tokens", "512", "--no-progress", *extra]
    return run


@pytest.mark.parametrize("yaml_text,words", [("- a\n- b\n", "expected a mapping of option names to values"),
                                              ("lr: 1\nlearning_rate: 2\n", "unknown option 'learning_rate'")])
def test_bad_config_file(train, tmp_path, yaml_text, words):
    (tmp_path / "run.yaml").write_text(yaml_text)
    fails(train("--config", str(tmp_path / "run.yaml")), words)


@pytest.mark.parametrize("option,value,words", [("--kd-weight", "2", "--kd-weight must be within [0, 1], not 2.0"),
                                                ("--temperature", "0", "--temperature must be positive, not 0.0"),
                                                ("--jsd-beta", "2", "--jsd-beta must be within [0, 1], not 2.0"),
                                                ("--skew", "-1", "--skew must be within [0, 1], not -1.0"),
                                                ("--akl-mu", "5", "--akl-mu must be within [0, 1], not 5.0"),
                                                ("--lr", "-1", "Invalid learning rate: -1.0")])
def test_loss_options_out_of_range(train, option, value, words):
    fails(train(option, value), words)


def test_student_that_is_neither_directory_nor_config(train, tmp_path):
    fails(train(student=tmp_path / "nothing"), "neither a model directory nor a config file")


def test_student_whose_logits_cannot_be_reproduced(train, fault_training, tmp_path):
    """A Llama config carrying a soft-cap its forward never applies: the output-layer check catches the mismatch."""
    setup, _ = fault_training
    cfg = json.loads(setup.student.read_text())
    (tmp_path / "capped.json").write_text(json.dumps(dict(cfg, final_logit_softcapping=0.5)))
    fails(train(student=tmp_path / "capped.json"), "LlamaForCausalLM (llama) computes its logits in a way adakd's "
          "chunked loss does not reproduce")


def test_cache_without_tokenizer_and_a_student_with_another(train, fault_training, fault_capture, tmp_path):
    setup, _ = fault_training
    cap, _, _ = fault_capture
    cache = tmp_path / "cache"
    shutil.copytree(setup.cache, cache)
    shutil.rmtree(cache / "tokenizer")
    student = tmp_path / "student"
    shutil.copytree(cap.teacher, student)
    (student / "model.safetensors").unlink()
    conf = json.loads((student / "tokenizer_config.json").read_text())
    (student / "tokenizer_config.json").write_text(json.dumps(dict(conf, bos_token="</s>")))  # another fingerprint
    fails(train(cache=cache, student=student), "the cache holds no tokenizer and the student's differs")


def test_a_cache_that_is_no_cache(train, tmp_path):
    (tmp_path / "empty").mkdir()
    fails(train(cache=tmp_path / "empty"), "no manifest-*.json here, so it is not an adakd cache")


def test_a_corrupt_shard_met_while_training_is_named(train, fault_training, tmp_path):
    setup, _ = fault_training
    cache = tmp_path / "cache"
    shutil.copytree(setup.cache, cache)
    for shard in (cache / "shards").iterdir():  # whichever the first batch reads
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 1
        shard.write_bytes(bytes(data))
    fails(train(cache=cache), f"{cache}/shards/", ": sha256 mismatch, the file is corrupted")


def _resumable(fault_training, tmp_path):
    _, reference = fault_training
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    return out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()


def test_checkpoint_from_another_world_size(train, fault_training, tmp_path):
    ckpt = _resumable(fault_training, tmp_path)
    state = json.loads((ckpt / "state.json").read_text())
    (ckpt / "state.json").write_text(json.dumps(dict(state, world=2)))
    fails(train("--max-steps", "12", "--save-every", "3"), "saved with 2 process(es), resumed with 1")


@pytest.mark.parametrize("name", ["optimizer.safetensors", "state.json"])
def test_unreadable_checkpoint(train, fault_training, tmp_path, name):
    ckpt = _resumable(fault_training, tmp_path)
    (ckpt / name).write_bytes((ckpt / name).read_bytes()[:40])
    fails(train("--max-steps", "12", "--save-every", "3"), f"{ckpt}: unreadable checkpoint")


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_tensorboard_without_the_package(train):
    fails(train("--tensorboard"), "--tensorboard needs the tensorboard package")


# -- eval ----------------------------------------------------------------------------------------
def test_eval_with_a_model_that_is_not_there(fault_training, tmp_path):
    setup, _ = fault_training
    fails(["eval", "--model", str(tmp_path / "nothing"), "--cache", str(setup.cache)], "--model '")


def test_eval_data_that_cannot_be_read(fault_training, tmp_path):
    _, reference = fault_training
    fails(["eval", "--model", str(reference / "final"), "--data", str(tmp_path / "none.jsonl")], "cannot read")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    fails(["eval", "--model", str(reference / "final"), "--data", str(tmp_path / "bad.jsonl")], "line 1: not JSON")
    (tmp_path / "empty.jsonl").write_text("")
    fails(["eval", "--model", str(reference / "final"), "--data", str(tmp_path / "empty.jsonl")], "no rows")


@pytest.mark.parametrize("option,value", [("--grad-accum", "0"), ("--batch-tokens", "0"), ("--chunk-positions", "0"),
                                          ("--epochs", "0"), ("--max-steps", "-1"), ("--stop-after", "0"),
                                          ("--save-every", "-1"), ("--row-tokens", "0")])
def test_counts_below_their_minimum(train, option, value):
    fails(train(option, value), f"{option} must be at least", f"not {value}")


def test_config_file_values_get_the_options_types(train, tmp_path):
    (tmp_path / "run.yaml").write_text("grad-accum: two\n")
    fails(train("--config", str(tmp_path / "run.yaml")), "'two' is not a valid integer", code=2)
