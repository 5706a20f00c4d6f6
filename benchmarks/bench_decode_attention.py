"""Decode attention of one layer over a preallocated cache: one call over the batch's
longest span against per-bucket calls (`unisd.fast_decode._buckets`), and what one more
call costs, in slot-positions read (the `CALL_COST` the bucketing is planned with).

Shapes are the 135M model's (3 KV heads, 3 query rows each, head dim 64), bf16, 128
running slots whose lengths are drawn uniformly from the decode workload's range
(75–727 positions; `--quick`: 16 slots of 8–80), sorted longest first as longest-first
admission leaves them. Variants, interleaved:

* one call: SDPA over every slot's keys up to the longest, with a length mask;
* buckets (planned): `_buckets(spans)` at the default `BUCKET_ROWS` and `CALL_COST`;
* buckets of 8, 16, 32 rows: fixed ranges, each over its own longest span;
* kernel: the fast backend's bf16 decode attention (`unisd.decode_attention`, compiled on
  first use), one call, each slot over its own length.

The cost of a call is read off the fixed-range variants: with c the seconds per slot-position
of the one-call variant, a variant of k calls reading P slot-positions in t seconds leaves
(t − c·P) / k per call, reported as slot-positions (÷ c).

`--compiled` adds the same attention written as elementwise products and sums, compiled by
inductor with dynamic shapes (`fused`: q·k, length mask, softmax and p·v in fp32 loops it
generates), over the planned buckets and in one call; and the machine's memory read rate (an
fp32 sum over 512 MiB, same threads), beside which the K/V column's rates are to be read.
"""

from __future__ import annotations

import _common as C


def fused(q, k, v, lens):
    """softmax(q·kᵀ/√D, keys past each slot's length masked)·v, as products and sums."""
    import torch

    scores = (q.float()[:, :, :, None, :] * k.float()[:, :, None, :, :]).sum(-1) * q.shape[-1] ** -0.5
    valid = torch.arange(k.shape[2])[None, :] < lens[:, None]
    p = torch.softmax(scores.masked_fill(~valid[:, None, None, :], float("-inf")), -1)
    return (p[..., None] * v.float()[:, :, None, :, :]).sum(-2).to(q.dtype)


def read_rate() -> float:
    """Bytes per second of an fp32 sum over 512 MiB: what a kernel that only reads can reach."""
    import time

    import torch

    x, best = torch.ones(128 * 1024 * 1024), float("inf")
    for _ in range(5):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def main() -> None:
    import torch
    import torch.nn.functional as F

    import unisd.fast_decode as fd
    from unisd import decode_attention

    parser = C.parser(__doc__)
    parser.add_argument("--compiled", action="store_true", help="also the inductor-compiled attention")
    args = C.parse(parser)
    n, lo, hi = (16, 8, 80) if args.quick else (128, 75, 727)
    reps = args.reps or (3 if args.quick else 20)
    kv, g, d = 3, 3, 64
    gen = torch.Generator().manual_seed(0)
    spans = torch.randint(lo, hi + 1, (n,), generator=gen).sort(descending=True).values
    keys = torch.randn(n, kv, hi, d, generator=gen).to(torch.bfloat16)
    values = torch.randn(n, kv, hi, d, generator=gen).to(torch.bfloat16)
    q = torch.randn(n, kv, g, d, generator=gen).to(torch.bfloat16)
    lens = spans.tolist()

    def plan(ranges: list[tuple[int, int]]):
        out = []
        for a, b in ranges:
            span = max(lens[a:b])
            out.append((slice(a, b), span, (torch.arange(span) < spans[a:b, None])[:, None, None]))
        return out

    def attend(buckets) -> torch.Tensor:
        return torch.cat(
            [F.scaled_dot_product_attention(q[r], keys[r, :, :s], values[r, :, :s], attn_mask=m) for r, s, m in buckets]
        )

    plans = {"one call": plan([(0, n)]), "buckets (planned)": plan(fd._buckets(lens))}
    for rows in (8, 16, 32):
        plans[f"buckets of {rows} rows"] = plan([(a, min(a + rows, n)) for a in range(0, n, rows)])
    variants = {name: (lambda b=b: attend(b)) for name, b in plans.items()}
    if args.compiled:
        compiled = torch.compile(fused, dynamic=True)
        for name in ("one call", "buckets (planned)"):
            plans[f"compiled, {name}"] = plans[name]
            variants[f"compiled, {name}"] = lambda b=plans[name]: torch.cat(
                [compiled(q[r], keys[r, :, :s], values[r, :, :s], spans[r]) for r, s, _ in b]
            )
    kernel = decode_attention.kernel()
    calls = {name: len(b) for name, b in plans.items()}
    read = {name: sum((r.stop - r.start) * s for r, s, _ in b) for name, b in plans.items()}
    if kernel is not None:
        variants["kernel"] = lambda: kernel(q, keys, values, spans, d**-0.5)
        calls["kernel"], read["kernel"] = 1, sum(lens)
    ref = attend(plans["one call"])
    for variant in variants.values():  # the same attention, only cut or computed differently
        torch.testing.assert_close(variant(), ref, atol=2e-2, rtol=2e-2)
    times = C.interleaved(variants, reps, warmup=2)
    per_position = min(times["one call"]) / read["one call"]
    kv_bytes = 2 * kv * d * keys.element_size()  # K and V of one slot-position
    rows = []
    for name in variants:
        best = min(times[name])
        cut = calls[name] > 1 and not name.startswith("compiled")
        call = (best - per_position * read[name]) / calls[name] if cut else None
        rows.append(
            [
                name,
                calls[name],
                read[name],
                C.spread([1e3 * t for t in times[name]], "{:.2f}"),
                f"{min(times['one call']) / best:.2f}×",
                "—" if call is None else f"{1e6 * call:.0f} µs = {call / per_position:.0f}",
                f"{read[name] * kv_bytes / best / 1e9:.1f}",
            ]
        )
    rate = read_rate() if args.compiled else None
    C.report(
        "Decode attention of one layer: one call vs buckets",
        [
            "variant",
            "calls",
            "slot-positions read",
            "ms",
            "× one call (best)",
            "cost of a call (slot-positions)",
            "K/V GB/s",
        ],
        rows,
        {"spans": lens, "times": times, "read": read, "read_rate": rate},
        args.json,
        [
            f"{n} slots of {lens[-1]}–{lens[0]} positions (mean {sum(lens) / n:.0f}), 3 KV heads × 3 query rows, "
            f"D 64, bf16; planned with BUCKET_ROWS {fd.BUCKET_ROWS}, CALL_COST {fd.CALL_COST}; median (min–max) "
            f"over {reps} interleaved runs; {torch.get_num_threads()} threads."
        ]
        + ([f"Memory read rate (fp32 sum over 512 MiB): {rate / 1e9:.1f} GB/s."] if rate else []),
    )


if __name__ == "__main__":
    main()
