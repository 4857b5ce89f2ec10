"""How every benchmark reports: the JSON result on stdout and in the file asked for."""

from __future__ import annotations

import json
from pathlib import Path


def emit(result: dict, path: Path) -> dict:
    text = json.dumps(result, indent=2) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text, end="")
    return result
