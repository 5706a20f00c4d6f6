"""The sandbox's judge and plumbing: plain values cross the boundary exactly, asserts are
judged outside with Python's own semantics, expected values stay out, and every run
ends as one result. The hostile programs are in tests/security/."""

import collections
import math
import os
import shutil
import subprocess
import tempfile
import textwrap
from pathlib import Path

import pytest

from unisd.sandbox import CodeTest, IsolationUnavailable, Limits, launch, run_many
from unisd.sandbox.inside import codec, seccomp
from unisd.sandbox.judge import defined_names, plan
from unisd.sandbox.run import isolation

FAST = Limits(timeout_s=5, memory_mb=256)


def job(solution: str, tests: str, names=()) -> CodeTest:
    return CodeTest(textwrap.dedent(solution), textwrap.dedent(tests), frozenset(names))


@pytest.fixture
def best_effort(monkeypatch):
    """Runs as on a machine without namespaces."""
    monkeypatch.setattr(launch, "_available", launch.Isolation("best_effort", seccomp.supported(), "forced by a test"))


# ------------------------------------------------------------------------------ codec

PLAIN = [
    None,
    True,
    False,
    0,
    -7,
    10**80,
    0.1,
    -0.0,
    float("inf"),
    1e-300,
    2 + 3j,
    "",
    "é\x00",
    b"\xff",
    bytearray(b"a"),
    [],
    [1, [2.5, "x"]],
    (),
    (1,),
    ((1, 2), [3]),
    {},
    {1: "a", (2, 3): [4], "k": {5: None}},
    {1, 2},
    frozenset({3}),
    collections.OrderedDict([(2, 1), (1, 2)]),
    collections.Counter("abca"),
    collections.deque([1, 2]),
]


@pytest.mark.parametrize("value", PLAIN, ids=repr)
def test_plain_values_cross_exactly(value):
    back = codec.decode(codec.parse(codec.json.dumps(codec.encode(value))))
    assert type(back) is type(value) and back == value and repr(back) == repr(value)


def test_nan_and_defaultdict_cross_as_python_compares_them():
    assert math.isnan(codec.plain(float("nan")))
    back = codec.plain(collections.defaultdict(int, {1: 2}))
    assert type(back) is dict and back == {1: 2}


class Always(list):
    def __eq__(self, other):
        return True


@pytest.mark.parametrize(
    "value", [Always(), object(), [1, object()], type("I", (int,), {})(3), lambda: 0, range(3), iter([1])], ids=repr
)
def test_what_is_not_plain_is_refused(value):
    with pytest.raises(TypeError):
        codec.encode(value)


@pytest.mark.parametrize(
    "text",
    [
        "1.5",
        "NaN",
        '{"float": "1e999"}',
        '{"x": 1}',
        '{"set": [[1]]}',
        '{"dict": [[1]]}',
        '{"tuple": [], "set": []}',
        "9" * 5000,
        "[" * 100000 + "]" * 100000,
        '{"float": 5}',
    ],
)
def test_hostile_encodings_are_refused(text):
    with pytest.raises((ValueError, TypeError)):
        codec.decode(codec.parse(text))


# ------------------------------------------------------------------------------ splitting


def test_expected_values_never_enter_the_sandbox():
    mbpp = job(
        "",
        """\
        import math
        assert add(1, 2) == 918273645
        assert math.isclose(area(10), 62.83185, rel_tol=0.001)
        assert set(common((3, 4), (4, 5))) == set((4, 777123))
        assert abs(f(1.33) - 0.33119) < 1e-6 and g(2) == [55511, 2]
        assert sorted(h(3))[0] == 'secret-value'
        """,
    )
    inside = plan(mbpp).inside_tests
    for expected in ("918273645", "62.83185", "777123", "0.33119", "55511", "secret-value", "1e-06", "0.001"):
        assert expected not in inside
    for call in ("add(1, 2)", "area(10)", "common((3, 4), (4, 5))", "f(1.33)", "g(2)", "h(3)"):
        assert call in inside


