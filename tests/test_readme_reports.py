"""The README's study tables are copies of the committed reports' tables.

A table in the README that comes from a report is preceded by a marker naming the report
and the section it copies, e.g. `<!-- reports/compare/report.md: Against the paper -->`;
this test requires the table after the marker to be that section's first table, line for
line. So a report that changes (a study rerun and published) fails the test until the
README shows its numbers, and no number there is typed by hand.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).parents[1]
MARKER = re.compile(r"<!-- (reports/[\w/.-]+\.md): (.+?) -->")


def first_table(lines: list[str]) -> list[str]:
    """The first run of consecutive `|` lines."""
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def section_table(report: str, title: str) -> list[str]:
    """The first table of the section whose heading starts with `title`."""
    lines = report.splitlines()
    heading = next(
        (i for i, line in enumerate(lines) if re.match(r"#{2,3} ", line) and line.split(" ", 1)[1].startswith(title)),
        None,
    )
    assert heading is not None, f"no section {title!r}"
    return first_table(lines[heading + 1 :])


def copies() -> list[tuple[str, str, list[str]]]:
    """(report, section, the README's table after the marker) for every marker."""
    lines = (REPO / "README.md").read_text().splitlines()
    return [
        (m.group(1), m.group(2), first_table(lines[i + 1 :]))
        for i, line in enumerate(lines)
        if (m := MARKER.fullmatch(line.strip()))
    ]


def test_the_readme_copies_its_study_tables_from_the_reports():
    found = copies()
    assert {report for report, _, _ in found} >= {"reports/compare/report.md"}
    for report, section, table in found:
        assert table == section_table((REPO / report).read_text(), section), f"README's copy of {report}: {section}"


def test_section_table_is_the_first_table_under_its_heading():
    report = "## Against the paper\n\ntext\n\n| a | b |\n|---|---|\n| x | +1.0 |\n\n## Next\n\n| c |\n"
    assert section_table(report, "Against the paper") == ["| a | b |", "|---|---|", "| x | +1.0 |"]
    assert section_table(report, "Against the paper") != ["| a | b |", "|---|---|", "| x | +1.5 |"]
    assert section_table(report, "Next") == ["| c |"]
