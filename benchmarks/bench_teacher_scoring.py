"""Teacher scoring throughput: K+2 teacher contexts per trajectory, batched or one by one.

Each trajectory (a completion y of an example's prompt) is scored by the teacher under
K=3 auxiliary contexts (reference material from other examples, docs/method.md §2.1), the gold
demonstration and a wrong one (the contrastive negative, §2.3): K+2 teacher-forced
passes over the same tokens y. The completions are the examples' gold responses, the
prompts are built by `unisd.prompts` from the embedded test splits (short MCQ and long
code, mixed), the negative demonstration is another example's gold response.
The pipeline scores the K contexts in its filter stage and runs the gold and negative
teacher passes in the train step; here all K+2 go through the same scoring call.

token budget: one `unisd.logprobs.completion_logprobs` call over all (context, y)
             pairs of all trajectories, length-sorted batches of at most `batch_size`
             rows and `score_tokens` padded tokens (what the pipeline's stages do).
rows only:   the same call without the token budget: length-sorted batches of
             `batch_size` rows (the stages before the budget existed).
one by one:  one forward per context per trajectory (batch size 1).

All must give the same log-probabilities (checked to 1e-4 after the table is printed:
padding and batch shape only change float rounding). The table reports trajectories/s.
`--bf16` runs every path under bf16 autocast (the stages' default on this CPU); the
check is then on the mean |Δ log p| (5e-2): bf16 matmuls round differently with the
batch shape, and a rare token's log-probability moves by tenths.
"""

from __future__ import annotations

import _common as C

FULL = {"mcq": 4, "code": 4, "k": 3, "batch_size": 16, "score_tokens": 2048, "reps": 3}
QUICK = {"mcq": 2, "code": 2, "k": 3, "batch_size": 8, "score_tokens": 256, "reps": 1}


def contexts(examples, builder, k: int) -> list[tuple[list[int], list[int]]]:
    """For each example, its K auxiliary prompts (other examples of the same task), its
    gold-teacher and its negative-teacher prompt, each paired with its gold completion."""
    from unisd.prompts import gold_response, reference_text, teacher_messages, user

    pairs = []
    for i, ex in enumerate(examples):
        same = [o for o in examples if o.task == ex.task and o.id != ex.id]
        chats = [[user(reference_text(ex, [same[(i + j) % len(same)]]))] for j in range(k)]
        chats += [teacher_messages(ex, gold_response(ex)), teacher_messages(ex, gold_response(same[i % len(same)]))]
        completion = builder.encode_response(gold_response(ex))
        pairs += [(builder.encode_messages(chat), completion) for chat in chats]
    return pairs


def main() -> None:
    import torch

    from unisd.logprobs import completion_logprobs

    p = C.parser(__doc__)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on every path")
    args = C.parse(p)
    cfg = (QUICK if args.quick else FULL) | {"bf16": args.bf16}
    reps = args.reps or cfg["reps"]
    model_dir = C.model_dir(args.quick)
    model, tok, builder = C.lm(args.quick, max_prompt_tokens=8192)
    examples = C.mixed_examples(cfg["mcq"], cfg["code"], args.quick)
    pairs = contexts(examples, builder, cfg["k"])
    out = {}

    pad, rows, bf16 = tok.pad_token_id, cfg["batch_size"], args.bf16

    def budget():
        out["token budget"] = completion_logprobs(model, pairs, pad, rows, bf16, max_tokens=cfg["score_tokens"])

    def rows_only():
        out["rows only"] = completion_logprobs(model, pairs, pad, rows, bf16)

    def one_by_one():
        out["one by one"] = [completion_logprobs(model, [pair], pad, 1, bf16)[0] for pair in pairs]

    times = C.interleaved({"token budget": budget, "rows only": rows_only, "one by one": one_by_one}, reps, warmup=1)
    deltas = [(a - b).abs() for name in ("token budget", "rows only") for a, b in zip(out[name], out["one by one"])]
    diff, mean_diff = max(float(d.max()) for d in deltas), sum(float(d.mean()) for d in deltas) / len(deltas)
    n = len(examples)
    speed = {name: [n / t for t in ts] for name, ts in times.items()}
    table = [
        [
            name,
            C.spread(speed[name], "{:.2f}"),
            C.spread(C.ratios(speed[name], speed["one by one"]), "{:.2f}×"),
            C.spread(C.ratios(speed[name], speed["rows only"]), "{:.2f}×"),
        ]
        for name in times
    ]
    tokens = [len(p) + len(c) for p, c in pairs]
    C.report(
        "Teacher scoring (K+2 contexts per trajectory)",
        ["path", "trajectories/s", "vs one by one", "vs rows only"],
        table,
        {
            "config": cfg | {"reps": reps, "model": str(model_dir)},
            "trajectories": n,
            "sequences": len(pairs),
            "sequence_tokens": tokens,
            "seconds": times,
            "max_abs_diff": diff,
            "mean_abs_diff": mean_diff,
        },
        args.json,
        [
            f"{n} trajectories × {cfg['k'] + 2} contexts = {len(pairs)} sequences of "
            f"{min(tokens)}–{max(tokens)} tokens; at most {rows} rows and (token budget) "
            f"{cfg['score_tokens']} padded tokens per batch; model {model_dir.name}, "
            f"{'bf16 autocast' if bf16 else 'fp32'}, {torch.get_num_threads()} threads; "
            f"|Δ log p| max {diff:.1e}, mean {mean_diff:.1e}; median (min–max) over "
            f"{reps} interleaved runs."
        ],
    )
    # bf16 matmuls round differently with the batch shape: a rare token moves by tenths,
    # the mean by hundredths; a misaligned row would move by nats
    worst, tolerance = (mean_diff, 5e-2) if bf16 else (diff, 1e-4)
    assert worst < tolerance, f"batched scoring differs from one-by-one by {worst:.2e}"


if __name__ == "__main__":
    main()
