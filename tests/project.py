"""A throwaway copy of this project with a tiny params.yaml, for integration tests."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def scrambled(model):
    """`model` with every matrix redrawn from N(0, 0.3²) (seed 0), in place. With the tiny
    llama's default initialisation every prompt greedily repeats one token, so equal
    outputs would prove little; scrambled, each prompt's continuation differs."""
    import torch

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def tiny_params(model_dir: Path, **sections) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"]["name"] = str(model_dir)
    params["data"]["benchmarks"] = ["sciq", "mbpp"]
    params["eval"].update(
        limit=2, batch_size=4, max_new_tokens={"mcq": 8, "code": 8, "tool": 8}, code_timeout_s=5, bf16_autocast=False
    )
    params["train_set"].update(limit=6, keep_truncated=True)  # a random tiny model rarely stops in 8 tokens
    # exact fp32 arithmetic: tests compare against independent fp32 computations
    params["generation"].update(batch_size=4, max_new_tokens={"mcq": 8, "code": 8, "tool": 8}, bf16_autocast=False)
    params["train"].update(
        batch_size=2,
        grad_accum=2,
        lr=1e-3,
        checkpoint_every=2,
        bf16_autocast=False,
        lora={**params["train"]["lora"], "r": 4, "alpha": 8},
    )
    for name, values in sections.items():
        params[name].update(values)
    return params


def copy_project(dest: Path, params: dict) -> Path:
    """Copy the files git would commit (tracked + untracked, not ignored) into a new git repo."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env)
    return dest
