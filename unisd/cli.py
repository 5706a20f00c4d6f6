"""The `unisd` command: pipeline stages (called by dvc.yaml), the Prefect flow, serving.

    unisd run                      the whole pipeline as a Prefect flow (cached), prints the table
    unisd model|prepare|distill|evaluate [--trained]
                                   one stage at the default paths (what `dvc repro` runs)
    unisd study compare|ablation   a study (Prefect flow) and its report in reports/<study>/
    unisd study compare --status   the study's cells done and to do, from their records (no score read)
    unisd report compare|ablation  rebuild a study's report from its outputs
    unisd serve [--with-server]    serve the Prefect deployments (optionally with a local server)
    unisd tracking-server          a shared MLflow tracking server (database + artifact store) on 127.0.0.1
    unisd table FILE               print a metrics file as a table

Every command takes `--params FILE`, `--set key.path=value` overrides and `--verbose`
(other libraries' logs too, `unisd.console`). Bad params, data, assets or a stage output
changed on disk exit with status 2 and one line per problem naming the file and the key
or row, before anything is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from unisd import console
from unisd.config import Config, load_config, parse_override, profile_overrides
from unisd.data.schema import DataError, decode_utf8
from unisd.errors import INPUT_ERRORS
from unisd.registry import COMMANDS

if TYPE_CHECKING:
    from unisd.stages import StageContext

log = logging.getLogger("unisd")


class _NoTraceback(logging.Filter):
    """Drops the traceback Prefect logs with a run that failed on bad input: the message
    already names the file and row, and a traceback would bury that one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], INPUT_ERRORS):
            record.exc_info = record.exc_text = None
        return True


def _dvc_lock_tags(root: Path, stage: str) -> dict[str, str]:
    """Hashes DVC recorded for the outputs of other stages (this stage's upstream)."""
    import yaml

    lock = root / "dvc.lock"
    if not lock.is_file():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    return {
        f"dvc.{name}.{out['path']}": out.get("md5", "")
        for name, entry in stages.items()
        if name != stage
        for out in entry.get("outs", [])
    }


def _stage_context(cfg: Config) -> tuple[StageContext, str]:
    """Tracking for a stage launched from the shell; under `dvc repro` (DVC sets DVC_STAGE)
    the runs are tagged with the DVC stage, its upstream hashes and the experiment name."""
    from unisd.stages import StageContext
    from unisd.tracking import Tracker, pipeline_key, recover

    tracker = Tracker(cfg)
    recover(cfg, tracker)
    dvc_stage = os.environ.get("DVC_STAGE")
    launcher = "dvc" if dvc_stage else "cli"
    tags = {"unisd.launcher": launcher}
    if dvc_stage:
        tags.update({"dvc.stage": dvc_stage, **_dvc_lock_tags(cfg.root, dvc_stage)})
        if exp := os.environ.get("DVC_EXP_NAME"):
            tags["dvc.exp_name"] = exp
    parent = tracker.pipeline_for_key(pipeline_key(cfg, launcher), f"{launcher}:{cfg.run.name}", tags)
    return StageContext(tracker, parent, tags), parent


def _run_stage(cfg: Config, command: str, trained: bool) -> None:
    """One dvc.yaml stage (`unisd.registry.COMMANDS`): model, prepare, distill (the
    recipe's rounds) or evaluate, each the part of `unisd.chain.run_recipe` it names,
    reading its inputs from the default paths."""
    from unisd.chain import direct_runner, distill_chain, evaluate_base, evaluate_trained
    from unisd.stages import Layout, format_table

    layout = Layout(cfg)
    ctx, parent = _stage_context(cfg)
    run_step = direct_runner(cfg, ctx)
    ok = False
    try:
        if command == "model":
            run_step("model", out=layout.model)
        elif command == "prepare":
            run_step("prepare", out=layout.data)
        elif command == "distill":
            layout.run.mkdir(parents=True, exist_ok=True)  # `base` trains nothing: the folder stays empty
            distill_chain(cfg, layout.model, layout.data, run_step)
        elif not trained:
            print(format_table(evaluate_base(cfg, layout.model, layout.data, run_step)))
        else:
            last = None if cfg.method.loss == "none" else layout.round(cfg.train_set.rounds, "train")
            print(format_table(evaluate_trained(cfg, last, layout.model, layout.data, run_step)))
        ok = True
    finally:
        ctx.tracker.end(parent, ok)


