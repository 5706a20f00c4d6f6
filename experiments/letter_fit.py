"""Did training move the letter toward the gold one, on the items it trained on and beyond?

For one model (base or trained) and N SciQ items of a split, the letter distribution right
after "Answer:" (answer_prefilled's first completion token): under the student's prompt,
and under the privileged teacher's prompt (the worked example with the gold answer) of the
same model. Prints letter accuracy (argmax), the mean probability of the gold letter, and
the mean distribution over A/B/C/D (renormalised over the four letters). On train items
the teacher's distribution is what self-distillation's first token is pulled toward.

    .venv/bin/python experiments/letter_fit.py MODEL_DIR [N] [SPLIT]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from unisd.choice_scores import AnswerEncoder
from unisd.config import load_config
from unisd.data import load_benchmark
from unisd.data.schema import LETTERS
from unisd.logprobs import next_token_logprobs
from unisd.modeling import load_model, load_tokenizer
from unisd.prompts import ANSWER_PREFIX, PromptBuilder, task_text
from unisd.trajectories import privileged_messages


def summary(name: str, lps: list[torch.Tensor], golds: list[int]) -> None:
    probs = torch.stack([lp.softmax(-1) for lp in lps])  # [N, 4], renormalised over the letters
    acc = 100.0 * sum(int(p.argmax()) == g for p, g in zip(probs, golds)) / len(golds)
    gold_p = 100.0 * float(torch.stack([p[g] for p, g in zip(probs, golds)]).mean())
    mean = " ".join(f"{LETTERS[i]} {100 * float(v):.1f}" for i, v in enumerate(probs.mean(0)))
    print(f"{name:8} letter acc {acc:5.1f}  p(gold) {gold_p:5.1f}  mean p: {mean}")


def main(model_dir: str, n: int = 100, split: str = "train") -> None:
    cfg = load_config(
        overrides={"prompts.teacher_template": "worked_example", "prompts.mcq_format": "answer_prefilled"}
    )
    tok, model = load_tokenizer(Path(model_dir)), load_model(Path(model_dir), device="cpu")
    builder = PromptBuilder.for_tokenizer(tok)
    enc = AnswerEncoder(builder)
    examples = [ex for ex in load_benchmark("embedded", "sciq", 42)[split][:n] if len(ex.choices) == 4]
    student, teacher, letters, golds = [], [], [], []
    for ex in examples:
        t = builder.encode_messages(privileged_messages(cfg, ex), ANSWER_PREFIX)
        s, cand = enc.letters(task_text(ex, "answer_prefilled"), 4)
        if t is not None:
            student.append(s), teacher.append(t), letters.append(cand), golds.append(LETTERS.index(ex.answer))
    print(f"{model_dir}: {len(golds)} SciQ {split} items")
    for name, prompts in (("student", student), ("teacher", teacher)):
        summary(name, next_token_logprobs(model, prompts, letters, tok.pad_token_id, 8, False, name), golds)


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) if a.isdigit() else a for a in sys.argv[2:]))
