"""The vllm backend's conversions and its choice of weights, without vLLM and without a GPU.

vLLM is not installed here (and needs a GPU), so `vllm` is replaced by a stand-in module
shaped like vLLM's documented offline API: `LLM(model=folder, ...)`, whose `generate`
takes token prompts and one `SamplingParams` per prompt and returns `RequestOutput`s
(`prompt_token_ids`, `outputs[0].token_ids`, `finish_reason`, and with `logprobs=0` each
step's `{token: Logprob}` of the sampled token, raw: T=1) as vLLM does — it stops at
a stop token (kept in `token_ids`), after the token that completes a stop string, or at
`max_tokens`. Its "engine" loads the weights from the folder it is given and decodes
greedily with HF, one prompt at a time. Oracle: the HF path one prompt at a time
(`generate(..., batch_size=1)`, no padding) on the model in memory, so equal completions
mean the right weights were handed over and both conversions are right.

The tiny llama's matrices are redrawn at scale 0.3 (as in test_fast_decode): with the
default initialisation every prompt repeats one token and equality would prove little.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from project import scrambled

import unisd.vllm_backend as vb
from unisd.generation import Sampling, generate
from unisd.modeling import load_model, load_tokenizer
from unisd.prompts import PromptBuilder

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]

# SamplingParams' keyword arguments as vLLM documents them (docs.vllm.ai, "Sampling Parameters")
SAMPLING_FIELDS = {
    "n",
    "best_of",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "max_tokens",
    "min_tokens",
    "logprobs",
    "prompt_logprobs",
    "detokenize",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "logits_processors",
    "include_stop_str_in_output",
    "truncate_prompt_tokens",
    "output_kind",
    "logit_bias",
    "allowed_token_ids",
    "extra_args",
    "bad_words",
}


@dataclass
class Logprob:  # vllm.logprobs.Logprob
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:  # vllm.outputs.CompletionOutput
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:  # vllm.outputs.RequestOutput
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: None
    outputs: list[CompletionOutput]
    finished: bool = True
    metrics: None = None


class SamplingParams:  # vllm.SamplingParams: only its documented arguments
    def __init__(self, **kwargs):
        assert set(kwargs) <= SAMPLING_FIELDS, set(kwargs) - SAMPLING_FIELDS
        self.__dict__.update({"stop": None, "stop_token_ids": None, "temperature": 1.0, "seed": None}, **kwargs)


class StandInLLM:  # vllm.LLM: loads its weights from the folder it is given
    made: list[StandInLLM] = []

    def __init__(self, model: str, **kwargs):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model, self.kwargs = model, kwargs
        self.hf = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, kwargs["dtype"])).eval()
        self.tok = AutoTokenizer.from_pretrained(kwargs["tokenizer"])
        StandInLLM.made.append(self)

    def generate(self, prompts, sampling_params, use_tqdm=True):
        assert isinstance(sampling_params, list) and len(sampling_params) == len(prompts)
        return [self._one(str(i), p["prompt_token_ids"], sp) for i, (p, sp) in enumerate(zip(prompts, sampling_params))]

    @torch.no_grad()
    def _one(self, request_id: str, prompt: list[int], sp: SamplingParams) -> RequestOutput:
        assert sp.temperature == 0.0, "the stand-in decodes greedily"
        ids, tokens, reason, stop_reason = torch.tensor([prompt]), [], "length", None
        logprobs = [] if sp.logprobs is not None else None
        while len(tokens) < sp.max_tokens:
            logits = self.hf(ids).logits[0, -1].float()
            token = int(logits.argmax())
            tokens.append(token)
            if logprobs is not None:  # raw_logprobs: log softmax of the logits as the model gave them
                logprobs.append({token: Logprob(float(torch.log_softmax(logits, -1)[token]), 1)})
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            text = self.tok.decode(tokens, skip_special_tokens=sp.skip_special_tokens)
            if token in (sp.stop_token_ids or []):
                reason, stop_reason = "stop", token
                break
            if hit := next((s for s in sp.stop or [] if s in text), None):
                reason, stop_reason = "stop", hit
                break
        text = self.tok.decode(tokens, skip_special_tokens=True)
        if isinstance(stop_reason, str):
            text = text[: text.index(stop_reason)]
        return RequestOutput(
            request_id,
            None,
            list(prompt),
            None,
            [CompletionOutput(0, text, tokens, logprobs=logprobs, finish_reason=reason, stop_reason=stop_reason)],
        )


@pytest.fixture
def stand_in_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = StandInLLM, SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv(vb.ENGINE_ARGS_ENV, raising=False)
    StandInLLM.made.clear()
    yield module
    vb._ENGINE.clear()


@pytest.fixture(scope="module")
def chaotic(tiny_model_dir, tmp_path_factory):
    """(model loaded from its folder, tokenizer, prompts): the tiny llama with N(0, 0.3²)
    matrices, saved and loaded back as a stage output would be, and 12 prompts."""
    folder = tmp_path_factory.mktemp("chaotic")
    tok = load_tokenizer(tiny_model_dir)
    scrambled(load_model(tiny_model_dir)).save_pretrained(folder)
    tok.save_pretrained(folder)
    builder = PromptBuilder.for_tokenizer(tok, max_prompt_tokens=4096)
    return load_model(folder), tok, [builder.encode(f"question {i}: " + "word " * (3 * i)) for i in range(12)]


def reference(model, tok, prompts, sampling, stops=None):
    """The HF path, one prompt at a time (no padding: the stand-in's arithmetic exactly)."""
    return generate(model, tok, prompts, sampling, 1, stops, backend="hf")


def test_greedy_completions_equal_the_hf_paths_and_the_engine_loads_the_students_folder(
    chaotic, stand_in_vllm, monkeypatch
):
    model, tok, prompts = chaotic
    free = reference(model, tok, prompts, Sampling(30))
    eos = max(set(free[0].ids[5:]), key=lambda t: sum(t in c.ids[1:] for c in free))  # a common token as EOS
    monkeypatch.setattr(model.generation_config, "eos_token_id", [tok.eos_token_id, eos])
    stop = next(
        text
        for c in free
        for k in range(8, 20)
        if (text := tok.decode(c.ids[k : k + 2])).isascii() and len(text.strip()) >= 2
    )  # a stop string that completions contain
    ref = reference(model, tok, prompts, Sampling(30), [stop])
    assert len({tuple(c.ids) for c in ref}) == len(prompts)  # the check has teeth
    assert sum(c.finished for c in ref) >= 3 and sum(not c.finished for c in ref) >= 1
    assert any(c.ids[-1] == eos for c in ref) and any(c.ids[-1] != eos and c.finished for c in ref)

    got = generate(model, tok, prompts, Sampling(30), 4, [stop], backend="vllm")
    assert [(c.ids, c.text, c.finished) for c in got] == [(c.ids, c.text, c.finished) for c in ref]
    for c, r in zip(got, ref):  # T=1 log-probs of the tokens kept, as the HF path's
        assert len(c.logprobs) == len(c.ids)
        torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(r.logprobs), atol=2e-4, rtol=0)
    [engine] = StandInLLM.made
    assert Path(engine.model) == Path(model.name_or_path)  # the weights as the stage loaded them, not a copy
    assert engine.kwargs["dtype"] == "float32" and engine.kwargs["generation_config"] == "vllm"
    assert engine.kwargs["logprobs_mode"] == "raw_logprobs"
    assert engine.kwargs["gpu_memory_utilization"] == 0.5
    generate(model, tok, prompts[:2], Sampling(5), backend="vllm")
    assert len(StandInLLM.made) == 1  # one engine per weights folder, kept between calls


