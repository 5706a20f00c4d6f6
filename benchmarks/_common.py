"""Shared benchmark helpers: arguments, interleaved timing, peak memory in a fresh
process, markdown tables, JSON output, and the models and prompts the scripts use.

Timing. Every variant of a comparison runs in the same process, after untimed warm-up
calls, and the repetitions are interleaved with a rotating order (A B C, B C A, C A B, …):
drift of a shared machine (other jobs, frequency, caches) then hits every variant alike,
and each ratio compares neighbouring measurements. We report the median and the min–max
over the repetitions.

Memory. CPU torch keeps no allocator statistics, and tracemalloc does not see its
allocations. Each memory measurement therefore runs in a fresh interpreter
(`python benchmarks/_common.py SCRIPT FACTORY KWARGS`): `SCRIPT.FACTORY(**kwargs)` builds
the inputs (model, tensors, optimizer state) and returns the call to measure; the child
reads its resident set (VmRSS), resets the kernel's high-water mark
(`echo 5 > /proc/self/clear_refs`, Linux ≥ 4.0), makes the call and reads the high-water
mark (VmHWM). The peak is what the call held at its worst; peak − baseline is what it
needed on top of its inputs. We do not use `ru_maxrss`: it cannot be reset, so it
includes transient peaks of the setup, and after fork+exec Linux starts a child's
`ru_maxrss` at the *parent's* peak (a 1 GB parent made a 14 MB child report 990 MB).
glibc is told to serve every allocation of 128 KiB or more with its own mmap
(MALLOC_MMAP_THRESHOLD_), so a freed tensor goes back to the system instead of staying
in the heap, where a later allocation could reuse it unseen.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # unisd without an install; the tests' tiny model and project copy
MB = 1024 * 1024


# --------------------------------------------------------------------------- arguments and output


def parser(doc: str | None) -> argparse.ArgumentParser:
    """The options every script takes (scripts add their own)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model and sizes, 1-2 repetitions: seconds")
    p.add_argument("--json", metavar="OUT", type=Path, help="also write the results to this JSON file")
    p.add_argument("--reps", type=int, help="repetitions per variant (default: the script's)")
    return p


