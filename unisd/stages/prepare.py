"""The prepare stage: every benchmark loaded and split deterministically."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from unisd.artifacts import dir_digest, write_json_atomic
from unisd.config import Config
from unisd.stages import StageContext, stage_output

log = logging.getLogger(__name__)


def prepare_stage(cfg: Config, out: Path, ctx: StageContext) -> Path:
    """Load each benchmark, split it deterministically, write `<benchmark>/<split>.jsonl`."""
    from unisd.data import SUITES, load_benchmark, write_jsonl

    suite = SUITES[cfg.data.suite]
    splits: dict[str, dict[str, Any]] = {}
    with stage_output(ctx, "prepare", "prepare", cfg, {}, out, cfg.section("data")) as (run, tmp):
        for name in cfg.data.benchmarks:
            log.debug("prepare: loading %s", name)
            bench = suite[name]
            parts = load_benchmark(cfg.data.suite, name, cfg.data.split_seed, cfg.data.sources.get(name))
            (tmp / name).mkdir()
            for split, examples in sorted(parts.items()):
                path = tmp / name / f"{split}.jsonl"
                write_jsonl(path, examples)
                digest = dir_digest(path)
                splits.setdefault(name, {})[split] = {"n": len(examples), "sha256": digest}
                run.log_dataset(
                    f"{name}/{split}",
                    out / name / f"{split}.jsonl",
                    digest,
                    split,
                    len(examples),
                    origin=cfg.data.sources.get(name) or bench.source,
                )
            splits[name]["_source"] = {
                "source": cfg.data.sources.get(name) or bench.source,
                "license": bench.license,
                "task": bench.task,
            }
        write_json_atomic(tmp / "splits.json", splits)
        run.log_artifacts(tmp / "splits.json")
        run.log_metrics({f"{b}.{s}.n": v["n"] for b, d in splits.items() for s, v in d.items() if s != "_source"})
    return out
