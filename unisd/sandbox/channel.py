"""The host's side of the pipes: write the job, read stdout, stderr and the reports.

Nothing is ever read back from the sandbox's files (which the program could replace by a
FIFO, a link to /dev/zero or to a file outside): only these pipes, non-blocking, under
one deadline, with byte caps. Of stdout and stderr the last `cap` bytes are kept (the
rest is read and dropped, so the program never blocks on a full pipe); report lines
longer than MAX_LINE, or more than MAX_REPORT bytes in all, fail the run.
"""

from __future__ import annotations

import os
import selectors
import time
from collections.abc import Callable

from .judge import Judge

MAX_LINE = 1 << 20
MAX_REPORT = 64 << 20
_CHUNK = 1 << 16


class _Tail:
    def __init__(self, cap: int) -> None:
        self.cap, self.data = cap, bytearray()

    def add(self, chunk: bytes) -> None:
        self.data += chunk
        if len(self.data) > 2 * self.cap:
            del self.data[: len(self.data) - self.cap]

    def text(self) -> str:
        return bytes(self.data[-self.cap :] if self.cap else b"").decode("utf-8", errors="replace")


class _Lines:
    def __init__(self, judge: Judge) -> None:
        self.judge, self.partial, self.total = judge, bytearray(), 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        if self.total > MAX_REPORT:
            return self.judge.fail("too much reported")
        self.partial += chunk
        *lines, rest = self.partial.split(b"\n")
        self.partial = bytearray(rest)
        for line in lines:
            self.judge.feed(bytes(line))
        if len(self.partial) > MAX_LINE:
            self.judge.fail("report line too long")


def exchange(
    job: bytes,
    job_fd: int,
    out_fd: int,
    err_fd: int,
    report_fd: int,
    judge: Judge,
    deadline: float,
    cap: int,
    close: Callable[[int], None],
) -> tuple[str, str, bool]:
    """Feed the job and read everything until the pipes close, the judge has failed the
    run, or the deadline passes; returns (stdout tail, stderr tail, timed out). Closes the
    job pipe with `close` once written (the runner reads it to the end); the reading ends
    stay the caller's."""
    sel = selectors.DefaultSelector()
    tails = {out_fd: _Tail(cap), err_fd: _Tail(cap)}
    lines = _Lines(judge)
    pending = memoryview(job)
    for fd in (job_fd, out_fd, err_fd, report_fd):
        os.set_blocking(fd, False)
    sel.register(job_fd, selectors.EVENT_WRITE)
    for fd in (out_fd, err_fd, report_fd):
        sel.register(fd, selectors.EVENT_READ)
    timed_out = False
    try:
        while len(sel.get_map()) and not judge.failure:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            for key, _ in sel.select(left):
                if key.fd == job_fd:
                    try:
                        pending = pending[os.write(job_fd, pending[:_CHUNK]) :]
                    except BrokenPipeError:
                        pending = pending[:0]
                    if not pending:
                        sel.unregister(job_fd)
                        close(job_fd)
                    continue
                chunk = os.read(key.fd, _CHUNK)
                if not chunk:
                    sel.unregister(key.fd)
                elif key.fd == report_fd:
                    lines.add(chunk)
                else:
                    tails[key.fd].add(chunk)
    finally:
        sel.close()
    if judge.failure:  # stopped early: keep what the program printed before the failing report
        for fd, tail in tails.items():
            _drain(fd, tail)
    elif not timed_out and lines.partial:
        judge.feed(bytes(lines.partial))  # a last line without its newline
    return tails[out_fd].text(), tails[err_fd].text(), timed_out


def _drain(fd: int, tail: _Tail, limit: int = MAX_LINE) -> None:
    """What is in the pipe now, at most `limit` bytes (the program may still be writing)."""
    while limit > 0:
        try:
            chunk = os.read(fd, min(_CHUNK, limit))
        except BlockingIOError:
            return
        if not chunk:
            return
        tail.add(chunk)
        limit -= len(chunk)