def test_humaneval_check_sees_only_plain_values():
    he = job(
        "",
        """\
        def check(candidate):
            assert candidate([1, 2]) == 'expected'
            for x in range(3):
                assert candidate([x]) == str(x)
            assert True
        check(f)
        """,
    )
    p = plan(he)
    assert "expected" not in p.inside_tests
    assert p.inside_tests.count("__plain__(candidate(") == 2
    assert [s.probes for s in p.sites] == [1, 2, 0] and all(s.required for s in p.sites)


def test_sites_in_conditional_code_are_not_required():
    p = plan(
        job(
            "",
            """\
        assert f() == 1
        if cond():
            assert f() == 2
        try:
            assert f() == 3
        except Exception:
            pass
        """,
        )
    )
    assert [s.required for s in p.sites] == [True, False, False]


def test_names_the_reference_defines_are_never_taken_for_builtins():
    assert defined_names("import math, os.path\nfrom x import y as z\ndef sum(a, b): pass\nN = 3\nclass C: pass") == {
        "os",
        "z",
        "sum",
        "N",
        "C",
    }
    assert "sum(10, 15)" in plan(job("", "assert sum(10, 15) == 6\n", {"sum"})).inside_tests
    assert "sum(" not in plan(job("", "assert sum(f(10)) == 6\n")).inside_tests


# ------------------------------------------------------------------------------ judging

SOLUTION = """\
import collections
def ident(x):
    return x
def pair():
    return [1, 2]
def tup():
    return (1, 2)
def floaty():
    return 0.1 + 0.2
def counter():
    return collections.Counter("aab")
def boom():
    raise ValueError("boom")
"""
# Each assert is judged by the sandbox and, as the oracle, by Python itself in this process.
ASSERTS = [
    "assert ident(3) == 3",
    "assert ident(3) == 3.0",
    "assert ident(True) == 1",
    "assert ident(3) == 4",
    "assert pair() == [1, 2]",
    "assert pair() == (1, 2)",
    "assert tup() == (1, 2)",
    "assert tup() == [1, 2]",
    "assert floaty() == 0.3",
    "assert floaty() == 0.30000000000000004",
    "assert math.isclose(floaty(), 0.3)",
    "assert abs(floaty() - 0.3) < 1e-9",
    "assert ident(float('nan')) == float('nan')",
    "assert ident(-0.0) == 0.0",
    "assert ident({'b': 1, 'a': 2}) == {'a': 2, 'b': 1}",
    "assert counter() == {'a': 2, 'b': 1}",
    "assert set(pair()) == {2, 1}",
    "assert sorted(ident([3, 1, 2])) == [1, 2, 3]",
    "assert len(pair()) == 2",
    "assert 2 in pair()",
    "assert 3 not in pair()",
    "assert ident(None) is None",
    "assert ident(0) is not None",
    "assert not ident(0)",
    "assert ident([0])",
    "assert ident(1) < 2 < 3",
    "assert pair()[1] == 2",
    "assert pair()[::-1] == [2, 1]",
    "assert ident('ab') + 'c' == 'abc'",
    "assert ident(1) == 1 and ident(2) == 3",
    "assert ident(5) == 2 * 3 - 1",
    "assert ident(1) == 1 or boom()",
    "assert ident('a') < 1",
    "assert all(x > 0 for x in pair())",
    "assert boom() == 1",
    "assert ident(1) == ident(1)",
]


def python_verdict(assert_line: str) -> bool:
    scope = {}
    exec("import math\n" + SOLUTION, scope)
    try:
        exec(assert_line, scope)
        return True
    except Exception:
        return False


def test_the_judge_agrees_with_python():
    tests = [job(SOLUTION, f"import math\n{line}\n") for line in ASSERTS]
    got = [r.passed for r in run_many(tests, FAST)]
    assert got == [python_verdict(line) for line in ASSERTS], list(zip(ASSERTS, got))


def test_results_say_why_and_keep_order():
    results = run_many(
        [
            job("def f():\n    return 2\n", "assert f() == 2\n"),
            job("def f():\n    return [1, 'x']\n", "assert f() == 1\n"),
            job("def f(:\n", "assert f() == 1\n"),
            job("def f():\n    print('out'); raise KeyError('k')\n", "assert f() == 1\n"),
            job("", "assert (\n"),
        ],
        FAST,
    )
    assert [r.status for r in results] == ["passed", "failed", "failed", "failed", "failed"]
    assert results[1].reason == "test 1 failed (got [1, 'x'])"
    assert results[2].reason.startswith("raised in the solution: SyntaxError")
    assert "KeyError" in results[3].reason and results[3].stdout == "out\n" and "KeyError: 'k'" in results[3].stderr
    assert results[4].reason.startswith("the tests do not parse")


