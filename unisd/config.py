"""The params schema: `params.yaml` is the single source of truth for every stage.

Every default here is the value `params.yaml` gives (tests/test_config.py compares the
two), so a key left out of a params file means what it means in `params.yaml`; the
paper's settings are a profile on top of it (`profiles/paper.yaml`).

The file is validated before any work starts: bytes that are not UTF-8, YAML errors,
keys given twice, unknown keys, wrong types, non-finite numbers and out-of-range values
raise `ConfigError`, one line per problem naming the file and the line or key path
(e.g. `eval.limit`). Stages receive the validated `Config`; a stage's cache key holds the
sections its registry entry names (`Config.section`, unisd.registry).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from copy import deepcopy
from pathlib import Path
from typing import Annotated, Any, Literal, cast

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from unisd.data.schema import key_path, not_utf8
from unisd.data.suites import SUITES
from unisd.prompts import McqFormat, TeacherTemplate
from unisd.recipes import COMPONENTS, RECIPES, Method, method_dict


class ConfigError(ValueError):
    """Invalid params: the message names the file and the key path."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        # pydantic would read `limit: true` (or YAML's `yes`) as 1.
        annotation: Any = cls.model_fields[cast(str, info.field_name)].annotation
        if isinstance(v, bool) and annotation in (int, float):
            raise ValueError("expected a number, not a boolean")
        return v


# torch, numpy and random all take it; bools and floats are not seeds
Seed = Annotated[int, Field(ge=0, le=2**32 - 1, strict=True)]


class RunCfg(Section):
    name: str = Field("default", pattern=r"^[A-Za-z0-9._-]+$", description="names the MLflow parent run")
    seed: Seed = 42


class PathsCfg(Section):
    artifacts: str = "artifacts"
    metrics: str = "metrics"


class ModelCfg(Section):
    # An embedded key (see unisd.assets.EMBEDDED_MODELS), a local directory, or a hub id.
    name: str = Field("smollm2-135m-instruct", min_length=1)  # "" would name the current folder
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # "chat" needs a chat template; "plain" is the fallback for base models; "auto" picks.
    template: Literal["auto", "chat", "plain"] = "auto"


class DataCfg(Section):
    suite: Literal["embedded", "paper"] = "embedded"
    benchmarks: tuple[str, ...] = Field(SUITES["embedded"].names, validate_default=True)  # checked against the suite
    split_seed: Seed = 42
    # Per-benchmark dataset source override (paper suite): a hub id or a local file/dir.
    sources: dict[str, str] = Field(default_factory=dict)

    @field_validator("benchmarks", "sources")
    @classmethod
    def _known_benchmarks(cls, v: Any, info: ValidationInfo) -> Any:
        # A field validator (not a model one) so that errors name `data.benchmarks` / `data.sources`.
        if info.field_name == "benchmarks" and not v:
            raise ValueError("at least one benchmark is needed")
        suite = info.data.get("suite")  # absent when the suite itself is invalid (reported there)
        known = SUITES[suite].names if suite else ()
        unknown = [name for name in v if suite and name not in known]
        if unknown:
            raise ValueError(f"unknown benchmark {unknown[0]!r} for suite {suite!r}; known: {', '.join(known)}")
        return v


class PromptCfg(Section):
    max_prompt_tokens: int = Field(1024, ge=32)
    # how the privileged teacher sees the gold demonstration (unisd.prompts.teacher_messages)
    teacher_template: TeacherTemplate = "worked_example"
    # the MCQ answer layout of task texts and gold responses (unisd.prompts.MCQ_FORMATS)
    mcq_format: McqFormat = "reason_first"


class NewTokens(Section):
    mcq: int = Field(128, ge=1)
    code: int = Field(384, ge=1)
    tool: int = Field(256, ge=1)


SCORE_TOKENS = "padded tokens (rows × longest) per teacher-forced scoring forward; 0 = batch_size rows only"


