"""Process 1 of the sandbox's PID namespace, and the setup of the program's filesystem.

`unshare` (util-linux) starts this in fresh PID, mount, network, IPC, UTS and cgroup
namespaces (and a user namespace when the evaluator is not root). It forks the payload
and then only waits: for the payload to end (its status becomes ours), or for the
evaluator to go away (the lifeline pipe closes, even when the evaluator was SIGKILLed).
When process 1 exits the kernel kills everything else in the namespace, so nothing the
program started can outlive it.

The payload builds the program's whole filesystem in a new mount namespace:

    /                   tmpfs, read-only once built
    <python prefix>     read-only bind of the interpreter and its standard library
    /usr/lib, ...       read-only binds of the shared libraries (symlinks such as /lib
                        -> usr/lib recreated)
    /unisd/inside       read-only bind of this package
    /dev/null, zero, urandom, random   binds of those devices only
    /tmp                tmpfs of limited size: the only writable place, and the cwd

then pivots into it and detaches the old root, so nothing of the host (its /proc, /etc,
the project, the data, other users' files) exists there. It drops to uid/gid 65534: as
root with setuid (the program is then the host's `nobody`), otherwise in a nested user
namespace that maps 65534 to the evaluator's uid: 65534 is not root there, so once it
executes the runner (with a scrubbed environment) it holds no capability anywhere.
"""

from __future__ import annotations

import json
import os
import re
import select
import traceback

from . import linux

SANDBOX_ID = 65534
LIB = "/unisd"  # the runner imports `inside` from here
SETUP_FAILED = 125
DEVICES = ("null", "zero", "urandom", "random")
RUNNER_BOOT = (
    "# unisd-sandbox runner\nimport sys; sys.path.append(sys.argv[1]); from inside import runner; runner.main()"
)


def main(config: str) -> None:
    cfg = json.loads(config)
    pid = os.fork()
    if pid == 0:
        try:
            _payload(cfg)
        except BaseException:
            traceback.print_exc()
        os._exit(SETUP_FAILED)
    os.close(0)
    os.close(cfg["report_fd"])
    linux.prctl(linux.PR_SET_DUMPABLE, 0)  # after the fork: the payload needs its /proc/self to map ids
    child = os.pidfd_open(pid)
    poller = select.poll()
    poller.register(child, select.POLLIN)
    poller.register(cfg["lifeline_fd"], select.POLLIN)
    if cfg["lifeline_fd"] in {fd for fd, _ in poller.poll()}:
        os._exit(137)  # the evaluator is gone
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    os._exit(code if code >= 0 else 128 - code)


def _payload(cfg: dict) -> None:
    if cfg["rootless"]:
        uid, gid = os.getuid(), os.getgid()
        linux.unshare(linux.CLONE_NEWUSER | linux.CLONE_NEWNS)
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{SANDBOX_ID} {uid} 1")
        _write("/proc/self/gid_map", f"{SANDBOX_ID} {gid} 1")
    else:
        linux.unshare(linux.CLONE_NEWNS)
    root = cfg["mountpoint"]
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    # Held open before the new root covers the mountpoint: a source below it (a checkout or
    # a virtual environment under /tmp) is bound through its descriptor, not its hidden path.
    sources = [*cfg["binds"], cfg["inside"]]
    held = {path: f"/proc/self/fd/{os.open(path, os.O_PATH | os.O_CLOEXEC)}" for path in sources}
    linux.mount("tmpfs", root, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "size=1m,nr_inodes=4096,mode=0755")
    os.mkdir(root + "/tmp")  # first: a runtime under /tmp must be bound on top of it, not hidden by it
    linux.mount(
        "tmpfs",
        root + "/tmp",
        "tmpfs",
        linux.MS_NOSUID | linux.MS_NODEV,
        f"size={cfg['tmp_bytes']},nr_inodes=4096,mode=1777",
    )
    for path, target in cfg["links"]:
        os.makedirs(root + os.path.dirname(path), exist_ok=True)
        os.symlink(target, root + path)
    for path in cfg["binds"]:
        _bind(held[path], root + path, readonly=True)
    _bind(held[cfg["inside"]], root + LIB + "/inside", readonly=True)
    for name in DEVICES:
        _bind(f"/dev/{name}", f"{root}/dev/{name}", readonly=False)
    os.chdir(root)
    linux.pivot_root(".", ".")
    linux.umount2(".", linux.MNT_DETACH)
    os.chdir("/")
    linux.mount(None, "/", None, linux.MS_REMOUNT | linux.MS_BIND | linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NODEV)
    if not cfg["rootless"]:
        os.setgroups([])
        os.setgid(SANDBOX_ID)
        os.setuid(SANDBOX_ID)
    os.chdir("/tmp")
    linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
    os.dup2(cfg["report_fd"], 3)
    os.closerange(4, os.sysconf("SC_OPEN_MAX"))
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp", "TMPDIR": "/tmp"}
    os.execve(cfg["python"], [cfg["python"], "-I", "-S", "-B", "-c", RUNNER_BOOT, LIB, cfg["label"]], env)


def _write(path: str, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)


def _bind(source: str, target: str, readonly: bool) -> None:
    """Bind `source` at `target`, then make it (and any mount below it) read-only, or for
    devices no-exec. Flags the kernel locked on the source mount (nosuid, nodev, noexec,
    atime) are kept: a user namespace may not clear them."""
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "w").close()
    linux.mount(source, target, None, linux.MS_BIND | linux.MS_REC)
    extra = (linux.MS_RDONLY | linux.MS_NODEV) if readonly else linux.MS_NOEXEC
    for mountpoint in [target, *_mounts_below(target)]:
        flags = linux.MS_REMOUNT | linux.MS_BIND | linux.MS_NOSUID | extra | _locked_flags(mountpoint)
        linux.mount(None, mountpoint, None, flags)


def _locked_flags(path: str) -> int:
    f = os.statvfs(path).f_flag
    pairs = (
        (os.ST_NODEV, linux.MS_NODEV),
        (os.ST_NOEXEC, linux.MS_NOEXEC),
        (os.ST_NOATIME, linux.MS_NOATIME),
        (os.ST_NODIRATIME, linux.MS_NODIRATIME),
        (os.ST_RELATIME, linux.MS_RELATIME),
    )
    return sum(ms for st, ms in pairs if f & st)


def _mounts_below(path: str) -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as fh:
        points = [_unescape(line.split()[4]) for line in fh]
    return [p for p in points if p.startswith(path + "/")]


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)
