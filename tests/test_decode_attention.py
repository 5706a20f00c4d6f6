"""The compiled decode attention (unisd.decode_attention), bf16 and fp32, against a hand-worked
example and an independent float64 computation, and its fallback to SDPA where it cannot be built."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from unisd import decode_attention


def reference(q, keys, values, lens, scale):
    """softmax(scale · q kᵀ) v per slot and KV head over its first lens[b] positions, float64."""
    n, KV, G, D = q.shape
    out = torch.empty(n, KV, G, D, dtype=torch.float64)
    for b in range(n):
        k, v = keys[b, :, : lens[b]].double(), values[b, :, : lens[b]].double()  # [KV, len, D]
        p = torch.softmax(scale * q[b].double() @ k.transpose(1, 2), dim=-1)  # [KV, G, len]
        out[b] = p @ v
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_hand_worked_example(decode_kernel, dtype):
    # one slot, one head, one query row, D = 2: q = (1, 0) against keys (1, 0), (0, 1), scale 1:
    # scores (1, 0), p = (e, 1) / (e + 1), out = p0·(1, 2) + p1·(3, 4)
    q = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2).to(dtype)
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 1, 2, 2).to(dtype)
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2).to(dtype)
    p0 = math.e / (math.e + 1)
    want = torch.tensor([p0 * 1 + (1 - p0) * 3, p0 * 2 + (1 - p0) * 4], dtype=torch.float64)
    out = decode_kernel(q, keys, values, torch.tensor([2]), 1.0)
    assert out.dtype == dtype
    if dtype == torch.bfloat16:
        assert torch.equal(out.view(2), want.bfloat16())
    else:  # fp32 sums of two terms: within a few units in the last place
        torch.testing.assert_close(out.view(2).double(), want, atol=0, rtol=1e-6)
    # only the first position valid: the output is its value row
    assert torch.equal(decode_kernel(q, keys, values, torch.tensor([1]), 1.0).view(2), values[0, 0, 0])


# (64, 3) and (128, 2): the AVX512-BF16 code where the CPU has it; a head size that is no
# multiple of 32, or more than 8 query rows per KV head: the plain loops everywhere
# fp32 (the evaluation's greedy answers) takes the plain loops for every shape.
@pytest.mark.parametrize(
    ("D", "G", "dtype"),
    [(64, 3, torch.bfloat16), (128, 2, torch.bfloat16), (40, 3, torch.bfloat16), (64, 9, torch.bfloat16)]
    + [(64, 3, torch.float32), (40, 3, torch.float32)],
)
def test_matches_float64_over_each_slots_own_length(decode_kernel, D, G, dtype):
    g = torch.Generator().manual_seed(0)
    slots, n, KV, L = 7, 5, 3, 37
    keys = torch.randn(slots, KV, L, D, generator=g).to(dtype)
    values = torch.randn(slots, KV, L, D, generator=g).to(dtype)
    q = torch.randn(n, KV, G, D, generator=g).to(dtype)
    lens = torch.tensor([37, 1, 16, 36, 5])  # whole and partial blocks of sixteen keys
    out = decode_kernel(q, keys, values, lens, D**-0.5)
    want = reference(q, keys, values, lens, D**-0.5)
    assert out.dtype == dtype and out.shape == (n, KV, G, D)
    tol = 8e-3 if dtype == torch.bfloat16 else 2e-6  # bf16's rounding of the output; fp32 sums
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
    # positions past a slot's length and slots past n are never read
    junk_k, junk_v = keys.clone(), values.clone()
    for b, length in enumerate(lens.tolist()):
        junk_k[b, :, length:], junk_v[b, :, length:] = 1e4, -1e4
    junk_k[n:], junk_v[n:] = float("nan"), float("nan")
    assert torch.equal(decode_kernel(q, junk_k, junk_v, lens, D**-0.5), out)


def test_rejects_what_it_cannot_compute(decode_kernel):
    q, cache = torch.zeros(1, 1, 1, 4, dtype=torch.bfloat16), torch.zeros(1, 1, 3, 4, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="all bf16 or all fp32"):
        decode_kernel(q.float(), cache, cache, torch.tensor([1]), 0.5)
    with pytest.raises(RuntimeError, match="all bf16 or all fp32"):
        decode_kernel(q.half(), cache.half(), cache.half(), torch.tensor([1]), 0.5)
    with pytest.raises(RuntimeError, match="lens outside"):
        decode_kernel(q, cache, cache, torch.tensor([4]), 0.5)
    with pytest.raises(RuntimeError, match="contiguous"):
        decode_kernel(q, cache.transpose(2, 3), cache.transpose(2, 3), torch.tensor([1]), 0.5)


def test_without_a_compiler_the_fast_backend_keeps_sdpa(monkeypatch, caplog):
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: c++: not found")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    decode_attention.kernel.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="unisd.decode_attention"):
            assert decode_attention.kernel() is None
        assert "uses SDPA" in caplog.text and "c++: not found" in caplog.text
    finally:
        decode_attention.kernel.cache_clear()