class EvalCfg(Section):
    split: Literal["validation", "test"] = "test"
    limit: int = Field(40, ge=0, description="items per benchmark; 0 = the whole split")
    limits: dict[str, Annotated[int, Field(ge=0, strict=True)]] = Field(
        {},
        description="items of the benchmarks named here, over `limit` (a small harm check beside a whole headline split)",
    )
    batch_size: int = Field(16, ge=1)
    score_tokens: int = Field(2048, ge=0, description=SCORE_TOKENS)
    max_new_tokens: NewTokens = NewTokens()
    bf16_autocast: bool = False
    code_timeout_s: float = Field(10.0, gt=0, le=600)
    code_memory_mb: int = Field(1024, ge=64)
    code_workers: int = Field(2, ge=1, le=256, description="concurrent sandboxed test processes")
    code_isolation: Literal["best_effort", "strict"] = Field(
        "best_effort",
        description="sandbox for generated code: strict refuses to score without namespaces and "
        "seccomp (docs/security.md)",
    )
    ppl: bool = True
    # MCQ: rotation-averaged letter probabilities and option log-likelihoods (unisd.choice_scores)
    choice_scores: bool = True
    headline: str = Field("sciq", description="benchmark whose rot_acc is metrics.json's headline, when evaluated")
    backend: Literal["hf", "fast", "vllm"] = Field(
        "fast",
        description="greedy answers by the fast backend (unisd.fast_decode: in fp32 the reference's "
        "answers, tested and measured in docs/lineage.md), the reference HF path, or vLLM "
        "(unisd.vllm_backend: optional extra, GPU only)",
    )

    def limit_of(self, benchmark: str) -> int:
        """Items of `benchmark` to evaluate (0 = the whole split)."""
        return self.limits.get(benchmark, self.limit)


class TrainSetCfg(Section):
    # None: every trainable benchmark of data.benchmarks
    benchmarks: tuple[str, ...] | None = None
    limit: int = Field(32, ge=0, description="train examples per benchmark; 0 = the whole split")
    rounds: int = Field(1, ge=1, description="generate -> filter -> train repeats, each from the latest student")
    prompts_per_round: int = Field(0, ge=0, description="prompts sampled per round; 0 = all")
    keep_truncated: bool = Field(
        False,
        description="train on samples cut at generation.max_new_tokens too "
        "(dropped by default: their teacher signal never ends the turn)",
    )


