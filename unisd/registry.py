"""The stage registry: one table saying what each pipeline stage is.

For every stage: the function that runs it, the names of its inputs (other stages'
outputs, keyed on their digests), the other arguments that change its output (the
round, the label), the params it reads and, through its function's module, the code it
runs. The cache keys (`StageSpec.key`), the Prefect tasks (`unisd/orchestration/tasks.py`) and the
`unisd` stage commands (`COMMANDS`, what dvc.yaml runs) are derived from it, and
dvc.yaml's per-stage deps and params are tested against it (tests/test_registry.py).

A stage's code version covers the module defining its function and every `unisd`
module that one imports, transitively, lazily or not (`unisd.artifacts.code_files`):
each stage function has a module of its own in `unisd/stages/`, so editing
`unisd/losses.py` reruns what computes losses and not the model conversion. This
module is left out of every code version: what it says about a stage (params, inputs)
enters the key as values, so an edit here that changes nothing there reruns nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from unisd.artifacts import PACKAGE, code_files, code_version, content_digest, dir_digest
from unisd.assets import local_model_folder
from unisd.config import Config, digest_json
from unisd.stages.contexts import contexts_stage
from unisd.stages.evaluate import evaluate_stage
from unisd.stages.filter import filter_stage
from unisd.stages.generate import generate_stage
from unisd.stages.model import model_stage
from unisd.stages.negatives import negatives_stage
from unisd.stages.prepare import prepare_stage
from unisd.stages.train import train_stage


def _local_model(cfg: Config) -> dict[str, Path]:
    """A local model folder: its name says nothing about the weights it holds, so a
    retrained or edited model in the same place must not get the old model's outputs."""
    folder = local_model_folder(cfg.model.name)
    return {"model": folder} if folder is not None else {}


def _local_sources(cfg: Config) -> dict[str, Path]:
    """Local benchmark folders (`data.sources`), for the same reason."""
    return {
        bench: Path(src).expanduser()
        for bench, src in sorted(cfg.data.sources.items())
        if Path(src).expanduser().is_dir()
    }


def _lookup(cfg: Config, key: str) -> Any:
    """A param by its dotted key (`train.lora`), as plain data."""
    value = cfg.section(key.split(".")[0])
    for part in key.split("."):
        value = value[part]
    return value


@dataclass(frozen=True)
class StageSpec:
    """One stage of the pipeline (see the module docstring)."""

    name: str
    function: Callable[..., Path]
    inputs: tuple[str, ...] = ()  # arguments naming other stages' outputs: their digests key the cache
    extra: tuple[str, ...] = ()  # other arguments that change the output
    sections: tuple[str, ...] = ()  # params.yaml sections (or keys in them, `train.lora`) it reads
    method: tuple[str, ...] | Literal["all"] = ()  # fields of the recipe's Method it reads
    seed: bool = False  # whether it reads run.seed
    local: Callable[[Config], dict[str, Path]] | None = None  # folders the params name, keyed on their files
    retries: int = 0  # Prefect retries: for stages that are safe to repeat after a transient failure

    def params(self, cfg: Config) -> dict[str, Any]:
        """The params this stage's output depends on (part of its cache key)."""
        params = {key: _lookup(cfg, key) for key in self.sections}
        if self.method:
            method = cfg.method.model_dump(mode="json")
            params["method"] = method if self.method == "all" else {f: method[f] for f in self.method}
        if self.seed:
            params["seed"] = cfg.run.seed
        if self.local is not None and (folders := self.local(cfg)):
            params["content"] = {k: content_digest(p) for k, p in folders.items()}
        return params

    @property
    def dvc_params(self) -> tuple[str, ...]:
        """The same params as dvc.yaml's `params:` names them."""
        method = ("recipe", "components") if self.method else ()
        return (*self.sections, *method, *(("run.seed",) if self.seed else ()))

    @property
    def code_files(self) -> tuple[Path, ...]:
        """The source files this stage runs."""
        return code_files(self.function.__module__, (__name__,))

    @functools.cached_property
    def code(self) -> str:
        """The version of the code this stage runs (part of its cache key)."""
        return code_version(self.function.__module__, (__name__,))

    def key(self, cfg: Config, inputs: Mapping[str, Path | None], extra: dict[str, Any] | None = None) -> str:
        """Content key of a run: code version, params, the digests of its inputs, extra arguments."""
        return digest_json(
            {
                "stage": self.name,
                "code": self.code,
                "params": self.params(cfg),
                "extra": extra or {},
                "inputs": {k: dir_digest(p) for k, p in sorted(inputs.items()) if p is not None},
            }
        )

    def run_name(self, arguments: dict[str, Any]) -> str:
        """What a run of this stage is called (MLflow run, Prefect task run): the stage,
        its round, its label, e.g. `generate-r2`, `evaluate-base`."""
        parts = [self.name]
        if arguments.get("round_idx") is not None:
            parts.append(f"r{arguments['round_idx']}")
        if arguments.get("label") is not None:
            parts.append(str(arguments["label"]))
        return "-".join(parts)


