"""Wall time of a second, unchanged `unisd run` against the first one.

Each repetition copies the project into a fresh temporary git repository (as the
integration tests do: `tests/project.py`), with a small params.yaml, and runs
`unisd run` twice there: the first run computes every stage; the second, with nothing
changed, should find every stage in the cache (Prefect task cache keyed on the inputs'
digests, the stage's params and the code version) and only pay for start-up and cache
checks. Each has its own Prefect home and result storage under the temporary folder and
its own MLflow database, so nothing outside is read or touched. The wall time is the
whole command, interpreter start-up included: what a user waits for.

Full: the real embedded model, recipe unisd-full on a handful of items (the
configuration of tests/test_integration_embedded.py). --quick: the tiny random model,
recipe sft, two benchmarks.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C

TARGET = 0.05


def params(quick: bool) -> dict:
    import yaml
    from project import tiny_params

    if quick:
        p = tiny_params(C.model_dir(True))
        p["recipe"] = "sft"
        p["eval"].update(limit=1)
        p["train_set"].update(limit=2)
        return p
    p = yaml.safe_load((C.REPO / "params.yaml").read_text())
    small = {"mcq": 24, "code": 48, "tool": 24}
    p["recipe"] = "unisd-full"
    p["eval"].update(limit=2, batch_size=8, max_new_tokens=small)
    p["train_set"].update(limit=4)
    p["generation"].update(batch_size=8, max_new_tokens=small)
    p["train"].update(batch_size=2, grad_accum=1, lr=1e-4, lora={**p["train"]["lora"], "r": 8, "alpha": 16})
    return p


def run_twice(p: dict) -> tuple[float, float, int, int]:
    """(first s, second s, stages of the first run, stages the second found CACHED) in a fresh copy."""
    from project import copy_project

    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        project = copy_project(Path(tmp) / "project", p)
        env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
        env.update(
            PREFECT_HOME=str(Path(tmp) / "prefect-home"),
            PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(Path(tmp) / "prefect-results"),
        )
        walls, logs = [], []
        for _ in range(2):
            start = time.perf_counter()
            out = subprocess.run(
                [str(Path(sys.executable).parent / "unisd"), "run"],
                cwd=project,
                env=env,
                capture_output=True,
                text=True,
            )
            walls.append(time.perf_counter() - start)
            if out.returncode != 0:
                raise RuntimeError(f"unisd run failed:\n{out.stderr[-3000:]}")
            logs.append(out.stdout + out.stderr)
    return walls[0], walls[1], logs[0].count(": ran ->") + logs[0].count(": CACHED ->"), logs[1].count(": CACHED ->")


def main() -> None:
    args = C.parse(C.parser(__doc__))
    reps = args.reps or 1
    p = params(args.quick)
    runs = [run_twice(p) for _ in range(reps)]
    first, second, stages, cached = ([r[i] for r in runs] for i in range(4))
    share = C.ratios(second, first)
    rows = [
        [
            p["recipe"],
            C.spread(first),
            C.spread(second),
            C.spread([100 * s for s in share], "{:.1f}%"),
            f"{min(cached)}/{max(stages)}",
            "yes" if max(share) <= TARGET else "no",
        ]
    ]
    C.report(
        "Second, unchanged pipeline run",
        ["recipe", "first run s", "second run s", "second / first", "stages cached (2nd)", f"≤ {TARGET:.0%}"],
        rows,
        {
            "config": {"quick": args.quick, "reps": reps, "params": p},
            "first_s": first,
            "second_s": second,
            "stages": stages,
            "cached_stages": cached,
        },
        args.json,
        [f"model {Path(p['model']['name']).name}; median (min–max) over {reps} fresh project copies."],
    )


if __name__ == "__main__":
    main()
