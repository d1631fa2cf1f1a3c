"""The style bar CI holds the code to: `ruff check` clean and no module over the size limit."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ["parcae_jax", "tests", "configs", "train.py", "eval.py"]
# "No file over ~600 lines": small flat modules with one clear job.
MAX_LINES = 620


def test_ruff_is_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff not installed (pip install -e '.[dev]')")
    p = subprocess.run([ruff, "check", *SOURCES], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0, p.stdout + p.stderr


def test_no_python_file_over_the_size_limit():
    files = [p for s in SOURCES for p in ([REPO / s] if s.endswith(".py") else (REPO / s).rglob("*.py"))]
    assert len(files) > 50
    long = {str(p.relative_to(REPO)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules: {long}"
