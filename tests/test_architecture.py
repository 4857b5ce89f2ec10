"""The architecture as code: the import contracts (pyproject.toml), lint, no dead code, and no
function that does too much."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent
# Longer than this and a function does more than one thing (tests excepted).
MAX_FUNCTION_LINES = 80


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


def test_no_function_is_longer_than_the_rule():
    long = []
    for package in ("schemas", "workers", "cluster", "bench"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} {lines}")
    assert not long, long


def test_the_actors_that_never_score_start_without_torch():
    """Every actor is a process that imports the actors' module: torch (and the flow's SciPy)
    only in those that score or train, else each camera pays for it at every start."""
    code = (
        "import sys, cluster.runtime.actors, cluster.transport.registry;"
        "print(sorted({'torch', 'FrEIA', 'ultralytics'} & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout
