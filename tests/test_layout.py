"""The package contract (ARCHITECTURE.md) holds, and a breach of it fails the suite.

import-linter reads the contracts from pyproject.toml. The second test copies the
packages to a scratch directory, adds one forbidden import and expects the tool to
refuse it, so a contract that silently stopped checking would be noticed too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("istasks", "bridge", "queues", "ops")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter not installed")


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--config", str(root / "pyproject.toml")],
        cwd=root, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def _copy_tree(dest: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in PACKAGES:
        shutil.copytree(ROOT / package, dest / package, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def test_the_contract_holds() -> None:
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "source", "contract"),
    [
        ("istasks/_breach.py", "import bridge.server\n", "never import the front door"),
        ("queues/_breach.py", "from ops import cli\n", "never import the front door"),
        ("bridge/_breach.py", "import numpy\n", "front door stays light"),
        ("istasks/core/_breach.py", "import redis\n", "image core is pure"),
    ],
)
def test_a_forbidden_import_breaks_it(
    tmp_path: Path, module: str, source: str, contract: str
) -> None:
    root = _copy_tree(tmp_path)
    (root / module).write_text(f'"""A throwaway breach of the contract."""\n\n{source}')
    result = _lint_imports(root)
    assert result.returncode != 0
    broken = result.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken and "_breach" in broken, result.stdout


def test_a_circle_breaks_it(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    with (root / "istasks" / "keys.py").open("a") as keys:
        keys.write("\nfrom istasks import tasks as _tasks  # a throwaway circle\n")
    result = _lint_imports(root)
    assert result.returncode != 0
    assert "No circles" in result.stdout.split("Broken contracts", 1)[-1], result.stdout
