"""One import name: the installed distribution provides `adakd` and nothing else at top level, while the
repository keeps pipeline/, trainer/, storage/ and cli.py at its root (pyproject's package-dir maps adakd -> .)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OLD_NAMES = ("cli", "demo", "storage", "pipeline", "trainer", "common")


@pytest.mark.slow
def test_the_wheel_holds_one_top_level_name(tmp_path):
    """What `pip install .` installs: every file of the wheel lies under adakd/ (or its .dist-info)."""
    src = tmp_path / "src"  # the checkout's files only (no build/ or egg-info left by an earlier build)
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.split()
    for rel in listed:
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("adakd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"adakd"}, tops
    for part in ("adakd/cli.py", "adakd/demo.py", "adakd/storage/reader.py", "adakd/trainer/train.py",
                 "adakd/pipeline/capture.py", "adakd/common/packing.py", "adakd/trainer/api.py", "adakd/integrations/hf.py"):
        assert part in names, part
    assert not [n for n in names if n.startswith(("adakd/tests/", "adakd/bench/"))]
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "adakd = adakd.cli:main" in entry and "train-student = adakd.cli:train_student_main" in entry


def test_no_source_imports_an_old_top_level_name():
    """A stray `from storage import ...` would work from a checkout (the root is on sys.path) and break once
    installed; every import of our own code goes through adakd, in code and in the docs' examples."""
    pattern = re.compile(rf"^\s*(from|import)\s+({'|'.join(OLD_NAMES)})(\.|\s|$)", re.M)
    offenders = []
    for path in [*ROOT.rglob("*.py"), *ROOT.rglob("*.md")]:
        if ".venv" in path.parts or "runs" in path.parts:
            continue
        for m in pattern.finditer(path.read_text()):
            offenders.append(f"{path.relative_to(ROOT)}: {m.group(0).strip()}")
    assert not offenders, offenders


def test_the_commands_run_as_a_module_from_anywhere(tmp_path):
    """`torchrun ... -m adakd.cli ...` (the documented multi-node form) needs adakd.cli runnable as a module
    outside the checkout, where no old top-level name can be found."""
    r = subprocess.run([sys.executable, "-m", "adakd.cli", "train-student", "--help"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--cache" in r.stdout
    r = subprocess.run([sys.executable, "-c", "import storage"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode != 0 and "No module named 'storage'" in r.stderr
