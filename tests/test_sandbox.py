"""The sandbox contains what generated code may do: loops, fork bombs, huge
allocations, file access outside its directory and network access."""

import os
import textwrap
import time

import pytest

from unisd.sandbox import Limits, run_many, run_python

FAST = Limits(timeout_s=3, memory_mb=256)


def run(src: str, limits: Limits = FAST):
    return run_python(textwrap.dedent(src), limits)


def test_passing_and_failing_programs():
    assert run("assert sum([1, 2]) == 3\nimport math, re, collections, heapq\nprint('ok')").passed
    res = run("assert 1 == 2, 'boom'")
    assert res.status == "failed" and "AssertionError: boom" in res.stderr


def test_infinite_loop_is_killed_at_the_timeout():
    t = time.monotonic()
    res = run("while True:\n    pass", Limits(timeout_s=1.5))
    assert res.status == "timeout"
    assert time.monotonic() - t < 10


def test_fork_bomb_is_contained():
    before = len(os.listdir("/proc"))
    res = run("""
        import os
        while True:
            os.fork()
    """)
    assert res.status == "failed" and "os.fork denied" in res.stderr
    res = run("import subprocess\nsubprocess.run(['sh', '-c', ':(){ :|:& };:'])")
    assert res.status == "failed" and "denied" in res.stderr
    res = run("import os\nos.system('sleep 100 &')")
    assert res.status == "failed" and "denied" in res.stderr
    time.sleep(0.2)
    assert len(os.listdir("/proc")) <= before + 2  # no processes left behind


def test_huge_allocation_fails_inside_the_sandbox():
    res = run("x = bytearray(8 * 1024**3)\nprint('allocated')")
    assert res.status == "failed" and "MemoryError" in res.stderr and "allocated" not in res.stdout


def test_files_outside_the_directory_cannot_be_read_or_deleted(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    for src in (f"print(open({str(secret)!r}).read())",
                f"import os\nos.remove({str(secret)!r})",
                f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
                f"import os\nos.rename({str(secret)!r}, 'stolen.txt')",
                f"open({str(tmp_path / 'new.txt')!r}, 'w').write('x')",
                "print(open('/etc/passwd').read())",
                "import os\nprint(os.listdir('/'))"):
        res = run(src)
        assert res.status == "failed" and "denied" in res.stderr, src
        assert "top secret" not in res.stdout
    assert secret.read_text() == "top secret"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.txt"]


def test_own_directory_is_writable():
    assert run("open('a.txt', 'w').write('hi')\nassert open('a.txt').read() == 'hi'\nimport os\nos.remove('a.txt')").passed


def test_network_is_unreachable():
    res = run("import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)")
    assert res.status == "failed" and "denied" in res.stderr


def test_limits_cannot_be_lifted_from_inside():
    res = run("import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))")
    assert res.status == "failed" and "denied" in res.stderr
    res = run("import ctypes\nctypes.CDLL(None).system(b'true')")
    assert res.status == "failed" and "denied" in res.stderr


def test_environment_is_scrubbed():
    os.environ["UNISD_SECRET_TOKEN"] = "abc"
    try:
        res = run("import os\nprint(sorted(os.environ))")
    finally:
        del os.environ["UNISD_SECRET_TOKEN"]
    assert res.passed and "UNISD_SECRET_TOKEN" not in res.stdout


def test_run_many_keeps_order():
    results = run_many(["print(1)", "raise SystemExit(3)", "print(3)"], FAST, workers=2)
    assert [r.status for r in results] == ["passed", "failed", "passed"]
    assert results[1].returncode == 3
