"""The "vllm" generation backend: sampling and evaluation on vLLM, for machines with a GPU.

**Not exercised on a GPU.** No GPU was available where this was written: the code is
built against vLLM's documented offline API (`vllm.LLM`, `SamplingParams`, token
prompts, `RequestOutput.outputs[0].token_ids` / `finish_reason`), and only its
conversions (our requests to vLLM's, vLLM's outputs to our `Completion`s) and its choice
of weights are tested, on CPU, with stand-ins shaped like vLLM's classes
(tests/test_vllm_backend.py). Install it with `pip install 'unisd[vllm]'` on a CUDA
machine (vLLM brings its own CUDA torch); select it with `generation.backend: vllm`
(sampling: trajectories, self-generated negatives, induction contexts) and
`eval.backend: vllm` (the evaluation's greedy answers).

**Which weights.** A `Backend` gets the HF model the stage loaded: the round's student.
The train stage writes each round's merged model (its LoRA adapter merged into the base
weights, `merge_and_unload`) to `round-<k>/train/model`, and the next stages load it
from there. vLLM loads that same folder (`weights_folder`), after checking tensor by
tensor that it holds exactly the weights of the model in memory; a model changed in
memory since it was loaded is saved to a temporary folder first, and a peft-wrapped
model is refused (merge it first). vLLM's own LoRA support (`enable_lora`,
`LoRARequest`) was not chosen: it adds the low-rank product at run time in its own
kernels, a different computation from the merged weights that the HF path, the
teacher's scoring and the saved model all use; the merged folder exists already, costs
one engine load per round, and has no `max_lora_rank` or module coverage to check.

**What is the same as the other backends**: prompts (token ids, in, completions out in
input order), the sampling parameters (`Sampling`: greedy, or temperature and top-p
with no top-k, no penalties; the model's generation_config.json is ignored), the EOS
set (`stop_token_ids`), stop strings, and where a completion ends: vLLM's tokens are
cut by the rule every backend uses (`unisd.generation._check`), so `ids`, `text` and
`finished` mean what they mean elsewhere. **What differs**: the numbers (vLLM's
kernels, batch composition and, with `bf16`, a model run wholly in bf16 rather than
under autocast), so samples are not token-identical to the HF path's; and the random
streams: each request gets its own seed, derived from `Sampling.seed` and its position
(requests of one prompt repeated `samples_per_prompt` times draw different samples).
`batch_size` is not used (vLLM's scheduler batches by KV-cache memory) and `phases` is
left as it is. Each token's log-prob (`Completion.logprobs`: T=1, under the decoding
model, whatever temperature and top-p drew it) is vLLM's `logprobs=0` output with the
engine's `logprobs_mode="raw_logprobs"` (log softmax of the logits before temperature,
penalties and top-p), so, as with the other backends, no second scoring pass is needed;
its numbers are vLLM's kernels', not the HF forward's.

Engine settings: `UNISD_VLLM_ENGINE_ARGS`, a JSON object of `vllm.LLM` arguments
(default `{"gpu_memory_utilization": 0.5}`: the stage's HF model is on the same GPU).
One engine is kept per process and replaced when another folder or dtype is asked for.
"""

from __future__ import annotations

import atexit
import gc
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from unisd.config import ConfigError
from unisd.generation import Completion, Phases, Sampling, _check, _eos_ids, _finish
from unisd.progress import Progress

log = logging.getLogger(__name__)

ENGINE_ARGS_ENV = "UNISD_VLLM_ENGINE_ARGS"
DEFAULT_ENGINE_ARGS = {"gpu_memory_utilization": 0.5}
INSTALL = "pip install 'unisd[vllm]' on a CUDA machine"


class VllmUnavailable(ConfigError):
    """The vllm backend was asked for where it cannot run (one line: what is missing)."""


def require_vllm() -> Any:
    """The `vllm` module, or VllmUnavailable saying in one line why it cannot be used."""
    try:
        import vllm
    except ImportError as err:
        raise VllmUnavailable(
            f"generation backend 'vllm': vLLM is not installed ({err.msg}); {INSTALL}, or choose backend hf or fast"
        ) from None
    if not torch.cuda.is_available():
        raise VllmUnavailable(
            "generation backend 'vllm': no CUDA GPU is visible (torch.cuda.is_available() "
            "is False); it runs on GPU machines only: choose backend hf or fast here"
        )
    return vllm


