"""Every benchmark script's --quick mode (tiny model, tiny sizes) exits 0, prints a markdown
table and writes its JSON. The full-size runs are for a quiet machine, by hand."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
TABLE = re.compile(r"^\| .+ \|\n\|[-|]+\|\n(\| .+ \|\n?)+", re.M)
SCRIPTS = [
    "bench_loss_memory",
    "bench_train_step",
    "bench_generation",
    "bench_teacher_scoring",
    "bench_option_scores",
    "bench_utilisation",
    "profile_decode",
    "bench_decode_attention",
    "bench_sampling",
    pytest.param("bench_cache", marks=pytest.mark.integration),
]  # two `unisd run`s: Prefect


def _has_trl() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None


@pytest.fixture(scope="module")
def quick_runs(request, tmp_path_factory):
    """Start the selected scripts all at once, niced (each runs one thread in --quick), so
    the module takes about as long as the slowest of them rather than their sum."""
    out = tmp_path_factory.mktemp("bench")
    names = [item.callspec.params["name"] for item in request.session.items if item.module is request.module]
    procs = {}
    for name in names:
        with open(out / f"{name}.out", "w") as stdout, open(out / f"{name}.err", "w") as stderr:
            procs[name] = subprocess.Popen(
                [sys.executable, str(BENCH / f"{name}.py"), "--quick", "--json", str(out / f"{name}.json")],
                stdout=stdout,
                stderr=stderr,
                preexec_fn=lambda: os.nice(19),
            )
    yield procs, out
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("name", SCRIPTS)
def test_quick_mode_prints_a_table(quick_runs, name):
    procs, out = quick_runs
    assert procs[name].wait(timeout=600) == 0, (out / f"{name}.err").read_text()[-3000:]
    printed = (out / f"{name}.out").read_text()
    assert TABLE.search(printed), printed
    assert json.loads((out / f"{name}.json").read_text())["environment"]["torch"]
    if name == "bench_train_step":
        assert ("| trl " in printed) == _has_trl()
