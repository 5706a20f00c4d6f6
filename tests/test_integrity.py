"""Cache integrity: a cached stage output is used only while its bytes are the ones
recorded when it was written, a local model is keyed on its files, and a shared-cache
hit is copied (verified), never linked, into another project.

Oracles: files are edited here by hand (same size, checked with os.stat), contents
compared byte for byte, inodes compared with os.stat; nothing is checked through the
code under test's own digests.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from unisd.artifacts import IntegrityError, atomic_dir, check_output, reuse_output
from unisd.config import load_config
from unisd.stages import Layout, StageContext, cache_key
from unisd.stages.model import model_stage

FIXTURES = Path(__file__).parent / "fixtures" / "paper"


def flip_one_byte(path: Path, old: bytes = b"a", new: bytes = b"b") -> None:
    """A same-size edit: one letter replaced in place (the inode is kept)."""
    data = path.read_bytes()
    size, inode = len(data), path.stat().st_ino
    with open(path, "r+b") as fh:
        fh.seek(data.index(old))
        fh.write(new)
    assert path.stat().st_size == size and path.stat().st_ino == inode and path.read_bytes() != data


def stage_output(root: Path, files: dict[str, bytes]) -> Path:
    out = root / "out"
    with atomic_dir(out, {"stage": "test"}) as tmp:
        for rel, data in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
    return out


FILES = {"gpqa/test.jsonl": b'{"question": "a b c"}\n', "splits.json": b"{}\n", "model/w.bin": bytes(range(256)) * 64}


def test_an_untouched_output_passes(tmp_path):
    out = stage_output(tmp_path, FILES)
    assert check_output(out) is None
    assert check_output(out, json.loads((out / "manifest.json").read_text())["digest"]) is None


def test_a_same_size_edit_is_found(tmp_path):
    out = stage_output(tmp_path, FILES)
    flip_one_byte(out / "gpqa" / "test.jsonl")
    assert check_output(out) == "gpqa/test.jsonl: content changed since the stage wrote it"


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda out: (out / "extra.txt").write_text("x"), "extra.txt: not in the manifest"),
        (lambda out: (out / "splits.json").unlink(), "splits.json: missing"),
        (lambda out: (out / "manifest.json").unlink(), "no readable manifest.json"),
        (lambda out: (out / "manifest.json").write_text("{"), "no readable manifest.json"),
        (lambda out: (out / "manifest.json").write_text('{"files": 3}'), "manifest.json is malformed"),
    ],
)
def test_added_missing_or_unreadable_files_are_found(tmp_path, change, words):
    out = stage_output(tmp_path, FILES)
    change(out)
    assert words in check_output(out)


def test_a_manifest_rewritten_to_match_an_edit_is_caught_by_the_recorded_digest(tmp_path):
    out = stage_output(tmp_path, FILES)
    recorded = json.loads((out / "manifest.json").read_text())["digest"]
    flip_one_byte(out / "gpqa" / "test.jsonl")
    # a consistent forgery: the manifest made again for the edited files
    edited = {rel: (out / rel).read_bytes() for rel in FILES}
    shutil.rmtree(out)
    forged = stage_output(tmp_path, edited)
    assert check_output(forged) is None  # consistent in itself ...
    assert "is not the recorded" in check_output(forged, recorded)  # ... but not what the cache recorded


def test_reuse_copies_verified_files_never_links(tmp_path):
    src = stage_output(tmp_path, FILES)
    dest = reuse_output(src, tmp_path / "other" / "out")
    for rel, data in FILES.items():
        assert (dest / rel).read_bytes() == data
        assert (dest / rel).stat().st_ino != (src / rel).stat().st_ino and (dest / rel).stat().st_nlink == 1
        assert (dest / rel).stat().st_mtime_ns == (src / rel).stat().st_mtime_ns  # a study reads this time
    assert (dest / "manifest.json").read_bytes() == (src / "manifest.json").read_bytes()
    flip_one_byte(src / "gpqa" / "test.jsonl")  # an edit in one place does not reach the other
    assert (dest / "gpqa" / "test.jsonl").read_bytes() == FILES["gpqa/test.jsonl"]


def test_an_altered_output_is_never_copied(tmp_path):
    src = stage_output(tmp_path, FILES)
    flip_one_byte(src / "model" / "w.bin", bytes([7]), bytes([8]))
    with pytest.raises(IntegrityError, match="model/w.bin: content changed"):
        reuse_output(src, tmp_path / "other" / "out")
    assert not (tmp_path / "other" / "out").exists()
    assert [p.name for p in (tmp_path / "other").iterdir()] == []  # no scratch left behind
    previous = reuse_output(stage_output(tmp_path / "b", FILES), tmp_path / "third" / "out")
    with pytest.raises(IntegrityError):
        reuse_output(src, previous)
    assert (previous / "model" / "w.bin").read_bytes() == FILES["model/w.bin"]  # left as it was


# --------------------------------------------------------------------------- a local model


def local_model(root: Path) -> Path:
    folder = root / "local-model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 256)
    return folder


def project(root: Path, model: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    params = {
        "model": {"name": str(model)},
        "eval": {"split": "test"},
        "data": {"suite": "paper", "benchmarks": ["gpqa"], "sources": {"gpqa": str(FIXTURES / "gpqa")}},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root / "params.yaml"


def test_a_local_model_is_keyed_on_its_files(tmp_path):
    model = local_model(tmp_path)
    cfg = load_config(project(tmp_path / "p", model))
    key = cache_key("model", cfg, {})
    os.utime(model / "model.safetensors", (0, 0))
    (model / "config.json").write_text('{"model_type": "llama"}')  # rewritten, same bytes
    assert cache_key("model", cfg, {}) == key
    flip_one_byte(model / "model.safetensors", bytes([1]), bytes([2]))
    assert cache_key("model", cfg, {}) != key


def test_changed_weights_change_the_model_output_and_what_depends_on_it(tmp_path):
    model = local_model(tmp_path)
    cfg = load_config(project(tmp_path / "p", model))
    out = model_stage(cfg, Layout(cfg).model, StageContext())
    before = (out / "source.json").read_bytes(), cache_key("evaluate", cfg, {"model": out})
    flip_one_byte(model / "model.safetensors", bytes([1]), bytes([2]))
    out = model_stage(cfg, Layout(cfg).model, StageContext())
    after = (out / "source.json").read_bytes(), cache_key("evaluate", cfg, {"model": out})
    assert before[0] != after[0] and before[1] != after[1]


def test_a_local_folder_with_a_stale_manifest_is_still_hashed(tmp_path):
    """A model folder that is itself a stage output (e.g. a trained model) keeps its old
    manifest after an edit: the key must come from the files, not from that manifest."""
    model = stage_output(tmp_path, {"model.safetensors": bytes(range(256)) * 16, "config.json": b"{}"})
    cfg = load_config(project(tmp_path / "p", model))
    key = cache_key("model", cfg, {})
    flip_one_byte(model / "model.safetensors", bytes([1]), bytes([2]))
    assert cache_key("model", cfg, {}) != key


# --------------------------------------------------------------------------- through Prefect


def run_stages(params: Path, stages: list[str]) -> dict[str, bool]:
    """The model and prepare stages of one project through the flow's StageRunner."""
    from prefect import flow

    from unisd.orchestration.runner import StageRunner

    @flow(name="integrity-test")
    def stages_flow() -> dict[str, bool]:
        cfg = load_config(params)
        runner, layout = StageRunner(cfg, StageContext()), Layout(cfg)
        for stage in stages:
            runner(stage, out=layout.model if stage == "model" else layout.data)
        return runner.cached

    return stages_flow()


