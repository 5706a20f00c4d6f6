"""experiments/pinned_study.sh: a study run at one pinned commit while the checkout moves
on, each finished cell committed back, the report and dvc.lock published at the end.

`dvc` is replaced by a stand-in that does what `dvc repro compare` leaves behind in the
pinned clone (one cell published, the report, the lock), so the test is about the
script's git and file handling, not about a study."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "experiments" / "pinned_study.sh"

pytestmark = pytest.mark.skipif(shutil.which("rsync") is None, reason="pinned_study.sh needs rsync")

FAKE_DVC = """#!/usr/bin/env bash
# `dvc repro STUDY` as the study leaves it: a cell, the report, the lock (the code it ran: unisd.txt)
study=${@: -1}
[ -f metrics/study/$study/old/cell.json ] || { echo "the published cell was not mirrored in" >&2; exit 3; }
mkdir -p metrics/study/$study/new reports/$study
echo '{"params": "p"}' > metrics/study/$study/new/cell.json
echo "report of $(ls metrics/study/$study | tr '\\n' ' ')" > reports/$study/report.md
echo "lock of $(cat unisd.txt)" > dvc.lock
exit ${FAKE_RC:-0}
"""


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def checkout(tmp_path: Path) -> tuple[Path, str]:
    """A checkout whose study is pinned at its first commit and which moved on after it;
    one cell ("old") was published by an earlier machine."""
    here = tmp_path / "main"
    (here / "experiments").mkdir(parents=True)
    shutil.copy2(SCRIPT, here / "experiments" / "pinned_study.sh")
    (here / "unisd.txt").write_text("pinned code\n")
    (here / "dvc.lock").write_text("lock of the main job\n")
    (here / ".gitignore").write_text(".venv/\n")
    git(here.parent, "init", "-q", "-b", "main", "main")
    git(here, "add", "-A")
    git(here, "commit", "-qm", "pinned")
    pinned = git(here, "rev-parse", "HEAD")
    (here / "unisd.txt").write_text("newer code\n")
    (here / "metrics/study/compare/old").mkdir(parents=True)
    (here / "metrics/study/compare/old/cell.json").write_text('{"params": "p"}\n')
    git(here, "add", "-A")
    git(here, "commit", "-qm", "moved on; cell old published")
    dvc = here / ".venv" / "bin" / "dvc"
    dvc.parent.mkdir(parents=True)
    dvc.write_text(FAKE_DVC)
    dvc.chmod(0o755)
    return here, pinned


def run(here: Path, pinned: str, **env: str) -> subprocess.CompletedProcess:
    who = {k: "test" for k in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME")}
    who |= {k: "test@example.com" for k in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL")}
    return subprocess.run(
        [str(here / "experiments" / "pinned_study.sh"), pinned, "compare"],
        env={**os.environ, **who, "PUBLISH_EVERY": "0.1", "DIR": str(here.parent / "clone"), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cells_come_back_one_commit_each_and_the_report_is_published_at_the_pinned_code(checkout):
    here, pinned = checkout
    done = run(here, pinned)
    assert done.returncode == 0, done.stderr
    subjects = git(here, "log", "--format=%s").splitlines()
    assert subjects[:2] == [
        f"study compare: published (report and dvc.lock of study-compare-{pinned[:8]})",
        f"study compare: cell new published (run at {pinned[:12]})",
    ]
    assert git(here, "status", "--porcelain") == ""
    # the checkout keeps its own code; the report and the lock are the pinned run's
    assert (here / "unisd.txt").read_text() == "newer code\n"
    assert (here / "dvc.lock").read_text() == "lock of pinned code\n"
    assert (here / "reports/compare/report.md").read_text() == "report of new old \n"
    # the publishing commit sits on the pinned commit, so checking it out reproduces the lock
    publishing = git(here, "rev-parse", "HEAD^2")
    assert git(here, "rev-parse", f"{publishing}^") == pinned
    assert git(here, "show", f"{publishing}:unisd.txt") == "pinned code"


def test_a_failed_study_publishes_its_cells_but_no_report(checkout):
    here, pinned = checkout
    head = git(here, "rev-parse", "HEAD")
    done = run(here, pinned, FAKE_RC="1")
    assert done.returncode == 1
    assert git(here, "log", "--format=%s", f"{head}..HEAD").splitlines() == [
        f"study compare: cell new published (run at {pinned[:12]})"
    ]
    assert not (here / "reports").exists()
    assert (here / "dvc.lock").read_text() == "lock of the main job\n"
    assert git(here, "status", "--porcelain") == ""
