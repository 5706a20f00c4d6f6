"""Option log-likelihoods (the evaluation's ll_acc): each prompt once, or prompt + option whole.

The evaluation scores an MCQ item by log p(" <option>" | prompt) for each of its n
options (`unisd.choice_scores.loglik_scores`); the n sequences share the prompt, which is
most of their tokens (SciQ: a support passage and a question, then options of a few
tokens).

prompt once:     `unisd.logprobs.shared_prompt_logprobs`, what the evaluation runs: one
                 forward over the distinct prompts keeps their KV cache, one more over the
                 options reads it (P + Σ|option| tokens per item).
whole sequences: `unisd.logprobs.completion_logprobs` on the same (prompt, option) pairs,
                 what the evaluation ran before (n·P + Σ|option| tokens per item).

Both with the stages' batching (`eval.batch_size` rows, `eval.score_tokens` padded
tokens), on SciQ validation items under `open_answer` (the studies' protocol: the
student's own prompt is the context) and under the letter formats' cloze text. The
table reports items/s; after it, the largest |Δ log p| of an option and how many items'
ll_correct / ll_norm_correct differ between the paths (fp32: must be < 1e-4 and 0 —
the published precision; `--bf16`: reported only).
"""

from __future__ import annotations

import _common as C

FULL = {"items": 60, "batch_size": 16, "score_tokens": 2048, "reps": 2}
QUICK = {"items": 4, "batch_size": 8, "score_tokens": 256, "reps": 1}


def main() -> None:
    import torch

    from unisd.choice_scores import AnswerEncoder, aggregate_loglik, cloze_text
    from unisd.logprobs import completion_logprobs, shared_prompt_logprobs

    p = C.parser(__doc__)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on both paths")
    args = C.parse(p)
    cfg = (QUICK if args.quick else FULL) | {"bf16": args.bf16}
    reps = args.reps or cfg["reps"]
    model, tok, builder = C.lm(args.quick, max_prompt_tokens=8192)
    examples = C.mcq_examples(cfg["items"], args.quick, split="validation")
    enc, pad, rows, bf16 = AnswerEncoder(builder), tok.pad_token_id, cfg["batch_size"], args.bf16
    paths = {"prompt once": shared_prompt_logprobs, "whole sequences": completion_logprobs}

    table, results = [], {}
    for fmt in ("open_answer", "reason_first"):
        pairs = [enc.split(cloze_text(ex, fmt), f" {c.strip()}") for ex in examples for c in ex.choices]
        out: dict[str, list] = {}

        def run(name: str, pairs=pairs, out=out) -> None:
            out[name] = paths[name](model, pairs, pad, rows, bf16, max_tokens=cfg["score_tokens"])

        times = C.interleaved({name: (lambda name=name: run(name)) for name in paths}, reps, warmup=1)
        diff = max(float((a - b).abs().max()) for a, b in zip(out["prompt once"], out["whole sequences"]))
        scores = {}
        for name, lps in out.items():
            it = iter(lps)
            scores[name] = [
                aggregate_loglik(
                    [float(next(it).sum()) for _ in ex.choices], [len(c.strip()) for c in ex.choices], ex.gold_index
                )
                for ex in examples
            ]
        flips = {
            key: sum(a[key] != b[key] for a, b in zip(scores["prompt once"], scores["whole sequences"]))
            for key in ("ll_correct", "ll_norm_correct")
        }
        speed = {name: [len(examples) / t for t in ts] for name, ts in times.items()}
        tokens = {
            "prompt once": sum(len(p) for p in {tuple(p) for p, _ in pairs}) + sum(len(c) for _, c in pairs),
            "whole sequences": sum(len(p) + len(c) for p, c in pairs),
        }
        for name in paths:
            table.append(
                [
                    fmt,
                    name,
                    tokens[name],
                    C.spread(speed[name], "{:.2f}"),
                    C.spread(C.ratios(speed[name], speed["whole sequences"]), "{:.2f}×"),
                ]
            )
        table[-2] += [f"{diff:.1e}", f"{flips['ll_correct']} / {flips['ll_norm_correct']}"]
        table[-1] += ["", ""]
        results[fmt] = {"seconds": times, "tokens": tokens, "max_abs_diff": diff, "flips": flips}
        if not bf16:
            assert diff < 1e-4 and not any(flips.values()), f"{fmt}: paths differ by {diff:.2e}, flips {flips}"

    C.report(
        "Option log-likelihoods (ll_acc): each prompt once vs prompt + option whole",
        ["format", "path", "tokens", "items/s", "× whole sequences", "max |Δ log p|", "ll / ll_norm flips"],
        table,
        {"config": cfg | {"reps": reps, "model": str(C.model_dir(args.quick))}, "items": len(examples), **results},
        args.json,
        [
            f"{len(examples)} SciQ validation items × their options; at most {rows} rows and "
            f"{cfg['score_tokens']} padded tokens per batch; {'bf16 autocast' if bf16 else 'fp32'}, "
            f"{torch.get_num_threads()} threads; median (min–max) over {reps} interleaved runs."
        ],
    )


if __name__ == "__main__":
    main()
