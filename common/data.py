"""Dataset -> records of one known shape (instruction, chat or plain text), with row-level errors.

Local files (jsonl/json/parquet/csv/txt, a directory or a glob of them) and hub dataset names are
loaded with `datasets` (Arrow-backed, memory-mapped: memory does not grow with the dataset). One data file
on an object store (`s3://bucket/gen.jsonl`, any URI pyarrow's filesystems read) is downloaded once per
process into a temporary folder (removed at exit) and read as that local file.
"""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import asdict, dataclass
from typing import Any, Iterator

SHAPES = ("auto", "instruction", "chat", "text")
FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}

# The MiniLLM / DistiLLM / AdaKD template (the `prompt` field of their dolly files is rendered with it).
DEFAULT_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
DEFAULT_TEMPLATE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}"
    "\n\n### Input:\n{input}\n\n### Response:\n"
)


class DataError(Exception):
    """A user-fixable problem with the dataset; the message names the file, row and column (rows count from 1,
    like the lines of a jsonl file and `adakd eval`'s messages)."""


def row_name(index: int) -> str:
    """How messages name the record at 0-based dataset `index`."""
    return f"row {index + 1}"


def first_bad_json_line(files: list[str]) -> str | None:
    """'<file>, line <n>: ...' for the first line of a jsonl file that is not a JSON object, or None."""
    import json

    for f in files:
        if not f.endswith(".jsonl"):
            continue
        with open(f, encoding="utf-8", errors="replace") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as e:
                    return f"{f}, line {n}: not valid JSON ({e.msg}, column {e.colno}); fix or remove this line"
                if not isinstance(value, dict):
                    return f"{f}, line {n}: expected a JSON object per line, got {type(value).__name__}"
    return None


@dataclass(frozen=True)
class DataSpec:
    """How records are read and mapped; recorded in the cache manifest."""

    source: str
    split: str = "train"
    config: str | None = None
    shape: str = "auto"
    prompt_field: str | None = None  # a pre-rendered prompt (MiniLLM's `prompt`)
    instruction_field: str | None = None
    input_field: str | None = None  # optional context
    response_field: str | None = None
    messages_field: str | None = None
    text_field: str | None = None
    prompt_template: str | None = None  # with {instruction} and {input}; default: MiniLLM's
    limit: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Record:
    """One dataset row in a known shape; `index` is its position in the (limited) dataset."""

    index: int
    shape: str
    prompt: str = ""  # instruction: rendered prompt (not trained)
    response: str = ""  # instruction: trained
    messages: list[dict[str, str]] | None = None  # chat
    text: str = ""  # plain text, all trained
    # a record written by `adakd generate`: the exact token ids of the response (instruction) or of the last
    # assistant turn (chat), its stop token included when it stopped (`stopped`)
    response_ids: list[int] | None = None
    stopped: bool = True


GENERATION_FIELD = "generation"  # the column `adakd generate` adds; its token_ids are the response's tokens


