"""Loading models and tokenizers from stage outputs, on the right device and dtype."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from unisd.assets import resolve_model_path

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(model_dir))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # generation appends on the right
    return tok


def load_model(model_dir: str | Path, dtype: str = "float32", device: str = "auto"):
    """A causal LM in eval mode from a `model` stage output or a checkpoint folder."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(model_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    model.to(pick_device(device)).eval()
    log.info("loaded %s (%.1fM parameters, %s, %s)", path, model.num_parameters() / 1e6, dtype, model.device)
    return model
