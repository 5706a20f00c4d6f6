"""What the best-effort sandbox adds where namespaces are unavailable: an audit hook.

It denies, at the Python level, file access outside the working directory (reads are
also allowed in the standard library), changing directory, process creation, sockets,
ctypes, sqlite3 and readline (both open files in C, past the hook), rlimit changes and
introspection of the hook. It is a second line at best: Python code in the same process
can reach and patch what the hook relies on. The kernel-enforced parts of best effort
are the rlimits and the seccomp filter, not this.
"""

from __future__ import annotations

import os
import signal
import sys

from . import linux

TYPE_CHECKING = False  # the sandbox's interpreter imports no `typing`; type checkers read this as true
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any


def die_with_parent(parent: int) -> None:
    """Be killed when the evaluator dies (seccomp then forbids undoing it)."""
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the line above
        os._exit(137)


def install_audit_hook(workdir: str) -> None:
    read_roots = tuple(os.path.realpath(p) for p in sys.path if p) + (workdir,)
    sys.addaudithook(_hook(os.path.realpath(workdir), read_roots))
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]  # imported by the runner: make the candidate's import go through the hook


def _hook(
    workdir, read_roots, realpath=os.path.realpath, fspath=os.fspath, sep=os.sep
) -> Callable[[str, tuple[Any, ...]], None]:
    def inside(path, roots) -> bool:
        try:
            p = realpath(fspath(path))
        except Exception:
            return False
        return any(p == r or p.startswith(r + sep) for r in roots)

    write_roots = (workdir,)
    blocked_imports = frozenset(
        {
            "_posixsubprocess",
            "subprocess",
            "_ctypes",
            "ctypes",
            "_socket",
            "socket",
            "multiprocessing",
            "_multiprocessing",
            "pty",
            "_xxsubinterpreters",
            "readline",
            "_sqlite3",
            "sqlite3",
        }
    )
    path_events = {
        "os.remove": 1,
        "os.rmdir": 1,
        "os.rename": 2,
        "shutil.rmtree": 1,
        "os.truncate": 1,
        "os.chmod": 1,
        "os.chown": 1,
        "os.link": 2,
        "os.symlink": 2,
        "os.mkdir": 1,
        "os.utime": 1,
        "os.chflags": 1,
        "os.lchflags": 1,
        "os.lchmod": 1,
        "shutil.copyfile": 2,
        "shutil.copymode": 2,
        "shutil.copystat": 2,
        "shutil.copytree": 2,
        "shutil.move": 2,
        "os.mkfifo": 1,
        "os.mknod": 1,
        "os.setxattr": 1,
        "os.removexattr": 1,
    }
    denied_events = frozenset(
        {
            "os.fork",
            "os.forkpty",
            "os.exec",
            "os.posix_spawn",
            "os.spawn",
            "os.system",
            "subprocess.Popen",
            "os.kill",
            "os.killpg",
            "pty.spawn",
            "os.chdir",
            "os.fchdir",
            "resource.setrlimit",
            "resource.prlimit",
            "sys.addaudithook",
            "sys._current_frames",
            "gc.get_objects",
            "gc.get_referrers",
            "gc.get_referents",
            "code.__new__",
            "os.setuid",
            "os.setgid",
            "os.chroot",
            "sqlite3.connect",
        }
    )
    denied_prefixes = ("socket.", "ctypes.", "_posixsubprocess", "mmap.")

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "open":
            path, mode, flags = args
            if path is None or isinstance(path, int):
                return
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & 0o3103
            if inside(path, write_roots) or (not writing and inside(path, read_roots)):
                return
            raise PermissionError(f"sandbox: access to {path!r} denied")
        if event in ("os.listdir", "os.scandir"):
            if args and args[0] is not None and not isinstance(args[0], int) and not inside(args[0], read_roots):
                raise PermissionError(f"sandbox: access to {args[0]!r} denied")
            return
        n = path_events.get(event)
        if n is not None:
            for p in args[:n]:
                if isinstance(p, (str, bytes, os.PathLike)) and not inside(p, write_roots):
                    raise PermissionError(f"sandbox: {event} on {p!r} denied")
            return
        if event == "import" and args and args[0] in blocked_imports:
            raise ImportError(f"sandbox: import of {args[0]} denied")
        if event in denied_events or event.startswith(denied_prefixes):
            raise PermissionError(f"sandbox: {event} denied")

    return hook
