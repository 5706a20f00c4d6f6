"""The negatives stage: wrong demonstrations per training example (docs/method.md §2.3)."""

from __future__ import annotations

from pathlib import Path
from typing import cast

from unisd.artifacts import write_json_atomic
from unisd.config import Config
from unisd.data.schema import Example, write_jsonl
from unisd.stages import StageContext, stage_output
from unisd.stages.inputs import log_train_splits, prompt_builder, train_examples

NEGATIVES_PER_EXAMPLE = 4  # the reference's count; one is sampled per example for training


def negatives_stage(cfg: Config, model: Path, data: Path, out: Path, ctx: StageContext) -> Path:
    """Wrong demonstrations per training example: verified programmatic ones, or the model's own."""
    from unisd import negatives
    from unisd.sandbox import Limits

    source = cfg.method.contrastive.negatives
    inputs = {"model": model, "data": data}
    # mutants that loop forever count as wrong at the timeout, so keep it short here
    limits = Limits(
        timeout_s=min(3.0, cfg.eval.code_timeout_s),
        memory_mb=cfg.eval.code_memory_mb,
        isolation=cfg.eval.code_isolation,
    )
    with stage_output(ctx, "negatives", "negatives", cfg, inputs, out, {"source": source}) as (run, tmp):
        examples = train_examples(cfg, data)
        log_train_splits(run, data, examples)
        if source == "programmatic":
            found = negatives.programmatic_negatives(
                examples, NEGATIVES_PER_EXAMPLE, cfg.run.seed, limits, cfg.eval.code_workers, cfg.prompts.mcq_format
            )
        else:
            found = _self_generated(cfg, model, examples, limits)
        rows = [{"id": ex.id, "negatives": [vars(n) for n in found[ex.id]]} for ex in examples if ex.id in found]
        write_jsonl(tmp / "negatives.jsonl", rows)
        stats = {"examples": len(examples), "with_negative": len(rows), "without_negative": len(examples) - len(rows)}
        write_json_atomic(tmp / "stats.json", stats)
        run.log_metrics(stats)
    return out


def _self_generated(cfg: Config, model_dir: Path, examples: list[Example], limits) -> dict[str, list]:
    from unisd import negatives
    from unisd.generation import Sampling, generate
    from unisd.modeling import load_model

    tok, builder = prompt_builder(cfg, model_dir)
    model = load_model(model_dir, cfg.model.dtype, cfg.model.device)
    fmt = cfg.prompts.mcq_format
    asks = [
        (ex, i, builder.encode(negatives.negative_request(ex, i, fmt)))
        for ex in examples
        for i in range(NEGATIVES_PER_EXAMPLE)
    ]
    asks = [a for a in asks if a[2] is not None]
    found: dict[str, list] = {}
    for task in sorted({ex.task for ex, _, _ in asks}):
        group = [a for a in asks if a[0].task == task]
        sampling = Sampling(
            getattr(cfg.generation.max_new_tokens, task),
            do_sample=True,
            temperature=cfg.generation.temperature,
            seed=cfg.run.seed,
        )
        outs = generate(
            model,
            tok,
            [cast(list[int], ids) for _, _, ids in group],
            sampling,
            cfg.generation.batch_size,
            builder.stop_strings,
            desc=f"negatives {task}",
            backend=cfg.generation.backend,
        )
        for (ex, i, _), c in zip(group, outs):
            if (neg := negatives.clean_self_generated(ex, i, c.text, fmt)) is not None:
                found.setdefault(ex.id, []).append(neg)
    by_id = {ex.id: ex for ex in examples}
    return negatives.verify_negatives([by_id[i] for i in found], found, limits, mcq_format=fmt)
