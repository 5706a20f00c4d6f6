"""A shared MLflow tracking server: one database for runs, one artifact store, one URL.

    unisd tracking-server [--host 127.0.0.1] [--port 5000] [--store DIR]
                          [--backend-store-uri URI] [--artifacts-destination URI] [--workers N]

starts `mlflow server` as a child process, waits until its `/health` answers, prints the
`MLFLOW_TRACKING_URI` that workers export, and stops it, with every process it started
(the server runs in a process group of its own), on Ctrl-C or SIGTERM. Scripts and tests
use `TrackingServer` as a context manager, which does the same: the code that starts the
service stops it.

Defaults: bound to 127.0.0.1 (other machines reach it through an SSH tunnel or after
`--host` names a private interface), runs in a SQLite database and an artifact folder
under `--store` (`mlflow-server/` in the current folder). Artifacts are proxied: workers
upload them to the server (`mlflow-artifacts:/`), which writes them to
`--artifacts-destination`, so no worker needs a path or a credential of the store. For
many writers use PostgreSQL (`--backend-store-uri postgresql://…`, needs `psycopg2` on
the server) and an S3-compatible destination (`--artifacts-destination s3://…`, needs
`boto3` on the server); README "Scaling out" has the commands.

MLflow's GenAI job runner (`MLFLOW_SERVER_ENABLE_JOB_EXECUTION`) is switched off: this
project runs no server-side jobs, and it would be one more process to start and stop.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
DEFAULT_STORE = "mlflow-server"


class ServerError(RuntimeError):
    """The tracking server could not be started (the message says why, in one line)."""


@dataclass(frozen=True)
class ServerSpec:
    """What to run: where runs and artifacts are stored, where the server listens."""

    backend_store_uri: str
    artifacts_destination: str
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    workers: int = 1
    allowed_hosts: str | None = None  # Host headers MLflow accepts (its default: localhost and private IPs)

    @classmethod
    def local(cls, store: str | Path = DEFAULT_STORE, **kwargs) -> ServerSpec:
        """A SQLite database and an artifact folder under `store` (one machine, or a
        head node that the workers reach over the network)."""
        store = Path(store).expanduser().resolve()
        return cls(f"sqlite:///{store / 'mlflow.db'}", str(store / "artifacts"), **kwargs)

    @property
    def uri(self) -> str:
        """What workers set as MLFLOW_TRACKING_URI (on this machine)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            self.backend_store_uri,
            "--serve-artifacts",
            "--artifacts-destination",
            self.artifacts_destination,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
            *(["--allowed-hosts", self.allowed_hosts] if self.allowed_hosts else []),
        ]


def healthy(uri: str, timeout: float = 2.0) -> bool:
    """Whether an MLflow server answers `GET /health` at `uri` with OK."""
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=timeout) as response:
            return response.status == 200 and response.read().strip() == b"OK"
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = DEFAULT_HOST) -> int:
    """A port nothing listens on now (for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class TrackingServer:
    """`mlflow server` as a child process in a process group of its own.

    `start` returns once `/health` answers (or raises ServerError with the end of the
    server's log); `stop` sends SIGTERM to the group, waits, then SIGKILL for what is
    left, so no worker process of the server outlives it. A context manager: started on
    enter, stopped on exit whatever happened inside.
    """

    def __init__(self, spec: ServerSpec, log: Path | None = None) -> None:
        self.spec, self.log = spec, log
        self.proc: subprocess.Popen | None = None
        self._log_fh: IO[bytes] | None = None

    @property
    def uri(self) -> str:
        return self.spec.uri

    def start(self, timeout: float = 180.0) -> str:
        if not _port_free(self.spec.host, self.spec.port):
            raise ServerError(f"{self.spec.host}:{self.spec.port} is in use: pick another --port")
        if self.spec.artifacts_destination.startswith("/"):
            Path(self.spec.artifacts_destination).mkdir(parents=True, exist_ok=True)
        if self.spec.backend_store_uri.startswith("sqlite:///"):
            Path(self.spec.backend_store_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        if self.log is not None:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            self._log_fh = open(self.log, "ab")  # noqa: SIM115 - the server's log for its lifetime, closed in stop()
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)  # the server's own store is --backend-store-uri
        self.proc = subprocess.Popen(
            self.spec.command(),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_fh,
            stderr=subprocess.STDOUT if self._log_fh else None,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while not healthy(self.uri):
            if self.proc.poll() is not None:
                self.stop()
                raise ServerError(f"mlflow server exited with status {self.proc.returncode}{self._log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(
                    f"mlflow server did not answer at {self.uri}/health in {timeout:.0f} s{self._log_tail()}"
                )
            time.sleep(0.5)
        return self.uri

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server and every process of its group (idempotent)."""
        if self.proc is None:
            return
        group = self.proc.pid  # start_new_session: the group id is the child's pid
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            if not group_alive(group):
                break
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                self.proc.poll()  # reap our child so that the group can empty
                if not group_alive(group):
                    break
                time.sleep(0.2)
        self.proc.wait()
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def _log_tail(self, lines: int = 15) -> str:
        if self.log is None or not self.log.is_file():
            return ""
        tail = self.log.read_text(errors="replace").splitlines()[-lines:]
        return ":\n" + "\n".join(tail) if tail else ""

    def __enter__(self) -> TrackingServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def group_alive(group: int) -> bool:
    """Whether process group `group` still has a process that is not a zombie."""
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":  # fields: state, ppid, pgrp
            return True
    return False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=DEFAULT_HOST, help="interface to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument(
        "--store",
        default=DEFAULT_STORE,
        help="folder of the default SQLite database and artifact folder (default: mlflow-server)",
    )
    parser.add_argument(
        "--backend-store-uri",
        help="runs database instead of <store>/mlflow.db, e.g. postgresql://user@db-host:5432/mlflow",
    )
    parser.add_argument(
        "--artifacts-destination", help="artifact store instead of <store>/artifacts, e.g. s3://bucket/mlflow"
    )
    parser.add_argument("--workers", type=int, default=1, help="server worker processes (default 1)")
    parser.add_argument(
        "--allowed-hosts",
        help="Host headers the server accepts, e.g. mlflow.internal:5000 "
        "(MLflow's --allowed-hosts; default: localhost and private IPs)",
    )


def spec_from_args(args: argparse.Namespace) -> ServerSpec:
    spec = ServerSpec.local(args.store, host=args.host, port=args.port, workers=args.workers)
    return ServerSpec(
        args.backend_store_uri or spec.backend_store_uri,
        args.artifacts_destination or spec.artifacts_destination,
        spec.host,
        spec.port,
        spec.workers,
        args.allowed_hosts,
    )


def serve(args: argparse.Namespace) -> None:
    """`unisd tracking-server`: run the server in the foreground until interrupted."""
    spec = spec_from_args(args)
    with TrackingServer(spec) as server:
        print(
            f"MLflow tracking server: {spec.backend_store_uri}, artifacts in {spec.artifacts_destination}", flush=True
        )
        print(f"workers: export MLFLOW_TRACKING_URI={server.uri}   (Ctrl-C stops the server)", flush=True)
        while server.alive():
            time.sleep(1.0)
        assert server.proc is not None  # started on entering the block
        raise ServerError(f"mlflow server exited with status {server.proc.returncode}")
