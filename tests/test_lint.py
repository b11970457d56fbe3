"""ruff and mypy, as configured in pyproject.toml, are clean on the whole repository."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_TIMEOUT_SECONDS = 300  # a deadline against hangs; a cold mypy run takes well under a minute


def run_tool(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install -e '.[test]')")
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=LINT_TIMEOUT_SECONDS)


def test_ruff() -> None:
    proc = run_tool("ruff", "check", ".")
    assert proc.returncode == 0, f"ruff check . failed:\n{proc.stdout}\n{proc.stderr}"


def test_mypy() -> None:
    proc = run_tool("mypy")  # packages and options come from [tool.mypy] in pyproject.toml
    assert proc.returncode == 0, f"mypy failed:\n{proc.stdout}\n{proc.stderr}"
    assert "Success" in proc.stdout, proc.stdout