def generated_ids(row: dict) -> tuple[list[int], bool] | None:
    """(token ids, stopped) from a row's `generation` column, or None when it has none usable."""
    g = row.get(GENERATION_FIELD)
    if not isinstance(g, dict):
        return None
    ids = g.get("token_ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
        return None
    return list(ids), g.get("finish") == "stop"


_DOWNLOADED: dict[str, str] = {}  # store URI -> its local copy


def local_source(source: str) -> str:
    """`source` itself, or for a data file on an object store its local copy (same file name, so the data's
    fingerprint is that of the same file on disk), downloaded on first use."""
    from adakd.storage.fs import is_uri, redact, split_uri

    if not is_uri(source):
        return source
    if source in _DOWNLOADED:
        return _DOWNLOADED[source]
    import atexit
    import shutil
    import tempfile

    folder, name = split_uri(source)
    if os.path.splitext(name)[1] not in FORMATS or "/" not in source.partition("?")[0].split("://", 1)[1]:
        raise DataError(f"--data {redact(source)}: a store URI must name one data file ({'/'.join(sorted(FORMATS))}), "
                        "such as s3://bucket/runs/gen.jsonl; folders and globs are read from local disk only")
    from adakd.storage.fs import CacheDir

    tmp = tempfile.mkdtemp(prefix="adakd-data-")
    atexit.register(shutil.rmtree, tmp, True)
    local = os.path.join(tmp, name)
    try:
        CacheDir.open(folder).download(name, local)
    except Exception as e:  # pyarrow and the store raise many types
        raise DataError(f"--data {redact(source)}: cannot be read from the store ({redact(str(e))}); check the URI, "
                        "the credentials and the endpoint (docs/object-stores.md)") from e
    _DOWNLOADED[source] = local
    return local


def source_name(source: str) -> str:
    """How messages name the data: a store URI with its credentials redacted."""
    from adakd.storage.fs import redact

    return redact(source)


def local_files(source: str) -> list[str]:
    if os.path.isdir(source):
        files = sorted(f for f in glob.glob(os.path.join(source, "**", "*"), recursive=True) if os.path.splitext(f)[1] in FORMATS)
        if not files:
            raise DataError(f"{source}: no .jsonl/.json/.parquet/.csv/.txt files in this directory")
        return files
    if any(c in source for c in "*?["):
        files = sorted(glob.glob(source))
        if not files:
            raise DataError(f"{source}: the pattern matches no file")
        return files
    return [source]


def is_local(source: str) -> bool:
    """A path (existing or clearly meant as one) rather than a hub dataset name."""
    return (os.path.exists(source) or any(c in source for c in "*?[") or os.path.splitext(source)[1] in FORMATS
            or source.startswith((".", "/", "~")))


def load_dataset(spec: DataSpec):
    """The dataset as a `datasets.Dataset`, limited to `spec.limit` rows."""
    import datasets

    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # load errors are reported below, naming the line
    datasets.disable_progress_bars()
    source = local_source(spec.source)
    try:
        if is_local(source):
            files = local_files(source)
            for f in files:
                if not os.path.isfile(f):
                    raise DataError(f"{f}: no such data file; check the --data path")
                if os.path.getsize(f) == 0:
                    raise DataError(f"{f}: the file is empty; --data needs at least one row")
            kinds = {FORMATS.get(os.path.splitext(f)[1]) for f in files}
            if None in kinds or len(kinds) != 1:
                raise DataError(f"{spec.source}: data files must all be one of {sorted(FORMATS)}; got {files[:5]}")
            ds = datasets.load_dataset(kinds.pop(), data_files=files, split="train")
        else:
            ds = datasets.load_dataset(spec.source, spec.config, split=spec.split)
    except DataError as e:
        if source != spec.source:  # name the store URI, not its local copy
            raise DataError(str(e).replace(source, source_name(spec.source))) from e
        raise
    except Exception as e:  # datasets raises many types for unreadable input
        bad = first_bad_json_line(files) if is_local(source) else None
        if bad and source != spec.source:
            bad = bad.replace(source, source_name(spec.source))
        raise DataError(bad or f"{source_name(spec.source)}: cannot load the dataset ({type(e).__name__}: "
                        f"{_first_line(e)})") from e
    if spec.limit is not None:
        ds = ds.select(range(min(spec.limit, len(ds))))
    if len(ds) == 0:
        raise DataError(f"{source_name(spec.source)}: the dataset has no rows")
    return ds


def _first_line(e: Exception) -> str:
    """datasets' errors chain the real cause under a generic first line; name the innermost one."""
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def fingerprint(spec: DataSpec, ds) -> str:
    """Content hash of local files (plus the row count); the datasets fingerprint for hub datasets."""
    h = hashlib.sha256()
    source = local_source(spec.source)
    if is_local(source):
        for f in local_files(source):
            h.update(os.path.basename(f).encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    else:
        h.update(str(getattr(ds, "_fingerprint", spec.source)).encode())
    h.update(str(len(ds)).encode())
    return "sha256:" + h.hexdigest()


def _pick(columns: list[str], wanted: str | None, candidates: tuple[str, ...]) -> str | None:
    if wanted:
        return wanted
    return next((c for c in candidates if c in columns), None)


@dataclass(frozen=True)
class Mapping:
    shape: str
    prompt: str | None = None
    instruction: str | None = None
    input: str | None = None
    response: str | None = None
    messages: str | None = None
    text: str | None = None


def resolve_mapping(spec: DataSpec, columns: list[str], where: str, prompts: bool = False) -> Mapping:
    """Which columns play which role; explicit options win over the usual names.

    `prompts`: the rows are prompts for `adakd generate`: instruction rows need no response column (one that is
    there is ignored), and plain text has no prompt to answer."""
    for opt in ("prompt_field", "instruction_field", "input_field", "response_field", "messages_field", "text_field"):
        name = getattr(spec, opt)
        if name and name not in columns:
            raise DataError(f"{where}: column {name!r} (--{opt.replace('_', '-')}) is not in the data; columns: {columns}")
    messages = _pick(columns, spec.messages_field, ("messages", "conversations", "conversation"))
    response = _pick(columns, spec.response_field, ("output", "response", "completion", "answer"))
    prompt = _pick(columns, spec.prompt_field, ("prompt",))
    instruction = _pick(columns, spec.instruction_field, ("instruction", "question"))
    text = _pick(columns, spec.text_field, ("text", "content"))
    shape = spec.shape
    if prompts and shape == "text":
        raise DataError(f"{where}: --shape text has no prompt to answer; generation needs instruction rows "
                        "(prompt, or instruction and input) or chat rows (messages)")
    if shape == "auto":
        if messages:
            shape = "chat"
        elif (response or prompts) and (prompt or instruction):
            shape = "instruction"
        elif prompts:
            raise DataError(
                f"{where}: no prompts in columns {columns}: generation needs a prompt or instruction column "
                "(instruction rows) or a messages column (chat rows); name them with --prompt-field/"
                "--instruction-field/--messages-field and/or --shape"
            )
        elif text:
            shape = "text"
        else:
            raise DataError(
                f"{where}: cannot tell the record shape from columns {columns}. Instruction data needs a response "
                "column (output/response) and a prompt or instruction column; chat data a messages column; plain "
                "text a text column. Name them with --response-field/--instruction-field/--messages-field/--text-field "
                "and/or --shape."
            )
    need = {"instruction": [("response", response or prompts), ("prompt or instruction", prompt or instruction)],
            "chat": [("messages", messages)], "text": [("text", text)]}[shape]
    for role, col in need:
        if not col:
            raise DataError(f"{where}: --shape {shape} needs a {role} column; columns are {columns}")
    return Mapping(shape, prompt if not spec.instruction_field else None, instruction,
                   _pick(columns, spec.input_field, ("input", "context")), response, messages, text)


def _text(row: dict, col: str, where: str, allow_empty: bool = False) -> str:
    value = row.get(col)
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise DataError(f"{where}, column {col!r}: expected text, got {type(value).__name__} ({str(value)[:60]!r})")
    if not value.strip() and not allow_empty:
        raise DataError(f"{where}, column {col!r}: empty; fix or drop this row")
    return value


def to_record(row: dict, index: int, m: Mapping, spec: DataSpec, where: str, prompts: bool = False) -> Record:
    """Map one row; errors name the row and column. `prompts`: a prompt for `adakd generate` (no response
    needed: instruction rows keep an empty one, chat rows need no assistant turn)."""
    rec = _to_record(row, index, m, spec, where, prompts)
    if not prompts and rec.shape != "text" and (gen := generated_ids(row)) is not None:
        rec.response_ids, rec.stopped = gen
    return rec


def _to_record(row: dict, index: int, m: Mapping, spec: DataSpec, where: str, prompts: bool) -> Record:
    if m.shape == "text":
        return Record(index, "text", text=_text(row, m.text, where))
    if m.shape == "chat":
        msgs = row.get(m.messages)
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}, column {m.messages!r}: expected a non-empty list of role/content messages")
        out = []
        for j, msg in enumerate(msgs):
            if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
                raise DataError(f"{where}, column {m.messages!r}, message {j}: expected {{'role': str, 'content': str}}")
            out.append({"role": msg["role"], "content": msg["content"]})
        if not prompts and not any(x["role"] == "assistant" for x in out):
            raise DataError(f"{where}, column {m.messages!r}: no assistant message to train on")
        return Record(index, "chat", messages=out)
    # a generated response may be the stop token alone (the student chose to answer nothing): its text is empty,
    # its one token is still trained
    response = "" if prompts else _text(row, m.response, where, allow_empty=generated_ids(row) is not None)
    if m.prompt:
        prompt = _text(row, m.prompt, where)
    else:
        instruction = _text(row, m.instruction, where)
        context = _text(row, m.input, where, allow_empty=True) if m.input else ""
        template = spec.prompt_template or (DEFAULT_TEMPLATE_WITH_INPUT if context.strip() else DEFAULT_TEMPLATE)
        prompt = template.format(instruction=instruction, input=context)
    return Record(index, "instruction", prompt=prompt, response=response)


def iter_records(spec: DataSpec, ds, worker_index: int = 0, num_workers: int = 1, start: int = 0,
                 prompts: bool = False) -> Iterator[Record]:
    """This worker's records (index % num_workers == worker_index) from dataset index `start` on
    (`prompts`: as prompts for `adakd generate`, see `to_record`)."""
    where0 = source_name(spec.source)
    m = resolve_mapping(spec, list(ds.column_names), where0, prompts)
    first = start + ((worker_index - start) % num_workers)
    indices = range(first, len(ds), num_workers)
    chunk = 512
    for c in range(0, len(indices), chunk):
        idx = indices[c:c + chunk]
        rows = ds[idx.start:idx.stop:idx.step] if len(idx) else {}
        cols = list(rows)
        for j, i in enumerate(idx):
            yield to_record({col: rows[col][j] for col in cols}, i, m, spec, f"{where0}, {row_name(i)}", prompts)


def validate_records(spec: DataSpec, ds, worker_index: int = 0, num_workers: int = 1, start: int = 0) -> int:
    """Map every record of this worker before the teacher loads, so a bad row fails in seconds, not hours."""
    return sum(1 for _ in iter_records(spec, ds, worker_index, num_workers, start))
