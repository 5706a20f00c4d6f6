"""The `unisd` command: pipeline stages (called by dvc.yaml), the Prefect flow, serving.

    unisd run                      the whole pipeline as a Prefect flow (cached), prints the table
    unisd model|prepare|evaluate   one stage at the default paths (what `dvc repro` runs)
    unisd serve [--with-server]    serve the Prefect deployments (optionally with a local server)
    unisd table FILE               print a metrics file as a table

Every command takes `--params FILE` and `--set key.path=value` overrides. Bad params,
data or assets exit with status 2 and a message naming the problem.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from unisd.assets import AssetError
from unisd.config import Config, ConfigError, load_config
from unisd.data.schema import DataError

log = logging.getLogger("unisd")


def _dvc_lock_tags(root: Path, stage: str) -> dict[str, str]:
    """Hashes DVC recorded for the outputs of other stages (this stage's upstream)."""
    import yaml

    lock = root / "dvc.lock"
    if not lock.is_file():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    return {f"dvc.{name}.{out['path']}": out.get("md5", "") for name, entry in stages.items() if name != stage
            for out in entry.get("outs", [])}


def _stage_context(cfg: Config, stage: str, launcher: str):
    from unisd.stages import StageContext
    from unisd.tracking import Tracker, pipeline_key

    tracker = Tracker(cfg)
    tags = {"unisd.launcher": launcher}
    if launcher == "dvc":
        tags.update({"dvc.stage": stage, **_dvc_lock_tags(cfg.root, stage)})
    parent = tracker.pipeline_for_key(pipeline_key(cfg, launcher), f"{launcher}:{cfg.run.name}", tags)
    return StageContext(tracker, parent, tags), parent


def _run_stage(cfg: Config, stage: str, launcher: str, label: str) -> None:
    from unisd.stages import Layout, evaluate_stage, format_table, model_stage, prepare_stage

    layout = Layout(cfg)
    ctx, parent = _stage_context(cfg, stage, launcher)
    ok = False
    try:
        if stage == "model":
            model_stage(cfg, layout.model, ctx)
        elif stage == "prepare":
            prepare_stage(cfg, layout.data, ctx)
        else:
            evaluate_stage(cfg, layout.model, layout.data, layout.eval(label), ctx, label=label)
            print(format_table(json.loads(layout.metrics(label).read_text())))
        ok = True
    finally:
        ctx.tracker.end(parent, ok)


def _serve(args: argparse.Namespace) -> None:
    from flows.serve import serve_deployments

    serve_deployments(Path(args.params).resolve(), with_server=args.with_server, port=args.port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unisd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, helptext in (("run", "run the pipeline flow"), ("model", "stage: materialize the model"),
                           ("prepare", "stage: load and split the benchmarks"),
                           ("evaluate", "stage: evaluate the model"), ("serve", "serve Prefect deployments"),
                           ("table", "print a metrics file")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a param, e.g. --set eval.limit=10 (repeatable)")
        if name in ("model", "prepare", "evaluate"):
            p.add_argument("--launcher", default="cli", help="tag for the MLflow parent run (dvc.yaml passes dvc)")
        if name == "evaluate":
            p.add_argument("--label", default="base", help="name of the evaluated model (output folder)")
        if name == "serve":
            p.add_argument("--with-server", action="store_true", help="also start a Prefect server on 127.0.0.1")
            p.add_argument("--port", type=int, default=4200)
        if name == "table":
            p.add_argument("file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "table":
            from unisd.stages import format_table

            print(format_table(json.loads(Path(args.file).read_text())))
            return 0
        cfg = load_config(args.params, args.overrides)  # validated before any work starts
        if args.command == "run":
            from flows.pipeline import run_pipeline

            run_pipeline(Path(args.params).resolve(), args.overrides)
        elif args.command == "serve":
            _serve(args)
        else:
            _run_stage(cfg, args.command, args.launcher, getattr(args, "label", "base"))
    except (ConfigError, DataError, AssetError) as err:
        print(f"unisd: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
