"""N-process training: one round's `train_round` in several processes, under `accelerate launch`.

With `train.processes: N` (> 1) or `train.accelerate_config: FILE`, the train stage calls
`train_in_processes` instead of `unisd.train.train_round`. It writes the round's
arguments to a job file in the round's resumable work folder, runs

    python -m accelerate.commands.launch --multi_gpu --num_processes N ... -m unisd.distributed JOB

(or `--config_file FILE` instead of the flags) and waits. `--multi_gpu` is accelerate's
name for its torchrun launcher: on CUDA each process gets its own GPU and NCCL, without
CUDA (or with `model.device: cpu`) the processes share the CPU and talk over gloo. Every
process runs `train_round` on the job; how they split the work and stay identical is
its docstring. The main process writes the checkpoints and the outputs and records its
metrics in a file, replayed into the stage's MLflow run when the processes are done.

Only the training runs in N processes: the pipeline's other stages (generation,
filtering, evaluation) run once, in the stage's process, as before. A failed process
fails the stage, and a rerun resumes from the last checkpoint on any number of processes.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from unisd.config import Config
from unisd.train import TrainingError

if TYPE_CHECKING:
    from unisd.train import TrainItem

log = logging.getLogger(__name__)
WORKER = ["-m", __name__]  # what each process runs, given the job file


def launched(cfg: Config) -> bool:
    """Whether the train stage runs its training under `accelerate launch`."""
    return cfg.train.processes > 1 or cfg.train.accelerate_config is not None


class MetricsFile:
    """The main process's stand-in for the stage's MLflow run: one JSON line per call."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._write({"metrics": metrics, "step": step})

    def log_checkpoint(self, step: int, point: dict[str, Any], path: Path) -> None:
        self._write({"checkpoint": step, "point": point, "path": str(path)})

    def _write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


def _replay(path: Path, run) -> None:
    """Log what the main process recorded (`MetricsFile`) to the stage's run."""
    if not path.is_file():
        return
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "checkpoint" in record:
            run.log_checkpoint(record["checkpoint"], record["point"], Path(record["path"]))
        else:
            run.log_metrics(record["metrics"], step=record["step"])
    path.unlink()


def launch_command(cfg: Config, job: Path) -> list[str]:
    """`accelerate launch` of the training processes: the accelerate config file's
    settings, or `train.processes` on this machine, each with an equal share of this
    process's torch threads (what `OMP_NUM_THREADS` sets in each), and their rendezvous on
    a free port (0: accelerate picks one) so that two trainings on one machine stay apart."""
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if cfg.train.accelerate_config is not None:
        command += ["--config_file", str(cfg.root / cfg.train.accelerate_config)]
    else:
        n = cfg.train.processes
        command += [
            *("--multi_gpu", "--num_processes", str(n), "--num_machines", "1"),
            *("--mixed_precision", "no", "--dynamo_backend", "no"),
            *("--num_cpu_threads_per_process", str(max(1, torch.get_num_threads() // n))),
            *("--main_process_port", "0"),
        ]
    return [*command, *WORKER, str(job)]


def train_in_processes(
    cfg: Config,
    items: list[TrainItem],
    base_dir: Path,
    base_digest: str,
    out: Path,
    work: Path,
    run,
    init_dir: Path | None = None,
) -> dict[str, Any]:
    """`unisd.train.train_round` with the same arguments, in the processes that
    `launch_command` starts; returns its `train_info`."""
    work.mkdir(parents=True, exist_ok=True)
    job, metrics = work / "job.pt", work / "metrics.jsonl"
    arguments = {"cfg": cfg, "items": items, "base_dir": base_dir, "base_digest": base_digest}
    torch.save({**arguments, "out": out, "work": work, "init_dir": init_dir}, job)  # all but `run`
    metrics.unlink(missing_ok=True)  # a resumed run logs from its checkpoint on, as in one process
    command = launch_command(cfg, job)
    log.info("training in processes: %s", shlex.join(command))
    if cfg.train.accelerate_config is not None:
        log.info("on every other machine: accelerate launch --config_file ITS_CONFIG -m %s %s", __name__, job)
    # the processes import this checkout's unisd, whatever their working directory
    path = os.pathsep.join(p for p in (str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")) if p)
    try:
        with subprocess.Popen(command, env={**os.environ, "PYTHONPATH": path}) as launcher:
            try:
                status = launcher.wait()
            except BaseException:
                launcher.terminate()  # torchrun stops its processes on SIGTERM
                raise
    finally:
        _replay(metrics, run)
    if status != 0:
        raise TrainingError(
            f"the training processes failed (exit status {status}; their errors are above); "
            "a rerun resumes from the last checkpoint"
        )
    return json.loads((out / "train_info.json").read_text())


def main(argv: list[str] | None = None) -> int:
    """One training process: `python -m unisd.distributed JOB`, what `accelerate launch` runs."""
    from unisd import console
    from unisd.train import train_round

    (job,) = sys.argv[1:] if argv is None else argv
    console.configure()
    arguments = torch.load(job, weights_only=False)
    train_round(**arguments, run=MetricsFile(Path(job).with_name("metrics.jsonl")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
