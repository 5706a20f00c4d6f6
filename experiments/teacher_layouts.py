"""Which teacher layout gives the teacher something to teach? The cheapest check, before any training.

Self-distillation can only move the student toward what the privileged teacher knows
better. For each `prompts.teacher_template`, on the first N SciQ *train* items (never
validation or test) and the base model, this prints:
  * the teacher's and the student's letter accuracy: the option letter chosen right after
    "Answer:" (`trajectories.letter_accuracy`; the student sees only its own prompt);
  * the log-probability of the gold response's first token ("Answer" under answer_first)
    under each: a teacher that starts elsewhere (openers such as "I'm ready to assist
    you.") pulls the student's first tokens away from the answer format.
A layout is worth a training cell only if its teacher beats the student on the letter.

    .venv/bin/python experiments/teacher_layouts.py [N] [LAYOUT ...]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import get_args

from unisd.assets import materialize_model
from unisd.config import load_config
from unisd.data import load_benchmark
from unisd.logprobs import next_token_logprobs
from unisd.modeling import load_model, load_tokenizer
from unisd.prompts import PromptBuilder, TeacherTemplate, gold_response, task_text
from unisd.trajectories import letter_accuracy, privileged_messages


def main(n: int = 100, layouts: list[str] | None = None) -> None:
    model_dir = Path(tempfile.mkdtemp(prefix="unisd-layouts-"))
    materialize_model("smollm2-135m-instruct", None, model_dir)
    tok, model = load_tokenizer(model_dir), load_model(model_dir, device="cpu")
    examples = load_benchmark("embedded", "sciq", 42)["train"][:n]
    print(f"{n} SciQ train items, answer_first, base model; letter acc (%) and mean log p(first gold token)")
    print(f"{'layout':20} {'teacher':>8} {'student':>8} {'lp first T':>11} {'lp first S':>11}")
    for layout in layouts or list(get_args(TeacherTemplate)):
        cfg = load_config(overrides={"prompts.teacher_template": layout, "prompts.mcq_format": "answer_first"})
        builder = PromptBuilder.for_tokenizer(tok, cfg.model.template, cfg.prompts.max_prompt_tokens)
        acc = letter_accuracy(cfg, model, tok, builder, examples)
        rows = [
            (
                builder.encode_messages(privileged_messages(cfg, ex)),
                builder.encode(task_text(ex, "answer_first")),
                builder.encode_response(gold_response(ex, "answer_first"))[0],
            )
            for ex in examples
        ]
        rows = [r for r in rows if r[0] is not None and r[1] is not None]  # both prompts within the budget
        k = len(rows)
        lps = next_token_logprobs(
            model,
            [r[0] for r in rows] + [r[1] for r in rows],
            [[r[2]] for r in rows] * 2,
            tok.pad_token_id,
            cfg.generation.batch_size,
            cfg.generation.bf16_autocast,
            desc=layout,
        )
        lp_t = sum(float(x[0]) for x in lps[:k]) / k
        lp_s = sum(float(x[0]) for x in lps[k:]) / k
        print(
            f"{layout:20} {acc['teacher_letter_acc']:8.1f} {acc['student_letter_acc']:8.1f} {lp_t:11.3f} {lp_s:11.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100, sys.argv[2:] or None)
