"""Hostile candidate programs, one per attack, and what the host checks after them.

Each is the solution of a task whose test is `assert answer() == ANSWER`; none can know
ANSWER, so every one must fail (or time out). A program prints "ESCAPED" when a step of
its attack worked, which the tests look for beside their own checks of the host: the
files outside unchanged, no secret in anything that came back, the bystander process
and the evaluator alive, no sandbox process or directory left behind.

$-placeholders are filled with Python literals from `conftest.Host.fields`.
"""

import hashlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from string import Template

from unisd.sandbox import CodeTest

ANSWER = 918273645
TEST = f"assert answer() == {ANSWER}\n"


@dataclass(frozen=True)
class Attack:
    name: str
    kind: str  # files | processes | trust | judge | limits
    source: str
    statuses: tuple[str, ...] = ("failed",)

    def job(self, fields: dict) -> CodeTest:
        return CodeTest(Template(self.source).substitute({k: repr(v) for k, v in fields.items()}), TEST)


ATTACKS = [
    # ------------------------------------------------------------------ 1. the file policy
    Attack(
        "read_secret",
        "files",
        """
def answer():
    print(open($secret_file).read())
""",
    ),
    Attack(
        "dir_fd_read_after_chdir",
        "files",
        """
import os
fd = os.open("/", os.O_RDONLY)
os.chdir("/tmp")
def answer():
    print("ESCAPED", os.read(os.open($secret_file.lstrip("/"), os.O_RDONLY, dir_fd=fd), 100))
""",
    ),
    Attack(
        "dir_fd_write_and_delete",
        "files",
        """
import os
fd = os.open("/", os.O_RDONLY)
def answer():
    try:
        os.write(os.open($canary.lstrip("/"), os.O_WRONLY | os.O_APPEND, dir_fd=fd), b"pwned"); print("ESCAPED")
    finally:
        os.unlink($canary.lstrip("/"), dir_fd=fd)
""",
    ),
    Attack(
        "evaluator_environ",
        "files",
        """
import os
def answer():
    for pid in ($evaluator, os.getppid(), 1):
        try:
            print("ESCAPED", open(f"/proc/{pid}/environ").read())
        except OSError as e:
            print(pid, e)
    print(dict(os.environ))
""",
    ),
    Attack(
        "poison_host_package",
        "files",
        """
def answer():
    open($package_init, "a").write("raise SystemExit('pwned')\\n")
""",
    ),
    Attack(
        "write_outside",
        "files",
        """
def answer():
    open($outside + "/dropped.txt", "w").write("x")
""",
    ),
    Attack(
        "delete_canary",
        "files",
        """
import os
def answer():
    os.remove($canary)
""",
    ),
    Attack(
        "rmtree_outside",
        "files",
        """
import shutil
def answer():
    shutil.rmtree($outside)
""",
    ),
    Attack(
        "sqlite_outside",
        "files",
        """
import sqlite3
def answer():
    sqlite3.connect($outside + "/stolen.db").execute("create table t (x)")
""",
    ),
    Attack(
        "readline_history",
        "files",
        """
import readline
def answer():
    readline.read_history_file($secret_file)
    print("ESCAPED", readline.get_history_item(1))
    readline.write_history_file($outside + "/history")
""",
    ),
    Attack(
        "symlink_to_host_root",
        "files",
        """
import os
def answer():
    os.symlink("/", "/tmp/host")
    print("ESCAPED", open("/tmp/host" + $secret_file).read())
""",
    ),
    Attack(
        "host_paths_visible",
        "files",
        """
import os
def answer():
    seen = [p for p in ("/etc", "/proc", "/sys", "/home", "/var", "/run", "/work", "/root/.cache", $outside)
            if os.path.exists(p)]
    print("ESCAPED" if seen else "nothing", seen)
""",
    ),
    Attack(
        "mount_and_chroot",
        "files",
        """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
def answer():
    tries = {"unshare": libc.unshare(0x10000000 | 0x00020000),
             "mount_proc": (os.makedirs("/tmp/p", exist_ok=True), libc.mount(b"proc", b"/tmp/p", b"proc", 0, None))[1],
             "remount_rw": libc.mount(None, b"/", None, 0x20, None)}
    try:
        os.chroot("/tmp"); tries["chroot"] = 0
    except OSError:
        tries["chroot"] = -1
    print("ESCAPED" if 0 in tries.values() else "denied", tries)
""",
    ),
    Attack(
        "open_by_handle",
        "files",
        """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
def answer():
    handle = ctypes.create_string_buffer(128)
    ctypes.memmove(handle, (128).to_bytes(4, "little"), 4)
    mount_id = ctypes.c_int()
    if libc.name_to_handle_at(-100, b"/", handle, ctypes.byref(mount_id), 0) == 0:
        print("ESCAPED", libc.open_by_handle_at(-100, handle, 0))
""",
    ),
    # ------------------------------------------------------------------ 2. other processes
    Attack(
        "pidfd_kill_parent",
        "processes",
        """
import os, signal
def answer():
    signal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGKILL)
""",
    ),
    Attack(
        "kill_evaluator",
        "processes",
        """
import os, signal
def answer():
    os.kill($evaluator, signal.SIGKILL)
""",
    ),
    Attack(
        "kill_bystander",
        "processes",
        """
import os, signal
def answer():
    os.kill($bystander, signal.SIGKILL)
""",
    ),
    Attack(
        "ptrace_parent",
        "processes",
        """
import ctypes, os
def answer():
    if ctypes.CDLL(None).ptrace(16, os.getppid(), 0, 0) == 0:
        print("ESCAPED")
""",
    ),
    Attack(
        "fork_bomb",
        "processes",
        """
import os
def answer():
    while True:
        os.fork()
""",
    ),
    Attack(
        "daemon_left_behind",
        "processes",
        """
import subprocess
def answer():
    subprocess.Popen(["sleep", "1000"], start_new_session=True)
""",
    ),
    Attack(
        "detached_sleeper",
        "processes",
        """
import os, threading, time
threading.Thread(target=time.sleep, args=(1000,)).start()
try:
    os.setsid()
except OSError:  # already a session leader
    pass
def answer():
    time.sleep(1000)
""",
        statuses=("timeout",),
    ),
    # ------------------------------------------------------------------ 3. trusting the sandbox's files and pipes
    Attack(
        "fifo_outputs",
        "trust",
        """
import os
for name in (".stdout", ".stderr", ".isolation.json"):
    os.mkfifo(name)
def answer():
    print("hello")
""",
    ),
    Attack(
        "links_to_zero_and_secret",
        "trust",
        """
import os
os.symlink("/dev/zero", ".stdout")
os.symlink($secret_file, ".stderr")
def answer():
    return 0
""",
    ),
    Attack(
        "garbage_files",
        "trust",
        """
import os
os.mkdir(".stdout")
open(".isolation.json", "w").write("{not json")
def answer():
    return 0
""",
    ),
    Attack(
        "flood_stdout",
        "trust",
        """
import sys
def answer():
    for _ in range(200):
        sys.stdout.write("x" * 100000)
""",
    ),
    Attack(
        "garbage_report",
        "trust",
        """
import os, sys
def answer():
    os.write(sys.modules["inside.runner"]._report_fd, b"\\xff\\xfe{garbage\\n")
    return 0
""",
    ),
    Attack(
        "endless_report_line",
        "trust",
        """
import os, sys
def answer():
    while True:
        os.write(sys.modules["inside.runner"]._report_fd, b"[" * 65536)
""",
    ),
    Attack(
        "forged_end",
        "trust",
        """
import os, sys
os.write(sys.modules["inside.runner"]._report_fd, b'{"end":true}\\n')
os._exit(0)
""",
    ),
    Attack(
        "forged_site",
        "trust",
        """
import os, sys
fd = sys.modules["inside.runner"]._report_fd
os.write(fd, b'{"site":[0,[1]]}\\n{"site":[0,[{"float":"nan"}]]}\\n{"end":true}\\n')
os._exit(0)
""",
    ),
    Attack(
        "close_pipes_and_hang",
        "trust",
        """
import os, sys, time
def answer():
    for fd in (1, 2, sys.modules["inside.runner"]._report_fd):
        os.close(fd)
    time.sleep(1000)
""",
        statuses=("failed", "timeout"),
    ),  # failed once the pipes close: no more reports can come
    # ------------------------------------------------------------------ 4. faking a pass
    Attack(
        "sys_exit_0",
        "judge",
        """
import sys
sys.exit(0)
""",
    ),
    Attack(
        "os_exit_0_in_the_call",
        "judge",
        """
import os
def answer():
    os._exit(0)
""",
    ),
    Attack(
        "atexit_exit_0",
        "judge",
        """
import atexit, os
atexit.register(lambda: os._exit(0))
def answer():
    return 0
""",
    ),
    Attack(
        "excepthook_exit_0",
        "judge",
        """
import os, sys
sys.excepthook = lambda *args: os._exit(0)
def answer():
    return 0
""",
    ),
    Attack(
        "eq_always_true",
        "judge",
        """
class Anything:
    def __eq__(self, other):
        return True
def answer():
    return Anything()
""",
    ),
    Attack(
        "int_subclass_eq",
        "judge",
        """
class Sly(int):
    def __eq__(self, other):
        return True
    __hash__ = int.__hash__
def answer():
    return Sly(0)
""",
    ),
    Attack(
        "read_the_tests",
        "judge",
        """
import gc, os, sys
def answer():
    found = set()
    def look(text):
        found.update(w for w in text.replace("(", " ").replace(")", " ").split() if w.isdigit() and len(w) > 6)
    for root in ("/", os.getcwd(), "/tmp"):
        for dirpath, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if not os.path.join(dirpath, d).startswith(("/usr", "/lib", "/root", "/dev"))]
            for f in files:
                try:
                    look(open(os.path.join(dirpath, f), errors="ignore").read(1 << 20))
                except OSError:
                    pass
    look(" ".join(sys.orig_argv))
    for obj in gc.get_objects():
        if isinstance(obj, str):
            look(obj)
    frame = sys._getframe(1)
    while frame:
        look(repr(frame.f_code.co_consts) + repr(frame.f_locals))
        frame = frame.f_back
    print("found", sorted(found))
    return int(max(found, key=len)) if found else 0
""",
    ),
    Attack(
        "patch_the_harness",
        "judge",
        """
import sys
runner = sys.modules["inside.runner"]
runner._report = lambda site, *values: runner._send({"site": [site, [{"float": "nan"}]]})
runner._send({"end": True})
def answer():
    return 0
""",
    ),
    Attack(
        "keyboard_interrupt",
        "judge",
        """
raise KeyboardInterrupt
""",
    ),
    # ------------------------------------------------------------------ limits
    Attack(
        "infinite_loop",
        "limits",
        """
def answer():
    while True:
        pass
""",
        statuses=("timeout",),
    ),
    Attack(
        "memory_hog",
        "limits",
        """
def answer():
    return len(bytearray(8 << 30))
""",
    ),
    Attack(
        "fill_the_disk",
        "limits",
        """
def answer():
    with open("/tmp/big", "wb") as fh:
        for _ in range(1000):
            fh.write(b"\\0" * (1 << 20))
""",
    ),
    Attack(
        "network",
        "limits",
        """
import socket
def answer():
    socket.create_connection(("1.1.1.1", 53), timeout=1)
    print("ESCAPED")
""",
    ),
    Attack(
        "deep_value",
        "limits",
        """
def answer():
    v = []
    for _ in range(100000):
        v = [v]
    return v
""",
    ),
    Attack(
        "huge_int",
        "limits",
        """
import sys
sys.set_int_max_str_digits(0)
def answer():
    return 10 ** 100000
""",
    ),
]

BENIGN = Attack("benign", "control", f"def answer():\n    return {ANSWER}\n", statuses=("passed",))


def leftover_sandboxes(evaluator: int | None = None, timeout_s: float = 3.0) -> list[str]:
    """Command lines of live processes carrying the sandbox label of `evaluator` (default:
    this process), given a moment: the rest of a namespace dies just after its process 1."""
    label = f"unisd-sandbox-of-{evaluator or os.getpid()}".encode()
    deadline = time.monotonic() + timeout_s
    while True:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if label in cmdline and alive(int(pid)):
                found.append(cmdline.replace(b"\0", b" ")[:120].decode(errors="replace"))
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def sandbox_dirs(evaluator: int | None = None) -> list[Path]:
    """The best-effort directories of `evaluator` (default: this process) still there."""
    return sorted(Path(tempfile.gettempdir()).glob(f"unisd-sandbox-of-{evaluator or os.getpid()}-*"))


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` with a digest of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }
