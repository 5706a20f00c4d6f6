"""The model stage: make the configured model loadable from disk."""

from __future__ import annotations

from pathlib import Path

from unisd.config import Config
from unisd.stages import StageContext, stage_output


def model_stage(cfg: Config, out: Path, ctx: StageContext) -> Path:
    """Make the configured model loadable from disk (embedded GGUF → safetensors)."""
    from unisd.assets import materialize_model

    with stage_output(ctx, "model", "model", cfg, {}, out, cfg.section("model")) as (run, tmp):
        source = materialize_model(cfg.model.name, cfg.model.revision, tmp)
        run.set_tags({f"model.{k}": v for k, v in source.items() if isinstance(v, str)})
        run.log_artifacts(tmp / "source.json")
    return out
