"""The README and docs/ stay true: every relative link resolves, the settings reference is the
one the code generates."""

import re
from pathlib import Path

import pytest

from cluster.runtime.settings_doc import render

ROOT = Path(__file__).parents[1]
GUIDES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors for a file's headings."""
    out = set()
    for heading in re.findall(r"^#+ (.+)$", markdown, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


@pytest.mark.parametrize("guide", GUIDES, ids=lambda p: p.name)
def test_every_relative_link_resolves(guide):
    broken = []
    for target in LINK.findall(guide.read_text()):
        if re.match(r"^[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (guide.parent / path).resolve() if path else guide
        if not resolved.exists():
            broken.append(target)
        elif anchor and anchor not in anchors(resolved.read_text()):
            broken.append(target)
    assert not broken, broken


def test_the_readme_is_a_guide_not_a_notebook():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


def test_the_configuration_reference_is_current():
    written = (ROOT / "docs" / "configuration.md").read_text()
    assert written == render(), "stale: run defectflow config-reference --out docs/configuration.md"
