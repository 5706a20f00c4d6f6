"""Can the model name the right answer when it does not have to pick a letter?

For one model (base or trained) and N SciQ items of a split, greedy answers (bf16, 16
tokens) under three prompts, each response opened with "Answer:" and read by
`unisd.scoring.parse_open` (the option named in words):

* listed: the options listed with letters, asked for the correct option's text;
* open: the student's open_answer prompt (no options listed);
* teacher: the open_answer teacher (the worked example with the gold answer, then the task).

Prints how often the gold option is named, how often another option is, and which listed
position is named (a letter habit shows there). The result chose `prompts.mcq_format:
open_answer` (docs/method.md §7.2, README "Self-distillation on validation").

    .venv/bin/python experiments/open_answer_probe.py MODEL_DIR [N] [SPLIT]
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from unisd.config import load_config
from unisd.data import load_benchmark
from unisd.generation import Sampling, generate
from unisd.modeling import load_model, load_tokenizer
from unisd.prompts import ANSWER_PREFIX, PromptBuilder, problem_text
from unisd.scoring import parse_open
from unisd.trajectories import teacher_prompt

LISTED = "Answer with the exact text of the correct option, in this format:\nAnswer: <option text>"


def main(model_dir: str, n: int = 100, split: str = "validation") -> None:
    cfg = load_config(overrides={"prompts.teacher_template": "worked_example", "prompts.mcq_format": "open_answer"})
    tok, model = load_tokenizer(Path(model_dir)), load_model(Path(model_dir), device="cpu")
    builder = PromptBuilder.for_tokenizer(tok, max_prompt_tokens=4096)
    examples = load_benchmark("embedded", "sciq", 42)[split][:n]
    prompts = {
        "listed": [builder.encode(f"{problem_text(ex)}\n{LISTED}", ANSWER_PREFIX) for ex in examples],
        "open": [builder.encode_task(ex, "open_answer") for ex in examples],
        "teacher": [teacher_prompt(cfg, builder, ex) for ex in examples],
    }
    print(f"{model_dir}: {len(examples)} SciQ {split} items")
    for name, ids in prompts.items():
        outs = generate(model, tok, ids, Sampling(16), 16, builder.stop_strings, True, name, backend="fast")
        named = [parse_open(ANSWER_PREFIX + c.text, ex.choices) for ex, c in zip(examples, outs)]
        gold = sum(p == ex.answer for p, ex in zip(named, examples))
        other = sum(p not in (None, ex.answer) for p, ex in zip(named, examples))
        where = Counter(p or "none" for p in named)
        print(f"{name:8} gold {gold}/{len(examples)}  another option {other}  named at {dict(sorted(where.items()))}")
        print(f"         first answers: {[c.text.strip()[:30] for c in outs[:4]]}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) if a.isdigit() else a for a in sys.argv[2:]))
