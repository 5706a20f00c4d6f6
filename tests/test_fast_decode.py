"""The fast backend gives the HF path's completions, stops where it must, and decodes in a
cache allocated once.

The tiny llama's random weights are redrawn at a large scale (`chaotic`): with the
default initialisation every prompt greedily repeats one token, so equal outputs would
prove little; here each prompt's continuation differs.
"""

from __future__ import annotations

import logging

import pytest
import torch
from project import scrambled

import unisd.fast_decode as fd
from unisd import decode_attention
from unisd.generation import Sampling, _Batch, _decode_step, generate
from unisd.modeling import load_model, load_tokenizer
from unisd.prompts import PromptBuilder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def chaotic(tiny_model_dir):
    """(model, tokenizer, prompts): the tiny llama with N(0, 0.3²) matrices, and 23 prompts of 8–80 tokens."""
    tok = load_tokenizer(tiny_model_dir)
    model = scrambled(load_model(tiny_model_dir))
    builder = PromptBuilder.for_tokenizer(tok, max_prompt_tokens=4096)
    return model, tok, [builder.encode(f"question {i}: " + "word " * (3 * i)) for i in range(23)]


def ids(completions) -> list[list[int]]:
    return [c.ids for c in completions]


@pytest.mark.parametrize(
    ("attention", "packed", "batch_size"),
    [
        ("kernel", True, 1),  # the evaluation's path, at several slot counts
        ("kernel", True, 4),
        ("kernel", True, 64),
        ("kernel", False, 4),
        ("buckets", True, 4),
        ("slot-buckets", True, 4),
    ],
)
def test_greedy_fp32_tokens_equal_model_generate(chaotic, monkeypatch, request, batch_size, attention, packed):
    """fp32 greedy tokens of the fast backend, whichever attention and products it runs,
    are `model.generate`'s (packed fp32 products round differently: the tokens must not)."""
    model, tok, prompts = chaotic
    monkeypatch.setattr(fd, "PREFILL_TOKENS", 60)  # several prefills per refill, some of one prompt
    if attention == "kernel":
        request.getfixturevalue("decode_kernel")  # skipped without a compiler
    else:
        monkeypatch.setattr(decode_attention, "kernel", lambda: None)
    if attention == "slot-buckets":  # SDPA slot by slot, each over its own span
        monkeypatch.setattr(fd, "BUCKET_ROWS", 1)
        monkeypatch.setattr(fd, "CALL_COST", 0)
    if packed and not fd._onednn(torch.float32):
        pytest.skip("no oneDNN in this torch build")
    if not packed:
        monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    with torch.inference_mode():
        decoder_linear = fd._Llama(model, None).linear
    assert (decoder_linear is fd._packed_linear) == packed
    fast = generate(model, tok, prompts, Sampling(40), batch_size, backend="fast")
    ref = generate(model, tok, prompts, Sampling(40), batch_size, continuous=False)  # `model.generate`
    assert len({tuple(c) for c in ids(ref)}) == len(prompts)  # the check has teeth
    assert ids(fast) == ids(ref)
    assert [c.text for c in fast] == [c.text for c in ref]
    assert [c.finished for c in fast] == [c.finished for c in ref]


def _cost(spans, ranges, call):
    return sum((b - a) * max(spans[a:b]) + call for a, b in ranges)


@pytest.mark.parametrize("seed", range(40))
def test_buckets_are_the_cheapest_cover_by_brute_force(seed):
    """Every way to cut the slots at multiples of `rows` is tried; `_buckets` must cover the
    slots in order and cost no more than the cheapest."""
    gen = torch.Generator().manual_seed(seed)
    rows = int(torch.randint(1, 9, (1,), generator=gen))
    n = int(torch.randint(1, 12 * rows + 1, (1,), generator=gen))  # at most 11 inner cuts: 2048 covers
    spans = torch.randint(1, 800, (n,), generator=gen).tolist()
    if seed % 2:
        spans.sort(reverse=True)  # the usual case: longest-first admission
    call = int(torch.randint(0, 3000, (1,), generator=gen))
    inner = list(range(rows, n, rows))
    cheapest = min(
        _cost(spans, list(zip([0, *cut], [*cut, n])), call)
        for k in range(1 << len(inner))
        for cut in [[c for i, c in enumerate(inner) if k >> i & 1]]
    )
    got = fd._buckets(spans, rows, call)
    assert [a for a, _ in got] == [0] + [b for _, b in got[:-1]] and got[-1][1] == n
    assert all(a % rows == 0 for a, _ in got)
    assert _cost(spans, got, call) == cheapest


def test_buckets_by_hand():
    assert fd._buckets([700] * 8 + [100] * 8, rows=8, call=700) == [(0, 8), (8, 16)]  # saves 8·600 > 700
    assert fd._buckets([700] * 8 + [650] * 8, rows=8, call=700) == [(0, 16)]  # saves 8·50 < 700
    assert fd._buckets([5], rows=8, call=700) == [(0, 1)]


