"""Workers sharing a cache folder never serve each other a stale or half-written output.

Two writer processes publish the same stage output again and again (each version a
different set of bytes, `atomic_dir`), while two reader processes verify it
(`check_output`) and copy it (`reuse_output`, what a worker does with another worker's
cached output). Oracle: each version's bytes, recomputed from the (writer, round) its
manifest names. Once a first version is published, every check must pass and every copy
must be one complete version, byte for byte, never a mix or a part; no writer may fail.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FILES, SIZE, SECONDS = 6, 64 * 1024, 6.0


def version(writer: int, rnd: int) -> dict[str, bytes]:
    """The files of version (writer, round): every file differs between versions."""
    out = {}
    for f in range(FILES):
        seed = hashlib.sha256(f"{writer}:{rnd}:{f}".encode()).digest()
        out[f"part/{f}.bin"] = seed * (SIZE // len(seed))
    return out


def publish(dest: Path, writer: int, rnd: int) -> None:
    from unisd.artifacts import atomic_dir

    with atomic_dir(dest, {"writer": writer, "round": rnd}) as tmp:
        for rel, data in version(writer, rnd).items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)


def _wait(start: Path) -> None:
    while not start.exists():
        time.sleep(0.01)


def write_loop(dest: Path, writer: int, start: Path, report: Path) -> None:
    _wait(start)
    rounds, errors, end = 0, [], time.monotonic() + SECONDS
    while time.monotonic() < end:
        rounds += 1
        try:
            publish(dest, writer, rounds)
        except Exception as err:  # noqa: BLE001 (counted: the test fails on any)
            errors.append(f"{type(err).__name__}: {err}")
    report.write_text(json.dumps({"rounds": rounds, "errors": errors[:5], "n_errors": len(errors)}))


def read_loop(dest: Path, reader: int, start: Path, stop: Path, report: Path) -> None:
    from unisd.artifacts import check_output, read_manifest, reuse_output

    _wait(start)
    copies, bad, seen = 0, [], set()
    scratch = dest.parent / f"reader-{reader}"
    while not stop.exists():
        try:
            if (problem := check_output(dest)) is not None:
                bad.append(f"check: {problem}")
        except Exception as err:  # noqa: BLE001
            bad.append(f"check raised {type(err).__name__}: {err}")
        copy = scratch / f"copy-{copies}"
        try:
            reuse_output(dest, copy)
        except Exception as err:  # noqa: BLE001
            bad.append(f"copy: {type(err).__name__}: {err}")
        else:
            meta = read_manifest(copy)["meta"]
            expected = version(meta["writer"], meta["round"])
            got = {
                p.relative_to(copy).as_posix(): p.read_bytes()
                for p in copy.rglob("*")
                if p.is_file() and p.name != "manifest.json"
            }
            if got != expected:
                bad.append(f"copy of {meta} is not that version: {sorted(got)}")
            seen.add((meta["writer"], meta["round"]))
            shutil.rmtree(copy)
        copies += 1
    report.write_text(json.dumps({"copies": copies, "bad": bad[:5], "n_bad": len(bad), "versions": len(seen)}))


def test_racing_writers_never_serve_readers_a_partial_or_mixed_output(tmp_path):
    dest = tmp_path / "cache" / "runs" / "train"
    publish(dest, 9, 0)  # a first version: from now on the output must always be whole
    start, stop = tmp_path / "start", tmp_path / "stop"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    roles = [("write", 0), ("write", 1), ("read", 0), ("read", 1)]
    procs = {
        role: subprocess.Popen(
            [sys.executable, __file__, *map(str, role), str(dest), str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for role in roles
    }
    time.sleep(1.0)  # imports done
    start.touch()
    for role in roles[:2]:
        assert procs[role].wait(timeout=120) == 0, procs[role].stdout.read().decode()[-2000:]
    stop.touch()
    for role in roles[2:]:
        assert procs[role].wait(timeout=120) == 0, procs[role].stdout.read().decode()[-2000:]

    writes = [json.loads((tmp_path / f"write-{i}.json").read_text()) for i in range(2)]
    reads = [json.loads((tmp_path / f"read-{i}.json").read_text()) for i in range(2)]
    assert [w["n_errors"] for w in writes] == [0, 0], writes
    assert [r["n_bad"] for r in reads] == [0, 0], reads
    assert all(w["rounds"] > 5 for w in writes) and all(r["copies"] > 5 for r in reads), (writes, reads)
    assert sum(r["versions"] for r in reads) > 2  # the readers did see the output change under them
    from unisd.artifacts import check_output, read_manifest

    assert check_output(dest) is None
    meta = read_manifest(dest)["meta"]
    assert {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*.bin")} == version(
        meta["writer"], meta["round"]
    )
    assert sorted(p.name for p in dest.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name) == []


def test_threads_of_one_process_take_turns_too(tmp_path):
    """Stages run in Prefect's worker threads: the same guarantees between threads."""
    import threading

    from unisd.artifacts import check_output, reuse_output

    dest = tmp_path / "out"
    publish(dest, 9, 0)
    errors, end = [], time.monotonic() + 2.0

    def write(w):
        rnd = 0
        while time.monotonic() < end:
            rnd += 1
            try:
                publish(dest, w, rnd)
            except Exception as err:  # noqa: BLE001
                errors.append(repr(err))

    def read(r):
        i = 0
        while time.monotonic() < end:
            i += 1
            try:
                if (problem := check_output(dest)) is not None:
                    errors.append(problem)
                shutil.rmtree(reuse_output(dest, tmp_path / f"r{r}" / f"c{i}"))
            except Exception as err:  # noqa: BLE001
                errors.append(repr(err))

    threads = [threading.Thread(target=write, args=(w,)) for w in range(2)]
    threads += [threading.Thread(target=read, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads) and errors == []
    assert check_output(dest) is None


if __name__ == "__main__":
    role, index, dest, folder = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
    if role == "write":
        write_loop(dest, index, folder / "start", folder / f"write-{index}.json")
    else:
        read_loop(dest, index, folder / "start", folder / "stop", folder / f"read-{index}.json")
