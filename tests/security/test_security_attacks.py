"""Every attack of hostile.ATTACKS, batched through run_many as an evaluation would:
each contained, scored as a failure with a reason, the host unharmed, the batch going on
(a correct program before, between and after the attacks still passes).

Under namespaces all of them; under the best-effort fallback the attacks that do not
depend on kernel isolation of the filesystem (processes, trust, judge, limits), which
the seccomp filter, the pipes and the judge must stop on their own.
"""

from dataclasses import dataclass

import pytest
from hostile import ANSWER, ATTACKS, BENIGN, Attack, alive, leftover_sandboxes, sandbox_dirs, snapshot

from unisd.sandbox import Limits, SandboxResult, launch, run_many
from unisd.sandbox.inside import seccomp
from unisd.sandbox.run import isolation

LIMITS = Limits(timeout_s=3, memory_mb=512)


@dataclass
class Outcome:
    results: dict[str, list[SandboxResult]]
    before: dict[str, str]


def run_batch(host, attacks: list[Attack]) -> Outcome:
    before = snapshot(host.outside)
    half = len(attacks) // 2
    programs = [BENIGN, *attacks[:half], BENIGN, *attacks[half:], BENIGN]
    results: dict[str, list[SandboxResult]] = {}
    for attack, result in zip(programs, run_many([a.job(host.fields()) for a in programs], LIMITS, workers=2)):
        results.setdefault(attack.name, []).append(result)
    return Outcome(results, before)


@pytest.fixture(scope="module")
def namespaced(host):
    iso = isolation(LIMITS)
    if iso.level != "namespaces" or not iso.seccomp:
        pytest.skip(f"this machine gives no namespace sandbox ({iso.reason}): run on one that does")
    return run_batch(host, ATTACKS)


FALLBACK_KINDS = ("processes", "trust", "judge", "limits")


@pytest.fixture(scope="module")
def fallback(host):
    if not seccomp.supported():
        pytest.skip("without seccomp the best-effort sandbox cannot stop signals to the evaluator")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(launch, "_available", launch.Isolation("best_effort", True, "forced by the test"))
        yield run_batch(host, [a for a in ATTACKS if a.kind in FALLBACK_KINDS])


def check_contained(outcome: Outcome, host, attack: Attack, level: str) -> None:
    (result,) = outcome.results[attack.name]
    assert result.status in attack.statuses, result.reason
    assert result.reason and result.isolation["level"] == level
    for text in (result.stdout, result.stderr, result.reason):
        assert host.secret not in text and "ESCAPED" not in text and str(ANSWER) not in text


def check_host(outcome: Outcome, host) -> None:
    assert [r.status for r in outcome.results["benign"]] == ["passed"] * 3  # the evaluation went on
    assert snapshot(host.outside) == outcome.before  # nothing outside read-written, dropped or deleted
    assert alive(host.bystander)
    assert leftover_sandboxes() == []
    assert sandbox_dirs() == []


@pytest.mark.parametrize("attack", ATTACKS, ids=lambda a: a.name)
def test_attack_is_contained_under_namespaces(namespaced, host, attack):
    check_contained(namespaced, host, attack, "namespaces")


def test_host_unharmed_under_namespaces(namespaced, host):
    check_host(namespaced, host)


@pytest.mark.parametrize("attack", [a for a in ATTACKS if a.kind in FALLBACK_KINDS], ids=lambda a: a.name)
def test_attack_is_contained_under_best_effort(fallback, host, attack):
    check_contained(fallback, host, attack, "best_effort")


def test_host_unharmed_under_best_effort(fallback, host):
    check_host(fallback, host)


def test_the_attacks_cover_every_class():
    kinds = {a.kind for a in ATTACKS}
    assert kinds == {"files", "processes", "trust", "judge", "limits"} and len(ATTACKS) >= 30
    assert len({a.name for a in ATTACKS}) == len(ATTACKS)