def test_every_report_is_needed():
    results = run_many(
        [
            job("import os\ndef f():\n    os._exit(0)\n", "assert f() == 1\n"),
            job("def f():\n    return 1\n", "assert f() == 1\nraise SystemExit\nassert f() == 1\n"),
            job("def f():\n    return 1\n", "x = 1\n"),
        ],
        FAST,
    )
    assert [r.reason for r in results] == [
        "exited before all tests reported",
        "raised in the tests: SystemExit: ",
        "the tests contain no assert",
    ]


def test_limits_end_runs_as_results():
    loop, hog = run_many(
        [
            job("def f():\n    while True: pass\n", "assert f() == 1\n"),
            job("def f():\n    return len(bytearray(1 << 30))\n", "assert f() == 1 << 30\n"),
        ],
        Limits(timeout_s=1.5, memory_mb=256),
    )
    assert loop.status == "timeout" and loop.seconds < 5
    assert hog.status == "failed" and "MemoryError" in hog.reason


def test_only_judged_jobs_are_run():
    with pytest.raises(TypeError):
        run_many(["print(1)"], FAST)


# ------------------------------------------------------------------------------ isolation


def test_each_result_records_its_isolation():
    iso = isolation(FAST)  # this machine's answer, probed once per process
    (result,) = run_many([job("def f():\n    return 1\n", "assert f() == 1\n")], FAST)
    assert result.passed and result.isolation == {"level": iso.level, "seccomp": iso.seccomp, "uid": 65534}


def test_namespaces_bind_a_package_that_lies_below_the_new_roots_mountpoint(monkeypatch, tmp_path):
    """A checkout under /tmp: the new root's tmpfs covers the temp directory, so the
    package must be bound through a descriptor opened before (it once failed to start)."""
    if isolation(FAST).level != "namespaces":
        pytest.skip("no namespace isolation on this machine")
    assert str(tmp_path).startswith(os.path.realpath(tempfile.gettempdir()) + "/")
    shutil.copytree(Path(launch.LIB_PARENT) / "inside", tmp_path / "inside")
    monkeypatch.setattr(launch, "LIB_PARENT", str(tmp_path))
    (result,) = run_many([job("def f():\n    return 1\n", "assert f() == 1\n")], FAST)
    assert result.passed and result.isolation["level"] == "namespaces", result.reason


def test_strict_refuses_best_effort(best_effort):
    with pytest.raises(IsolationUnavailable):
        run_many([job("def f():\n    return 1\n", "assert f() == 1\n")], Limits(isolation="strict"))


