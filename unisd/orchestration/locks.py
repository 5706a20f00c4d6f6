"""One computation per cache key, across processes: Prefect's SERIALIZABLE isolation on `flock`.

Two runs that ask for the same stage at once (two Dask workers, two projects sharing the
Prefect result storage) would both compute it and both write its result record. Under
SERIALIZABLE isolation Prefect takes a lock on the cache key before looking the record
up: the second run waits, then finds the first one's record and is served from cache.
Prefect's own `FileSystemLockManager` writes a lock file that a killed holder leaves
behind, held for ever (or until a `hold_timeout`, and our stages run for hours); this
manager holds an `flock` on the lock file instead, which the kernel releases when the
holder's process dies, kill -9 included. Lock files live in `<result storage>/.locks/`,
so every process that shares the records shares the locks (one machine, or a file
system with working `flock`).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio.to_thread
from prefect.cache_policies import CacheKeyFnPolicy, CachePolicy
from prefect.context import TaskRunContext

POLL_S = 0.1


class FlockLockManager:
    """A `prefect.locking.protocol.LockManager` whose locks die with their process.

    One manager serves the whole process (tasks share it; copies are the same object).
    `hold_timeout` is ignored: a lock is held until released or until its holder dies.
    """

    def __init__(self) -> None:
        self._held: dict[str, tuple[int, str]] = {}  # lock file -> (open descriptor, holder)
        self._guard = threading.Lock()

    def __deepcopy__(self, memo: dict[int, Any]) -> FlockLockManager:
        return self  # Prefect copies cache policies; the locks this process holds are one set

    @staticmethod
    def path(key: str) -> Path:
        """The lock file of `key`, beside the result records that key names."""
        from prefect.settings import get_current_settings

        name = key if re.fullmatch(r"[\w.-]{1,200}", key) else hashlib.sha256(key.encode()).hexdigest()
        return Path(get_current_settings().results.local_storage_path).expanduser() / ".locks" / f"{name}.lock"

    def _try(self, path: Path, mode: int, timeout: float | None) -> int | None:
        """An open descriptor of `path` holding `flock` `mode`, or None after `timeout` s."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    os.close(fd)
                    return None
                time.sleep(POLL_S)

    def acquire_lock(
        self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None
    ) -> bool:
        path = str(self.path(key))
        if self.is_lock_holder(key, holder):
            return True
        fd = self._try(Path(path), fcntl.LOCK_EX, acquire_timeout)
        if fd is None:
            return False
        with self._guard:
            self._held[path] = (fd, holder)
        return True

    def release_lock(self, key: str, holder: str) -> None:
        path = str(self.path(key))
        with self._guard:
            if self._held.get(path, (None, None))[1] != holder:
                raise ValueError(f"no lock held by {holder} for key {key}")
            fd, _ = self._held.pop(path)
        os.close(fd)  # releases the flock

    def is_locked(self, key: str) -> bool:
        path = self.path(key)
        with self._guard:
            if str(path) in self._held:
                return True
        fd = self._try(path, fcntl.LOCK_SH, timeout=0)
        if fd is None:
            return True
        os.close(fd)
        return False

    def is_lock_holder(self, key: str, holder: str) -> bool:
        with self._guard:
            return self._held.get(str(self.path(key)), (None, None))[1] == holder

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        """Wait until nobody holds `key` (True) or `timeout` s have passed (False)."""
        fd = self._try(self.path(key), fcntl.LOCK_SH, timeout)
        if fd is None:
            return False
        os.close(fd)
        return True

    async def aacquire_lock(
        self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None
    ) -> bool:
        return await anyio.to_thread.run_sync(self.acquire_lock, key, holder, acquire_timeout, hold_timeout)

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        return await anyio.to_thread.run_sync(self.wait_for_lock, key, timeout)


LOCKS = FlockLockManager()


def serializable(key: Callable[[TaskRunContext, dict[str, Any]], str | None]) -> CachePolicy:
    """A task cache keyed by `key(context, parameters)`, computed once per key at a time."""
    return CacheKeyFnPolicy(cache_key_fn=key).configure(isolation_level="SERIALIZABLE", lock_manager=LOCKS)
