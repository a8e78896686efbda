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
    # Every HTTP module too: an API node serves without torch (tests/test_scaleout.py checks its
    # memory map; this finds an import that would bring it, as a portrait module's once did, in a second).
    code = "import sys, importlib, pkgutil, imagegenx, imagegenx.types, imagegenx.config, imagegenx.cli, "
    code += "imagegenx.engine.scheduler, imagegenx.api; "
    code += "[importlib.import_module('imagegenx.api.' + m.name) "
    code += "for m in pkgutil.iter_modules(imagegenx.api.__path__)]; "
    code += "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "[]", proc.stderr