def test_a_student_changed_in_memory_is_what_vllm_runs(chaotic, stand_in_vllm):
    model, tok, prompts = chaotic
    changed = load_model(model.name_or_path, device="cpu")  # (the stand-in claims a GPU)
    with torch.no_grad():
        changed.model.layers[0].mlp.down_proj.weight.mul_(-1.0)
    ref = reference(changed, tok, prompts, Sampling(20))
    assert [c.ids for c in ref] != [c.ids for c in reference(model, tok, prompts, Sampling(20))]
    assert [c.ids for c in generate(changed, tok, prompts, Sampling(20), backend="vllm")] == [c.ids for c in ref]
    [engine] = StandInLLM.made
    assert Path(engine.model) != Path(model.name_or_path) and vb.same_weights(changed, Path(engine.model))
    assert not vb.same_weights(changed, Path(model.name_or_path))
    assert vb.same_weights(model, Path(model.name_or_path))  # a tied LM head counts once


def test_bf16_and_engine_args_reach_the_engine(chaotic, stand_in_vllm, monkeypatch):
    model, tok, prompts = chaotic
    monkeypatch.setenv(vb.ENGINE_ARGS_ENV, '{"gpu_memory_utilization": 0.8, "enforce_eager": true}')
    generate(model, tok, prompts[:2], Sampling(4), bf16=True, backend="vllm")
    assert (
        StandInLLM.made[-1].kwargs.items()
        >= {"dtype": "bfloat16", "gpu_memory_utilization": 0.8, "enforce_eager": True}.items()
    )
    monkeypatch.setenv(vb.ENGINE_ARGS_ENV, "[1]")
    with pytest.raises(vb.ConfigError, match="UNISD_VLLM_ENGINE_ARGS: must be a JSON object"):
        generate(model, tok, prompts[:2], Sampling(4), backend="vllm")


