"""The README's main-job table is the committed metrics files' (metrics/base.json,
metrics/trained.json, published with dvc.lock): a number shown there comes from the run
the lock records, not from memory. The committed files are read (git's HEAD), since a local
`make run` rewrites the working copies with its own run's numbers."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).parents[1]
ROWS = {
    "SciQ": "sciq",
    "ARC-Challenge": "arc_challenge",
    "CommonsenseQA": "commonsense_qa",
    "HumanEval": "humaneval",
    "MBPP": "mbpp",
}


def main_job_table() -> list[list[str]]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("### Measured: the main job on 2 CPU cores", 1)[1].split("\n### ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return [[cell.strip().replace("*", "") for cell in row.strip("|").split("|")] for row in rows[1:]]


def committed(path: str) -> dict:
    """The JSON file at `path` as committed, or as it is where there is no git checkout."""
    try:
        text = subprocess.run(
            ["git", "show", f"HEAD:{path}"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        text = (REPO / path).read_text()
    return json.loads(text)


def shown(cell: str) -> list[float]:
    return [float(x) for x in re.findall(r"\d+\.\d+", cell)]


def test_the_main_job_table_is_the_committed_metrics():
    base, trained = (committed(f"metrics/{name}.json") for name in ("base", "trained"))
    rows = main_job_table()
    assert [r[0].split(" (")[0] for r in rows[:-1]] == list(ROWS)
    for row in rows[:-1]:
        bench = ROWS[row[0].split(" (")[0]]
        b, t = base["benchmarks"][bench], trained["benchmarks"][bench]
        assert int(row[1]) == b["n"] == t["n"]
        keys = ("score", "rot_acc", "ll_acc") if "rot_acc" in b else ("score",)
        assert shown(row[2]) == [round(b[k], 1) for k in keys], bench
        assert shown(row[3]) == [round(t[k], 1) for k in keys], bench
        if "finish_rate" in b:
            assert shown(row[4]) == [round(b["finish_rate"], 3), round(t["finish_rate"], 3)], bench
        assert shown(row[5]) == [round(t["ppl_ret"], 2)], bench
    assert shown(rows[-1][2]) == [round(base["overall"], 1)]
    assert shown(rows[-1][3]) == [round(trained["overall"], 1)]