def engine_args() -> dict[str, Any]:
    """`vllm.LLM` arguments: the defaults, updated from UNISD_VLLM_ENGINE_ARGS (JSON)."""
    raw = os.environ.get(ENGINE_ARGS_ENV, "").strip()
    if not raw:
        return dict(DEFAULT_ENGINE_ARGS)
    try:
        extra = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{ENGINE_ARGS_ENV}: not valid JSON ({err.msg}, column {err.colno})") from None
    if not isinstance(extra, dict):
        raise ConfigError(f"{ENGINE_ARGS_ENV}: must be a JSON object of vllm.LLM arguments")
    return {**DEFAULT_ENGINE_ARGS, **extra}


# --------------------------------------------------------------------------- conversions


def request_seed(seed: int, index: int) -> int:
    """The seed of request `index` of a call seeded `seed`: distinct per request, the
    same on every run (vLLM draws each seeded request from a generator of its own)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:8], "big") >> 1


def sampling_kwargs(sampling: Sampling, eos_ids: set[int], stops: list[str], index: int) -> dict[str, Any]:
    """`SamplingParams` arguments of request `index`: our sampling parameters, spelled
    out so that no vLLM default or model generation_config changes them. The EOS set is
    the HF path's (`_eos_ids`: the model's generation config, else the tokenizer's)."""
    # ignore_eos: vLLM would also stop at its tokenizer's EOS; our EOS set (stop_token_ids) is the one
    kwargs: dict[str, Any] = {
        "n": 1,
        "max_tokens": sampling.max_new_tokens,
        "stop_token_ids": sorted(eos_ids),
        "ignore_eos": True,
        "stop": list(stops) or None,
        "detokenize": bool(stops),  # vLLM needs text only to find stop strings
        "skip_special_tokens": True,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "min_p": 0.0,
        "min_tokens": 0,
        "logprobs": 0,  # the sampled token's own log-prob at each step (raw: T=1, see `engine`)
    }
    if sampling.do_sample:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, seed=request_seed(sampling.seed, index))
    else:
        kwargs.update(temperature=0.0)  # vLLM: greedy
    return kwargs


def token_prompts(prompts: list[list[int]]) -> list[dict[str, list[int]]]:
    """Our prompts (token ids) as vLLM token prompts (`vllm.inputs.TokensPrompt`, a TypedDict)."""
    return [{"prompt_token_ids": [int(t) for t in ids]} for ids in prompts]


def sampled_logprobs(completion: Any) -> list[float]:
    """Each generated token's log-prob from a `CompletionOutput` asked for `logprobs=0`:
    per position, a mapping of token id to `Logprob` (`.logprob`) holding the sampled one."""
    if completion.logprobs is None:
        raise RuntimeError("vLLM returned no log-probs (SamplingParams.logprobs was not set)")
    return [float(step[int(t)].logprob) for step, t in zip(completion.logprobs, completion.token_ids)]


def to_completion(output: Any, tokenizer, eos_ids: set[int], stops: list[str], sampling: Sampling) -> Completion:
    """Our `Completion` from one vLLM `RequestOutput`: its first `CompletionOutput`'s
    tokens and their log-probs, cut where every backend stops (`_check`: an EOS, a stop
    string in the last 8 tokens, or the token limit). Where vLLM stopped earlier than that
    rule would (a stop string spanning more than 8 tokens), its own "stop" counts as finished."""
    completion = output.outputs[0]
    tokens, logprobs = [int(t) for t in completion.token_ids], sampled_logprobs(completion)
    for k in range(1, len(tokens) + 1):
        if (done := _check(tokens[:k], logprobs[:k], tokenizer, eos_ids, stops, sampling)) is not None:
            return done
    return _finish(tokens, logprobs, tokenizer, stops, completion.finish_reason == "stop")


# --------------------------------------------------------------------------- the student's weights


def _state_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


def same_weights(model, folder: Path) -> bool:
    """Whether the safetensors in `folder` hold exactly `model`'s weights (every tensor
    equal, in the model's dtype; a tied weight may appear once)."""
    from safetensors import safe_open

    files = _state_files(folder)
    if not files:
        return False
    state = model.state_dict()
    seen: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - a safetensors file handle, not a dict
                if name not in state:
                    return False
                mine = state[name]
                if not torch.equal(f.get_tensor(name).to(device=mine.device, dtype=mine.dtype), mine):
                    return False
                seen.add(name)
    stored = {state[n].data_ptr() for n in seen}
    return all(n in seen or t.data_ptr() in stored for n, t in state.items())


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").is_file() and any(
        (folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")
    )


_SCRATCH: list[Path] = []


def _scratch_folder() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="unisd-vllm-"))
    _SCRATCH.append(folder)
    return folder


