"""An evaluator that is signalled in the middle of a batch takes its sandboxes with it:
SIGTERM and Ctrl-C kill them and remove their directories before it ends; SIGKILL
(no cleanup code can run) still ends them, through the lifeline pipe of their PID
namespace, or the parent-death signal of the best-effort fallback."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from hostile import leftover_sandboxes, sandbox_dirs

from unisd.sandbox import Limits
from unisd.sandbox.run import isolation

EVALUATOR = """
import signal, sys
from unisd.sandbox import CodeTest, Limits, launch, run_many
signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job may start with Ctrl-C ignored
if sys.argv[1] == "best_effort":
    launch._available = launch.Isolation("best_effort", True, "forced by the test")
sleeper = CodeTest("import time\\ndef f():\\n    time.sleep(600)\\n", "assert f() == 1\\n")
run_many([sleeper] * 4, Limits(timeout_s=600), workers=2)
"""


def running_evaluator(level: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", EVALUATOR, level])
    deadline = time.monotonic() + 30
    while len(leftover_sandboxes(proc.pid, timeout_s=0)) < 2:  # both workers' sandboxes are up
        assert proc.poll() is None and time.monotonic() < deadline, "the evaluator did not start its sandboxes"
        time.sleep(0.1)
    return proc


@pytest.mark.parametrize(
    "level, sig",
    [
        ("namespaces", signal.SIGKILL),
        ("namespaces", signal.SIGTERM),
        ("best_effort", signal.SIGTERM),
        ("best_effort", signal.SIGINT),
        ("best_effort", signal.SIGKILL),
    ],
)
def test_signalled_evaluator_leaves_nothing_running(level, sig):
    if level == "namespaces" and isolation(Limits()).level != "namespaces":
        pytest.skip("this machine gives no namespace sandbox")
    proc = running_evaluator(level)
    os.kill(proc.pid, sig)
    assert proc.wait(timeout=30) == -sig
    assert leftover_sandboxes(proc.pid) == []
    left = sandbox_dirs(proc.pid)
    for path in left:  # best effort after SIGKILL: nothing could remove them (docs/security.md)
        shutil.rmtree(path)
    assert left == [] or (level, sig) == ("best_effort", signal.SIGKILL)
