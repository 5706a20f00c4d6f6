"""Stage outputs on disk: atomic writes, manifests, content digests and their checks.

Every stage writes one directory through `atomic_dir`: the files appear under their
final name only when the stage succeeded, together with a `manifest.json` listing each
file's sha256 and size. The digest of a stage output is the digest of that listing,
so downstream cache keys never re-hash large files (models, checkpoints). Before a
cached output is used, `check_output` re-hashes its files against the manifest, and
`reuse_output` copies it elsewhere only as the bytes the manifest recorded.

Scratch names (`.<name>.tmp-<owner>-<id>`) carry the writing process's identity
(`process_token`), so that `sweep_stale` can remove what a killed process left behind
without touching what a live one is still writing.

Workers may share these folders (one file system, or NFS): each output has a lock file
beside it (`.<name>.unisd-lock`, `output_lock`), held exclusively while a new version is
swapped in and shared while `check_output` verifies or `reuse_output` copies it. So two
workers publishing the same output at once both succeed (one after the other), and a
reader never sees the moment between the two renames of a swap, nor one version's
manifest with another's files. `.dvcignore` keeps the lock files out of DVC's outputs.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


class IntegrityError(RuntimeError):
    """A stage output whose files no longer match the digests recorded when it was written."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p != root / MANIFEST)


def _listing(root: Path) -> dict[str, dict[str, Any]]:
    return {p.relative_to(root).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size} for p in _files(root)}


def listing_digest(files: dict[str, dict[str, Any]]) -> str:
    return sha256_text(json.dumps({k: v["sha256"] for k, v in sorted(files.items())}, sort_keys=True))


# --------------------------------------------------------------------------- owners of scratch names


