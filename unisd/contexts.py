"""Auxiliary contexts a_k(x) for multi-teacher agreement (docs/method.md §2.1).

Each of an example's K contexts holds reference material from *other* training
examples of the same benchmark, never its own answer:

* random: one random other example per context (seeded, self excluded);
* retrieval: the K nearest other examples by all-MiniLM-L6-v2 embedding (cosine);
* induction: an instruction the model wrote from a few demonstrations; K+1 instructions
  are induced per benchmark from disjoint demonstration sets, and each example gets the
  K whose demonstrations do not include it.

A record is `{"id", "refs": [ids]}` (random, retrieval) or `{"id", "instructions": [..]}`
(induction); `context_texts` turns it into the K texts the teacher is prompted with.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from unisd.data.schema import Example
from unisd.prompts import McqFormat, reference_text, solved_example

INDUCTION_DEMOS = 3
INDUCTION_REQUEST = (
    "Here are examples of a task, each with a good response:\n\n{demos}\n\n"
    "Write one short general instruction (one or two sentences) that would help someone solve new "
    "problems of this kind. Reply with the instruction only."
)


def random_refs(examples: list[Example], k: int, seed: int) -> list[dict[str, Any]]:
    if len(examples) <= k:
        raise ValueError(f"random contexts need more than k={k} examples per benchmark, got {len(examples)}")
    records = []
    for i, ex in enumerate(examples):
        others = [j for j in range(len(examples)) if j != i]
        picked = random.Random(f"{seed}:{ex.id}").sample(others, k)
        records.append({"id": ex.id, "refs": [examples[j].id for j in picked]})
    return records


def retrieval_refs(examples: list[Example], k: int, embed: Callable[[list[str]], Any]) -> list[dict[str, Any]]:
    """K nearest neighbours by cosine similarity of the embedded questions, self excluded."""
    import torch

    if len(examples) <= k:
        raise ValueError(f"retrieval contexts need more than k={k} examples per benchmark, got {len(examples)}")
    emb = torch.nn.functional.normalize(torch.as_tensor(embed([ex.question for ex in examples])).float(), dim=-1)
    sim = emb @ emb.T
    sim.fill_diagonal_(float("-inf"))
    nearest = sim.topk(k, dim=-1).indices.tolist()
    return [{"id": ex.id, "refs": [examples[j].id for j in row]} for ex, row in zip(examples, nearest)]


def induction_demo_sets(examples: list[Example], k: int, seed: int) -> list[list[Example]]:
    """K+1 disjoint sets of demonstrations, one per induced instruction."""
    need = (k + 1) * INDUCTION_DEMOS
    if len(examples) < need:
        raise ValueError(f"induction contexts need at least {need} examples per benchmark, got {len(examples)}")
    picked = random.Random(f"{seed}:induction").sample(examples, need)
    return [picked[j * INDUCTION_DEMOS : (j + 1) * INDUCTION_DEMOS] for j in range(k + 1)]


def induction_request(demos: list[Example], mcq_format: McqFormat = "reason_first") -> str:
    """What the model is asked to induce an instruction from."""
    return INDUCTION_REQUEST.format(demos="\n\n".join(solved_example(d, mcq_format) for d in demos))


def induction_records(
    examples: list[Example], k: int, demo_ids: list[list[str]], instructions: list[str]
) -> list[dict[str, Any]]:
    """Each example gets the K instructions whose demonstrations do not include it."""
    records = []
    for ex in examples:
        usable = [ins for ids, ins in zip(demo_ids, instructions) if ex.id not in ids]
        records.append({"id": ex.id, "instructions": usable[:k]})
    return records


def context_texts(
    ex: Example, record: dict[str, Any], by_id: dict[str, Example], mcq_format: McqFormat = "reason_first"
) -> list[str]:
    """The K auxiliary-context prompts (task text, before the chat template) of one example."""
    if "instructions" in record:
        return [
            reference_text(ex, f"A general instruction for this kind of problem: {ins}", mcq_format)
            for ins in record["instructions"]
        ]
    return [reference_text(ex, [by_id[ref]], mcq_format) for ref in record["refs"]]
