"""The params schema: `params.yaml` is the single source of truth for every stage.

The file is validated before any work starts: unknown keys, wrong types and
out-of-range values raise `ConfigError` naming the key path (e.g. `eval.limit`).
Stages receive the validated `Config`; caches key on `Config.section_digest(...)`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from unisd.data.suites import SUITES


class ConfigError(ValueError):
    """Invalid params: the message names the file and the key path."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunCfg(Section):
    name: str = Field("default", pattern=r"^[A-Za-z0-9._-]+$", description="names run folders")
    seed: int = Field(42, ge=0)


class PathsCfg(Section):
    artifacts: str = "artifacts"
    metrics: str = "metrics"


class ModelCfg(Section):
    # An embedded key (see unisd.assets.EMBEDDED_MODELS), a local directory, or a hub id.
    name: str = "smollm2-135m-instruct"
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # "chat" needs a chat template; "plain" is the fallback for base models; "auto" picks.
    template: Literal["auto", "chat", "plain"] = "auto"


class DataCfg(Section):
    suite: Literal["embedded", "paper"] = "embedded"
    benchmarks: tuple[str, ...] = SUITES["embedded"].names
    split_seed: int = Field(42, ge=0)
    # Per-benchmark dataset source override (paper suite): a hub id or a local file/dir.
    sources: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_benchmarks(self) -> "DataCfg":
        known = SUITES[self.suite].names
        for name in (*self.benchmarks, *self.sources):
            if name not in known:
                raise ValueError(f"unknown benchmark {name!r} for suite {self.suite!r}; known: {', '.join(known)}")
        if not self.benchmarks:
            raise ValueError("benchmarks: at least one benchmark is needed")
        return self


class PromptCfg(Section):
    max_prompt_tokens: int = Field(1024, ge=32)


class NewTokens(Section):
    mcq: int = Field(256, ge=1)
    code: int = Field(384, ge=1)
    tool: int = Field(256, ge=1)


class EvalCfg(Section):
    split: Literal["validation", "test"] = "test"
    limit: int = Field(100, ge=0, description="items per benchmark; 0 = the whole split")
    batch_size: int = Field(16, ge=1)
    max_new_tokens: NewTokens = NewTokens()
    bf16_autocast: bool = False
    code_timeout_s: float = Field(10.0, gt=0, le=600)
    code_memory_mb: int = Field(1024, ge=64)
    code_workers: int = Field(2, ge=1)
    ppl: bool = True


class Config(Section):
    run: RunCfg = RunCfg()
    paths: PathsCfg = PathsCfg()
    model: ModelCfg = ModelCfg()
    data: DataCfg = DataCfg()
    prompts: PromptCfg = PromptCfg()
    eval: EvalCfg = EvalCfg()

    # Where params.yaml lives; every relative path is taken from here. Not a param.
    root: Path = Field(Path("."), exclude=True)

    @field_validator("root")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return Path(v).resolve()

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

    def section_digest(self, *names: str) -> str:
        return digest_json(self.section(*names))

    def digest(self) -> str:
        """Digest of every param (the root folder is not a param)."""
        return digest_json(self.model_dump(mode="json"))


def digest_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY.PATH=VALUE")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
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
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        got = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""
        lines.append(f"{source}: {loc}: {e['msg']}{got}")
    return "invalid params:\n  " + "\n  ".join(lines)


def build_config(data: dict[str, Any], root: Path, source: str = "params") -> Config:
    if "root" in data:
        raise ConfigError(f"{source}: root: not a param (paths are relative to the params file)")
    try:
        return Config.model_validate({**data, "root": root})
    except ValidationError as err:
        raise ConfigError(_format_errors(source, err)) from None


def load_config(path: str | Path = "params.yaml", overrides: list[str] | dict[str, Any] = ()) -> Config:
    """Read, override and validate `params.yaml`; raise ConfigError before any work."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    data = apply_overrides(data, overrides or [])
    return build_config(data, path.parent, source=str(path))
