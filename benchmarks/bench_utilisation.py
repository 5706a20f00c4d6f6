"""Achieved FLOP/s of training and of teacher scoring, as a share of the measured peak.

Peak: the best of several large square matmuls (fp32, and bf16 inputs) on this machine,
in this process, with the same threads: what the cores can do at best.

Achieved: model FLOPs over wall time, with the usual estimates (Kaplan et al. 2020):
2·N per token for a forward pass and 6·N per token for a forward + backward, where N is
the non-embedding parameter count. The estimates ignore attention's sequence-length
term and the LM head (2·H·V per token: about a third of N for SmolLM2-135M, so the
true work is larger than counted) and, under LoRA, count the frozen weights' gradients
that are never computed (so the true backward is smaller than counted): the share is a
model-FLOPs utilisation, comparable across runs, not a hardware counter.

train:   one distillation optimizer step as in bench_train_step ("ours", LoRA, generalized
         JSD): student forward + backward (6·N per student token) and teacher forward
         (2·N per teacher token).
scoring: teacher-forced forward passes of `unisd.logprobs.completion_logprobs` over a
         batch of sequences (2·N per token).
Each runs in fp32 and under bf16 autocast; its share is taken of the peak of the same
precision.
"""

from __future__ import annotations

import time

import _common as C
import bench_train_step as T

FULL = {"matmul": 4096, "matmul_reps": 5, "score_batch": 8, "score_len": 512, "reps": 3, "train": T.FULL}
QUICK = {"matmul": 512, "matmul_reps": 2, "score_batch": 2, "score_len": 64, "reps": 1, "train": T.QUICK}


def matmul_peak(n: int, dtype, reps: int) -> float:
    """Best FLOP/s of an n×n by n×n matmul."""
    import torch

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def non_embedding_params(model) -> int:
    embeddings = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    return sum(p.numel() for p in model.parameters() if id(p) not in embeddings)


def main() -> None:
    import torch

    from unisd.logprobs import completion_logprobs
    from unisd.modeling import load_model, load_tokenizer

    args = C.parse(C.parser(__doc__))
    cfg = QUICK if args.quick else FULL
    reps = args.reps or cfg["reps"]
    model_dir = C.model_dir(args.quick)
    tok = load_tokenizer(model_dir)
    scorer = load_model(model_dir, device="cpu")
    n_params = non_embedding_params(scorer)
    g = torch.Generator().manual_seed(0)
    pairs = [
        (
            torch.randint(3, len(tok), (cfg["score_len"] // 2,), generator=g).tolist(),
            torch.randint(3, len(tok), (cfg["score_len"] // 2,), generator=g).tolist(),
        )
        for _ in range(cfg["score_batch"])
    ]
    score_tokens = cfg["score_batch"] * cfg["score_len"]
    train_tokens = cfg["train"]["batch"] * (cfg["train"]["prompt"] + cfg["train"]["completion"])
    train_flops = 8 * n_params * train_tokens  # 6·N student + 2·N teacher, equal lengths in bench_train_step

    peaks = {
        name: matmul_peak(cfg["matmul"], dtype, cfg["matmul_reps"])
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
    }
    variants = {}
    for precision in peaks:
        bf16 = precision == "bf16"
        variants[f"train {precision}"] = T.build("ours", model_dir, cfg["train"], bf16)[0]
        variants[f"scoring {precision}"] = lambda bf16=bf16: completion_logprobs(
            scorer, pairs, tok.pad_token_id, cfg["score_batch"], bf16
        )
    times = C.interleaved(variants, reps, warmup=1)

    rows, results = [], []
    for name, secs in times.items():
        workload, precision = name.split()
        flops, tokens = (
            (train_flops, train_tokens) if workload == "train" else (2 * n_params * score_tokens, score_tokens)
        )
        achieved = [flops / t for t in secs]
        rows.append(
            [
                workload,
                precision,
                C.spread([tokens / t for t in secs]),
                C.spread([a / 1e9 for a in achieved]),
                f"{peaks[precision] / 1e9:.0f}",
                C.spread([100 * a / peaks[precision] for a in achieved], "{:.1f}%"),
            ]
        )
        results.append(
            {
                "workload": workload,
                "precision": precision,
                "seconds": secs,
                "flops_per_call": flops,
                "tokens_per_call": tokens,
            }
        )
    C.report(
        "Utilisation of the measured matmul peak",
        ["workload", "precision", "tokens/s", "achieved GFLOP/s", "peak GFLOP/s", "share of peak"],
        rows,
        {
            "config": cfg | {"reps": reps, "model": str(model_dir)},
            "non_embedding_params": n_params,
            "peak_flops": peaks,
            "results": results,
        },
        args.json,
        [
            f"model {model_dir.name}: N = {n_params / 1e6:.1f}M non-embedding parameters; train = 6·N per student "
            f"token + 2·N per teacher token ({train_tokens} each per step), scoring = 2·N per token ({score_tokens} "
            f"per call); peak = best {cfg['matmul']}² matmul; {torch.get_num_threads()} threads; median (min–max) "
            f"over {reps} interleaved runs."
        ],
    )


if __name__ == "__main__":
    main()
