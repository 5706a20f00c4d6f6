"""Loading models and tokenizers from stage outputs, on the right device and dtype."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from unisd.assets import resolve_model_path

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(model_dir))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # generation appends on the right
    return tok


def load_model(model_dir: str | Path, dtype: str = "float32", device: str = "auto") -> PreTrainedModel:
    """A causal LM in eval mode from a `model` stage output or a checkpoint folder."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(model_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    model.to(pick_device(device)).eval()  # type: ignore[arg-type]  # transformers' annotation of `to`
    log.debug("loaded %s (%.1fM parameters, %s, %s)", path, model.num_parameters() / 1e6, dtype, model.device)
    return model


@contextlib.contextmanager
def inference_autocast(model, enabled: bool) -> Iterator[None]:
    """bf16 autocast for inference, with the linear layers' fp32 weights cast once.

    Under inference mode autocast keeps no cache of its casts, so every forward (every
    decoding step) would cast every weight again. Casting them once up front gives the
    same numbers (autocast would round them the same way) with a fraction of the memory
    traffic. The output embedding is left alone when it is tied to the input embedding
    (the embedding lookup must stay fp32). The fp32 weights are back on exit.
    """
    if not enabled:
        yield
        return
    tied = model.get_input_embeddings().weight
    swapped = []
    with torch.inference_mode(False), torch.no_grad():
        for module in model.modules():
            w: Any = getattr(module, "weight", None)
            if isinstance(module, torch.nn.Linear) and w is not tied and w.dtype == torch.float32:
                swapped.append((w, w.data))
                w.data = w.data.to(torch.bfloat16)
    try:
        with torch.autocast(model.device.type, dtype=torch.bfloat16):
            yield
    finally:
        with torch.inference_mode(False), torch.no_grad():
            for w, data in swapped:
                w.data = data