def test_sampling_is_reproducible_for_a_seed(chaotic):
    model, tok, prompts = chaotic

    def sample(seed):
        return ids(generate(model, tok, prompts, Sampling(20, True, 0.8, 0.9, seed), 5, backend="fast"))

    assert sample(3) == sample(3) != sample(4)


def test_stops_at_eos(chaotic, monkeypatch):
    model, tok, prompts = chaotic
    free = ids(generate(model, tok, prompts, Sampling(40), 4, continuous=False))
    eos = max(set(free[0][5:]), key=lambda t: sum(t in seq[1:] for seq in free))  # common, but not first
    monkeypatch.setattr(model.generation_config, "eos_token_id", [tok.eos_token_id, eos])
    fast = generate(model, tok, prompts, Sampling(40), 4, backend="fast")
    assert ids(fast) == ids(generate(model, tok, prompts, Sampling(40), 4, continuous=False))
    stopped = [c for c in fast if c.ids[-1] == eos]
    assert len(stopped) >= 3 and all(c.finished and len(c.ids) < 40 and eos not in c.ids[:-1] for c in stopped)


def test_stops_at_every_stop_string(chaotic):
    model, tok, prompts = chaotic
    free = generate(model, tok, prompts, Sampling(40), 4, continuous=False)
    stops = [free[0].text[8:11], free[1].text[5:8], free[2].text[12:14]]  # text each of three prompts produces
    fast = generate(model, tok, prompts, Sampling(40), 4, stops, backend="fast")
    hit = set()
    for c in fast:
        assert c.finished == (any(s in tok.decode(c.ids) for s in stops) or tok.eos_token_id in c.ids)
        if c.finished:  # it stopped at the first token that completes a stop string, text cut before it
            full = tok.decode(c.ids, skip_special_tokens=True)
            first = min((full.index(s), s) for s in stops if s in full)
            assert c.text == full[: first[0]] and not any(s in tok.decode(c.ids[:-1]) for s in stops)
            hit.add(first[1])
    assert hit == set(stops)
    hf = generate(model, tok, prompts, Sampling(40), 4, stops, continuous=True)
    assert [(c.ids, c.text, c.finished) for c in fast] == [(c.ids, c.text, c.finished) for c in hf]


