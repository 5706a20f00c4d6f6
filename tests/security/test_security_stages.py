"""The two stages that run generated code, fed hostile completions: evaluation scores them
as wrong with a reason and the isolation they had; negatives verification keeps them as
verified-wrong demonstrations; neither stops, and the host is unharmed."""

from types import SimpleNamespace

import pytest
from hostile import ANSWER, ATTACKS, alive, leftover_sandboxes, snapshot

from unisd.data.schema import Example
from unisd.evaluate import Item, score_items
from unisd.negatives import Negative, verify_negatives
from unisd.sandbox import Limits
from unisd.sandbox.run import isolation

TASK = Example(
    id="mbpp-hostile",
    benchmark="mbpp",
    task="code",
    question="Return the answer.",
    answer=f"def answer():\n    return {ANSWER}\n",
    tests=[f"assert answer() == {ANSWER}"],
)
# One attack of each kind that ends quickly: the stages' plumbing is what is tested here.
PICKED = [
    a
    for a in ATTACKS
    if a.name
    in (
        "dir_fd_write_and_delete",
        "evaluator_environ",
        "pidfd_kill_parent",
        "fifo_outputs",
        "forged_end",
        "sys_exit_0",
        "eq_always_true",
        "read_the_tests",
        "memory_hog",
    )
]


@pytest.fixture(scope="module", autouse=True)
def namespaces():
    iso = isolation(Limits())
    if iso.level != "namespaces":
        pytest.skip(f"this machine gives no namespace sandbox ({iso.reason})")


def fenced(code: str) -> str:
    return f"```python\n{code.strip()}\n```"


def test_evaluation_scores_hostile_code_as_wrong(host):
    before = snapshot(host.outside)
    fields = host.fields()
    completions = [a.job(fields).solution for a in PICKED] + [TASK.answer]
    items = [Item(TASK, [], {"completion": fenced(c), "benchmark": "mbpp"}) for c in completions]
    cfg = SimpleNamespace(
        eval=SimpleNamespace(code_timeout_s=3, code_memory_mb=512, code_workers=2, code_isolation="best_effort")
    )
    score_items(cfg, items)
    records = [it.record for it in items]
    assert [r["correct"] for r in records] == [False] * len(PICKED) + [True]
    assert all(r["sandbox_reason"] for r in records[:-1]) and records[-1]["sandbox_reason"] == ""
    assert {r["sandbox_isolation"] for r in records} == {"namespaces"}
    assert not any(host.secret in r["sandbox_stderr"] + r["sandbox_reason"] for r in records)
    assert snapshot(host.outside) == before and alive(host.bystander) and leftover_sandboxes() == []


def test_negative_verification_keeps_hostile_code_as_wrong(host):
    before = snapshot(host.outside)
    fields = host.fields()
    negatives = [Negative(fenced(a.job(fields).solution), a.name, verified=False) for a in PICKED]
    correct = Negative(fenced(TASK.answer), "not_a_bug", verified=False)
    kept = verify_negatives([TASK], {TASK.id: [*negatives, correct]}, Limits(timeout_s=3, memory_mb=512), workers=2)
    assert [n.kind for n in kept[TASK.id]] == [a.name for a in PICKED] and all(n.verified for n in kept[TASK.id])
    assert snapshot(host.outside) == before and alive(host.bystander) and leftover_sandboxes() == []