class GenerationCfg(Section):
    temperature: float = Field(0.7, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    samples_per_prompt: int = Field(1, ge=1)
    batch_size: int = Field(16, ge=1)
    score_tokens: int = Field(2048, ge=0, description=SCORE_TOKENS)
    max_new_tokens: NewTokens = NewTokens(mcq=128, code=256, tool=128)
    bf16_autocast: bool = True
    # "fast": unisd.fast_decode for sampling (greedy fp32 tokens identical to "hf"); "vllm":
    # unisd.vllm_backend (optional extra, GPU only); the evaluation decodes with eval.backend
    backend: Literal["hf", "fast", "vllm"] = "fast"


class LoraCfg(Section):
    enabled: bool = True
    r: int = Field(64, ge=1)
    alpha: float = Field(128.0, gt=0.0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class TrainCfg(Section):
    lora: LoraCfg = LoraCfg()
    lr: float = Field(1e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    epochs: int = Field(1, ge=1)
    max_steps: int = Field(0, ge=0, description="optimizer steps per round; 0 = epochs over the data")
    batch_size: int = Field(4, ge=1, description="sequences per micro-batch")
    grad_accum: int = Field(2, ge=1)
    max_grad_norm: float = Field(1.0, gt=0.0)
    bf16_autocast: bool = True
    checkpoint_every: int = Field(50, ge=1, description="optimizer steps between resumable checkpoints")
    chunk_size: int = Field(128, ge=1, description="sequence positions per chunk of the vocabulary divergence")
    cache_teacher: bool = Field(
        True,
        description="keep a frozen teacher's hidden states for items seen again "
        "(epochs > 1): completion tokens × hidden size floats",
    )
    processes: int = Field(
        1,
        ge=1,
        description="data-parallel training processes on this machine, under `accelerate launch` "
        "(unisd.distributed); each runs grad_accum / processes micro-batches of every step",
    )
    accelerate_config: str | None = Field(
        None,
        description="an accelerate config file (relative to the project) to launch the training "
        "processes with: several machines or GPUs; it then says the process count",
    )
    sharding: Literal["none", "fsdp"] = Field(
        "none",
        description="none: every process holds the whole student (DDP); fsdp: each holds 1/N of "
        "the decoder (FSDP2, unisd.sharding)",
    )

    @model_validator(mode="after")
    def _whole_shares(self) -> TrainCfg:
        if self.grad_accum % self.processes:
            raise ValueError(
                f"grad_accum ({self.grad_accum}) must be a multiple of processes "
                f"({self.processes}): the same global batch, split evenly"
            )
        return self


def resolve_method(recipe: str, components: dict[str, Any], where: str) -> Method:
    """`recipe` with `components` on top, validated; an error names the key under `where`."""
    try:
        return Method.model_validate(method_dict(recipe, components))
    except ValidationError as err:
        e = err.errors()[0]
        key = key_path(e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        raise ValueError(f"{where}.{key}: {msg}" if key else f"{where}: {msg}") from None


STUDY_SIZE: dict[str, Any] = {
    "data.benchmarks": ["sciq", "arc_challenge", "commonsense_qa"],
    "train_set.benchmarks": ["sciq"],
    "train_set.limit": 0,
    "eval.limit": 0,
    "eval.limits": {"arc_challenge": 150, "commonsense_qa": 150},
    "prompts.mcq_format": "open_answer",
}
_SCALED = {  # unisd-full's mechanisms scaled to its ~65 steps (docs/tuning.md)
    "agreement": {"gamma": 0.1, "filter_quantile": 0.8},
    "teacher": {"ema_every": 4, "ema_beta": 0.9},
    "clip": {"mode": "quantile", "q": 0.99},
}
STUDY_RECIPE_COMPONENTS: dict[str, dict[str, Any]] = {
    "unisd-full": {**_SCALED, "gold_mix": 0.25},
    **{r: {"gold_mix": 0.25} for r in ("ssd", "sdft", "gkd", "opsd", "sd")},
    "agreement_tok_retrieval": {"agreement": _SCALED["agreement"], "gold_mix": 0.25},  # the ablation's singles
    "ema": {"teacher": _SCALED["teacher"], "gold_mix": 0.25},
    "clip": {"clip": _SCALED["clip"], "gold_mix": 0.25},
}


class StudyCfg(Section):
    """The compare and ablation studies (unisd/study.py)."""

    recipes: tuple[str, ...] = ("base", "sft", "ssd", "sdft", "gkd", "opsd", "unisd-full")
    seeds: tuple[Seed, ...] = (42, 43)
    # the ablation's seeds (null: `seeds`): one, since it diagnoses on validation and has
    # about twice the compare study's cells
    ablation_seeds: tuple[Seed, ...] | None = (42,)
    components: tuple[str, ...] = ("agreement_tok_retrieval", "ema", "clip")
    agreement_variants: bool = False
    leave_one_out: bool = True
    # param overrides applied to every study run: the study protocol chosen on SciQ
    # validation (docs/tuning.md)
    size: dict[str, Any] = Field(default_factory=lambda: dict(STUDY_SIZE))
    # component overrides per recipe in every study cell of that recipe, under the cell's own
    # (the ablation's leave-one-out): a budget-scaled unisd-full, and the same format
    # stabilisation for every baseline that lacks it
    recipe_components: dict[str, dict[str, Any]] = Field(default_factory=lambda: deepcopy(STUDY_RECIPE_COMPONENTS))
    # further overrides for the ablation's runs only (it has ~2x the compare study's cells): it
    # diagnoses, so it reads validation
    ablation_size: dict[str, Any] = Field(
        default_factory=lambda: {"eval.split": "validation", "eval.bf16_autocast": True, "data.benchmarks": ["sciq"]}
    )

    # where the cells run: sequential (in this process, one after another) or dask (each
    # cell a Prefect task on a Dask cluster; README "Scaling out")
    runner: Literal["sequential", "dask"] = "sequential"
    # a running Dask scheduler, "tcp://10.0.0.5:8786"; null: a LocalCluster on 127.0.0.1
    # with `workers` worker processes of one thread each
    dask_address: str | None = None
    workers: int = Field(default=2, ge=1)
    # torch threads per cell (set before the cell, restored after); null: torch's default
    # when sequential, 1 on a Dask worker. Pin it (1) for metrics identical across runners
    threads: int | None = Field(default=None, ge=1)

    @field_validator("recipe_components")
    @classmethod
    def _valid_per_recipe(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for recipe, components in v.items():
            resolve_method(recipe, components, where=recipe)  # an unknown recipe: method_dict says so
        return v

    @field_validator("recipes", "components")
    @classmethod
    def _known(cls, v: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        known = RECIPES if info.field_name == "recipes" else COMPONENTS
        unknown = [name for name in v if name not in known]
        if unknown:
            raise ValueError(f"unknown {cast(str, info.field_name)[:-1]} {unknown[0]!r}; known: {', '.join(known)}")
        return v


class Config(Section):
    run: RunCfg = RunCfg()
    paths: PathsCfg = PathsCfg()
    model: ModelCfg = ModelCfg()
    data: DataCfg = DataCfg()
    prompts: PromptCfg = PromptCfg()
    eval: EvalCfg = EvalCfg()
    recipe: str = "unisd-full"
    # Component settings on top of the recipe, e.g. {clip: {mode: static}} (see unisd.recipes.Method).
    components: dict[str, Any] = Field(default_factory=dict)
    train_set: TrainSetCfg = TrainSetCfg()
    generation: GenerationCfg = GenerationCfg()
    train: TrainCfg = TrainCfg()
    study: StudyCfg = StudyCfg()

    # Where params.yaml lives; every relative path is taken from here. Not a param.
    root: Path = Field(Path("."), exclude=True)

    @field_validator("root")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return Path(v).resolve()

    @model_validator(mode="after")
    def _method_and_train_set(self) -> Config:
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe: unknown recipe {self.recipe!r}; known: {', '.join(RECIPES)}")
        self.method  # noqa: B018 - validates the components now, before any work
        suite = SUITES[self.data.suite]
        for name in self.data.benchmarks:
            if self.eval.split not in suite[name].splits:
                raise ValueError(
                    f"eval.split: {name!r} has no {self.eval.split!r} split (only "
                    f"{', '.join(suite[name].splits)}); drop it from data.benchmarks"
                )
        for name in self.eval.limits:
            if name not in suite.names:
                known = ", ".join(suite.names)
                raise ValueError(
                    f"eval.limits: unknown benchmark {name!r} for suite {self.data.suite!r}; known: {known}"
                )
        for name in self.train_set.benchmarks or ():
            if name not in self.data.benchmarks:
                raise ValueError(f"train_set.benchmarks: {name!r} is not in data.benchmarks")
            if not suite[name].trainable:
                raise ValueError(f"train_set.benchmarks: {name!r} is evaluation-only (no train split)")
        return self

    @model_validator(mode="after")
    def _outputs_inside_their_own_folders(self) -> Config:
        # Stage outputs are replaced and swept there (artifacts.sweep_stale): `/`, `.` or
        # `..` would put the project itself, or everything above it, in their way.
        folders = {}
        for key in ("artifacts", "metrics"):
            folder = (self.root / getattr(self.paths, key)).resolve()
            if folder == self.root or folder in self.root.parents:
                raise ValueError(
                    f"paths.{key}: {getattr(self.paths, key)!r} is the project folder or a folder "
                    f"above it; name a folder of its own, e.g. {key}"
                )
            folders[key] = folder
        if folders["artifacts"].is_relative_to(folders["metrics"]) or folders["metrics"].is_relative_to(
            folders["artifacts"]
        ):
            raise ValueError("paths.metrics: the metrics and artifacts folders must not contain one another")
        return self

    @model_validator(mode="after")
    def _finite_numbers(self) -> Config:
        # `.inf` and `.nan` are YAML floats, and bounds like `gt=0` let infinity through.
        values = {**self.model_dump(mode="python"), "components": self.method.model_dump(mode="python")}
        if found := _non_finite(values):
            raise ValueError(f"{found[0]}: must be a finite number (got {found[1]})")
        return self

    @property
    def method(self) -> Method:
        """The recipe's components with `components:` applied, validated."""
        return resolve_method(self.recipe, self.components, where="components")

    @property
    def train_benchmarks(self) -> tuple[str, ...]:
        suite = SUITES[self.data.suite]
        return self.train_set.benchmarks or tuple(b for b in self.data.benchmarks if suite[b].trainable)

    @property
    def artifacts(self) -> Path:
        return self.root / self.paths.artifacts

    @property
    def metrics_dir(self) -> Path:
        return self.root / self.paths.metrics

    def section(self, *names: str) -> dict[str, Any]:
        """The named top-level sections as plain data (what a stage depends on)."""
        data = self.model_dump(mode="json")
        return {n: data[n] for n in names}

    def digest(self) -> str:
        """Digest of every param (the root folder is not a param)."""
        return digest_json(self.model_dump(mode="json"))


def _non_finite(data: Any, path: str = "") -> tuple[str, float] | None:
    """(key path, value) of the first infinite or NaN number in nested params."""
    if isinstance(data, float) and not math.isfinite(data):
        return path, data
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, (list, tuple)) else ()
    for key, value in items:
        if found := _non_finite(value, f"{path}.{key}" if path else str(key)):
            return found
    return None


def digest_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the
    last one without a word, so a second `eval:` section would silently replace the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults` may be overridden key by key
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice (first on line {seen[key] + 1})", key_node.start_mark
                    )
                seen[key] = key_node.start_mark.line
            except TypeError:
                continue  # an unhashable key: the base class reports it
        return super().construct_mapping(node, deep=deep)


def _yaml(text: str, where: str) -> Any:
    """Parse YAML text; an error is one line naming `where`, the line and the column."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: {at}not valid YAML: {problem}") from None


def _read_yaml(path: Path) -> Any:
    """A YAML file's data; unreadable files and bytes that are not UTF-8 are ConfigErrors too."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read: {err.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: {not_utf8(raw, err)}; save the file as UTF-8") from None
    return _yaml(text, str(path))


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY.PATH=VALUE")
    key, raw = item.split("=", 1)
    return key.strip().split("."), _yaml(raw, f"override {key.strip()}") if raw.strip() else ""


def apply_overrides(data: dict[str, Any], overrides: Sequence[str] | dict[str, Any]) -> dict[str, Any]:
    """Apply `a.b=value` overrides (YAML-typed values) or a {"a.b": value} mapping."""
    items = overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides)
    for key, value in items:
        path = key.split(".") if isinstance(key, str) else key
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {'.'.join(path)}: {part!r} is not a section")
        node[path[-1]] = value
    return data


def _format_errors(source: str, err: ValidationError) -> str:
    """One line per problem, each naming the file and the key path."""
    lines = []
    for e in err.errors():
        loc = key_path(e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        got = ""
        if loc and "input" in e and not isinstance(e["input"], dict):
            shown = repr(e["input"])
            got = f" (got {shown if len(shown) <= 80 else shown[:77] + '...'})"
        lines.append(f"{source}: {loc}: {msg}{got}" if loc else f"{source}: {msg}")
    return "\n".join(lines)


def build_config(data: dict[str, Any], root: Path, source: str = "params") -> Config:
    if "root" in data:
        raise ConfigError(f"{source}: root: not a param (paths are relative to the params file)")
    try:
        return Config.model_validate({**data, "root": root})
    except ValidationError as err:
        raise ConfigError(_format_errors(source, err)) from None


def load_config(path: str | Path = "params.yaml", overrides: Sequence[str] | dict[str, Any] = ()) -> Config:
    """Read, override and validate `params.yaml`; raise ConfigError before any work."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    data = _read_yaml(path)
    if data is None:  # an empty file is more likely a truncated one than a wish for every default
        raise ConfigError(
            f"{path}: no params in the file (it is empty or only comments); write {{}} to take every default"
        )
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    data = apply_overrides(data, overrides or [])
    return build_config(data, path.parent, source=str(path))


def profile_overrides(path: str | Path) -> list[str]:
    """A profile file (a flat mapping of `a.b: value`, e.g. profiles/paper.yaml) as
    `a.b=value` overrides, applied before the command line's own `--set`s."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: profile not found")
    data = _read_yaml(path)
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ConfigError(f"{path}: a profile must be a mapping of dotted param keys to values")
    return [f"{key}={json.dumps(value)}" for key, value in data.items()]
