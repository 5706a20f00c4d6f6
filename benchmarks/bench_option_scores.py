"""The evaluation's option scores (ll_acc, rot_acc): the shared part of an item's prompts
once, or every prompt whole.

An MCQ item is scored by n sequences that share most of their tokens
(`unisd.choice_scores`): the option log-likelihoods read log p(" <option>" | prompt) for
each of the n options after one prompt; the rotations read the next-token letter
probabilities after the prompt with its options in each of n cyclic orders, prompts that
agree up to where the options start (SciQ: a support passage and a question).

shared:  what the evaluation runs. One forward over the distinct shared parts (the
         prompt; the rotations' common prefix) keeps their KV cache, one more over the
         rest reads it (`unisd.logprobs.shared_prompt_logprobs`,
         `shared_prefix_next_token_logprobs`).
whole:   what it ran before: every sequence on its own (`completion_logprobs`,
         `next_token_logprobs`).

Both with the stages' batching (`eval.batch_size` rows, `eval.score_tokens` padded
tokens), on SciQ validation items: option log-likelihoods under `open_answer` (the
studies' protocol) and under the letter formats' cloze text, rotations under
`reason_first` (the default). The table reports items/s, then the largest |Δ log p| and
how many items' credits (ll_correct / ll_norm_correct; rot_correct / circular_correct)
differ between the paths: in fp32 they must be < 1e-4 and 0, the published precision;
`--bf16` only reports them. `--scores` picks one kind.

`--scores eval` compares the evaluation's teacher-forced scoring of an item as a whole
(open_answer): the gold response (gold_ppl), the model's own greedy answer (the base
model's ppl_ret; generated first, bf16, at most 128 tokens) and the options, read in one
pass after the item's prompt (`unisd.evaluate.score_after_prompts`: the options' prompt,
the same task then "Answer:", is cut at the item's prompt) against three passes (gold and
own answer each whole with `completion_logprobs`, the options shared apart), as the
evaluation ran them before. `--benchmark` picks the MCQ benchmark (validation split).
"""

from __future__ import annotations

import _common as C

FULL = {"items": 60, "batch_size": 16, "score_tokens": 2048, "reps": 2}
QUICK = {"items": 4, "batch_size": 8, "score_tokens": 256, "reps": 1}


def workloads(examples, builder, kinds: list[str], owns: list[list[int]]) -> list[dict]:
    """Per workload: its label, both paths (name -> call(model, pad, rows, bf16, max_tokens)
    returning one log-prob tensor per sequence), the tokens each path reads, and the
    per-item credits from a path's output. `owns`: the model's own answers (eval only)."""
    from unisd.choice_scores import AnswerEncoder, aggregate_loglik, aggregate_rotations, cloze_text, common_prefix
    from unisd.data.convert import rotate_options
    from unisd.logprobs import (
        completion_logprobs,
        next_token_logprobs,
        shared_prefix_next_token_logprobs,
        shared_prompt_logprobs,
    )
    from unisd.prompts import task_text

    enc, out = AnswerEncoder(builder), []
    for fmt in ("open_answer", "reason_first") if "ll" in kinds else ():
        pairs = [enc.split(cloze_text(ex, fmt), f" {c.strip()}") for ex in examples for c in ex.choices]

        def ll_credits(lps, keys=("ll_correct", "ll_norm_correct")):
            it = iter(lps)
            items = [
                aggregate_loglik(
                    [float(next(it).sum()) for _ in ex.choices], [len(c.strip()) for c in ex.choices], ex.gold_index
                )
                for ex in examples
            ]
            return {k: [i[k] for i in items] for k in keys}

        out.append(
            {
                "label": f"ll, {fmt}",
                "paths": {
                    "shared": lambda *a, pairs=pairs, **k: shared_prompt_logprobs(a[0], pairs, *a[1:], **k),
                    "whole": lambda *a, pairs=pairs, **k: completion_logprobs(a[0], pairs, *a[1:], **k),
                },
                "tokens": {
                    "shared": sum(len(p) for p in {tuple(p) for p, _ in pairs}) + sum(len(c) for _, c in pairs),
                    "whole": sum(len(p) + len(c) for p, c in pairs),
                },
                "credits": ll_credits,
            }
        )
    if "eval" in kinds:
        from unisd.choice_scores import loglik_pairs, loglik_records
        from unisd.prompts import gold_completion

        anchors = [builder.encode_task(ex, "open_answer") for ex in examples]
        golds = [builder.encode_response(gold_completion(ex, "open_answer")) for ex in examples]
        options = loglik_pairs(enc, examples, "open_answer", anchors)
        separate = loglik_pairs(enc, examples, "open_answer")
        answers = [(a, g) for a, g in zip(anchors, golds)] + [(a, o) for a, o in zip(anchors, owns)]

        def one_pass(*a, **k):
            lps = shared_prompt_logprobs(a[0], answers + [(p, c) for p, c, _ in options], *a[1:], **k)
            return lps[: len(answers)] + [lp[len(lp) - n :] for lp, (_, _, n) in zip(lps[len(answers) :], options)]

        def three_passes(*a, **k):
            whole = completion_logprobs(a[0], answers, *a[1:], **k)
            return whole + shared_prompt_logprobs(a[0], [(p, c) for p, c, _ in separate], *a[1:], **k)

        def eval_credits(lps, keys=("ll_correct", "ll_norm_correct")):
            items = loglik_records(examples, lps[len(answers) :], [(p, c, len(c)) for p, c, _ in separate])
            return {k: [i[k] for i in items] for k in keys}

        out.append(
            {
                "label": "gold + own answer + options, open_answer",
                "paths": {"one pass": one_pass, "three passes": three_passes},
                "tokens": {
                    "one pass": sum(map(len, anchors))
                    + sum(len(c) for _, c in answers)
                    + sum(len(c) for _, c, _ in options),
                    "three passes": sum(len(p) + len(c) for p, c in answers)
                    + sum(len(p) for p in {tuple(p) for p, _, _ in separate})
                    + sum(len(c) for _, c, _ in separate),
                },
                "credits": eval_credits,
            }
        )
    if "rot" in kinds:
        splits, letters = [], []
        for ex in examples:
            rotations = [
                enc.letters(task_text(rotate_options(ex, r), "reason_first"), len(ex.choices))
                for r in range(len(ex.choices))
            ]
            n = common_prefix([p for p, _ in rotations])
            splits += [(p[:n], p[n:]) for p, _ in rotations]
            letters += [c for _, c in rotations]
        whole = [p + s for p, s in splits]

        def rot_credits(lps, keys=("rot_correct", "circular_correct")):
            it = iter(lps)
            items = [aggregate_rotations([next(it) for _ in ex.choices], ex.gold_index) for ex in examples]
            return {k: [i[k] for i in items] for k in keys}

        out.append(
            {
                "label": "rotations, reason_first",
                "paths": {
                    "shared": lambda m, pad, *a, **k: shared_prefix_next_token_logprobs(
                        m, splits, letters, pad, *a, **k
                    ),
                    "whole": lambda m, pad, *a, **k: next_token_logprobs(m, whole, letters, pad, *a, **k),
                },
                "tokens": {
                    "shared": sum(len(p) for p in {tuple(p) for p, _ in splits}) + sum(len(s) for _, s in splits),
                    "whole": sum(map(len, whole)),
                },
                "credits": rot_credits,
            }
        )
    return out


