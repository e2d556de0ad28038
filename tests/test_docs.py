"""The documentation stays true: every test docs/errors.md cites exists, and every message it quotes with no
placeholder is one the code can print."""

from __future__ import annotations

import re
from pathlib import Path

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
