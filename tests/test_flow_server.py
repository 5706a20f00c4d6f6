"""`unisd run`/`study` get a Prefect server of their own that dies with them, kill -9
included (Prefect's temporary server outlived a killed run)."""

import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = pytest.mark.integration

HOLDER = """
import os, time
os.environ.pop("PREFECT_API_URL", None)
from prefect.settings import PREFECT_API_URL
from unisd.orchestration.serve import flow_server
with flow_server():
    print(PREFECT_API_URL.value(), flush=True)
    time.sleep(600)
"""


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2):
            return True
    except OSError:
        return False


def test_the_server_dies_with_a_killed_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], stdout=subprocess.PIPE, text=True, env=env)
    try:
        url = holder.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and healthy(url)
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        deadline = time.monotonic() + 60
        while healthy(url):
            assert time.monotonic() < deadline, f"the server at {url} outlived its killed run"
            time.sleep(0.5)
    finally:
        holder.kill()
