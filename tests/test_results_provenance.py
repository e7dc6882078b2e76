"""Every table under results/ says how it was made: a figure without its command cannot be checked.

The csv (exact values) opens with a `# regenerate: <command>` or `# command: <command>` line, so it
says so even when it travels without its markdown; the markdown names the command in its caption.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parent.parent / "results"
CSVS = sorted(RESULTS.rglob("*.csv"))
MARKDOWN = sorted(RESULTS.rglob("*.md"))
NAMES_A_COMMAND = re.compile(r"(regenerate|command):", re.IGNORECASE)


def test_results_hold_tables():
    assert CSVS and MARKDOWN  # the checks below would pass on nothing


@pytest.mark.parametrize("csv", CSVS, ids=lambda p: str(p.relative_to(RESULTS)))
def test_a_results_csv_opens_with_its_command(csv):
    first = csv.read_text().splitlines()[0]
    assert first.startswith(("# regenerate: ", "# command: ")) and len(first.split(": ", 1)[1]) > 4, first


@pytest.mark.parametrize("markdown", MARKDOWN, ids=lambda p: str(p.relative_to(RESULTS)))
def test_a_results_markdown_names_its_command(markdown):
    assert NAMES_A_COMMAND.search(markdown.read_text()), f"{markdown} does not say how it was made"
