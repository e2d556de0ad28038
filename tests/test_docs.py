"""The documentation stays true: every test docs/errors.md cites exists, every message it quotes with no
placeholder is one the code can print, and docs/on-policy.md's real-data block runs as written."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import SHARED

ROOT = Path(__file__).resolve().parents[1]
CATALOGUE = (ROOT / "docs" / "errors.md").read_text()


def _sources(folders: tuple[str, ...], files: tuple[str, ...] = ()) -> str:
    paths = [p for f in folders for p in (ROOT / f).rglob("*.py")] + [ROOT / f for f in files]
    return "\n".join(p.read_text() for p in paths)


# quoted from the libraries whose errors adakd passes on, or composed from a variable part ("the {what}")
LIBRARY_TEXT = {"The repository", "contains custom code which must be executed", "is not a valid integer",
                "Invalid learning rate", "cannot load the tokenizer", "is not one of", "Invalid value for"}


def test_every_cited_test_exists():
    tests = _sources(("tests",))
    cited = set(re.findall(r"`(test_\w+\.py)::(test_\w+)", CATALOGUE))
    assert len(cited) > 60
    missing = [f"{f}::{name}" for f, name in sorted(cited)
               if not (ROOT / "tests" / f).exists() or f"def {name}(" not in (ROOT / "tests" / f).read_text()]
    assert not missing, f"docs/errors.md cites tests that do not exist: {missing}"
    assert tests


def test_quoted_messages_are_in_the_code():
    """Each literal stretch (between placeholders) of a quoted message is printed by the product somewhere."""
    code = re.sub(r"\"\s*\n\s*f?\"", "", _sources(("pipeline", "trainer", "storage", "common"), ("cli.py", "demo.py", "rounds.py")))
    rows = [line for line in CATALOGUE.splitlines() if line.startswith("| ") and "`" in line]
    checked, absent = 0, []
    for row in rows:
        message = row.split(" | ")[1] if row.count(" | ") >= 2 else ""
        for quoted in re.findall(r"`([^`]{12,})`", message):
            for part in re.split(r"<[^>]*>|\.\.\.|\[[^\]]*\]|\(|\)|'|: |; ", quoted):
                part = part.strip(" :;,.")
                if len(part) < 14 or part.startswith(("test_", "--", "adakd ")) or part in LIBRARY_TEXT:
                    continue
                checked += 1
                if part not in code:
                    absent.append(part)
    assert checked > 80
    assert not absent, f"docs/errors.md quotes text the code never prints: {absent}"


# -- docs/on-policy.md: "On real data, as a new user would" ----------------------------------------------
ONPOLICY_REAL = "## On real data, as a new user would"


def _onpolicy_real_block() -> str:
    """The first ```bash block under the heading, as written."""
    text = (ROOT / "docs" / "on-policy.md").read_text()
    assert ONPOLICY_REAL in text, f"docs/on-policy.md has no '{ONPOLICY_REAL}' section"
    m = re.search(r"```bash\n(.*?)```", text.split(ONPOLICY_REAL, 1)[1], re.DOTALL)
    assert m, f"no ```bash block under '{ONPOLICY_REAL}'"
    return m.group(1)


def test_the_on_policy_real_data_block_has_every_step():
    block = _onpolicy_real_block()
    for step in ("../shared/models/stories260K", "../shared/data/tinystories/", "adakd generate ", "--engine hf",
                 "--cache-weights 0.5,0.5", "--generate"):
        assert step in block, step
    assert block.count("cache-teacher ") == 2 and block.count("adakd eval ") == 2


@pytest.mark.slow
def test_the_on_policy_real_data_block_runs_as_written(tmp_path):
    """The commands verbatim, from a folder whose ../shared is the real one (as the repository root's is), with
    this environment's adakd, cache-teacher and train-student first on PATH."""
    if not (SHARED / "models" / "stories260K").is_dir() or not (SHARED / "data" / "tinystories").is_dir():
        pytest.skip(f"the block reads the stories260K teacher and TinyStories from ../shared ({SHARED}: absent)")
    block = _onpolicy_real_block()
    (tmp_path / "shared").symlink_to(SHARED.resolve(), target_is_directory=True)
    work = tmp_path / "work"
    work.mkdir()
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=work, env=env, capture_output=True, text=True,
                       timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    reports = [json.loads(line) for line in r.stdout.splitlines() if line.startswith('{"onpolicy": ')]
    assert len(reports) == 2, r.stdout[-3000:]
    for rep in reports:  # both students on their own continuations of the same held-out prompts
        op, tf = rep["onpolicy"], rep["teacher_forced"]  # the prompts carry the rest of each story as `output`
        for key in ("rkl", "kl", "teacher_nll", "student_nll", "top1_agreement"):
            assert math.isfinite(op[key]) and op[key] >= 0, (key, op)
        assert (op["prompts"], op["samples"]) == (40, 80) and 0 < op["generated_tokens"] <= 80 * 48
        assert all(math.isfinite(tf[k]) and tf[k] >= 0 for k in ("kl", "rkl", "nll", "teacher_nll")), tf
    assert reports[0]["teacher_forced"]["positions"] == reports[1]["teacher_forced"]["positions"] > 0
