"""A compiled attention for the fast backend's decode steps, bf16 or fp32 (`decode_attention.cpp`).

Why: a decode step's attention is n·KV small problems (G query rows against one slot's
cached keys), and the kernels PyTorch offers on the CPU (SDPA, inductor's) spend most of
their time per problem, reading K/V at a fifth of the memory's rate; this one reads each
slot's keys and values once, over that slot's own length: with AVX512-BF16 instructions
where the CPU has them and the head size is 64 or 128, in plain loops the compiler
vectorises elsewhere (benchmarks/README.md, "A compiled decode attention").

It is built on first use with the machine's C++ compiler (`torch.utils.cpp_extension`,
about 30 s, then cached under a name that covers the source, the flags, torch's version
and this CPU's instruction set: it is compiled for the CPU it runs on). Where it cannot be
built (no compiler, no OpenMP) `kernel()` says so once and returns None, and the fast
backend keeps SDPA. In fp32 (the evaluation's greedy answers) it takes the plain loops: its
sums run in another order than SDPA's (differences ~1e-7), and the fast backend's fp32
tokens are tested to be the HF path's.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_suffix(".cpp")
CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def _cpu_flags() -> str:
    """This CPU's instruction-set flags (Linux), else the platform's processor name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


@functools.cache
def kernel() -> Kernel | None:
    """The compiled `decode_attention(q, keys, values, lens, scale)`, or None where it cannot be built.

    q [n, KV, G, D]; keys, values [slots ≥ n, KV, max_len, D] contiguous; lens [n] int64
    (each slot's valid positions, ≥ 1) → [n, KV, G, D]; all bf16 or all fp32 but lens.
    """
    from torch.utils import cpp_extension

    key = "\0".join([SOURCE.read_text(), *CFLAGS, torch.__version__, _cpu_flags()])
    name = "unisd_decode_attention_" + hashlib.sha256(key.encode()).hexdigest()[:12]
    log.info("decode attention kernel: building or loading %s (a first build takes about 30 s)", name)
    try:
        module = cpp_extension.load(name, [str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, no OpenMP, a failed build: SDPA instead
        why = (str(e).splitlines() or [type(e).__name__])[0]
        log.warning("decode attention kernel unavailable (%s); the fast backend uses SDPA", why)
        return None
    return module.decode_attention