def test_best_effort_still_judges_and_limits(best_effort, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    ok, wrong, reader = run_many(
        [
            job("def f():\n    return 1\n", "assert f() == 1\n"),
            job("def f():\n    return 2\n", "assert f() == 1\n"),
            job(f"def f():\n    return open({str(secret)!r}).read()\n", "assert f() == 1\n"),
        ],
        FAST,
    )
    assert ok.passed and ok.isolation["level"] == "best_effort"
    assert wrong.reason == "test 1 failed (got 2)"
    assert "denied" in reader.reason and "top secret" not in reader.reason + reader.stdout + reader.stderr


def _nobody_can_start(python: str) -> bool:
    """Whether uid 65534 can run `python` and read the sandbox's own package."""
    probe = [python, "-I", "-S", "-c", f"import os; os.listdir({launch.LIB_PARENT!r})"]
    try:
        return subprocess.run(probe, user=65534, group=65534, extra_groups=[], capture_output=True).returncode == 0
    except PermissionError:  # the interpreter itself is out of reach
        return False


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping the uid needs a root evaluator")
def test_best_effort_as_root_runs_the_program_as_nobody(monkeypatch):
    """Our interpreter may sit under a root-only home; the system one is world-readable."""
    python = next((p for p in (launch.python(), "/usr/bin/python3") if _nobody_can_start(p)), None)
    if python is None:
        pytest.skip("no interpreter that uid 65534 can start")
    monkeypatch.setattr(launch, "python", lambda: python)
    monkeypatch.setattr(
        launch, "_available", launch.Isolation("best_effort", seccomp.supported(), "forced", as_nobody=True)
    )
    [ids] = run_many(
        [
            job(
                "import os\ndef f():\n    return os.getuid(), os.geteuid(), os.getgid(), os.getgroups()\n",
                "assert f() == (65534, 65534, 65534, [])\n",
            )
        ],
        FAST,
    )
    assert ids.passed, ids.reason
    assert ids.isolation == {"level": "best_effort", "seccomp": seccomp.supported(), "uid": 65534}


@pytest.mark.skipif(os.geteuid() != 0, reason="the uid question is a root evaluator's")
@pytest.mark.parametrize("nobody_works", [True, False])
def test_root_without_namespaces_drops_to_nobody_only_where_it_can(monkeypatch, nobody_works):
    monkeypatch.setattr(launch.shutil, "which", lambda *a, **k: "/usr/bin/unshare")
    tried = []

    def probe(iso):
        tried.append(iso)
        return "" if iso.as_nobody and nobody_works else "no namespaces here"

    iso = launch._decide(probe)
    assert [t.level for t in tried] == ["namespaces", "best_effort"] and tried[1].as_nobody
    assert iso.level == "best_effort" and iso.as_nobody == nobody_works
    assert iso.record()["uid"] == (65534 if nobody_works else 0)
    assert nobody_works or "keeps the evaluator's uid 0" in iso.reason


# ------------------------------------------------------------------------------ seccomp filter


def run_bpf(program, nr: int, arch: int, arg0: int = 0) -> int:
    """A classic-BPF interpreter for the instructions the filter uses."""
    data = {0: nr, 4: arch, 16: arg0}
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = program[pc]
        if code == 0x20:  # ld [k]
            acc, pc = data[k], pc + 1
        elif code == 0x06:  # ret k
            return k
        else:
            taken = {0x15: acc == k, 0x35: acc >= k, 0x45: bool(acc & k)}[code]
            pc += 1 + (jt if taken else jf)


# (x86_64, aarch64) from the kernel's unistd tables, independently of the filter's own table
SYSCALLS = {
    "read": (0, 63),
    "openat": (257, 56),
    "mmap": (9, 222),
    "socketpair": (53, 199),
    "kill": (62, 129),
    "pidfd_send_signal": (424, 424),
    "execve": (59, 221),
    "ptrace": (101, 117),
    "unshare": (272, 97),
    "mount": (165, 40),
    "socket": (41, 198),
    "clone": (56, 220),
    "clone3": (435, 435),
    "prctl": (157, 167),
}
ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
EPERM, ENOSYS = 0x00050000 | 1, 0x00050000 | 38


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_seccomp_filter_decisions(machine):
    col, prog = ("x86_64", "aarch64").index(machine), seccomp.program(machine)
    decide = lambda name, arg0=0: run_bpf(prog, SYSCALLS[name][col], ARCH[machine], arg0)  # noqa: E731
    for name in ("read", "openat", "mmap", "socketpair"):
        assert decide(name) == seccomp.ALLOW, name
    for name in ("kill", "pidfd_send_signal", "execve", "ptrace", "unshare", "mount", "socket"):
        assert decide(name) == EPERM, name
    assert decide("clone", seccomp.CLONE_THREAD | 0x3D0F00) == seccomp.ALLOW  # pthread_create's flags
    assert decide("clone", 0x01200011) == EPERM  # fork's flags
    assert decide("clone3") == ENOSYS
    assert decide("prctl", 1) == EPERM and decide("prctl", 38) == seccomp.ALLOW  # PDEATHSIG / NO_NEW_PRIVS
    other = ARCH["aarch64" if machine == "x86_64" else "x86_64"]
    assert run_bpf(prog, 0, other) == seccomp.KILL_PROCESS
    if machine == "x86_64":
        assert run_bpf(prog, 0x40000000, ARCH[machine]) == seccomp.KILL_PROCESS  # x32 ABI
