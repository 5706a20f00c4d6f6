"""The evaluation's teacher-forced scores against one unpadded forward per sequence.

`evaluate_model` reads the gold response (gold_ppl), the base model's own answer
(ppl_ret) and every option (ll) after an item's prompt in one shared pass, the options'
prompt cut where it extends the item's own (open_answer). Here each is recomputed the
plain way: the prompt and the continuation as one sequence, one forward, no padding, no
cache, log-softmax at the continuation's positions.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from project import tiny_params
from test_eval_determinism import chaotic_dir, data_dir  # noqa: F401 - fixtures

from unisd.choice_scores import AnswerEncoder, cloze_text
from unisd.config import build_config
from unisd.data.schema import read_examples
from unisd.evaluate import evaluate_model
from unisd.modeling import load_model, load_tokenizer
from unisd.prompts import PromptBuilder, gold_completion

pytestmark = pytest.mark.usefixtures("one_thread")


def plain_logprobs(model, prompt: list[int], continuation: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + continuation])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(continuation) - 1)
    return logp[positions, torch.tensor(continuation)]


def ppl(lp: torch.Tensor) -> float:
    return math.exp(-float(lp.mean()))


@pytest.mark.parametrize("fmt", ["open_answer", "reason_first"])
def test_scores_equal_one_plain_forward_per_sequence(tmp_path, chaotic_dir, data_dir, fmt):  # noqa: F811
    params = tiny_params(chaotic_dir)
    params["data"]["benchmarks"] = ["sciq"]
    params["prompts"]["mcq_format"] = fmt
    params["eval"].update(split="validation", limit=6, batch_size=4, max_new_tokens={"mcq": 10, "code": 10, "tool": 10})
    cfg = build_config(params, root=tmp_path)
    evaluate_model(cfg, chaotic_dir, data_dir, tmp_path / "eval")
    records = [json.loads(line) for line in (tmp_path / "eval" / "predictions" / "sciq.jsonl").read_text().splitlines()]

    model, tok = load_model(chaotic_dir), load_tokenizer(chaotic_dir)
    builder = PromptBuilder.for_tokenizer(tok, cfg.model.template, cfg.prompts.max_prompt_tokens)
    enc = AnswerEncoder(builder)
    examples = {ex.id: ex for ex in read_examples(data_dir / "sciq" / "validation.jsonl")}
    assert len(records) == 6
    for r in records:
        ex = examples[r["id"]]
        prompt = builder.encode_task(ex, fmt)
        gold = builder.encode_response(gold_completion(ex, fmt))
        assert r["gold_ppl"] == pytest.approx(ppl(plain_logprobs(model, prompt, gold)), rel=1e-4)
        assert r["ppl_ret"] == pytest.approx(ppl(plain_logprobs(model, prompt, r["completion_ids"])), rel=1e-4)
        assert r["jsd_to_base"] == 0.0
        sums = [
            float(plain_logprobs(model, *enc.split(cloze_text(ex, fmt), f" {c.strip()}")).sum()) for c in ex.choices
        ]
        assert r["ll"] == pytest.approx(sums, rel=1e-4, abs=1e-4)
        assert ("rot_probs" in r) == (fmt != "open_answer")  # open_answer shows no letters to rotate
        if fmt == "open_answer":  # the options follow the student's own task text, its instruction read
            bare = [float(plain_logprobs(model, *enc.split(cloze_text(ex), f" {c.strip()}")).sum()) for c in ex.choices]
            assert r["ll"] != pytest.approx(bare, rel=1e-4, abs=1e-4)