# how the negatives stage runs code to check that a negative is wrong
_SANDBOX = ("eval.code_timeout_s", "eval.code_memory_mb", "eval.code_workers", "eval.code_isolation")
DISTILL = ("contexts", "negatives", "generate", "filter", "train")
STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in (
        StageSpec("model", model_stage, sections=("model",), local=_local_model, retries=2),
        StageSpec("prepare", prepare_stage, sections=("data",), local=_local_sources, retries=2),
        StageSpec(
            "contexts",
            contexts_stage,
            ("model", "data"),
            sections=("model", "prompts", "train_set", "generation.backend", "generation.batch_size"),
            method=("agreement",),
            seed=True,
        ),
        StageSpec(
            "negatives",
            negatives_stage,
            ("model", "data"),
            sections=("model", "prompts", "train_set", "generation", *_SANDBOX),
            method=("contrastive",),
            seed=True,
        ),
        StageSpec(
            "generate",
            generate_stage,
            ("student", "data"),
            ("round_idx",),
            sections=("model", "prompts", "train_set", "generation"),
            method=("loss", "data", "on_policy_fraction", "sample_temperature", "sample_top_p", "gold_mix"),
            seed=True,
        ),
        StageSpec(
            "filter",
            filter_stage,
            ("trajectories", "base", "data", "contexts", "previous"),
            ("round_idx",),
            sections=("model", "prompts", "train_set", "generation", "train.lora"),
            method=("agreement", "teacher"),
        ),
        # resumes from its last checkpoint, so a retry loses at most `train.checkpoint_every` steps
        StageSpec(
            "train",
            train_stage,
            ("filtered", "base", "data", "negatives", "previous"),
            ("round_idx",),
            sections=("model", "prompts", "train"),
            method="all",
            seed=True,
            retries=1,
        ),
        StageSpec(
            "evaluate",
            evaluate_stage,
            ("model", "data", "base"),
            ("label",),
            sections=("model", "data", "prompts", "eval"),
        ),
    )
}


@dataclass(frozen=True)
class Command:
    """A `unisd` stage command (what a dvc.yaml stage runs): the stages it runs, and the
    params it reads besides theirs to find its inputs and outputs."""

    stages: tuple[str, ...]
    params: tuple[str, ...] = ()
    help: str = ""

    @property
    def dvc_params(self) -> set[str]:
        """Its stages' params and its own, a key left out where its section is listed."""
        keys = {p for stage in self.stages for p in STAGES[stage].dvc_params} | set(self.params)
        return {k for k in keys if not any(k.startswith(other + ".") for other in keys)}

    @property
    def code_files(self) -> set[Path]:
        return {f for stage in self.stages for f in STAGES[stage].code_files}


COMMANDS = {  # by command line, as dvc.yaml's `cmd:` says it
    "unisd model": Command(("model",), help="stage: materialize the model"),
    "unisd prepare": Command(("prepare",), help="stage: load and split the benchmarks"),
    "unisd distill": Command(DISTILL, help="stage: the recipe's contexts, negatives and rounds"),
    "unisd evaluate": Command(("evaluate",), help="stage: evaluate the base (or, with --trained, the trained) model"),
    # the trained model is the recipe's last round
    "unisd evaluate --trained": Command(("evaluate",), ("recipe", "train_set.rounds")),
}


def dvc_deps(files: set[Path], package: Path = PACKAGE) -> list[str]:
    """Source files as dvc.yaml lists them, relative to the project: a folder stands for
    its files when every one of them is listed."""
    root = package.parent
    listed, deps = {f.resolve() for f in files}, set()
    for f in listed:
        folder = f.parent
        while folder != package and all(p in listed for p in folder.rglob("*.py")):
            f, folder = folder, folder.parent
        deps.add(f.relative_to(root).as_posix())
    return sorted(d for d in deps if not any(d.startswith(other + "/") for other in deps))
