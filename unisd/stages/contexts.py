"""The contexts stage: K auxiliary contexts per training example (docs/method.md §2.1)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from unisd.config import Config
from unisd.data.schema import Example, write_jsonl
from unisd.prompts import McqFormat, PromptBuilder
from unisd.stages import StageContext, stage_output
from unisd.stages.inputs import by_benchmark, log_train_splits, prompt_builder, train_examples


def contexts_stage(cfg: Config, model: Path, data: Path, out: Path, ctx: StageContext) -> Path:
    """K auxiliary contexts per training example (random, retrieval or induction)."""
    from unisd import contexts

    agreement = cfg.method.agreement
    inputs = {"model": model, "data": data}
    with stage_output(
        ctx, "contexts", "contexts", cfg, inputs, out, {"kind": agreement.contexts, "k": agreement.k}
    ) as (run, tmp):
        records: list[dict[str, Any]] = []
        examples = train_examples(cfg, data)
        log_train_splits(run, data, examples)
        groups = by_benchmark(examples)
        if agreement.contexts == "random":
            for exs in groups.values():
                records += contexts.random_refs(exs, agreement.k, cfg.run.seed)
        elif agreement.contexts == "retrieval":
            embed = _embedder()
            for exs in groups.values():
                records += contexts.retrieval_refs(exs, agreement.k, embed)
        else:
            records = _induced(cfg, model, groups)
        write_jsonl(tmp / "contexts.jsonl", records)
        run.log_metrics({"examples": len(records)})
        run.log_artifacts(tmp / "contexts.jsonl")
    return out


def _embedder() -> Callable[[list[str]], Any]:
    """all-MiniLM-L6-v2 from its pinned offline wheel, as a texts -> embeddings function."""
    from sentence_transformers import SentenceTransformer

    from unisd.assets import embedding_model_dir

    model = SentenceTransformer(str(embedding_model_dir()), device="cpu")
    return lambda texts: model.encode(texts, batch_size=64, convert_to_tensor=True, show_progress_bar=False)


def _induced(cfg: Config, model_dir: Path, groups: dict[str, list[Example]]) -> list[dict[str, Any]]:
    from unisd import contexts
    from unisd.generation import Sampling, generate
    from unisd.modeling import load_model

    tok, builder = prompt_builder(cfg, model_dir)
    model = load_model(model_dir, cfg.model.dtype, cfg.model.device)
    k, records = cfg.method.agreement.k, []
    for bench, exs in groups.items():
        demo_sets = contexts.induction_demo_sets(exs, k, cfg.run.seed)
        prompts = [_fitting_request(builder, demos, cfg.prompts.mcq_format) for demos in demo_sets]
        outs = generate(
            model,
            tok,
            prompts,
            Sampling(96, do_sample=True, temperature=0.7, seed=cfg.run.seed),
            cfg.generation.batch_size,
            builder.stop_strings,
            desc=f"induce {bench}",
            backend=cfg.generation.backend,
        )
        instructions = [" ".join(c.text.split()) or "Solve the problem step by step." for c in outs]
        records += contexts.induction_records(exs, k, [[d.id for d in ds] for ds in demo_sets], instructions)
    return records


def _fitting_request(builder: PromptBuilder, demos: list[Example], mcq_format: McqFormat) -> list[int]:
    """The induction request with as many of its demonstrations as fit the prompt budget."""
    from unisd.contexts import induction_request

    for n in range(len(demos), 0, -1):
        if (ids := builder.encode(induction_request(demos[:n], mcq_format))) is not None:
            return ids
    raise ValueError(
        f"an induction request with one demonstration ({demos[0].id}) exceeds "
        f"prompts.max_prompt_tokens={builder.max_prompt_tokens}"
    )
