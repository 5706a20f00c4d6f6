"""Stage outputs on disk: atomic writes, manifests and content digests.

Every stage writes one directory through `atomic_dir`: the files appear under their
final name only when the stage succeeded, together with a `manifest.json` listing each
file's sha256 and size. The digest of a stage output is the digest of that listing,
so downstream cache keys never re-hash large files (models, checkpoints).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

MANIFEST = "manifest.json"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _listing(root: Path) -> dict[str, dict[str, Any]]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)
    return {p.relative_to(root).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size} for p in files}


def listing_digest(files: dict[str, dict[str, Any]]) -> str:
    return sha256_text(json.dumps({k: v["sha256"] for k, v in sorted(files.items())}, sort_keys=True))


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
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
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
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
    old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def link_copy(src: str | Path, dest: str | Path) -> Path:
    """Make `dest` an exact copy of the stage output `src` (hard links where possible),
    atomically: the same work asked for at another place is not done twice."""
    src, dest = Path(src), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        shutil.copytree(src, tmp, copy_function=_link_or_copy)
        _swap_in(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    mf = Path(path) / MANIFEST
    if not mf.is_file():
        return None
    try:
        return json.loads(mf.read_text())
    except json.JSONDecodeError:
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
    return listing_digest(_listing(path))


def is_intact(path: str | Path, digest: str | None = None) -> bool:
    """Cheap check that a stage output is still what its manifest says (names and sizes)."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest is None or (digest is not None and manifest["digest"] != digest):
        return False
    for rel, info in manifest["files"].items():
        f = path / rel
        if not f.is_file() or f.stat().st_size != info["size"]:
            return False
    return True


@functools.lru_cache(maxsize=None)
def code_version(module: str) -> str:
    """Digest of the sources of `module` and every `unisd` module it imports (directly,
    lazily inside functions, or transitively): a change there invalidates the cached
    outputs of the stages it defines, and a change elsewhere does not."""
    import modulefinder

    pkg = Path(__file__).resolve().parent
    path = pkg.joinpath(*module.split(".")[1:]).with_suffix(".py")
    finder = modulefinder.ModuleFinder(path=[str(pkg.parent)])
    finder.run_script(str(path))
    files = {path} | {Path(m.__file__) for name, m in finder.modules.items()
                      if name.split(".")[0] == "unisd" and m.__file__}
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.relative_to(pkg).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()