def parse(p: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse the options. --quick runs one intra-op thread (here and in child processes):
    tiny matrices gain nothing from more, and on a busy machine a second thread that the
    scheduler parks makes every op wait for it."""
    args = p.parse_args()
    if args.quick:
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    return args


def environment() -> dict[str, Any]:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor(),
    }


def report(
    title: str,
    headers: list[str],
    rows: list[list[Any]],
    results: dict[str, Any],
    json_out: Path | None,
    notes: Iterable[str] = (),
) -> None:
    """Print a markdown table (and notes); write `results` with the environment to `json_out`."""
    print(f"\n### {title}\n")
    print(markdown_table(headers, rows))
    for note in notes:
        print(f"\n{note}")
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({"title": title, "environment": environment(), **results}, indent=2) + "\n")


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


# --------------------------------------------------------------------------- statistics


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    """'median (min–max)' of the repetitions."""
    s = summary(values)
    if s["n"] == 1:
        return fmt.format(s["median"])
    return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}–{fmt.format(s['max'])})"


def ratios(numerator: list[float], denominator: list[float]) -> list[float]:
    """Per-repetition ratios of two interleaved series (neighbouring measurements)."""
    return [a / b for a, b in zip(numerator, denominator)]


# --------------------------------------------------------------------------- timing


def interleaved(variants: dict[str, Callable[[], Any]], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each variant: `warmup` untimed calls each, then `reps` timed
    rounds, the order rotated every round."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    return times


# --------------------------------------------------------------------------- memory in a fresh process


def _proc_status_kb(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def peak_memory(script: str | Path, factory: str, save: Path | None = None, **kwargs) -> dict[str, float]:
    """Peak resident memory (MiB) of `factory(**kwargs)()` in a fresh interpreter.

    Returns baseline_mb (resident after the factory), peak_mb (the high-water mark during
    the call), extra_mb (peak − baseline) and seconds (the call's wall time). With `save`,
    the call's return value is written there with torch.save, after the measurement.
    """
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    cmd = [sys.executable, __file__, str(script), factory, json.dumps(kwargs), str(save or "")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"memory child {factory}({kwargs}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _child(script: str, factory: str, kwargs: str, save: str) -> None:
    spec = importlib.util.spec_from_file_location("bench_child", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    call = getattr(module, factory)(**json.loads(kwargs))
    baseline = _proc_status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # high-water mark := current resident set
    start = time.perf_counter()
    result = call()
    seconds = time.perf_counter() - start
    peak = _proc_status_kb("VmHWM")
    if save:
        import torch

        torch.save(result, save)
    print(
        json.dumps(
            {
                "baseline_mb": baseline / 1024,
                "peak_mb": peak / 1024,
                "extra_mb": (peak - baseline) / 1024,
                "seconds": seconds,
            }
        )
    )


# --------------------------------------------------------------------------- models and prompts

REAL_MODEL = REPO / "artifacts" / "model"
DATA = REPO / "artifacts" / "data"


def model_dir(quick: bool) -> Path:
    """The real embedded model (made by `unisd model`), or in --quick a tiny random llama."""
    if quick:
        from tiny import build_tiny_model

        out = Path(tempfile.gettempdir()) / f"unisd-bench-tiny-{os.getuid()}"
        if not out.is_dir():  # built aside and renamed into place: scripts may start together
            tmp = build_tiny_model(tempfile.mkdtemp(dir=out.parent, prefix=f"{out.name}."))
            try:
                os.rename(tmp, out)
            except OSError:  # another script got there first
                shutil.rmtree(tmp)
        return out
    if not (REAL_MODEL / "model.safetensors").is_file():
        sys.exit(f"{REAL_MODEL} is missing: run `unisd model` first (or use --quick)")
    return REAL_MODEL


def lm(quick: bool, max_prompt_tokens: int):
    """(model on CPU, tokenizer, prompt builder) of the benchmark's model."""
    from unisd.modeling import load_model, load_tokenizer
    from unisd.prompts import PromptBuilder

    path = model_dir(quick)
    tok = load_tokenizer(path)
    return load_model(path, device="cpu"), tok, PromptBuilder.for_tokenizer(tok, max_prompt_tokens=max_prompt_tokens)


def mcq_examples(n: int, quick: bool, split: str = "test", benchmark: str = "sciq") -> list:
    """The first n examples of an MCQ benchmark's `split` from `unisd prepare`'s output;
    --quick without that output uses made-up ones."""
    from unisd.data.schema import Example, read_examples

    if (DATA / benchmark / f"{split}.jsonl").is_file():
        return read_examples(DATA / benchmark / f"{split}.jsonl")[:n]
    if not quick:
        sys.exit(f"{DATA} is missing: run `unisd prepare` first (or use --quick)")
    return [
        Example(
            id=f"m{i}",
            benchmark="sciq",
            task="mcq",
            question="Which gas do plants absorb? " * (1 + i % 3),
            choices=["oxygen", "carbon dioxide", "nitrogen", "helium"],
            answer="B",
        )
        for i in range(n)
    ]


def mixed_examples(n_mcq: int, n_code: int, quick: bool) -> list:
    """Short MCQ (SciQ) and long code (MBPP, HumanEval) test examples from `unisd prepare`'s
    output, shuffled (seeded). --quick without that output uses made-up examples."""
    import random

    from unisd.data.schema import Example, read_examples

    mcq = mcq_examples(n_mcq, quick)
    if (DATA / "mbpp" / "test.jsonl").is_file():
        code = [
            ex
            for pair in zip(
                read_examples(DATA / "mbpp" / "test.jsonl"), read_examples(DATA / "humaneval" / "test.jsonl")
            )
            for ex in pair
        ][:n_code]
    else:  # mcq_examples has exited unless --quick
        code = [
            Example(
                id=f"c{i}",
                benchmark="mbpp",
                task="code",
                question="Write a function that adds numbers. " * (4 + i),
                answer="def add(a, b):\n    return a + b\n",
                tests=["assert add(1, 2) == 3"],
            )
            for i in range(n_code)
        ]
    examples = mcq + code
    random.Random(0).shuffle(examples)
    return examples


if __name__ == "__main__":
    _child(*sys.argv[1:5])
