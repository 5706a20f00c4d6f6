"""Running untrusted, model-generated Python.

Each program runs in its own process, in a fresh temporary directory, with layered
containment:

* process: a new session (the whole group is killed on timeout), isolated Python
  (`-I -S`: no site-packages, no user paths), a scrubbed environment, stdout/stderr to
  size-limited files rather than pipes;
* kernel: rlimits on address space, CPU time, file size, open files, processes, no core
  dumps; a new network namespace (no interfaces but a down loopback) where the kernel
  allows it;
* interpreter: an audit hook, installed before the program starts and impossible to
  remove from Python, that denies file access outside the directory (reads are allowed
  only there and in the standard library), process creation, sockets, ctypes, rlimit
  changes and introspection of the hook itself.

What each run actually got is returned in `SandboxResult.isolation`. This stops
accidental damage and naive escapes by generated code; it is not a container against a
determined attacker (use a VM or container runtime for that).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from unisd.progress import Progress

Status = Literal["passed", "failed", "timeout"]

# Runs inside the child, before the untrusted program. argv[1] holds the limits as JSON.
_BOOT = r'''
import json, os, sys
cfg = json.loads(sys.argv[1])
import resource
mem = cfg["memory_bytes"]
for lim, val in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_DATA, mem), (resource.RLIMIT_CPU, cfg["cpu_s"]),
                 (resource.RLIMIT_FSIZE, cfg["file_bytes"]), (resource.RLIMIT_NOFILE, 64),
                 (resource.RLIMIT_NPROC, cfg["nproc"]), (resource.RLIMIT_CORE, 0)):
    try:
        resource.setrlimit(lim, (val, val))
    except (ValueError, OSError):
        pass
isolation = {"rlimits": True, "network_namespace": False, "audit_hook": True}
try:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    CLONE_NEWNET, CLONE_NEWUSER = 0x40000000, 0x10000000
    flags = CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWNET | CLONE_NEWUSER
    isolation["network_namespace"] = libc.unshare(flags) == 0
    del ctypes, libc
except Exception:
    pass
with open(cfg["isolation_file"], "w") as fh:
    json.dump(isolation, fh)
source = open(cfg["program"], encoding="utf-8").read()

def _policy(workdir, read_roots):
    sep = os.sep
    realpath, fspath = os.path.realpath, os.fspath
    def inside(path, roots):
        try:
            p = realpath(fspath(path))
        except Exception:
            return False
        return any(p == r or p.startswith(r + sep) for r in roots)
    write_roots = (workdir,)
    blocked_imports = frozenset({"_posixsubprocess", "subprocess", "_ctypes", "ctypes", "_socket", "socket",
                                 "multiprocessing", "_multiprocessing", "pty", "_xxsubinterpreters"})
    path_events = {"os.remove": 1, "os.rmdir": 1, "os.rename": 2, "shutil.rmtree": 1, "os.truncate": 1,
                   "os.chmod": 1, "os.chown": 1, "os.link": 2, "os.symlink": 2, "os.mkdir": 1, "os.utime": 1,
                   "os.chflags": 1, "os.lchflags": 1, "os.lchmod": 1, "shutil.copyfile": 2, "shutil.copymode": 2,
                   "shutil.copystat": 2, "shutil.copytree": 2, "shutil.move": 2, "os.mkfifo": 1, "os.mknod": 1,
                   "os.setxattr": 1, "os.removexattr": 1}
    denied_events = frozenset({"os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system",
                               "subprocess.Popen", "os.kill", "os.killpg", "pty.spawn", "os.startfile",
                               "resource.setrlimit", "resource.prlimit", "sys.addaudithook",
                               "sys._current_frames", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
                               "code.__new__", "os.setuid", "os.setgid", "os.chroot"})
    denied_prefixes = ("socket.", "ctypes.", "_posixsubprocess", "winreg.", "mmap.")

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            if path is None or isinstance(path, int):
                return
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & 0o3103
            if inside(path, write_roots) or (not writing and inside(path, read_roots)):
                return
            raise PermissionError(f"sandbox: access to {path!r} denied")
        if event in ("os.listdir", "os.scandir", "os.chdir"):
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

_workdir = os.path.realpath(os.getcwd())
_read_roots = tuple(os.path.realpath(p) for p in sys.path if p) + (_workdir,)
sys.addaudithook(_policy(_workdir, _read_roots))
del _policy, cfg, json, resource
exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
'''


@dataclass
class SandboxResult:
    status: Status
    returncode: int | None
    seconds: float
    stdout: str = ""
    stderr: str = ""
    isolation: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0
    memory_mb: int = 1024
    file_mb: int = 16
    nproc: int = 64
    output_chars: int = 4000  # of stdout/stderr kept in the result


def run_python(program: str, limits: Limits = Limits()) -> SandboxResult:
    """Run `program` in the sandbox; passed means exit status 0 within the time limit."""
    workdir = Path(tempfile.mkdtemp(prefix="unisd-sandbox-"))
    try:
        (workdir / "program.py").write_text(program, encoding="utf-8")
        cfg = {"memory_bytes": limits.memory_mb << 20, "cpu_s": int(limits.timeout_s) + 1,
               "file_bytes": limits.file_mb << 20, "nproc": limits.nproc,
               "program": str(workdir / "program.py"), "isolation_file": str(workdir / ".isolation.json")}
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(workdir), "TMPDIR": str(workdir),
               "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
        start = time.monotonic()
        with open(workdir / ".stdout", "wb") as out, open(workdir / ".stderr", "wb") as err:
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-B", "-c", _BOOT, json.dumps(cfg)], cwd=workdir,
                                    env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True)
            try:
                returncode: int | None = proc.wait(timeout=limits.timeout_s)
                status: Status = "passed" if returncode == 0 else "failed"
            except subprocess.TimeoutExpired:
                returncode, status = None, "timeout"
            finally:
                _kill_group(proc)
        seconds = time.monotonic() - start
        isolation_file = workdir / ".isolation.json"
        isolation = json.loads(isolation_file.read_text()) if isolation_file.is_file() else {}
        return SandboxResult(status, returncode, seconds, _tail(workdir / ".stdout", limits.output_chars),
                             _tail(workdir / ".stderr", limits.output_chars), isolation)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_many(programs: list[str], limits: Limits = Limits(), workers: int = 2,
             desc: str = "sandbox") -> list[SandboxResult]:
    """Run programs concurrently (each in its own sandbox), results in input order."""
    progress = Progress(desc, len(programs), "programs")

    def one(program: str) -> SandboxResult:
        result = run_python(program, limits)
        progress.update()
        return result

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(one, programs))
    progress.close()
    return results


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _tail(path: Path, n: int) -> str:
    with open(path, "rb") as fh:
        fh.seek(max(0, path.stat().st_size - n))
        return fh.read().decode("utf-8", errors="replace")
