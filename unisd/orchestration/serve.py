"""Prefect servers of our own, and serving the deployments: `unisd serve [--with-server]`.

With `--with-server` a Prefect server is started on 127.0.0.1 first and stopped when
serving ends; otherwise PREFECT_API_URL must point at a running server. Then, from
another shell: `prefect deployment run 'pipeline/unisd-full'`. `unisd run` and `unisd
study` without PREFECT_API_URL get a server of their own (`flow_server`) that the kernel
stops if they die, even by kill -9; Prefect's temporary server would outlive them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


@contextlib.contextmanager
def local_prefect_server(port: int = 4200, timeout_s: float = 90) -> Iterator[str]:
    """A Prefect server bound to 127.0.0.1 for the duration of the block; yields its API URL.
    The server runs in one process (`prefect server start` serves in the foreground) that
    gets SIGTERM from the kernel when this process dies."""
    url = f"http://127.0.0.1:{port}/api"
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"},
        preexec_fn=_dies_with(os.getpid()),
    )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Prefect server on 127.0.0.1:{port} did not start") from None
                time.sleep(0.5)
        log.info("Prefect server at %s (UI: http://127.0.0.1:%d)", url, port)
        yield url
    finally:
        send_queued_logs()
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def send_queued_logs(timeout_s: float = 10) -> None:
    """Send the flow-run log lines still queued for the API while the server is up: the
    last ones ("Finished in state Completed()") are otherwise sent after it stopped, and
    Prefect prints "--- Error logging to API ---" for them."""
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=timeout_s)


def _dies_with(parent: int):
    """A child's pre-exec step: SIGTERM when `parent` dies (Linux; elsewhere nothing)."""

    def preexec() -> None:
        if sys.platform == "linux":
            from unisd.sandbox.inside import linux

            linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != parent:  # it died before the line above
                os._exit(1)

    return preexec


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def flow_server() -> Iterator[None]:
    """The Prefect API for a flow command: PREFECT_API_URL's server when set, else a server
    of this process on a free port (startup allowed 180 s: 2 busy cores)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    with local_prefect_server(free_port(), timeout_s=180) as url, temporary_settings(updates={PREFECT_API_URL: url}):
        os.environ["PREFECT_API_URL"] = url  # and for the processes this one starts (Dask workers)
        try:
            yield
        finally:
            del os.environ["PREFECT_API_URL"]


def deployments(params_file: Path) -> list:
    """`pipeline/unisd-full` and one `pipeline/<recipe>` per baseline; `compare/compare`,
    `ablation/ablation`. All read `params_file`."""
    from unisd.orchestration.pipeline import pipeline
    from unisd.orchestration.study import ablation, compare
    from unisd.recipes import BASELINES

    params = {"params_file": str(params_file)}
    return [
        *(
            pipeline.to_deployment(
                name=recipe,
                parameters={**params, "recipe": recipe},
                description=f"the whole pipeline with recipe {recipe}",
            )
            for recipe in ("unisd-full", *BASELINES)
        ),
        compare.to_deployment(name="compare", parameters=params, description="baselines vs unisd-full, with report"),
        ablation.to_deployment(name="ablation", parameters=params, description="component ablation, with report"),
    ]


def serve_deployments(params_file: Path, with_server: bool = False, port: int = 4200) -> None:
    from prefect import serve
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with contextlib.ExitStack() as stack:
        if with_server:
            url = stack.enter_context(local_prefect_server(port))
            stack.enter_context(temporary_settings(updates={PREFECT_API_URL: url}))
        serve(*deployments(params_file))
