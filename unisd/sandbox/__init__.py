"""Running untrusted, model-generated code and judging it from outside.

* `launch`: where the program runs. By default in Linux namespaces built with util-linux
  `unshare` (no root needed where user namespaces are enabled): its own PID, mount,
  network, IPC and UTS namespaces, a filesystem holding only the read-only Python
  runtime and a small writable tmpfs, uid 65534, rlimits and a seccomp filter. Where
  that cannot run, a logged, weaker best-effort fallback; every result records which
  it had, and `Limits(isolation="strict")` refuses the fallback.
* `judge`: who decides. Each assert is split into values computed in the sandbox and a
  comparison evaluated here with the expected values, which never enter the sandbox; an
  early exit, a missing report or anything malformed is a failure. Exit status means
  nothing.
* `channel`, `run`: pipes with byte caps (no file of the sandbox is ever read), one
  result per program whatever happens, everything killed and removed afterwards.

Threat model, the attacks tried and what is not protected against: docs/security.md.
"""

from .judge import CodeTest, defined_names
from .run import IsolationUnavailable, Limits, SandboxResult, run_many

__all__ = ["CodeTest", "IsolationUnavailable", "Limits", "SandboxResult", "defined_names", "run_many"]
