"""The linter is part of the suite: ``ruff check .`` with the configuration in ``pyproject.toml`` (line length 120;
pycodestyle, pyflakes, isort, bugbear, pyupgrade, comprehensions, pie, unused noqa)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ruff_check_is_clean() -> None:
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"ruff check . found problems (fix them, or run `ruff check --fix .`):\n{proc.stdout}"