def test_sampling_parameters_are_ours_spelled_out():
    eos = {7, 3}
    greedy = vb.sampling_kwargs(Sampling(64), eos, [], 0)
    assert greedy["temperature"] == 0.0 and "seed" not in greedy and greedy["max_tokens"] == 64
    assert greedy["logprobs"] == 0  # the sampled token's log-prob only
    assert greedy["stop_token_ids"] == [3, 7] and greedy["stop"] is None and greedy["detokenize"] is False
    sampled = [vb.sampling_kwargs(Sampling(32, True, 0.7, 0.95, seed=11), eos, ["\n\n"], i) for i in range(4)]
    for kw in sampled:
        SamplingParams(**kw)  # only documented arguments
        assert (kw["temperature"], kw["top_p"], kw["max_tokens"], kw["stop"]) == (0.7, 0.95, 32, ["\n\n"])
        assert kw["detokenize"] and kw["n"] == 1 and "top_k" not in kw  # no top-k
        assert kw["ignore_eos"] and kw["stop_token_ids"] == [3, 7]  # our EOS set, not vLLM's tokenizer's
        assert (kw["repetition_penalty"], kw["presence_penalty"], kw["frequency_penalty"], kw["min_p"]) == (
            1.0,
            0.0,
            0.0,
            0.0,
        )
        assert 0 <= kw["seed"] < 2**63
    seeds = [kw["seed"] for kw in sampled]  # requests of one prompt repeated must not draw the same sample
    assert len(set(seeds)) == 4
    assert seeds == [vb.sampling_kwargs(Sampling(32, True, 0.7, 0.95, seed=11), eos, [], i)["seed"] for i in range(4)]
    assert seeds[0] != vb.sampling_kwargs(Sampling(32, True, 0.7, 0.95, seed=12), eos, [], 0)["seed"]


def test_outputs_convert_to_completions_cut_where_every_backend_stops(chaotic):
    _, tok, _ = chaotic
    eos, sampling = {tok.eos_token_id}, Sampling(12)
    word = tok.encode("word", add_special_tokens=False)
    body = word * 3

    def out(tokens, reason, prompt=(1, 2), logprobs=True):
        steps = [{t: Logprob(-0.5 - i, 1)} for i, t in enumerate(tokens)] if logprobs else None
        return RequestOutput(
            "0", None, list(prompt), None, [CompletionOutput(0, "", list(tokens), logprobs=steps, finish_reason=reason)]
        )

    ended = vb.to_completion(out(body + [tok.eos_token_id], "stop"), tok, eos, [], sampling)
    assert ended.ids == body + [tok.eos_token_id] and ended.finished and ended.text == tok.decode(body)
    assert ended.logprobs == [-0.5 - i for i in range(len(body) + 1)]
    capped = vb.to_completion(out(word * 12, "length"), tok, eos, [], sampling)
    assert len(capped.ids) == 12 and not capped.finished
    # tokens past the one completing a stop string are cut, and the text ends before it
    stopped = vb.to_completion(
        out(word * 2 + tok.encode("Answer", add_special_tokens=False) + word, "stop"), tok, eos, ["Answer"], sampling
    )
    assert stopped.finished and "Answer" not in stopped.text and stopped.text == tok.decode(word * 2)
    assert tok.decode(stopped.ids).endswith("Answer")
    assert stopped.logprobs == [-0.5 - i for i in range(len(stopped.ids))]  # cut with the tokens
    with pytest.raises(RuntimeError, match="no log-probs"):
        vb.to_completion(out(body, "length", logprobs=False), tok, eos, [], sampling)
    empty = vb.to_completion(out([], "length"), tok, eos, [], sampling)
    assert empty.ids == [] and empty.text == "" and not empty.finished and empty.logprobs == []
    assert vb.token_prompts([[1, 2], [3]]) == [{"prompt_token_ids": [1, 2]}, {"prompt_token_ids": [3]}]
    with pytest.raises(RuntimeError, match="another prompt"):
        vb.convert_outputs([out(body, "length", (5,))], [[1, 2]], tok, eos, [], sampling)
    with pytest.raises(RuntimeError, match="1 outputs for 2 prompts"):
        vb.convert_outputs([out(body, "length")], [[1, 2], [1, 2]], tok, eos, [], sampling)


def test_a_peft_wrapped_model_is_refused(chaotic):
    _, tok, _ = chaotic
    wrapped = types.SimpleNamespace(peft_config={"default": None}, name_or_path="")
    with pytest.raises(ValueError, match="merge its adapter first"):
        vb.weights_folder(wrapped, tok)


def test_without_vllm_or_a_gpu_one_line_and_nothing_runs(tmp_path, monkeypatch, capsys):
    from unisd.cli import main

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(vb.VllmUnavailable, match=r"vLLM is not installed .*pip install 'unisd\[vllm\]'"):
        vb.require_vllm()
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(vb.VllmUnavailable, match="no CUDA GPU is visible"):
        vb.require_vllm()

    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    for setting in ("generation.backend=vllm", "eval.backend=vllm"):
        assert main(["evaluate", "--params", str(tmp_path / "params.yaml"), "--set", setting]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "unisd: error: generation backend 'vllm': no CUDA GPU" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing written
    assert main(["evaluate", "--params", str(tmp_path / "params.yaml"), "--set", "eval.backend=onnx"]) == 2
    assert "eval.backend" in capsys.readouterr().err  # hf, fast or vllm only
