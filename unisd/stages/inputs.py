"""What the self-distillation stages read alike: the training pool, the prompt builder,
JSON lines."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from unisd.config import Config
from unisd.data.schema import Example, iter_jsonl, read_examples
from unisd.stages import log_read

if TYPE_CHECKING:
    from unisd.prompts import PromptBuilder


def train_examples(cfg: Config, data: Path) -> list[Example]:
    """The training pool: the first `train_set.limit` examples of each train split."""
    out = []
    for bench in cfg.train_benchmarks:
        examples = read_examples(data / bench / "train.jsonl")
        out += examples[: cfg.train_set.limit] if cfg.train_set.limit else examples
    return out


def by_benchmark(examples: list[Example]) -> dict[str, list[Example]]:
    """Examples grouped by benchmark, in their order."""
    groups: dict[str, list[Example]] = {}
    for ex in examples:
        groups.setdefault(ex.benchmark, []).append(ex)
    return groups


def prompt_builder(cfg: Config, model_dir: Path) -> tuple[Any, PromptBuilder]:
    """The tokenizer of `model_dir` and the prompt builder over it."""
    from unisd.modeling import load_tokenizer
    from unisd.prompts import PromptBuilder

    tok = load_tokenizer(model_dir)
    return tok, PromptBuilder.for_tokenizer(tok, cfg.model.template, cfg.prompts.max_prompt_tokens)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return list(iter_jsonl(path))


def log_train_splits(run, data: Path, examples: list[Example]) -> None:
    """Record the train splits a stage reads its `examples` from."""
    for bench, group in by_benchmark(examples).items():
        log_read(run, f"{bench}/train", data / bench / "train.jsonl", "training", len(group))
