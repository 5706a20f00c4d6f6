"""Several workers share one DVC remote: a local (or NFS) folder, as README "Scaling out" sets up.

Two worker clones of one git repository (a small DVC project, not this one: seconds,
not minutes) each produce an output and push it to the same remote folder at the same
time; a third clone pulls both. Oracles: the bytes each worker wrote, and the remote's
own content addressing (every object's md5 is its name, so none is partial).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@t",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@t",
    "DVC_NO_ANALYTICS": "1",
}


def run(cwd: Path, *args: str) -> str:
    out = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=ENV)
    assert out.returncode == 0, f"{args}: {out.stdout}{out.stderr}"
    return out.stdout


def dvc(cwd: Path, *args: str) -> list[str]:
    return [str(BIN / "dvc"), *args]


def files_of(worker: int) -> dict[str, bytes]:
    """A worker's output: files of its own and one that both workers produce alike."""
    own = {f"w{worker}/{i}.bin": hashlib.sha256(f"{worker}:{i}".encode()).digest() * 4096 for i in range(3)}
    return {**own, "common.bin": b"the same bytes on every worker\n" * 1000}


def test_two_workers_push_to_one_remote_folder_and_a_third_pulls_both(tmp_path):
    remote, origin = tmp_path / "dvc-remote", tmp_path / "origin.git"
    run(tmp_path, "git", "init", "-q", "--bare", "-b", "main", str(origin))
    seed = tmp_path / "seed"
    run(tmp_path, "git", "clone", "-q", str(origin), str(seed))
    run(seed, "git", "checkout", "-q", "-b", "main")
    run(seed, *dvc(seed, "init", "-q"))
    # the committed config names the shared folder; a machine that mounts it elsewhere
    # overrides the url in its git-ignored .dvc/config.local
    run(seed, *dvc(seed, "remote", "add", "-d", "shared", str(tmp_path / "not-mounted-here")))
    run(seed, "git", "add", "-A")
    run(seed, "git", "commit", "-qm", "dvc")
    run(seed, "git", "push", "-q", "origin", "main")

    workers = []
    for w in range(2):
        clone = tmp_path / f"worker{w}"
        run(tmp_path, "git", "clone", "-q", str(origin), str(clone))
        run(clone, *dvc(clone, "remote", "modify", "--local", "shared", "url", str(remote)))
        for rel, data in files_of(w).items():
            (clone / f"w{w}" / "out" / rel).parent.mkdir(parents=True, exist_ok=True)
            (clone / f"w{w}" / "out" / rel).write_bytes(data)
        run(clone, *dvc(clone, "add", "-q", f"w{w}/out"))
        workers.append(clone)
    pushes = [
        subprocess.Popen(dvc(c, "push"), cwd=c, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for c in workers
    ]  # at the same time, with one object in common
    for p in pushes:
        out = p.communicate(timeout=180)[0].decode()
        assert p.returncode == 0, out
    for w, clone in enumerate(workers):  # each publishes its .dvc file through git
        run(clone, "git", "add", f"w{w}")
        run(clone, "git", "commit", "-qm", f"out{w}")
        run(clone, "git", "pull", "-q", "--no-rebase", "origin", "main")
        run(clone, "git", "push", "-q", "origin", "main")

    objects = [p for p in remote.rglob("*") if p.is_file()]
    assert len(objects) == 2 * 3 + 1 + 2  # 3 own files each, the common one once, one listing per output
    for obj in objects:  # files/md5/<2 hex>/<30 hex>[.dir]: content-addressed, never partial
        digest = obj.parent.name + obj.name.removesuffix(".dir")
        assert hashlib.md5(obj.read_bytes()).hexdigest() == digest, obj

    third = tmp_path / "worker2"
    run(tmp_path, "git", "clone", "-q", str(origin), str(third))
    run(third, *dvc(third, "remote", "modify", "--local", "shared", "url", str(remote)))
    run(third, *dvc(third, "pull"))
    for w in range(2):
        got = {
            p.relative_to(third / f"w{w}" / "out").as_posix(): p.read_bytes()
            for p in (third / f"w{w}" / "out").rglob("*")
            if p.is_file()
        }
        assert got == files_of(w)
    assert "up to date" in run(third, *dvc(third, "status"))
