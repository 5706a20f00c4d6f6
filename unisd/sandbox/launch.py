"""Starting a sandboxed process, and finding out which isolation this machine allows.

Two levels, recorded in every result (`SandboxResult.isolation["level"]`):

* `namespaces` (the default wherever it works): the kernel enforces the policy. util-linux
  `unshare` creates PID, mount, network, IPC and UTS namespaces (plus a user namespace
  when the evaluator is not root; nothing to install and no root needed where user
  namespaces are enabled), `inside.init` builds a filesystem holding only the Python
  runtime (read-only) and a small tmpfs, and drops to uid 65534; the runner adds rlimits
  and the seccomp filter. Why unshare and not bubblewrap or nsjail: it ships with every
  Linux distribution (util-linux is essential in Debian and Ubuntu), so the one-command
  setup keeps working for users without root, and the few things it does not do (bind
  mounts, pivot_root, dropping the uid) are a hundred lines of `inside.init`.
* `best_effort` (the logged fallback where namespaces cannot be created, e.g. user
  namespaces disabled, or a container without the rights): a plain child process in a
  new session and a fresh directory, with the same rlimits and seccomp filter (when the
  machine is supported) plus `inside.fallback`'s audit hook. The filesystem and other
  processes of the same user are then protected only by that hook, which in-process code
  can get around; `eval.code_isolation: strict` refuses to score in that case.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .inside import init, seccomp
from .inside.init import SANDBOX_ID

log = logging.getLogger(__name__)

Level = Literal["namespaces", "best_effort"]
LIB_PARENT = str(Path(__file__).parent)  # holds the `inside` package
INIT_BOOT = (
    "# unisd-sandbox init\nimport sys; sys.path.append(sys.argv[1]); from inside import init; init.main(sys.argv[2])"
)
# The evaluator's environment (tokens, keys) never reaches the sandbox.
HOST_ENV = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8"}
SYSTEM_LIBS = ("/lib", "/lib64", "/lib32", "/libx32", "/usr/lib", "/usr/lib64", "/usr/lib32", "/usr/libx32")


@dataclass(frozen=True)
class Isolation:
    level: Level
    seccomp: bool
    reason: str = ""  # why not namespaces
    as_nobody: bool = False  # best effort with a root evaluator: the program runs as uid/gid 65534

    def record(self) -> dict:
        """What each result records: the level, seccomp, and the uid the program ran as (on
        the host; under namespaces 65534 is the host's nobody or an unprivileged mapping)."""
        uid = SANDBOX_ID if self.level == "namespaces" or self.as_nobody else os.geteuid()
        return {"level": self.level, "seccomp": self.seccomp, "uid": uid}


def python() -> str:
    """The real interpreter (never a virtual environment's: -I -S ignore it anyway)."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


@dataclass(frozen=True)
class Started:
    proc: subprocess.Popen
    report_fd: int  # the number the runner writes to, inside
    workdir: str | None  # best effort only: the host directory to remove


def label() -> str:
    """Every sandbox process carries this in its command line, and every best-effort
    directory in its name: `ps` and `ls` show whose they are."""
    return f"unisd-sandbox-of-{os.getpid()}"


def start(iso: Isolation, tmp_bytes: int, stdin: int, stdout: int, stderr: int, report: int, lifeline: int) -> Started:
    """Start the sandbox (`tmp_bytes`: the size of its writable tmpfs); the caller owns the
    pipes and closes its copies of these ends."""
    common: dict = dict(stdin=stdin, stdout=stdout, stderr=stderr, start_new_session=True)
    if iso.level == "namespaces":
        binds, links = _runtime()
        cfg: dict[str, Any] = {
            "python": python(),
            "binds": binds,
            "links": links,
            "inside": LIB_PARENT + "/inside",
            "mountpoint": os.path.realpath(tempfile.gettempdir()),
            "report_fd": report,
            "lifeline_fd": lifeline,
            "rootless": os.geteuid() != 0,
            "tmp_bytes": tmp_bytes,
            "label": label(),
        }
        argv = _unshare(cfg["rootless"]) + [python(), "-I", "-S", "-B", "-c", INIT_BOOT, LIB_PARENT, json.dumps(cfg)]
        return Started(subprocess.Popen(argv, pass_fds=(report, lifeline), env=HOST_ENV, cwd="/", **common), 3, None)
    workdir = tempfile.mkdtemp(prefix=label() + "-")
    env = {**HOST_ENV, "HOME": workdir, "TMPDIR": workdir}
    argv = [python(), "-I", "-S", "-B", "-c", init.RUNNER_BOOT, LIB_PARENT, label()]
    try:
        if iso.as_nobody:
            os.chown(workdir, SANDBOX_ID, SANDBOX_ID)
            common.update(user=SANDBOX_ID, group=SANDBOX_ID, extra_groups=[])
        proc = subprocess.Popen(argv, pass_fds=(report,), env=env, cwd=workdir, **common)
    except BaseException:
        remove_tree(workdir)
        raise
    return Started(proc, report, workdir)


def _unshare(rootless: bool) -> list[str]:
    user = ["--user", "--map-root-user"] if rootless else []
    return [
        shutil.which("unshare", path=HOST_ENV["PATH"]) or "unshare",
        *user,
        "--pid",
        "--kill-child",
        "--mount",
        "--net",
        "--ipc",
        "--uts",
        "--",
    ]


@functools.cache
def _runtime() -> tuple[list[str], list[tuple[str, str]]]:
    """What the program's filesystem shows of the host, read-only: the interpreter's prefix
    and the system library directories, bound; those that are symlinks (merged /usr:
    /lib -> usr/lib) recreated as symlinks."""
    dirs = sorted(
        {os.path.realpath(sys.base_prefix), os.path.dirname(python())}
        | {os.path.realpath(p) for p in SYSTEM_LIBS if os.path.isdir(p)}
    )
    binds = [d for i, d in enumerate(dirs) if not any(d.startswith(p + "/") for p in dirs[:i])]
    links = [
        (p, os.readlink(p)) for p in SYSTEM_LIBS if os.path.islink(p) and not any(p.startswith(b + "/") for b in binds)
    ]
    return binds, links


def remove_tree(path: str) -> None:
    """Remove a best-effort working directory whatever its (dead) program left there:
    FIFOs, symlinks (never followed) and directories it made unreadable, itself included."""
    with contextlib.suppress(OSError):
        os.chmod(path, 0o700)
    for dirpath, dirnames, _ in os.walk(path):
        for d in dirnames:  # made listable before the walk descends
            full = os.path.join(dirpath, d)
            if not os.path.islink(full):
                with contextlib.suppress(OSError):
                    os.chmod(full, 0o700)
    shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------- which level

_lock = threading.Lock()
_available: Isolation | None = None


def available(probe) -> Isolation:
    """The best isolation this machine gives, found once per process by running `probe`
    (a function Isolation -> '' on success, else why not) and logged."""
    global _available
    with _lock:
        if _available is None:
            _available = _decide(probe)
            if _available.level == "namespaces":
                log.info(
                    "sandbox isolation: namespaces (unshare%s), seccomp %s",
                    ", user namespace" if os.geteuid() != 0 else "",
                    "on" if _available.seccomp else "off",
                )
            else:
                log.warning(
                    "sandbox isolation: BEST EFFORT (no namespaces: %s). Weaker: no filesystem or process "
                    "isolation, only rlimits, seccomp %s, an audit hook and the program's uid %d. Results record "
                    "isolation=best_effort; eval.code_isolation=strict refuses to score. See docs/security.md.",
                    _available.reason,
                    "on" if _available.seccomp else "off",
                    _available.record()["uid"],
                )
        return _available


def _decide(probe) -> Isolation:
    if platform.system() != "Linux":
        return Isolation("best_effort", False, "not Linux")
    has_seccomp = seccomp.supported()
    if not shutil.which("unshare", path=HOST_ENV["PATH"]):
        return Isolation("best_effort", has_seccomp, "util-linux unshare not found")
    why = probe(Isolation("namespaces", has_seccomp))
    if not why:
        return Isolation("namespaces", has_seccomp)
    if os.geteuid() != 0:
        return Isolation("best_effort", has_seccomp, why)
    # a root evaluator still drops the program to nobody, if nobody can reach the interpreter
    nobody = Isolation("best_effort", has_seccomp, why, as_nobody=True)
    if not (why_not := probe(nobody)):
        return nobody
    return Isolation(
        "best_effort",
        has_seccomp,
        f"{why}; and as uid {SANDBOX_ID} it cannot start ({why_not}), so it keeps the evaluator's uid 0",
    )
