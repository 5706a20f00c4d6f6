"""Peak memory of the per-token divergence on B×T×V logits, forward + backward.

ours:  `unisd.chunked.chunked_divergence` from final hidden states [B, T, H]; the LM head
       is applied a chunk of positions at a time under activation checkpointing, so no
       B×T×V tensor ever exists.
naive: the usual implementation (TRL's GKD, most KD code): both models' full logits
       [B, T, V], full-vocabulary log-softmax, then the divergence
       (`unisd.losses.token_divergence`).

Both start from the same inputs (student hidden states that require grad, teacher
hidden states, one shared frozen LM head as under LoRA with tied embeddings), compute
the per-token divergence at temperature 0.7, and backpropagate its mean to the student
hidden states. The two must agree: values and gradients within 1e-5 (the maximum
absolute differences are printed, then asserted).

Memory: each variant runs in a fresh interpreter (see _common.py): the inputs are
built, the resident set is the baseline, the kernel's high-water mark is reset, the
variant runs, and "extra" is the high-water mark above the baseline: the memory the
loss needed on top of its inputs. Repetitions alternate the order of the variants.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import _common as C

FULL = {
    "vocabs": [49_152, 151_936],
    "seq": 1024,
    "batch": 1,
    "hidden": 576,
    "chunk": 128,
    "kinds": ["forward_kl", "jsd"],
    "reps": 3,
}
QUICK = {"vocabs": [8_192], "seq": 256, "batch": 1, "hidden": 64, "chunk": 64, "kinds": ["jsd"], "reps": 1}
TEMPERATURE = 0.7
TOLERANCE = 1e-5


def setup(variant: str, vocab: int, seq: int, batch: int, hidden: int, chunk: int, kind: str):
    """Inputs for one variant; returns the forward + backward call (measured).

    One untimed call on small inputs first: torch's lazy one-time allocations (kernels,
    autograd engine, thread pools) then belong to the baseline, not to the variant.
    """
    import torch
    import torch.nn.functional as F

    from unisd.chunked import chunked_divergence
    from unisd.losses import token_divergence

    def inputs(vocab: int, seq: int):
        g = torch.Generator().manual_seed(0)
        student = torch.randn(batch, seq, hidden, generator=g).requires_grad_()
        teacher = student.detach() + 0.3 * torch.randn(batch, seq, hidden, generator=g)
        weight = torch.randn(vocab, hidden, generator=g) * (2.0 / hidden**0.5)  # logits with a std of about 2
        return student, teacher, lambda h: F.linear(h, weight)

    def call(student, teacher, head):
        if variant == "ours":
            ell = chunked_divergence(
                student, head, teacher, head, kind=kind, temperature=TEMPERATURE, chunk_size=chunk
            ).divergence
        else:
            with torch.no_grad():
                teacher_logits = head(teacher)
            ell = token_divergence(head(student), teacher_logits, kind, temperature=TEMPERATURE)
        ell.mean().backward()
        return {"divergence": ell.detach(), "grad": student.grad}

    call(*inputs(256, 2 * chunk))
    full = inputs(vocab, seq)
    return lambda: call(*full)


def main() -> None:
    args = C.parse(C.parser(__doc__))
    cfg = QUICK if args.quick else FULL
    reps = args.reps or cfg["reps"]
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for vocab in cfg["vocabs"]:
            for kind in cfg["kinds"]:
                shape = {k: cfg[k] for k in ("seq", "batch", "hidden", "chunk")} | {"vocab": vocab, "kind": kind}
                runs = {"naive": [], "ours": []}
                for rep in range(reps):
                    for variant in ["naive", "ours"] if rep % 2 == 0 else ["ours", "naive"]:
                        save = Path(tmp, f"{variant}.pt") if rep == 0 else None
                        runs[variant].append(C.peak_memory(__file__, "setup", save, variant=variant, **shape))
                value_diff, grad_diff = _differences(Path(tmp, "naive.pt"), Path(tmp, "ours.pt"))
                extra = {v: [r["extra_mb"] for r in runs[v]] for v in runs}
                share = C.ratios(extra["ours"], extra["naive"])
                logits_mb = cfg["batch"] * cfg["seq"] * vocab * 4 / C.MB
                rows.append(
                    [
                        f"{vocab:,}",
                        cfg["seq"],
                        cfg["batch"],
                        kind,
                        f"{logits_mb:.0f}",
                        C.spread(extra["naive"], "{:.0f}"),
                        C.spread(extra["ours"], "{:.0f}"),
                        C.spread([100 * s for s in share], "{:.1f}%"),
                        f"{value_diff:.1e} / {grad_diff:.1e}",
                    ]
                )
                results.append(
                    {
                        **shape,
                        "logits_mb": logits_mb,
                        "runs": runs,
                        "ours_over_naive": C.summary(share),
                        "max_abs_diff_values": value_diff,
                        "max_abs_diff_grads": grad_diff,
                    }
                )
    C.report(
        "Divergence memory, forward + backward (MiB above the inputs)",
        [
            "V",
            "T",
            "B",
            "divergence",
            "one B×T×V fp32 tensor",
            "naive extra",
            "ours extra",
            "ours / naive",
            "max abs Δ values / grads",
        ],
        rows,
        {"config": cfg | {"reps": reps, "temperature": TEMPERATURE}, "results": results},
        args.json,
        notes=[
            f"H={cfg['hidden']}, chunk={cfg['chunk']}, fp32; median (min–max) over {reps} fresh processes "
            "per variant. Target: ours ≤ 25% of naive at V=151,936, T=1,024."
        ],
    )
    worst = max(max(r["max_abs_diff_values"], r["max_abs_diff_grads"]) for r in results)
    assert worst <= TOLERANCE, f"ours differs from naive by {worst:.2e} (> {TOLERANCE}): see the table"


def _differences(naive: Path, ours: Path) -> tuple[float, float]:
    import torch

    a, b = torch.load(naive), torch.load(ours)
    return (float((a["divergence"] - b["divergence"]).abs().max()), float((a["grad"] - b["grad"]).abs().max()))


if __name__ == "__main__":
    main()
