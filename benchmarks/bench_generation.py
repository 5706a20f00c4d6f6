"""Generation throughput: continuous batching vs `model.generate`, greedy, one prompt set.

The prompts are a seeded shuffle of short MCQ prompts (SciQ) and long code prompts (MBPP,
HumanEval) from the embedded test splits, rendered with the model's chat template by
`unisd.prompts`. Such a mix is where plain batching wastes most: a batch runs until its
longest member stops, and its short prompts are left-padded to its longest prompt.

ours:           `unisd.generation.generate` (continuous batching: a finished row's slot
                is refilled at once), `batch_size` slots. In bf16 its linear weights
                are cast once per call (`unisd.modeling.inference_autocast`).
ours, per-call casts: the same under a plain `torch.autocast`, which under inference
                mode casts every weight again at every forward (the path before the
                one-time cast); it must give exactly ours-bf16's tokens.
plain (sorted): `unisd.generation.generate(..., continuous=False)`: `model.generate` on
                length-sorted batches of `batch_size`, the reference path.
hf default:     what a user writes by default: one `model.generate` call per batch of 32
                prompts in input order, left-padded by the tokenizer, fp32.

Ours and plain run in fp32 and under bf16 autocast (the `generate` and `evaluate` stages'
default, `bf16_autocast: true` in params.yaml), so the table separates what continuous
batching gains from what bf16 gains; the headline ratio is the stage as configured
(ours, bf16) against the default `generate` call. All decode greedily with the same
max_new_tokens. In fp32, ours must produce exactly the plain path's tokens (asserted
after the table is printed); the table shows how many completions each path shares with
its own-precision reference (other batchings round differently, which may flip a
near-tie). tokens/s counts each completion's tokens up to and including its EOS, not
padding.
"""

from __future__ import annotations

import _common as C

FULL = {"mcq": 16, "code": 16, "max_new_tokens": 128, "batch_size": 16, "reps": 3}
QUICK = {"mcq": 4, "code": 4, "max_new_tokens": 12, "batch_size": 4, "reps": 1}
HF_BATCH = 32


def main() -> None:
    import torch

    from unisd.generation import Sampling, generate
    from unisd.prompts import task_text

    args = C.parse(C.parser(__doc__))
    cfg = QUICK if args.quick else FULL
    reps = args.reps or cfg["reps"]
    model_dir = C.model_dir(args.quick)
    model, tok, builder = C.lm(args.quick, max_prompt_tokens=4096)
    prompts = [builder.encode(task_text(ex)) for ex in C.mixed_examples(cfg["mcq"], cfg["code"], args.quick)]
    eos = set(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list)
              else [model.generation_config.eos_token_id])
    sampling = Sampling(cfg["max_new_tokens"])
    outputs: dict[str, list[list[int]]] = {}

    def ours_or_plain(name: str, continuous: bool, bf16: bool):
        def run():
            outputs[name] = [c.ids for c in generate(model, tok, prompts, sampling, cfg["batch_size"], bf16=bf16,
                                                     continuous=continuous)]
        return run

    def per_call_casts():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours_or_plain("ours, bf16, per-call casts", True, False)()

    @torch.inference_mode()
    def hf_default():
        ids = []
        for first in range(0, len(prompts), HF_BATCH):
            batch = tok.pad({"input_ids": prompts[first : first + HF_BATCH]}, padding=True, return_tensors="pt")
            seqs = model.generate(**batch, max_new_tokens=cfg["max_new_tokens"], do_sample=False)
            for row in seqs[:, batch["input_ids"].shape[1]:].tolist():
                cut = next((k for k, t in enumerate(row) if t in eos), None)
                ids.append(row if cut is None else row[: cut + 1])
        outputs["hf default, fp32"] = ids

    paths = {"ours, bf16": ours_or_plain("ours, bf16", True, True),
             "ours, bf16, per-call casts": per_call_casts,
             "ours, fp32": ours_or_plain("ours, fp32", True, False),
             "plain (sorted), bf16": ours_or_plain("plain (sorted), bf16", False, True),
             "plain (sorted), fp32": ours_or_plain("plain (sorted), fp32", False, False),
             "hf default, fp32": hf_default}
    times = C.interleaved(paths, reps, warmup=1)
    n = len(prompts)
    reference = {name: "ours, bf16" if "bf16" in name else "ours, fp32" for name in times}
    same = {name: sum(a == b for a, b in zip(outputs[name], outputs[reference[name]])) for name in times}
    speed = {name: [sum(map(len, outputs[name])) / t for t in times[name]] for name in times}
    rows = [[name, C.spread(speed[name]), C.spread(C.ratios(speed["ours, bf16"], speed[name]), "{:.2f}×"),
             C.spread(C.ratios(speed[reference[name]], speed[name]), "{:.2f}×"), sum(map(len, outputs[name])),
             f"{same[name]}/{n}"] for name in times]
    lengths = sorted(map(len, prompts))
    C.report("Generation throughput (greedy)",
             ["path", "tokens/s", "ours-bf16 ×", "ours × (same precision)", "tokens", "same as ours (same precision)"],
             rows,
             {"config": cfg | {"reps": reps, "model": str(model_dir), "prompt_lengths": lengths},
              "seconds": times, "same_as_ours": same},
             args.json, [f"{len(prompts)} prompts of {lengths[0]}–{lengths[-1]} tokens (median "
                         f"{lengths[len(lengths) // 2]}), max_new_tokens {cfg['max_new_tokens']}, batch size "
                         f"{cfg['batch_size']} (hf default: {HF_BATCH}); model {model_dir.name}; median (min–max) "
                         f"over {reps} interleaved runs. Target: ours ≥ 2× plain."])
    assert same["plain (sorted), fp32"] == n, "continuous batching changed the greedy completions of the plain path"
    assert same["ours, bf16, per-call casts"] == n, "casting the weights once changed the bf16 completions"


if __name__ == "__main__":
    main()