@atexit.register
def _remove_scratch() -> None:
    while _SCRATCH:
        shutil.rmtree(_SCRATCH.pop(), ignore_errors=True)


def weights_folder(model, tokenizer) -> tuple[Path, Path]:
    """(model folder, tokenizer folder) for vLLM holding exactly `model`'s weights: the
    folder it was loaded from when that still matches it tensor for tensor, else a
    temporary one it is saved to."""
    if hasattr(model, "peft_config"):
        raise ValueError(
            "the vllm backend needs a plain model, not a peft-wrapped one: merge its adapter first "
            "(merge_and_unload), as the train stage does for each round"
        )
    source = Path(getattr(model, "name_or_path", "") or "")
    if source.is_dir() and (source / "config.json").is_file() and same_weights(model, source):
        if _has_tokenizer(source):
            return source, source
        tok_dir = _scratch_folder()
        tokenizer.save_pretrained(tok_dir)
        return source, tok_dir
    log.info("the model in memory differs from %s: saving it for vLLM", source or "its source")
    folder = _scratch_folder()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, folder


# --------------------------------------------------------------------------- the engine


_ENGINE: dict[str, Any] = {}


def _dtype_name(model, bf16: bool) -> str:
    return "bfloat16" if bf16 else str(model.dtype).removeprefix("torch.")


def _release() -> None:
    """Drop the engine (and its GPU memory) before another is made."""
    llm = _ENGINE.pop("llm", None)
    _ENGINE.clear()
    if llm is None:
        return
    core: Any = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if callable(getattr(core, "shutdown", None)):
        core.shutdown()
    del llm
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def engine(vllm: Any, model_dir: Path, tokenizer_dir: Path, dtype: str) -> Any:
    """The process's vLLM engine for these weights and dtype (made on first use)."""
    args = engine_args()
    key = json.dumps([str(model_dir), str(tokenizer_dir), dtype, args], sort_keys=True)
    if _ENGINE.get("key") != key:
        _release()
        log.info("vLLM engine: %s (%s)", model_dir, dtype)
        # generation_config="vllm": the model's generation_config.json must not change our sampling;
        # logprobs_mode="raw_logprobs": log-probs of the model's own distribution (T=1), as Completion wants
        _ENGINE.update(
            key=key,
            llm=vllm.LLM(
                model=str(model_dir),
                tokenizer=str(tokenizer_dir),
                dtype=dtype,
                generation_config="vllm",
                logprobs_mode="raw_logprobs",
                **args,
            ),
        )
    return _ENGINE["llm"]


def vllm_generate(
    model,
    tokenizer,
    prompts: list[list[int]],
    sampling: Sampling,
    batch_size: int = 16,
    stop_strings: list[str] | None = None,
    bf16: bool = False,
    desc: str = "generate",
    phases: Phases | None = None,
) -> list[Completion]:
    """The "vllm" backend (`unisd.generation.Backend`; see the module docstring)."""
    vllm = require_vllm()
    if not prompts:
        return []
    stops, eos_ids = list(stop_strings or []), _eos_ids(model, tokenizer)
    model_dir, tokenizer_dir = weights_folder(model, tokenizer)
    llm = engine(vllm, model_dir, tokenizer_dir, _dtype_name(model, bf16))
    params = [vllm.SamplingParams(**sampling_kwargs(sampling, eos_ids, stops, i)) for i in range(len(prompts))]
    progress = Progress(desc, len(prompts), "sequences")
    outputs = llm.generate(token_prompts(prompts), params, use_tqdm=False)
    return convert_outputs(outputs, prompts, tokenizer, eos_ids, stops, sampling, progress)


def convert_outputs(
    outputs: list[Any],
    prompts: list[list[int]],
    tokenizer,
    eos_ids: set[int],
    stops: list[str],
    sampling: Sampling,
    progress: Progress | None = None,
) -> list[Completion]:
    """`LLM.generate`'s outputs (in the order of its prompts) as our completions, after
    checking that each answers the prompt at its place."""
    if len(outputs) != len(prompts):
        raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
    out = []
    for output, prompt in zip(outputs, prompts):
        got = getattr(output, "prompt_token_ids", None)
        if got is not None and list(got) != list(prompt):
            raise RuntimeError(f"vLLM output {output.request_id!r} answers another prompt than the one at its place")
        out.append(to_completion(output, tokenizer, eos_ids, stops, sampling))
        if progress is not None:
            progress.update(1, tokens=len(out[-1].ids))
    if progress is not None:
        progress.close()
    return out
