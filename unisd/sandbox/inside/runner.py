"""The sandboxed process: limits itself, then runs the candidate's solution and the tests.

The job (JSON on stdin, read to the end before anything else) holds the rlimits, whether
to install the seccomp filter and the fallback policy, the solution and the tests as
`judge.plan` rewrote them. Reports go to the file descriptor the job names (3 under
namespaces) as JSON lines: `ready` (before the candidate's code runs), one `site` per
executed assert with its probes' plain values, then `end`, or `error` when anything
escapes, SystemExit included. The exit status means nothing: the host's judge decides.
"""

from __future__ import annotations

import builtins
import json
import os
import resource
import sys
import traceback

from . import codec, seccomp

_report_fd = 3  # the job says which
_LIMITS = {
    "memory_bytes": (resource.RLIMIT_AS, resource.RLIMIT_DATA),
    "cpu_s": (resource.RLIMIT_CPU,),
    "file_bytes": (resource.RLIMIT_FSIZE,),
    "nproc": (resource.RLIMIT_NPROC,),
    "nofile": (resource.RLIMIT_NOFILE,),
    "core": (resource.RLIMIT_CORE,),
}


def main() -> None:
    global _report_fd
    job = json.loads(sys.stdin.buffer.read())
    _report_fd = job["report_fd"]
    for key, value in job["limits"].items():
        for lim in _LIMITS[key]:
            resource.setrlimit(lim, (value, value))
    if job["best_effort"]:
        from . import fallback

        fallback.die_with_parent(job["parent"])
    if job["seccomp"]:
        seccomp.install()
    if job["best_effort"]:
        fallback.install_audit_hook(os.getcwd())
    _send({"ready": True})
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    stage = "solution"
    try:
        exec(compile(job["solution"], "solution.py", "exec"), namespace)
        stage = "tests"
        namespace.update(__report__=_report, __plain__=codec.plain)
        exec(compile(job["tests"], "tests.py", "exec"), namespace)
        _flush()
    except BaseException as exc:  # SystemExit and KeyboardInterrupt too: leaving early is failing
        _print_traceback(exc)
        _send({"error": f"in the {stage}: {_describe(exc)}"})
        os._exit(1)
    _send({"end": True})
    os._exit(0)


def _report(site: int, *values: object) -> None:
    record = {"site": [site, [codec.encode(v) for v in values]]}
    _flush()  # the host stops the sandbox at the first failing site: let what was printed reach it first
    _send(record)


def _send(record: dict) -> None:
    data = memoryview(json.dumps(record, separators=(",", ":")).encode() + b"\n")
    while data:
        data = data[os.write(_report_fd, data) :]


def _describe(exc: BaseException) -> str:
    try:
        return f"{type(exc).__name__}: {exc}"[:1000]
    except Exception:  # the candidate's __str__
        return type(exc).__name__


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:  # noqa: SIM105 - the sandbox's runner imports no more than it needs
            stream.flush()
        except Exception:
            pass


def _print_traceback(exc: BaseException) -> None:
    try:
        traceback.print_exception(exc)
        _flush()
    except Exception:
        pass