def own_answers(model, tok, builder, examples, max_new_tokens: int) -> list[list[int]]:
    """The model's greedy open answers (bf16, the fast backend): real answer lengths for
    the scoring pass, which only reads them."""
    from unisd.generation import Sampling, generate

    prompts = [builder.encode_task(ex, "open_answer") for ex in examples]
    return [c.ids for c in generate(model, tok, prompts, Sampling(max_new_tokens), 16, bf16=True, backend="fast")]


def main() -> None:
    import torch

    p = C.parser(__doc__)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on both paths")
    p.add_argument("--scores", choices=["ll", "rot", "eval", "both"], default="both", help="both: ll and rot")
    p.add_argument("--items", type=int, help="validation items (default: the script's)")
    p.add_argument("--benchmark", default="sciq", choices=["sciq", "arc_challenge", "commonsense_qa"])
    args = C.parse(p)
    cfg = (QUICK if args.quick else FULL) | {"bf16": args.bf16}
    reps = args.reps or cfg["reps"]
    model, tok, builder = C.lm(args.quick, max_prompt_tokens=8192)
    examples = C.mcq_examples(args.items or cfg["items"], args.quick, "validation", args.benchmark)
    pad, rows, bf16 = tok.pad_token_id, cfg["batch_size"], args.bf16
    kinds = ["ll", "rot"] if args.scores == "both" else [args.scores]

    table, results = [], {}
    owns = own_answers(model, tok, builder, examples, 8 if args.quick else 128) if "eval" in kinds else []
    for w in workloads(examples, builder, kinds, owns):
        out: dict[str, list] = {}

        def run(name: str, w=w, out=out) -> None:
            out[name] = w["paths"][name](model, pad, rows, bf16, max_tokens=cfg["score_tokens"])

        times = C.interleaved({name: (lambda name=name: run(name)) for name in w["paths"]}, reps, warmup=1)
        new, old = list(w["paths"])  # the path the evaluation runs, the one it is compared with
        diff = max(float((a - b).abs().max()) for a, b in zip(out[new], out[old]))
        shared, whole = w["credits"](out[new]), w["credits"](out[old])
        flips = {k: sum(a != b for a, b in zip(shared[k], whole[k])) for k in shared}
        speed = {name: [len(examples) / t for t in ts] for name, ts in times.items()}
        for name in w["paths"]:
            row = [w["label"], name, w["tokens"][name], C.spread(speed[name], "{:.2f}")]
            row.append(C.spread(C.ratios(speed[name], speed[old]), "{:.2f}×"))
            row += [f"{diff:.1e}", " / ".join(f"{k} {v}" for k, v in flips.items())] if name == new else ["", ""]
            table.append(row)
        results[w["label"]] = {"seconds": times, "tokens": w["tokens"], "max_abs_diff": diff, "flips": flips}
        if not bf16:
            assert diff < 1e-4 and not any(flips.values()), f"{w['label']}: paths differ by {diff:.2e}, flips {flips}"

    C.report(
        "Option scores: the shared part of an item's prompts once vs every prompt whole",
        ["scores", "path", "tokens", "items/s", "× the other path", "max |Δ log p|", "credits changed"],
        table,
        {"config": cfg | {"reps": reps, "model": str(C.model_dir(args.quick))}, "items": len(examples), **results},
        args.json,
        [
            f"{len(examples)} {args.benchmark} validation items × their options; at most {rows} rows and "
            f"{cfg['score_tokens']} padded tokens per batch; {'bf16 autocast' if bf16 else 'fp32'}, "
            f"{torch.get_num_threads()} threads; median (min–max) over {reps} interleaved runs."
        ],
    )


if __name__ == "__main__":
    main()
