"""The architecture as code: the import contracts (pyproject.toml), lint, and no dead code."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "command",
    [["lint-imports"], ["ruff", "check", "."], ["vulture"]],
    ids=["import-contracts", "ruff", "vulture"],
)
def test_the_code_keeps_its_rules(command):
    result = subprocess.run(
        [str(BIN / command[0]), *command[1:]], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