def _serve(args: argparse.Namespace) -> None:
    from unisd.orchestration.serve import serve_deployments

    serve_deployments(Path(args.params).resolve(), with_server=args.with_server, port=args.port)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanup runs (see `_on_sigterm`)."""


def _on_sigterm(signum, frame) -> None:
    # Python's default SIGTERM action ends the process on the spot: no `finally`, no
    # atexit, so the temporary Prefect server (a child process that atexit stops) would
    # outlive us. Prefect turns a SIGTERM during a flow into a crash, then re-sends it to
    # the handler that was installed before: this one.
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("unisd: interrupted; finished stage outputs are kept and reused on the next run", file=sys.stderr)
        return 130
    except Terminated:
        print("unisd: terminated; finished stage outputs are kept and reused on the next run", file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="unisd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    stage_commands = [(line.split()[1], c.help) for line, c in COMMANDS.items() if c.help]
    for name, helptext in (
        ("run", "run the pipeline flow"),
        *stage_commands,
        ("study", "run the compare or ablation study (Prefect flow) and write its report"),
        ("report", "rebuild a study's report from its outputs"),
        ("serve", "serve Prefect deployments"),
        ("table", "print a metrics file"),
        ("tracking-server", "run a shared MLflow tracking server until interrupted"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        p.add_argument(
            "--profile",
            metavar="FILE",
            help="a profile of param overrides applied before --set, e.g. profiles/paper.yaml",
        )
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a param, e.g. --set eval.limit=10 (repeatable)",
        )
        p.add_argument(
            "--verbose",
            action="store_true",
            help="also print other libraries' INFO logs, HTTP requests and progress bars",
        )
        if name == "evaluate":
            p.add_argument("--trained", action="store_true", help="evaluate the recipe's trained model")
        if name == "serve":
            p.add_argument("--with-server", action="store_true", help="also start a Prefect server on 127.0.0.1")
            p.add_argument("--port", type=int, default=4200)
        if name == "table":
            p.add_argument("file")
        if name == "tracking-server":
            from unisd.tracking_server import add_arguments

            add_arguments(p)
        if name in ("study", "report"):
            p.add_argument("study", choices=("compare", "ablation"))
        if name == "study":
            p.add_argument("--status", action="store_true", help="list the cells done and to do; run nothing")
    args = parser.parse_args(argv)
    console.configure(args.verbose, prefect=args.command in ("run", "study", "serve"))
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logging.getLogger(name).addFilter(_NoTraceback())
    try:
        if args.command == "table":
            print(_table(Path(args.file)))
            return 0
        if args.command == "tracking-server":
            from unisd.tracking_server import ServerError, serve

            try:
                serve(args)
            except ServerError as err:
                print(f"unisd: error: {err}", file=sys.stderr)
                return 1
            return 0
        if getattr(args, "profile", None):
            args.overrides = profile_overrides(args.profile) + args.overrides
        cfg = load_config(args.params, args.overrides)  # validated before any work starts
        if args.command in ("run", "study", "distill", "evaluate") and "vllm" in (
            cfg.generation.backend,
            cfg.eval.backend,
        ):
            from unisd.vllm_backend import require_vllm

            require_vllm()  # vLLM and a GPU, or one line and exit status 2 before any stage runs
        if args.command == "run":
            from unisd.orchestration.pipeline import run_pipeline
            from unisd.orchestration.serve import flow_server

            with flow_server():
                run_pipeline(Path(args.params).resolve(), args.overrides)
        elif args.command == "serve":
            _serve(args)
        elif args.command in ("study", "report"):
            overrides = {".".join(k): v for k, v in map(parse_override, args.overrides)}
            if args.command == "study" and args.status:
                from unisd.study import format_status, study_status

                print(format_status(study_status(Path(args.params).resolve(), overrides, args.study)))
            elif args.command == "study":
                from unisd.orchestration import study
                from unisd.orchestration.serve import flow_server

                with flow_server():
                    getattr(study, args.study)(str(Path(args.params).resolve()), overrides)
            else:
                from unisd.study import run_study

                print(run_study(Path(args.params).resolve(), overrides, args.study).read_text())
        else:
            _run_stage(cfg, args.command, getattr(args, "trained", False))
    except INPUT_ERRORS as err:
        print("\n".join(f"unisd: error: {line}" for line in str(err).splitlines()), file=sys.stderr)
        return 2
    return 0


def _table(path: Path) -> str:
    """`unisd table FILE`: a file that is missing, not JSON or not a metrics file is a DataError."""
    from unisd.stages import format_table

    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot be read: {err.strerror}") from None
    text = decode_utf8(raw, str(path))
    try:
        return format_table(json.loads(text))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise DataError(f"{path}: not a metrics file ({type(err).__name__}: {err})") from None


if __name__ == "__main__":
    sys.exit(main())
