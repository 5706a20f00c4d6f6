"""A shared MLflow tracking server (`unisd.tracking_server`) with two workers writing at once.

The real `mlflow server` starts on 127.0.0.1 (a free port) with a SQLite database and a
local artifact destination; two processes, released together by a barrier, log through
the project's own `Tracker` (MLFLOW_TRACKING_URI pointing at the server): a pipeline run,
nested stage runs with params, a metric curve and an artifact each. Oracles: the values
and bytes each writer computes from its index, compared with what the server returns
and with the files in its artifact destination; after the server is stopped, nothing of
its process group is left and its port is closed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from unisd.tracking_server import ServerSpec, TrackingServer, free_port, group_alive, healthy

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]
WRITERS, STAGES, STEPS = 2, 3, 40


def loss(writer: int, stage: int, step: int) -> float:
    return writer * 1000 + stage * 100 + step + 0.25  # exact in float64


def payload(writer: int, stage: int) -> bytes:
    """64 KiB that differ per writer and stage."""
    seed = f"{writer}:{stage}".encode()
    return b"".join(hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(2048))


def writer(index: int, root: Path, barrier: Path) -> None:
    """One worker: its own project folder, the shared server from MLFLOW_TRACKING_URI."""
    import mlflow  # noqa: F401  (imported before the barrier, so that both write at once)

    from unisd.config import build_config
    from unisd.tracking import Tracker

    (barrier / f"ready-{index}").touch()
    while len(list(barrier.glob("ready-*"))) < WRITERS:
        time.sleep(0.05)
    cfg = build_config(yaml.safe_load((REPO / "params.yaml").read_text()), root)
    tracker = Tracker(cfg)  # both may create the experiment at once
    parent = tracker.start_pipeline(f"writer-{index}", {"unisd.launcher": "test", "writer": str(index)})
    for stage in range(STAGES):
        with tracker.stage(parent, f"stage-{stage}", params={"writer": index, "stage": stage}) as run:
            for step in range(STEPS):
                run.log_metrics({"loss": loss(index, stage, step)}, step=step)
            blob = root / f"blob-{index}-{stage}.bin"
            blob.write_bytes(payload(index, stage))
            run.log_artifacts(blob, "blobs")
    tracker.end(parent)


@pytest.fixture
def server(tmp_path):
    spec = ServerSpec.local(tmp_path / "store", port=free_port())
    srv = TrackingServer(spec, log=tmp_path / "server.log")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def test_two_concurrent_writers_arrive_intact_and_the_server_stops(tmp_path, server):
    from mlflow import MlflowClient

    assert server.spec.host == "127.0.0.1"
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri, "PYTHONPATH": str(REPO)}
    procs = []
    for i in range(WRITERS):
        (tmp_path / f"w{i}").mkdir()
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, str(i), str(tmp_path / f"w{i}"), str(barrier)],
                env=env,
                cwd=tmp_path,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    for p in procs:
        out = p.communicate(timeout=240)[0].decode(errors="replace")
        assert p.returncode == 0, out[-3000:]

    client = MlflowClient(server.uri)
    experiments = [e for e in client.search_experiments() if e.name == "unisd"]
    assert len(experiments) == 1
    exp = experiments[0]
    assert exp.artifact_location.startswith("mlflow-artifacts:/")  # proxied: the server's store
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    assert len(runs) == WRITERS * (1 + STAGES)
    assert all(r.info.status == "FINISHED" for r in runs)
    parents = {r.data.tags["writer"]: r.info.run_id for r in runs if "writer" in r.data.tags}
    assert sorted(parents) == [str(i) for i in range(WRITERS)]
    downloads = tmp_path / "downloads"
    for run in runs:
        if "writer" in run.data.tags:
            continue
        w, s = int(run.data.params["writer"]), int(run.data.params["stage"])
        assert run.data.tags["mlflow.parentRunId"] == parents[str(w)]
        history = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)
        assert [(m.step, m.value) for m in history] == [(k, loss(w, s, k)) for k in range(STEPS)]
        [artifact] = client.list_artifacts(run.info.run_id, "blobs")
        local = client.download_artifacts(run.info.run_id, artifact.path, str(downloads / run.info.run_id))
        assert Path(local).read_bytes() == payload(w, s)
    stored = sorted(Path(server.spec.artifacts_destination).rglob("*.bin"))
    assert len(stored) == WRITERS * STAGES
    assert {p.read_bytes() for p in stored} == {payload(w, s) for w in range(WRITERS) for s in range(STAGES)}

    group = server.proc.pid
    server.stop()
    assert not group_alive(group)  # the server and every worker process it started
    assert not healthy(server.uri, timeout=1)
    server.stop()  # idempotent


def test_a_busy_port_is_one_line_and_starts_nothing(tmp_path):
    import socket

    from unisd.tracking_server import ServerError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        spec = ServerSpec.local(tmp_path / "store", port=s.getsockname()[1])
        with pytest.raises(ServerError, match=r"127\.0\.0\.1:\d+ is in use"):
            TrackingServer(spec).start()


def test_the_default_binds_this_machine_only(tmp_path):
    spec = ServerSpec.local(tmp_path)
    command = spec.command()
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert spec.backend_store_uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert spec.uri == "http://127.0.0.1:5000"


if __name__ == "__main__":
    writer(int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
