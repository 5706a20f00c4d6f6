"""After kill -9: the next start marks the killed launch's MLflow runs KILLED and its
Prefect runs Crashed, removes its scratch folders, keeps its resumable training state,
and the resumed round ends exactly as an uninterrupted one.

The killed launch is a real process sent SIGKILL in the middle of a training round
(after the checkpoint of step 4), with a tiny model; the reference is an uninterrupted
round in this process."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mlflow_db import empty_mlflow_db
from project import tiny_params
from safetensors.torch import load_file

from unisd.artifacts import atomic_dir, owner_gone, process_token, sweep_stale
from unisd.config import load_config
from unisd.modeling import load_tokenizer
from unisd.stages import StageContext, stage_output
from unisd.tracking import OWNER, Tracker, recover
from unisd.train import TrainItem, train_round

pytestmark = pytest.mark.usefixtures("one_thread")

KILLED_LAUNCH = """
import json, os, signal, sys
from pathlib import Path
import torch
from unisd.artifacts import process_token, write_text_atomic
from unisd.config import load_config
from unisd.stages import StageContext, stage_output
from unisd.tracking import Tracker
from unisd.train import TrainItem, train_round

torch.set_num_threads(1)
params, model_dir, out, work = map(Path, sys.argv[1:])
cfg = load_config(params)
items = [TrainItem(**item) for item in json.loads((params.parent / "items.json").read_text())]
tracker = Tracker(cfg)
ctx = StageContext(tracker, tracker.start_pipeline("cli:default"))
print(process_token(), flush=True)

def kill(step):
    if step == 5:  # the checkpoint of step 4 is on disk; killed while logging another one
        tracker.client.create_logged_model(tracker.experiment_id, name="checkpoint-step5", source_run_id=run.run_id)
        os.kill(os.getpid(), signal.SIGKILL)

with stage_output(ctx, "train-r1", "train", cfg, {}, out, {}) as (run, tmp):
    train_round(cfg, items, model_dir, "d" * 64, tmp, work, run, on_step=kill)
"""

PAIRS = [
    ("Question: Which gas do plants absorb?", "Reasoning: carbon dioxide.\nAnswer: B"),
    ("Write a function that adds two numbers.", "def add(a, b):\n    return a + b"),
    ("Question: What is the weather in Paris?", "Action: getWeather"),
    ("Double every number below x.", "def f(x):\n    return [i * 2 for i in range(x)]"),
]


class Run:
    """A stand-in for the MLflow run of the reference round."""

    def log_metrics(self, *args, **kwargs):
        pass

    def log_checkpoint(self, *args, **kwargs):
        pass


def train_items(model_dir: Path) -> list[TrainItem]:
    tok = load_tokenizer(model_dir)
    return [
        TrainItem(
            tok(q + "\n")["input_ids"],
            tok(a)["input_ids"] + [tok.eos_token_id],
            teacher_prompt=tok(f"{q}\nExample: {a}\n")["input_ids"],
        )
        for q, a in PAIRS * 2
    ]


@pytest.fixture
def killed_launch(tmp_path, tmp_path_factory, tiny_model_dir, monkeypatch):
    """A project whose `train-r1` stage was killed with SIGKILL at step 5 of 6."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    empty_mlflow_db(tmp_path_factory, tmp_path / "mlflow.db")
    params = tiny_params(
        tiny_model_dir,
        model={"device": "cpu"},
        train={
            "lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.1},
            "lr": 5e-3,
            "max_steps": 6,
            "batch_size": 2,
            "grad_accum": 2,
            "checkpoint_every": 2,
            "chunk_size": 4,
        },
    )
    params.update(recipe="ema", components={"teacher": {"ema_every": 3}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    items = train_items(tiny_model_dir)
    (tmp_path / "items.json").write_text(json.dumps([vars(it) for it in items]))
    out, work = tmp_path / "artifacts" / "runs" / "ema" / "round-1" / "train", tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_LAUNCH, str(tmp_path / "params.yaml"), str(tiny_model_dir), str(out), str(work)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-3000:]
    return load_config(tmp_path / "params.yaml"), items, out, work, proc.stdout.split()[0]


@pytest.mark.slow  # a training process killed mid-round, then resumed
def test_the_next_start_cleans_up_and_the_round_resumes_exactly(killed_launch, tiny_model_dir, tmp_path):
    cfg, items, out, work, token = killed_launch
    assert owner_gone(token) and not owner_gone(process_token())
    scratch = [p for p in out.parent.iterdir() if p.name.startswith(".train.tmp-")]
    assert len(scratch) == 1 and (work / "checkpoint.pt").is_file() and not out.exists()
    tracker = Tracker(cfg)
    left = {r.info.run_name: r for r in tracker.client.search_runs([tracker.experiment_id])}
    assert {name: r.info.status for name, r in left.items()} == {"cli:default": "RUNNING", "train-r1": "RUNNING"}

    # what this (live) process has open is not touched by the clean-up
    live_run = tracker.start_pipeline("live")
    with atomic_dir(cfg.artifacts / "live") as live_scratch:
        recover(cfg, tracker)
        assert live_scratch.is_dir()
    runs = {r.info.run_name: r.info for r in tracker.client.search_runs([tracker.experiment_id])}
    assert (runs["cli:default"].status, runs["train-r1"].status, runs["live"].status) == ("KILLED", "KILLED", "RUNNING")
    assert runs["train-r1"].end_time is not None
    assert tracker.client.get_run(live_run).data.tags[OWNER] == process_token()
    models = {m.name: str(m.status) for m in tracker.client.search_logged_models([tracker.experiment_id])}
    assert models == {"checkpoint-step2": "READY", "checkpoint-step4": "READY", "checkpoint-step5": "FAILED"}
    assert not scratch[0].exists() and (work / "checkpoint.pt").is_file()  # scratch gone, resume state kept
    assert sweep_stale(cfg.artifacts) == []

    steps = []
    with stage_output(StageContext(tracker, live_run), "train-r1", "train", cfg, {}, out, {}) as (run, tmp):
        train_round(cfg, items, tiny_model_dir, "d" * 64, tmp, work, run, on_step=steps.append)
    assert steps == [5, 6]  # continued from the checkpoint of step 4
    (tmp_path / "ref").mkdir()
    train_round(cfg, items, tiny_model_dir, "d" * 64, tmp_path / "ref", tmp_path / "ref-work", Run())
    a, b = (
        load_file(tmp_path / "ref" / "adapter" / "adapter_model.safetensors"),
        load_file(out / "adapter" / "adapter_model.safetensors"),
    )
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0)
    curves = [
        [json.loads(line)["loss"] for line in (d / "curves.jsonl").read_text().splitlines()]
        for d in (tmp_path / "ref", out)
    ]
    assert curves[1] == pytest.approx(curves[0], rel=1e-6)