@functools.cache
def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _start_ticks(pid: int) -> str:
    """When process `pid` started (clock ticks since boot; '' without /proc): a pid that
    was reused by a later process then no longer matches."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the name before ')' may hold spaces


def process_token() -> str:
    """`<host>.<pid>.<start>`: which process, on which machine, wrote a scratch name or opened a run."""
    pid = os.getpid()
    return f"{_host()}.{pid}.{_start_ticks(pid) or 0}"


def owner_gone(token: str) -> bool:
    """True only when `token`'s process ran on this machine and has ended: a token from
    another machine (a shared file system or tracking server) cannot be judged here."""
    m = re.fullmatch(r"([0-9a-f]{8})\.(\d+)\.(\d+)", token)
    if m is None or m[1] != _host():
        return False
    ticks = _start_ticks(int(m[2]))
    if ticks:
        return ticks != m[3]
    try:
        os.kill(int(m[2]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


# a scratch name, or one made from it (the model converter's `.<scratch>.gguf-work` beside it)
_SCRATCH = re.compile(r"^\..+\.(?:tmp|old)-(?P<owner>[0-9a-f]{8}\.\d+\.\d+)-[0-9a-f]{8}(?:\.[\w-]+)?$")


def _scratch(dest: Path, kind: str) -> Path:
    return dest.with_name(f".{dest.name}.{kind}-{process_token()}-{uuid.uuid4().hex[:8]}")


def sweep_stale(root: str | Path) -> list[Path]:
    """Remove the scratch files and folders under `root` whose writer was killed (kill -9,
    a power cut): `atomic_dir` cleans up after exceptions and signals it sees, but not
    after those. Resumable training state (`Layout.resume`) is not scratch: it stays."""
    removed = []
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            if (m := _SCRATCH.match(name)) and owner_gone(m["owner"]):
                path = Path(folder) / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
        dirs[:] = [d for d in dirs if not _SCRATCH.match(d)]
    return removed


# --------------------------------------------------------------------------- writing


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _scratch(path, "tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_dir(dest: str | Path, meta: dict[str, Any] | None = None) -> Iterator[Path]:
    """Yield a scratch directory that replaces `dest` (with a manifest) on success.

    On any exception the scratch directory is removed and `dest` is left as it was.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _scratch(dest, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        files = _listing(tmp)
        manifest = {"digest": listing_digest(files), "files": files, "meta": meta or {}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _swap_in(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: Path, dest: Path) -> None:
    """`tmp` becomes `dest` (the version there before, if any, is removed), under
    `dest`'s exclusive lock: two renames that no reader sees half done."""
    old = _scratch(dest, "old")
    with output_lock(dest):
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


LOCK_SUFFIX = ".unisd-lock"


def lock_path(dest: str | Path) -> Path:
    """The lock file of output `dest`: beside it, never inside (it is not content)."""
    dest = Path(dest)
    return dest.with_name(f".{dest.name}{LOCK_SUFFIX}")


@contextlib.contextmanager
def output_lock(dest: str | Path, shared: bool = False) -> Iterator[None]:
    """Hold the lock of output `dest`: exclusive (a writer swapping a version in) or
    shared (readers verifying or copying it), with `flock`, so a lock dies with its
    process (kill -9 included). The lock file stays (removing a lock file others may
    be waiting on would let two holders in). On NFS, Linux emulates `flock` with
    byte-range locks, which other machines see but which do not exclude the threads of
    one process: a lock per path in this process does. A reader that cannot create the lock
    file (a read-only cache, or no folder yet: nothing to read) reads unlocked."""
    path = lock_path(dest)
    if not shared:
        path.parent.mkdir(parents=True, exist_ok=True)
    with _thread_lock(path):  # NFS's emulated flock does not tell a process's threads apart
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            if not shared:
                raise
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                yield
                return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock


_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


def _thread_lock(path: Path) -> threading.Lock:
    """This process's lock for lock file `path` (threads of one process take turns)."""
    with _THREAD_LOCKS_GUARD:
        return _THREAD_LOCKS.setdefault(str(path.resolve()), threading.Lock())


# --------------------------------------------------------------------------- reading and checking


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    mf = Path(path) / MANIFEST
    if not mf.is_file():
        return None
    try:
        return json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def dir_digest(path: str | Path) -> str:
    """Digest of a stage output (from its manifest), or of any directory or file."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    manifest = read_manifest(path)
    if manifest is not None:
        return manifest["digest"]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such stage output")
    return content_digest(path)


def content_digest(path: str | Path) -> str:
    """Digest of what a folder holds now, every file hashed (a manifest, if any, is not
    trusted): the cache key of a folder that no stage wrote, e.g. a local model."""
    return listing_digest(_listing(Path(path)))


def _manifest_problem(path: Path, manifest: dict[str, Any] | None, digest: str | None) -> str | None:
    """What makes `path` unusable before any file is hashed: no manifest, a manifest that
    contradicts itself or the digest recorded elsewhere, files added or missing."""
    if manifest is None:
        return "no readable manifest.json"
    try:
        if listing_digest(manifest["files"]) != manifest["digest"]:
            return "manifest.json was edited (its listing no longer gives its digest)"
    except (KeyError, TypeError, AttributeError):
        return "manifest.json is malformed"
    if digest is not None and manifest["digest"] != digest:
        return f"digest {manifest['digest'][:12]} is not the recorded {digest[:12]}"
    try:
        on_disk = {p.relative_to(path).as_posix() for p in _files(path)}
    except OSError as err:  # the folder went away while it was listed
        return f"cannot be listed: {err.strerror}"
    if extra := sorted(on_disk - set(manifest["files"])):
        return f"{extra[0]}: not in the manifest (added after the stage wrote it)"
    if missing := sorted(set(manifest["files"]) - on_disk):
        return f"{missing[0]}: missing"
    return None


def check_output(path: str | Path, digest: str | None = None) -> str | None:
    """None when every file of stage output `path` still has the sha256 its manifest
    recorded (and the manifest the `digest` recorded elsewhere, if given), else what differs.

    Names and sizes are not enough: a same-size edit (one flipped letter in a data file,
    weights rewritten in place) keeps both, so each file is hashed again (the cost is in
    benchmarks/README.md).
    """
    path = Path(path)
    with output_lock(path, shared=True):
        manifest = read_manifest(path)
        if problem := _manifest_problem(path, manifest, digest):
            return problem
        assert manifest is not None  # a missing manifest is a problem reported above
        for rel, info in sorted(manifest["files"].items()):
            f = path / rel
            try:
                if f.stat().st_size != info["size"] or sha256_file(f) != info["sha256"]:
                    return f"{rel}: content changed since the stage wrote it"
            except OSError as err:  # removed or made unreadable while being checked
                return f"{rel}: {err.strerror}"
    return None


def _copy_hashing(src: Path, dst: Path, chunk: int = 1 << 20) -> str:
    """Copy `src` to `dst` with its times (a study tells a cached evaluation by its
    metrics' modification time), returning the sha256 of the bytes written, read once."""
    h = hashlib.sha256()
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while block := fin.read(chunk):
            h.update(block)
            fout.write(block)
    shutil.copystat(src, dst)
    return h.hexdigest()


def reuse_output(src: str | Path, dest: str | Path, digest: str | None = None) -> Path:
    """Make `dest` a copy of the stage output `src`, atomically, but only of the bytes its
    manifest recorded: the same work asked for at another place is not done twice.

    Copies, not hard links: a hard link makes both places one file, so an edit made in
    place in one project (an editor, `>>`, a tool writing weights) would silently alter
    the other project's output, and read-only modes stop neither root nor a `chmod`.
    Each file is hashed as it is copied; a file that differs from the manifest raises
    IntegrityError and leaves `dest` as it was.
    """
    src, dest = Path(src), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _scratch(dest, "tmp")
    try:
        with output_lock(src, shared=True):  # released before `dest`'s lock is taken: no lock order to get wrong
            manifest = read_manifest(src)
            if problem := _manifest_problem(src, manifest, digest):
                raise IntegrityError(f"{src}: {problem}")
            assert manifest is not None  # a missing manifest is a problem reported above
            for rel, info in sorted(manifest["files"].items()):
                if _copy_hashing(src / rel, tmp / rel) != info["sha256"]:
                    raise IntegrityError(f"{src}: {rel}: content changed since the stage wrote it")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _swap_in(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


PACKAGE = Path(__file__).resolve().parent


def _module_file(package: Path, module: str) -> Path:
    """`unisd.a.b` -> <package>/a/b.py, or <package>/a/b/__init__.py for a subpackage."""
    path = package.joinpath(*module.split(".")[1:])
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


# subpackages whose modules are told apart: one module per stage, each stage's code its own
BY_MODULE = ("stages",)


@functools.cache
def code_files(module: str, exclude: tuple[str, ...] = (), package: Path = PACKAGE) -> tuple[Path, ...]:
    """The source files of `module` and of every module of the package it imports
    (directly, lazily inside functions, or transitively), not looking inside the modules
    named in `exclude`. A subpackage counts whole: a module there may run as a script in
    another process (as the sandbox's `inside/` does), which no import shows; only those
    of `BY_MODULE` count module by module. A module's C++ source beside it (same name,
    `.cpp`: compiled on first use, as `decode_attention`'s) counts with it."""
    import modulefinder

    path = _module_file(package, module)
    finder = modulefinder.ModuleFinder(path=[str(package.parent)], excludes=list(exclude))
    finder.run_script(str(path))
    modules: dict[str, Any] = finder.modules  # typeshed's Module has no __file__
    found = {Path(m.__file__) for name, m in modules.items() if name.split(".")[0] == package.name and m.__file__} | {
        path
    }
    found |= {f.with_suffix(".cpp") for f in found if f.with_suffix(".cpp").exists()}
    parts = [f.relative_to(package).parts for f in found]
    whole = {p[0] for p in parts if len(p) > 1} - set(BY_MODULE)
    return tuple(sorted(found | {f for sub in whole for f in (package / sub).rglob("*.py")}))


def code_version(module: str, exclude: tuple[str, ...] = (), package: Path = PACKAGE) -> str:
    """Digest of the sources `code_files` lists: a change there invalidates the cached
    outputs of what `module` defines, and a change elsewhere does not."""
    h = hashlib.sha256()
    for f in code_files(module, exclude, package):
        h.update(f.relative_to(package).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()
