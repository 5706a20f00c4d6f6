"""One computation per cache key: the flock lock manager and SERIALIZABLE stage tasks."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from unisd.orchestration.locks import LOCKS, FlockLockManager, serializable


def hold_in_child(storage) -> subprocess.Popen:
    """A process that takes the lock of key "k" and keeps it until killed."""
    code = textwrap.dedent(
        """
        import sys, time
        from unisd.orchestration.locks import LOCKS
        assert LOCKS.acquire_lock("k", "child")
        print("held", flush=True)
        time.sleep(600)
        """
    )
    env = {**os.environ, "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(storage)}
    child = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_lock_excludes_other_processes_and_dies_with_its_holder(prefect_storage):
    child = hold_in_child(prefect_storage)
    try:
        assert LOCKS.is_locked("k")
        assert not LOCKS.acquire_lock("k", "parent", acquire_timeout=0.3)
        assert not LOCKS.wait_for_lock("k", timeout=0.3)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    # Prefect's FileSystemLockManager would wait here for ever: its lock file outlives the holder
    assert LOCKS.path("k").exists()
    assert not LOCKS.is_locked("k")
    assert LOCKS.acquire_lock("k", "parent", acquire_timeout=5)
    assert LOCKS.is_lock_holder("k", "parent") and not LOCKS.is_lock_holder("k", "other")
    with pytest.raises(ValueError, match="no lock held by other"):
        LOCKS.release_lock("k", "other")
    LOCKS.release_lock("k", "parent")
    assert not LOCKS.is_locked("k")


def test_keys_that_are_not_file_names_get_their_own_lock_file(prefect_storage):
    odd = FlockLockManager.path("../../etc/x")
    assert odd.parent == prefect_storage / ".locks" and odd.name != "x.lock"
    assert FlockLockManager.path("a/b") != FlockLockManager.path("a_b")


def test_two_runs_of_one_key_at_once_compute_it_once(prefect_storage, tmp_path):
    """Two concurrent task runs with the same key: the second waits for the first and is
    served its record. Under Prefect's default isolation (READ_COMMITTED) both compute."""
    from prefect import flow, task
    from prefect.task_runners import ThreadPoolTaskRunner

    log = tmp_path / "computed"

    def slow(x: int) -> int:
        with open(log, "a") as fh:
            fh.write(f"{x}\n")
        time.sleep(1.5)
        return x * 2

    same_key = task(slow, cache_policy=serializable(lambda context, parameters: "one-key"), persist_result=True)

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=2))
    def twice() -> list[str]:
        futures = [same_key.submit(3), same_key.submit(3)]
        for f in futures:
            f.wait()
        return sorted(f.state.name for f in futures)

    assert twice() == ["Cached", "Completed"]
    assert log.read_text() == "3\n"


def test_every_stage_task_is_serializable_on_flock():
    from unisd.orchestration.tasks import TASKS

    for name, t in TASKS.items():
        assert str(t.cache_policy.isolation_level).endswith("SERIALIZABLE"), name
        assert t.cache_policy.lock_manager is LOCKS, name
