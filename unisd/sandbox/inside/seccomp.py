"""A seccomp filter: the kernel refuses, whatever the program does in Python or C.

Denied (EPERM): new processes (fork, vfork, clone without CLONE_THREAD; threads stay
allowed) and new programs (execve); signals to anyone (kill, tgkill, pidfd_*: the
evaluator and other processes of the same user stay out of reach even without a PID
namespace); sockets (socketpair, which needs no network, stays); namespaces, mounts and
chroot; ptrace and cross-process memory access; and the kernel interfaces a Python
program never needs (bpf, perf, io_uring, keyrings, userfaultfd, modules, kexec, reboot,
swap, accounting, quotas, file handles, syslog). clone3 gets ENOSYS so that the C library
falls back to clone, whose flags the filter can read. Clearing the parent-death signal is
denied too (the best-effort sandbox relies on it). Any other architecture's calling
convention kills the process. Supported machines: x86_64 and aarch64.
"""

from __future__ import annotations

import ctypes
import errno
import platform
import struct

from . import linux

# name: (x86_64, aarch64); from <asm/unistd_64.h> and <asm-generic/unistd.h>.
_DENIED = {
    "fork": (57, None),
    "vfork": (58, None),
    "execve": (59, 221),
    "execveat": (322, 281),
    "kill": (62, 129),
    "tkill": (200, 130),
    "tgkill": (234, 131),
    "rt_sigqueueinfo": (129, 138),
    "rt_tgsigqueueinfo": (297, 240),
    "pidfd_open": (434, 434),
    "pidfd_send_signal": (424, 424),
    "pidfd_getfd": (438, 438),
    "socket": (41, 198),
    "unshare": (272, 97),
    "setns": (308, 268),
    "mount": (165, 40),
    "umount2": (166, 39),
    "pivot_root": (155, 41),
    "chroot": (161, 51),
    "open_tree": (428, 428),
    "move_mount": (429, 429),
    "fsopen": (430, 430),
    "fsconfig": (431, 431),
    "fsmount": (432, 432),
    "fspick": (433, 433),
    "mount_setattr": (442, 442),
    "ptrace": (101, 117),
    "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271),
    "bpf": (321, 280),
    "perf_event_open": (298, 241),
    "userfaultfd": (323, 282),
    "keyctl": (250, 219),
    "add_key": (248, 217),
    "request_key": (249, 218),
    "io_uring_setup": (425, 425),
    "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427),
    "kexec_load": (246, 104),
    "kexec_file_load": (320, 294),
    "init_module": (175, 105),
    "finit_module": (313, 273),
    "delete_module": (176, 106),
    "reboot": (169, 142),
    "swapon": (167, 224),
    "swapoff": (168, 225),
    "acct": (163, 89),
    "quotactl": (179, 60),
    "open_by_handle_at": (304, 265),
    "name_to_handle_at": (303, 264),
    "syslog": (103, 116),
}
_CLONE, _CLONE3, _PRCTL = (56, 220), (435, 435), (157, 167)
_ARCH = {"x86_64": (0, 0xC000003E), "aarch64": (1, 0xC00000B7)}  # column, AUDIT_ARCH_*
_X32_BIT = 0x40000000
CLONE_THREAD = 0x00010000

_LD_W_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
ALLOW, KILL_PROCESS, _ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
_NR, _ARCH_OFF, _ARG0 = 0, 4, 16  # offsets in struct seccomp_data (little-endian low word of args[0])


def supported() -> bool:
    return platform.machine() in _ARCH


def program(machine: str | None = None) -> list[tuple[int, int, int, int]]:
    """The filter as (code, jt, jf, k) instructions for `machine` (default: this one)."""
    col, audit_arch = _ARCH[machine or platform.machine()]
    eperm = _ERRNO | errno.EPERM
    ins = [(_LD_W_ABS, 0, 0, _ARCH_OFF), (_JEQ, 1, 0, audit_arch), (_RET, 0, 0, KILL_PROCESS), (_LD_W_ABS, 0, 0, _NR)]
    if col == 0:  # x32 system calls share x86_64's audit arch
        ins += [(_JGE, 0, 1, _X32_BIT), (_RET, 0, 0, KILL_PROCESS)]
    for nrs in _DENIED.values():
        if (nr := nrs[col]) is not None:
            ins += [(_JEQ, 0, 1, nr), (_RET, 0, 0, eperm)]
    ins += [(_JEQ, 0, 1, _CLONE3[col]), (_RET, 0, 0, _ERRNO | errno.ENOSYS)]
    # clone: allowed only for threads; prctl: all but PR_SET_PDEATHSIG. Each block ends in a return.
    ins += [
        (_JEQ, 0, 4, _CLONE[col]),
        (_LD_W_ABS, 0, 0, _ARG0),
        (_JSET, 1, 0, CLONE_THREAD),
        (_RET, 0, 0, eperm),
        (_RET, 0, 0, ALLOW),
    ]
    ins += [
        (_JEQ, 0, 4, _PRCTL[col]),
        (_LD_W_ABS, 0, 0, _ARG0),
        (_JEQ, 0, 1, linux.PR_SET_PDEATHSIG),
        (_RET, 0, 0, eperm),
        (_RET, 0, 0, ALLOW),
    ]
    return ins + [(_RET, 0, 0, ALLOW)]


class _FProg(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install() -> None:
    """Install the filter on this process (and every thread it starts); irreversible."""
    ins = program()
    raw = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in ins))
    prog = _FProg(len(ins), ctypes.cast(raw, ctypes.c_void_p))
    linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
    linux.prctl(linux.PR_SET_SECCOMP, 2, ctypes.byref(prog))  # SECCOMP_MODE_FILTER
