"""Lint, format and the design's import rules run with the tests, so CI enforces them."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "check", "src", "tests", "scripts"],
        ["ruff", "format", "--check", "src", "tests", "scripts"],
        ["lint-imports"],
    ],
    ids=["ruff-check", "ruff-format", "import-contracts"],
)
def test_tool_passes(command):
    tool = Path(sys.executable).parent / command[0]
    proc = subprocess.run([str(tool), *command[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_importing_the_package_loads_nothing_heavy():
    code = "import sys, imagegenx, imagegenx.types, imagegenx.config, imagegenx.cli, "
    code += "imagegenx.engine.scheduler; "
    code += "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "[]", proc.stderr
