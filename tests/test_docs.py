"""The documentation names every setting, so operators never meet an undocumented knob."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from istasks.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def test_readme_lists_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [
        f"IS_{f.name.upper()}"
        for f in dataclasses.fields(Settings)
        if f.name != "extra" and f"IS_{f.name.upper()}" not in readme
    ]
    assert missing == []


def test_readme_names_exactly_two_setup_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## The two commands", 1)[1].split("```")[1]
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["make run", "make test"]
    assert (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1] == "make test"
