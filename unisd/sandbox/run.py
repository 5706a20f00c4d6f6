"""Running candidate solutions against their tests, each in its own sandbox.

Whatever happens inside (a crash, a hang, garbage on the pipes, a sandbox that does not
start) becomes a failed or timed-out result with a `reason`; only a programming error of
the caller, or `strict` isolation being unavailable, raises. Every sandbox process is
killed and every best-effort directory removed when its run ends, when the evaluation is
interrupted (KeyboardInterrupt) and when it receives SIGTERM while `run_many` runs in the
main thread; under namespaces a SIGKILLed evaluator takes its sandboxes with it too (their
lifeline pipe closes).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

from unisd.progress import Progress

from . import channel, launch
from .judge import CodeTest, Judge, Plan, TestsUnjudgeable, plan

log = logging.getLogger(__name__)

Status = Literal["passed", "failed", "timeout"]


@dataclass
class SandboxResult:
    status: Status
    returncode: int | None
    seconds: float
    stdout: str = ""
    stderr: str = ""
    isolation: dict = field(default_factory=dict)  # {"level": "namespaces" | "best_effort", "seccomp": bool}
    reason: str = ""  # why it did not pass

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0
    memory_mb: int = 1024
    file_mb: int = 16  # largest file, and the size of the writable tmpfs
    nproc: int = 64
    output_chars: int = 4000  # bytes of stdout/stderr kept in the result (the last ones)
    isolation: Literal["best_effort", "strict"] = "best_effort"  # strict: refuse to run without namespaces+seccomp


class IsolationUnavailable(RuntimeError):
    """`strict` isolation was asked for and this machine cannot give it."""


def run_many(
    tests: Sequence[CodeTest], limits: Limits = Limits(), workers: int = 2, desc: str = "sandbox"
) -> list[SandboxResult]:
    """Judge each solution against its tests (`unisd.scoring.code_program`), concurrently,
    results in input order."""
    for test in tests:
        if not isinstance(test, CodeTest):
            raise TypeError(f"run_many takes CodeTest jobs (unisd.scoring.code_program), not {type(test).__name__}")
    iso = isolation(limits)
    progress = Progress(desc, len(tests), "programs")
    batch = _Batch()

    def one(test: CodeTest) -> SandboxResult:
        result = run_one(test, limits, iso, batch)
        progress.update()
        return result

    with ThreadPoolExecutor(max_workers=workers) as pool, _stopped_on_termination(pool, batch):
        results = [_result(future) for future in [pool.submit(one, test) for test in tests]]
    progress.close()
    return results


def _result(future: Future) -> SandboxResult:
    """Wait in short slices: a signal may wake a worker thread instead of this one, and
    its Python handler (Ctrl-C, SIGTERM) runs only when this thread runs again."""
    while True:
        try:
            return future.result(timeout=0.25)
        except TimeoutError:
            pass


def isolation(limits: Limits) -> launch.Isolation:
    iso = launch.available(_probe)
    if limits.isolation == "strict" and (iso.level != "namespaces" or not iso.seccomp):
        raise IsolationUnavailable(
            f"strict sandbox isolation needs namespaces and seccomp; this machine gives "
            f"{iso.level}, seccomp {'on' if iso.seccomp else 'off'} ({iso.reason})"
        )
    return iso


_PROBE = CodeTest("def f():\n    return 1\n", "assert f() == 1\n")


def _probe(iso: launch.Isolation) -> str:
    result = run_one(_PROBE, Limits(timeout_s=30), iso, warn=False)  # the caller reports why
    last_line = (result.stderr.strip().splitlines() or [""])[-1][:300]
    return "" if result.passed else f"{result.reason}: {last_line}"


def run_one(
    test: CodeTest, limits: Limits, iso: launch.Isolation, batch: _Batch | None = None, warn: bool = True
) -> SandboxResult:
    start = time.monotonic()
    record = iso.record()
    try:
        return _run(test, plan(test), limits, iso, record, start, batch or _Batch())
    except (TestsUnjudgeable, _Interrupted) as err:
        reason = str(err)
    except Exception as err:  # a harness-level surprise: this item fails, the evaluation goes on
        if warn:
            log.warning("sandbox run failed: %s: %s", type(err).__name__, err)
        reason = f"sandbox error: {type(err).__name__}: {err}"
    return SandboxResult("failed", None, time.monotonic() - start, isolation=record, reason=reason)


class _Fds:
    """File descriptors closed exactly once (a second close could hit another thread's fd)."""

    def __init__(self) -> None:
        self.open: set[int] = set()

    def pipe(self) -> tuple[int, int]:
        r, w = os.pipe()
        self.open |= {r, w}
        return r, w

    def close(self, *fds: int) -> None:
        for fd in fds:
            if fd in self.open:
                self.open.discard(fd)
                os.close(fd)


class _Batch:
    """The live sandboxes of one `run_many`, so that an interruption can end them all."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.live: dict[int, launch.Started] = {}
        self.stopping = False

    def add(self, started: launch.Started) -> bool:
        """Register a sandbox; False once the batch is stopping (then the caller stops it)."""
        with self.lock:
            if not self.stopping:
                self.live[id(started)] = started
            return not self.stopping

    def discard(self, started: launch.Started) -> None:
        with self.lock:
            self.live.pop(id(started), None)

    def stop(self) -> None:
        """Kill every live sandbox and remove its directory, once its process is gone (so
        that nothing can change the directory while it is removed)."""
        with self.lock:
            self.stopping = True
            live = list(self.live.values())
        for started in live:
            with contextlib.suppress(OSError):
                os.killpg(started.proc.pid, signal.SIGKILL)
        for started in live:
            if started.workdir:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    started.proc.wait(timeout=5)
                launch.remove_tree(started.workdir)


class _Interrupted(Exception):
    """The batch was stopped while this run started."""


def _run(
    test: CodeTest, tests: Plan, limits: Limits, iso: launch.Isolation, record: dict, start: float, batch: _Batch
) -> SandboxResult:
    fds = _Fds()
    job_r, job_w = fds.pipe()
    out_r, out_w = fds.pipe()
    err_r, err_w = fds.pipe()
    rep_r, rep_w = fds.pipe()
    life_r, life_w = fds.pipe()
    started = None
    try:
        started = launch.start(iso, limits.file_mb << 20, job_r, out_w, err_w, rep_w, life_r)
        fds.close(job_r, out_w, err_w, rep_w, life_r)
        if not batch.add(started):
            raise _Interrupted("the evaluation was interrupted")
        judge = Judge(tests)
        job = {
            "limits": {
                "memory_bytes": limits.memory_mb << 20,
                "cpu_s": int(limits.timeout_s) + 1,
                "file_bytes": limits.file_mb << 20,
                "nproc": limits.nproc,
                "nofile": 64,
                "core": 0,
            },
            "best_effort": iso.level == "best_effort",
            "parent": os.getpid(),
            "seccomp": iso.seccomp,
            "report_fd": started.report_fd,
            "solution": test.solution,
            "tests": tests.inside_tests,
        }
        stdout, stderr, timed_out = channel.exchange(
            json.dumps(job).encode(),
            job_w,
            out_r,
            err_r,
            rep_r,
            judge,
            start + limits.timeout_s,
            limits.output_chars,
            fds.close,
        )
    finally:
        if started is not None:
            _stop(started, fds, life_w)
            batch.discard(started)
        fds.close(*list(fds.open))
    seconds = time.monotonic() - start
    reason = judge.failure or judge.verdict()
    status: Status
    if timed_out and not judge.failure:
        status, reason = "timeout", f"timed out after {limits.timeout_s:g}s ({reason})"
    else:
        status = "failed" if reason else "passed"
    return SandboxResult(status, started.proc.returncode, seconds, stdout, stderr, record, reason)


def _stop(started: launch.Started, fds: _Fds, life_w: int) -> None:
    with contextlib.suppress(OSError):
        os.killpg(started.proc.pid, signal.SIGKILL)
    fds.close(life_w)  # process 1 of the namespaces exits when this closes
    started.proc.wait()
    if started.workdir:
        launch.remove_tree(started.workdir)


@contextlib.contextmanager
def _stopped_on_termination(pool: ThreadPoolExecutor, batch: _Batch) -> Iterator[None]:
    """On KeyboardInterrupt or SIGTERM: drop the runs not started, kill the running ones
    (one starting meanwhile stops itself, `_Batch.add`); after SIGTERM the signal goes on
    to the previous handler, which by default ends the process."""
    previous = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    if previous in (None, signal.SIG_IGN):  # not ours to handle (no Python handler can be restored)
        previous = None
    else:

        def on_term(signum: int, frame: object) -> None:
            pool.shutdown(wait=False, cancel_futures=True)
            batch.stop()
            signal.signal(signal.SIGTERM, previous)
            signal.raise_signal(signal.SIGTERM)

        signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        batch.stop()
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
