"""Imports go down only: protocol/ and gcache/ never load trio (or any istd glue), nor each other.

Each check runs in a fresh interpreter, since this test process has long since imported everything.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GLUE = ("trio", "structlog", "click", "hypercorn")
SUBPROCESS_TIMEOUT_SECONDS = 60  # a deadline against hangs, not a timing assertion


def modules_after(statement: str) -> set[str]:
    """The top-level names in sys.modules of a fresh interpreter after running ``statement``."""
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=SUBPROCESS_TIMEOUT_SECONDS)
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.splitlines()[-1]))


def test_subprocess_sees_the_glue_when_it_is_imported() -> None:
    # the probe itself works: importing the CLI does load the glue
    loaded = modules_after("import istd.cli")
    assert {"trio", "structlog", "click"} <= loaded
    assert {"protocol", "gcache"} <= loaded


def test_protocol_and_gcache_leave_the_glue_out() -> None:
    loaded = modules_after("import protocol, gcache")
    assert {"protocol", "gcache", "istd.errors"} <= loaded
    assert {m.split(".")[0] for m in loaded} & set(GLUE) == set()
    istd_modules = {m for m in loaded if m == "istd" or m.startswith("istd.")}
    assert istd_modules <= {"istd", "istd.errors"}, istd_modules


@pytest.mark.parametrize("package,other", [("gcache", "protocol"), ("protocol", "gcache")])
def test_packages_do_not_import_each_other(package: str, other: str) -> None:
    loaded = modules_after(f"import {package}")
    assert package in loaded
    assert not {m for m in loaded if m == other or m.startswith(other + ".")}


def test_gcache_is_stdlib_only() -> None:
    # gcache/: stdlib + istd.errors; construct belongs to protocol/ and istd/writeset.py
    loaded = modules_after("import gcache")
    assert "construct" not in loaded


@pytest.mark.parametrize("package", ["protocol", "gcache"])
def test_every_submodule_keeps_the_glue_out(package: str) -> None:
    submodules = sorted(p.stem for p in (ROOT / package).glob("*.py") if p.stem != "__init__")
    assert submodules
    loaded = modules_after("\n".join(f"import {package}.{name}" for name in submodules))
    assert {m.split(".")[0] for m in loaded} & set(GLUE) == set()


def test_errors_imports_nothing() -> None:
    tree = ast.parse((ROOT / "istd" / "errors.py").read_text(), filename="istd/errors.py")
    imports = [ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)]
    assert imports == []
    calls = [node for node in ast.walk(tree)
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "__import__"]
    assert calls == []


def test_istd_init_imports_nothing() -> None:
    tree = ast.parse((ROOT / "istd" / "__init__.py").read_text(), filename="istd/__init__.py")
    imports = [ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)]
    assert imports in ([], ["from __future__ import annotations"])