@pytest.fixture
def shared_cache(tmp_path, monkeypatch, prefect_storage):
    """Projects that share one Prefect result storage (a shared Prefect home)."""
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    return tmp_path


def test_shared_cache_hits_are_verified_copied_and_recomputed_when_altered(shared_cache):
    model = local_model(shared_cache)
    a, b, c = (project(shared_cache / name, model) for name in "abc")
    data = Path("artifacts") / "data" / "gpqa" / "test.jsonl"
    assert run_stages(a, ["model", "prepare"]) == {"model": False, "prepare": False}
    original = (a.parent / data).read_bytes()

    # another project asks for the same work: served from the cache as a copy of its own
    assert run_stages(b, ["model", "prepare"]) == {"model": True, "prepare": True}
    assert (b.parent / data).read_bytes() == original
    inode = (b.parent / data).stat().st_ino
    assert inode != (a.parent / data).stat().st_ino
    assert run_stages(b, ["prepare"]) == {"prepare": True}  # its own copy, verified, is used as it is
    assert (b.parent / data).stat().st_ino == inode

    # a same-size edit of the prepared data in `a`: `b` keeps its bytes; `c`, served by the
    # cache entry that points at `a`, gets the data recomputed, not the edit
    flip_one_byte(a.parent / data)
    assert (b.parent / data).read_bytes() == original
    assert run_stages(c, ["model", "prepare"]) == {"model": True, "prepare": False}
    assert (c.parent / data).read_bytes() == original

    # `a` itself: its altered output is replaced by the intact one the cache now points at
    assert run_stages(a, ["prepare"]) == {"prepare": True}
    assert (a.parent / data).read_bytes() == original

    # new weights of the same size in the same folder: a new model output, not the cached one
    source = (b.parent / "artifacts" / "model" / "source.json").read_bytes()
    flip_one_byte(model / "model.safetensors", bytes([1]), bytes([2]))
    assert run_stages(b, ["model"]) == {"model": False}
    assert (b.parent / "artifacts" / "model" / "source.json").read_bytes() != source
    assert (a.parent / "artifacts" / "model" / "source.json").read_bytes() == source  # `a` untouched
    assert any((shared_cache / "prefect-results").iterdir())  # the cache these projects shared


def test_a_failed_stage_stops_the_flow_with_its_own_error(shared_cache):
    """A stage that fails is never taken for an output: the flow raises the stage's error."""
    from unisd.data import DataError

    source = shared_cache / "gpqa"
    shutil.copytree(FIXTURES / "gpqa", source)
    (source / "test.jsonl").write_bytes((FIXTURES / "gpqa" / "test.jsonl").read_bytes() + b"\xff\n")
    params = project(shared_cache / "p", local_model(shared_cache))
    params.write_text(params.read_text().replace(str(FIXTURES / "gpqa"), str(source)))
    with pytest.raises(DataError, match=r"gpqa/test.jsonl: row 5: column 1: byte 0xff is not UTF-8"):
        run_stages(params, ["prepare", "model"])
    assert not (params.parent / "artifacts" / "data").exists() and not (params.parent / "artifacts" / "model").exists()