def test_sweep_removes_only_what_ended_processes_left_on_this_machine(tmp_path):
    host, pid, start = process_token().split(".")
    reused = f"{host}.{pid}.{int(start) + 1}"  # this pid, but another (ended) process
    ended = subprocess.Popen(["true"])
    ended.wait()
    names = {
        f".train.tmp-{reused}-0123abcd": False,
        f".data.old-{host}.{ended.pid}.7-0123abcd": False,
        f"..model.tmp-{reused}-0123abcd.gguf-work": False,  # the model converter's work folder
        f".train.tmp-{process_token()}-0123abcd": True,  # this process is alive
        f".train.tmp-ffffffff.{ended.pid}.7-0123abcd": True,  # another machine: cannot tell
        ".train.work-0123456789ab": True,  # resumable training state
        "train": True,
        ".train.tmp-0123abcd": True,  # an output; an unknown old-style name
    }
    for name in names:
        (tmp_path / "runs" / name / "sub").mkdir(parents=True)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / f".base.json.tmp-{reused}-0123abcd").write_text("{")
    removed = sweep_stale(tmp_path)
    assert {p.name for p in removed} == {n for n, kept in names.items() if not kept} | {
        f".base.json.tmp-{reused}-0123abcd"
    }
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(n for n, kept in names.items() if kept)


@pytest.mark.slow  # a flow in a process that is killed, then a second start
def test_flow_runs_of_a_killed_process_are_marked_crashed(tmp_path, monkeypatch):
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run
    from prefect.states import Completed, Running

    from unisd.orchestration.recovery import OWNER_TAG, begin_flow

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    dead = subprocess.run(
        [sys.executable, "-c", "from unisd.artifacts import process_token; print(process_token())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert owner_gone(dead)

    @flow(name="killed")
    def killed_flow():
        pass

    @task(name="killed-task")
    def killed_task():
        pass

    with get_client(sync_client=True) as client:
        orphan = client.create_flow_run(killed_flow, tags=[OWNER_TAG + dead], state=Running())
        orphan_task = client.create_task_run(killed_task, orphan.id, "k-1", state=Running())
        live = client.create_flow_run(killed_flow, tags=[OWNER_TAG + process_token()], state=Running())

    @flow(name="next-start")
    def next_start() -> str:
        begin_flow()
        return str(flow_run.id)

    started = next_start()
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(orphan.id).state.is_crashed()
        assert client.read_task_run(orphan_task.id).state.is_crashed()
        assert client.read_flow_run(live.id).state.is_running()
        assert OWNER_TAG + process_token() in client.read_flow_run(started).tags
        client.set_flow_run_state(live.id, Completed(), force=True)
