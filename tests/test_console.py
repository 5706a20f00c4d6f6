"""The console of a `unisd` command: unisd's own lines and every warning by default;
other libraries' INFO records, Prefect's per-task lines and FutureWarnings only with
--verbose. Each case runs in a fresh interpreter (logging is process-wide)."""

import subprocess
import sys

import pytest

SCRIPT = """
import logging, sys, warnings
from unisd import console
console.configure(verbose={verbose}, prefect={prefect})
logging.getLogger("httpx").info("HTTP Request: GET /api/csrf-token")
logging.getLogger("prefect.task_runs").info("Finished in state Completed()")
logging.getLogger("unisd.stages").info("stage line")
logging.getLogger("some.library").warning("library warning")
warnings.warn("is deprecated", FutureWarning)
print(logging.getLogger().handlers[0].__class__.__name__, file=sys.stderr)
"""


def console_of(verbose: bool, prefect: bool) -> str:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(verbose=verbose, prefect=prefect)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout + out.stderr


@pytest.mark.parametrize("prefect", [False, True])
def test_quiet_by_default(prefect):
    text = console_of(False, prefect)
    assert "stage line" in text and "library warning" in text
    for noise in ("HTTP Request", "csrf", "Finished in state", "is deprecated"):
        assert noise not in text
    # flow commands keep Prefect's own console handler on the root logger
    assert text.strip().splitlines()[-1] == ("PrefectConsoleHandler" if prefect else "StreamHandler")


def test_verbose_shows_everything():
    text = console_of(True, True)
    for line in (
        "stage line",
        "library warning",
        "HTTP Request",
        "Finished in state",
        "is deprecated",
    ):
        assert line in text
