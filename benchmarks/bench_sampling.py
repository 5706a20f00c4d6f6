"""Drawing the next token: `unisd.generation._pick` at the stages' sampling settings
(T 0.7, top-p 1.0) against the draw it replaced, on last-position logits of the 135M
model's vocabulary (49,152; `--quick`: 1,000), 16 rows (the generate stage's slots) and
128 (the decode workload's).

* multinomial (before): softmax at T, `torch.multinomial(probs, 1)`, the token's T=1
  log-prob by `gather - logsumexp`;
* inverse CDF (`_pick`): softmax at T, one float64 uniform per row located in the row's
  cumulative sum (`_inverse_cdf`), the log-prob by `log_softmax` and `gather`.

Both draw from the same distribution (tests/test_generation.py checks `_pick`'s
frequencies against torch.distributions); the draws themselves differ for a seed.
"""

from __future__ import annotations

import _common as C


def multinomial(logits, temperature: float, gen):
    """The draw before: torch.multinomial on the probabilities at T."""
    import torch

    probs = torch.softmax(logits / temperature, dim=-1)
    picked = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
    return picked, logits.gather(-1, picked[:, None]).squeeze(-1) - logits.logsumexp(-1)


def main() -> None:
    import torch

    from unisd.generation import Sampling, _pick

    args = C.parse(C.parser(__doc__))
    vocab, batches = (1_000, [2, 16]) if args.quick else (49_152, [16, 128])
    reps = args.reps or (3 if args.quick else 15)
    sampling, gen = Sampling(1, True, 0.7, 1.0), torch.Generator().manual_seed(0)
    rows, results = [], {}
    with torch.inference_mode():
        for b in batches:
            logits = 3 * torch.randn(b, vocab, generator=gen)  # a spread like the model's last-position logits
            times = C.interleaved(
                {
                    "multinomial (before)": lambda x=logits: multinomial(x, sampling.temperature, gen),
                    "inverse CDF (_pick)": lambda x=logits: _pick(x, sampling, gen),
                },
                reps,
                warmup=2,
            )
            results[b] = times
            ratio = C.ratios(times["multinomial (before)"], times["inverse CDF (_pick)"])
            for name, t in times.items():
                ms = [1e3 * x for x in t]
                rows.append(
                    [b, name, C.spread(ms, "{:.2f}"), "" if name.startswith("multi") else C.spread(ratio, "{:.1f}×")]
                )
    C.report(
        "Drawing the next token, T 0.7 (ms per call)",
        ["rows", "draw", "ms", "× before"],
        rows,
        {"vocab": vocab, "times": results},
        args.json,
        [f"vocabulary {vocab}; median (min–max) over {reps} interleaved runs; {torch.get_num_threads()} threads."],
    )


if __name__ == "__main__":
    main()
