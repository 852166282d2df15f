"""The repository is self-contained: its documentation and code never point at files outside it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)")  # [text](target): the target, without an anchor


def _tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True, check=True)
    return [ROOT / line for line in out.stdout.splitlines()]


def test_docs_folder_holds_design_and_definitions():
    assert {"design.md", "definitions.md"} <= {p.name for p in DOCS}


@pytest.mark.parametrize("doc", DOCS, ids=[p.relative_to(ROOT).as_posix() for p in DOCS])
def test_relative_links_stay_inside_the_repository(doc):
    for target in LINK.findall(doc.read_text()):
        if "://" in target:
            continue
        resolved = (doc.parent / target).resolve()
        assert resolved.is_relative_to(ROOT), f"{doc.name} links outside the repository: {target}"


def test_no_file_names_a_folder_outside_the_repository():
    # The notes the project started from lived beside the repository, in a folder named like this; nothing may
    # send a reader there. (Spelt in two parts so that this file passes its own check.)
    needle = "shared" + "/"
    offenders = [f"{p.relative_to(ROOT)}:{n}" for p in _tracked("*.py", "*.md") if p.is_file()
                 for n, line in enumerate(p.read_text().splitlines(), 1) if needle in line]
    assert offenders == []
