"""Teacher scoring throughput: K+2 teacher contexts per trajectory, batched or one by one.

Each trajectory (a completion y of an example's prompt) is scored by the teacher under
K=3 auxiliary contexts (reference material from other examples, SPEC §2.1), the gold
demonstration and a wrong one (the contrastive negative, §2.3): K+2 teacher-forced
passes over the same tokens y. The completions are the examples' gold responses, the
prompts are built by `unisd.prompts` from the embedded test splits (short MCQ and long
code, mixed), the negative demonstration is another example's gold response.
The pipeline scores the K contexts in its filter stage and runs the gold and negative
teacher passes in the train step; here all K+2 go through the same scoring call.

batched:     one `unisd.logprobs.completion_logprobs` call over all (context, y) pairs
             of all trajectories, length-sorted batches of `batch_size` (what the
             pipeline's filter stage does).
one by one:  one forward per context per trajectory (batch size 1).

Both must give the same log-probabilities (checked to 1e-4 after the table is printed:
padding and batch shape only change float rounding). The table reports trajectories/s.
"""

from __future__ import annotations

import _common as C

FULL = {"mcq": 4, "code": 4, "k": 3, "batch_size": 16, "reps": 3}
QUICK = {"mcq": 2, "code": 2, "k": 3, "batch_size": 8, "reps": 1}


def contexts(examples, builder, k: int) -> list[tuple[list[int], list[int]]]:
    """For each example, its K auxiliary prompts (other examples of the same task), its
    gold-teacher and its negative-teacher prompt, each paired with its gold completion."""
    from unisd.prompts import gold_response, reference_text, teacher_text

    pairs = []
    for i, ex in enumerate(examples):
        same = [o for o in examples if o.task == ex.task and o.id != ex.id]
        texts = [reference_text(ex, [same[(i + j) % len(same)]]) for j in range(k)]
        texts += [teacher_text(ex, gold_response(ex)), teacher_text(ex, gold_response(same[i % len(same)]))]
        completion = builder.encode_response(gold_response(ex))
        pairs += [(builder.encode(text), completion) for text in texts]
    return pairs


def main() -> None:
    import torch

    from unisd.logprobs import completion_logprobs

    args = C.parse(C.parser(__doc__))
    cfg = QUICK if args.quick else FULL
    reps = args.reps or cfg["reps"]
    model_dir = C.model_dir(args.quick)
    model, tok, builder = C.lm(args.quick, max_prompt_tokens=8192)
    examples = C.mixed_examples(cfg["mcq"], cfg["code"], args.quick)
    pairs = contexts(examples, builder, cfg["k"])
    out = {}

    def batched():
        out["batched"] = completion_logprobs(model, pairs, tok.pad_token_id, cfg["batch_size"])

    def one_by_one():
        out["one by one"] = [completion_logprobs(model, [pair], tok.pad_token_id, 1)[0] for pair in pairs]

    times = C.interleaved({"batched": batched, "one by one": one_by_one}, reps, warmup=1)
    diff = max(float((a - b).abs().max()) for a, b in zip(out["batched"], out["one by one"]))
    n = len(examples)
    speed = {name: [n / t for t in ts] for name, ts in times.items()}
    rows = [[name, C.spread(speed[name], "{:.2f}"), C.spread(C.ratios(speed[name], speed["one by one"]), "{:.2f}×")]
            for name in times]
    tokens = [len(p) + len(c) for p, c in pairs]
    C.report("Teacher scoring (K+2 contexts per trajectory)", ["path", "trajectories/s", "vs one by one"], rows,
             {"config": cfg | {"reps": reps, "model": str(model_dir)}, "trajectories": n, "sequences": len(pairs),
              "sequence_tokens": tokens, "seconds": times, "max_abs_diff": diff},
             args.json, [f"{n} trajectories × {cfg['k'] + 2} contexts = {len(pairs)} sequences of "
                         f"{min(tokens)}–{max(tokens)} tokens; batch size {cfg['batch_size']}; model {model_dir.name}, "
                         f"fp32, {torch.get_num_threads()} threads; max |Δ log p| {diff:.1e}; median (min–max) over "
                         f"{reps} interleaved runs."])
    assert diff < 1e-4, f"batched scoring differs from one-by-one by {diff:.2e}"


if __name__ == "__main__":
    main()