def net_allocated_bytes(fn) -> int:
    """Bytes that `fn()` allocated and did not free (tensors it left alive)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(e.self_cpu_memory_usage for e in prof.events())


@torch.inference_mode()
def test_decode_steps_allocate_nothing_that_stays(chaotic):
    model, tok, prompts = chaotic
    decoder = fd._Decoder(fd._Llama(model, None), 4, 200, Sampling(200))
    decoder.prefill([0, 1, 2, 3], prompts[:4])
    keys, values = decoder.cache.keys.data_ptr(), decoder.cache.values.data_ptr()
    assert net_allocated_bytes(lambda: [decoder.step() for _ in range(50)]) == 0
    assert (decoder.cache.keys.data_ptr(), decoder.cache.values.data_ptr()) == (keys, values)
    assert decoder.cache.lens.tolist() == [len(p) + 50 for p in prompts[:4]]
    # the same measurement sees the HF path's cache grow
    ref = _Batch()
    from transformers import DynamicCache

    from unisd.logprobs import pad_left

    cache, (ids_, mask) = DynamicCache(), pad_left(prompts[:4], tok.pad_token_id, "cpu")
    model(input_ids=ids_, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), cache=cache)
    ref.add(cache, mask, [0, 1, 2, 3], (torch.zeros(4, dtype=torch.long), torch.zeros(4)))
    gen = torch.Generator().manual_seed(0)
    assert net_allocated_bytes(lambda: [_decode_step(model, ref, Sampling(200), gen) for _ in range(5)]) > 0


def test_one_cache_per_call_whatever_the_refills(chaotic, monkeypatch):
    model, tok, prompts = chaotic
    made = []

    class Spy(fd.KVCache):
        def __init__(self, *args):
            super().__init__(*args)
            made.append((self, self.keys.data_ptr(), self.values.data_ptr(), self.keys.shape))

    monkeypatch.setattr(fd, "KVCache", Spy)
    generate(model, tok, prompts, Sampling(60), 3, backend="fast")  # 23 prompts through 3 slots
    assert len(made) == 1
    cache, keys, values, shape = made[0]
    assert (cache.keys.data_ptr(), cache.values.data_ptr(), cache.keys.shape) == (keys, values, shape)
    assert shape[1:4:2] == (3, max(map(len, prompts)) + 60)  # [layers, slots, KV, max_len, D]


def test_unsupported_models_fall_back_to_hf(chaotic, monkeypatch, caplog):
    model, tok, prompts = chaotic
    assert fd.unsupported(model) is None
    monkeypatch.setattr(model.config, "rope_parameters", {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    assert "dynamic" in fd.unsupported(model)
    with caplog.at_level(logging.INFO, "unisd.fast_decode"):
        fast = generate(model, tok, prompts[:5], Sampling(8), 2, backend="fast")
    assert "using the HF path" in caplog.text
    monkeypatch.undo()
    assert ids(fast) == ids(generate(model, tok, prompts[:5], Sampling(8), 2))
    monkeypatch.setattr(model.config, "model_type", "gpt2")
    assert "not a llama" in fd.unsupported(model)


def test_peft_wrapped_models_are_refused(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_model(tiny_model_dir), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert "merge" in fd.unsupported(model)
    assert fd.unsupported(model.merge_and_unload()) is None


@pytest.mark.slow  # converts and runs the real embedded model
def test_real_model_prompts(real_model_dir):
    tok = load_tokenizer(real_model_dir)
    model = load_model(real_model_dir, device="cpu")
    builder = PromptBuilder.for_tokenizer(tok, max_prompt_tokens=1024)
    prompts = [
        builder.encode(q)
        for q in [
            "Which gas do plants absorb from the air?",
            "What is the capital of France?",
            "Write a Python function that returns the square of a number.",
            "Name a primary colour.",
        ]
    ]
    fast = generate(model, tok, prompts, Sampling(24), 3, builder.stop_strings, backend="fast")
    hf = generate(model, tok, prompts, Sampling(24), 3, builder.stop_strings, continuous=True)
    assert [(c.ids, c.text, c.finished) for c in fast] == [(c.ids, c.text, c.finished) for c in hf]
    assert "Paris" in fast[1].text
    bf16 = generate(model, tok, prompts, Sampling(24), 3, builder.stop_strings, bf16=True, backend="fast")
    assert "Paris" in bf16[1].text


@pytest.mark.parametrize("backend,continuous", [("fast", None), ("hf", True), ("hf", False)])
def test_logprobs_of_sampled_tokens_are_the_models_at_temperature_one(chaotic, backend, continuous):
    """Each completion's log-probs equal log softmax of one fp32 forward over prompt +
    completion, gathered at the sampled tokens — whatever T and top-p drew them."""
    model, tok, prompts = chaotic
    outs = generate(
        model, tok, prompts[:6], Sampling(15, True, 0.7, 0.9, seed=1), 3, continuous=continuous, backend=backend
    )
    for prompt, c in zip(prompts, outs):
        seq = torch.tensor([prompt + c.ids])
        with torch.no_grad():
            logits = model(input_ids=seq).logits[0, len(prompt) - 1 : -1].double()
        expected = torch.distributions.Categorical(logits=logits).log_prob(torch.tensor(c.ids))
        assert len(c.logprobs) == len(c.ids)
        torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float64), expected, atol=2e-4, rtol=0)


def bf16_decode_logits(model, prompts, monkeypatch) -> tuple[fd._Decoder, torch.Tensor]:
    """A bf16 decoder of six slots and its logits [6, 6, V]: the prefill of the last six
    prompts, then five decode steps."""
    seen: list[torch.Tensor] = []
    pick = fd._pick
    monkeypatch.setattr(fd, "_pick", lambda logits, *a: (seen.append(logits), pick(logits, *a))[1])
    decoder = fd._Decoder(fd._Llama(model, torch.bfloat16), 6, 300, Sampling(10))
    with torch.inference_mode():
        decoder.prefill(list(range(6)), prompts[-6:])
        for _ in range(5):
            decoder.step()
    monkeypatch.setattr(fd, "_pick", pick)
    return decoder, torch.stack(seen)


def test_bf16_decode_steps_with_the_compiled_attention_follow_sdpa(chaotic, decode_kernel, monkeypatch):
    """The same bf16 decode steps, attention by `unisd.decode_attention`'s kernel or by SDPA:
    the same logits to bf16's precision (the kernel itself: tests/test_decode_attention.py)."""
    model, _, prompts = chaotic

    def logits_of(attention):
        monkeypatch.setattr(decode_attention, "kernel", lambda: attention)
        decoder, logits = bf16_decode_logits(model, prompts, monkeypatch)
        assert decoder.kernel is attention
        return logits[1:]  # the decode steps'

    ours, sdpa = logits_of(decode_kernel), logits_of(None)
    assert not torch.equal(ours, sdpa)  # two computations, not one
    torch.testing.assert_close(ours, sdpa, atol=0.03 * float(sdpa.abs().max()), rtol=0)  # seen: 1.4%
    assert (ours.argmax(-1) == sdpa.argmax(-1)).float().mean() > 0.9


@pytest.mark.skipif(not fd._onednn(torch.bfloat16), reason="no oneDNN bf16 products in this torch build or CPU")
def test_bf16_weights_packed_for_onednn_give_f_linears_logits(chaotic, monkeypatch):
    """Prefill and decode steps with the matrices packed (`_pack`) or multiplied by F.linear:
    the same logits, bit for bit."""
    model, _, prompts = chaotic

    def logits_of(packed: bool) -> torch.Tensor:
        monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: packed)
        decoder, logits = bf16_decode_logits(model, prompts, monkeypatch)
        assert (decoder.llama.linear is fd._packed_linear) == packed
        return logits

    assert torch.equal(logits_of(True), logits_of(False))
