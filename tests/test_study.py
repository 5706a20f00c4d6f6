"""The study runner: resumable cell by cell, each cell recorded when it finishes, a
report for a partly run study (with a stand-in for the pipeline); then both study flows
at the smallest size on the tiny model: the report's tables and figures exist and its
numbers are the metrics files' numbers."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from project import tiny_params

from unisd.config import Config, load_config
from unisd.report import ReportError
from unisd.stages import Layout
from unisd.study import (
    Cell,
    StudyError,
    ablation_cells,
    compare_cells,
    format_status,
    run_cell_recorded,
    run_study,
    study_status,
)


def _fake_cell(cfg: Config, cell: Cell) -> None:
    """What the pipeline leaves of a cell: its evaluation (everything right on sciq, wrong
    on mbpp) and, for a trained recipe, each round's curves and filter stats."""
    layout = Layout(cfg)
    (layout.recipe_eval / "predictions").mkdir(parents=True, exist_ok=True)
    benchmarks = {}
    for bench, right in (("sciq", True), ("mbpp", False)):
        rows = [{"id": f"{bench}-{i}", "correct": right} for i in range(2)]
        (layout.recipe_eval / "predictions" / f"{bench}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        benchmarks[bench] = {"n": 2, "score": 100.0 * right}
    metrics = {"split": cfg.eval.split, "benchmarks": benchmarks, "overall": 50.0}
    (layout.recipe_eval / "metrics.json").write_text(json.dumps(metrics))
    if cfg.method.loss != "none":
        for r in range(1, cfg.train_set.rounds + 1):
            layout.round(r, "train").mkdir(parents=True, exist_ok=True)
            layout.round(r, "filter").mkdir(parents=True, exist_ok=True)
            (layout.round(r, "train") / "curves.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
            (layout.round(r, "filter") / "stats.json").write_text(json.dumps({"filtered_fraction": 0.0}))


class Launcher:
    """Runs cells with `_fake_cell`, remembering which; fails on the cell named `crash_on`."""

    def __init__(self, crash_on: str | None = None):
        self.ran: list[str] = []
        self.crash_on = crash_on

    def __call__(self, cfg: Config, cell: Cell) -> None:
        if cell.name == self.crash_on:
            raise KeyboardInterrupt
        self.ran.append(cell.name)
        _fake_cell(cfg, cell)


@pytest.fixture
def small_study(tmp_path):
    params = tiny_params(tmp_path / "no-model-needed")
    params["study"] = {"recipes": ["base", "sft", "unisd-full"], "seeds": [42]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path / "params.yaml"


def _cells(params_file: Path) -> dict:
    return json.loads((params_file.parent / "reports" / "compare" / "report.json").read_text())["study"]["cells"]


def test_study_resumes_cell_by_cell(small_study):
    with pytest.raises(KeyboardInterrupt):
        run_study(small_study, {}, "compare", Launcher(crash_on="sft-s42"))
    record = small_study.parent / "metrics" / "study" / "compare" / "base-s42" / "cell.json"
    assert json.loads(record.read_text())["computed"] is True  # written before the next cell started
    assert not (small_study.parent / "metrics" / "study" / "compare" / "sft-s42" / "cell.json").exists()

    again = Launcher()
    run_study(small_study, {}, "compare", again)
    assert again.ran == ["sft-s42", "unisd-full-s42"]  # the finished cell is not run again
    cells = _cells(small_study)
    assert [c["status"] for c in cells.values()] == ["done"] * 3
    assert all(c["wall_time_s"] >= 0 and set(c["code"]) == {"evaluate", "train"} for c in cells.values())

    shutil.rmtree(small_study.parent / "artifacts")  # a fresh clone elsewhere: only the committed files
    elsewhere = Launcher()
    report = run_study(small_study, {}, "compare", elsewhere)
    assert elsewhere.ran == []  # the published cells are done
    data = json.loads((report.parent / "report.json").read_text())
    assert data["scores"]["sft-s42"]["sciq"]["score"] == 100.0 and data["scores"]["sft-s42"]["mbpp"]["score"] == 0.0

    more_seeds = Launcher()
    run_study(small_study, {"study.seeds": [42, 7]}, "compare", more_seeds)
    assert more_seeds.ran == ["base-s7", "sft-s7", "unisd-full-s7"]  # a new seed leaves the others done

    other_params = Launcher()
    run_study(small_study, {"eval.limit": 1}, "compare", other_params)
    assert other_params.ran == ["base-s42", "sft-s42", "unisd-full-s42"]  # stale under other params


def test_status_reads_the_records_alone(small_study):
    """`unisd study compare --status`: done / missing / stale from the cells' records, no
    score read: the metrics of a done cell can be unreadable."""
    with pytest.raises(KeyboardInterrupt):
        run_study(small_study, {}, "compare", Launcher(crash_on="sft-s42"))
    (small_study.parent / "metrics/study/compare/base-s42/eval/metrics.json").write_text("not read")
    rows = study_status(small_study, {}, "compare")
    assert [(r["cell"], r["status"]) for r in rows] == [
        ("base-s42", "done"),
        ("sft-s42", "missing"),
        ("unisd-full-s42", "missing"),
    ]
    assert rows[0]["wall_time_s"] >= 0 and rows[0]["finished"] and rows[1]["wall_time_s"] is None
    assert [r["status"] for r in study_status(small_study, {"eval.limit": 1}, "compare")][0] == "stale"
    table = format_status(rows).splitlines()
    assert table[1].split()[:2] == ["base-s42", "done"] and table[2].split() == ["sft-s42", "missing"]
    assert table[-1] == "1 of 3 cells done"
    unisd = Path(sys.executable).parent / "unisd"
    command = [str(unisd), "study", "compare", "--status", "--params", str(small_study)]
    shown = subprocess.run(command, capture_output=True, text=True)
    assert shown.returncode == 0 and shown.stdout.splitlines()[-1] == "1 of 3 cells done", shown.stderr


def test_a_failed_cell_fails_alone_when_cells_run_together(small_study):
    """`map_cells` (the Dask runner's shape): the other cells are recorded and reported,
    the failed one is named, and the next run runs only it."""

    def together(launcher):
        def run(pending):
            results = []
            for cfg, cell in pending:
                try:
                    results.append(run_cell_recorded(cfg, cell, launcher))
                except Exception as err:
                    results.append(err)
            return results

        return run

    class Broken(Launcher):
        def __call__(self, cfg, cell):
            if cell.name == "sft-s42":
                raise RuntimeError("out of memory")
            super().__call__(cfg, cell)

    with pytest.raises(StudyError, match="1 cell.*sft-s42: RuntimeError: out of memory"):
        run_study(small_study, {}, "compare", Launcher(), together(Broken()))
    cells = _cells(small_study)
    assert [c["status"] for c in cells.values()] == ["done", "missing", "done"]
    assert cells["sft-s42"]["error"] == "RuntimeError: out of memory"
    again = Launcher()
    run_study(small_study, {}, "compare", again, together(again))
    assert again.ran == ["sft-s42"]
    assert [c["status"] for c in _cells(small_study).values()] == ["done"] * 3


def test_cells_evaluated_before_records_are_timed_as_cache(small_study):
    run_study(small_study, {}, "compare", Launcher())
    for name in ("base-s42", "sft-s42", "unisd-full-s42"):
        (small_study.parent / "metrics" / "study" / "compare" / name / "cell.json").unlink()
    an_hour_ago = time.time() - 3600
    for metrics in (small_study.parent / "artifacts" / "study" / "compare").glob("*/eval/recipes/*/metrics.json"):
        os.utime(metrics, (an_hour_ago, an_hour_ago))  # evaluated in an earlier sitting
    replayed = []
    run_study(small_study, {}, "compare", lambda cfg, cell: replayed.append(cell.name))  # the cache: no new files
    assert replayed == ["base-s42", "sft-s42", "unisd-full-s42"]
    assert [c["computed"] for c in _cells(small_study).values()] == [False] * 3


def test_recipe_components_apply_to_their_recipes_cells_under_the_cells_own(small_study):
    """study.recipe_components: a budget-scaled unisd-full and a stabilised baseline, in
    every cell of their recipe; a leave-one-out cell's own removal still wins."""
    params = yaml.safe_load(small_study.read_text())
    params["study"]["recipe_components"] = {
        "unisd-full": {"teacher": {"ema_every": 4}, "clip": {"mode": "quantile", "q": 0.99}},
        "sft": {"gold_mix": 0.5},
    }
    params["study"]["components"] = ["ema", "clip"]
    params["study"]["recipe_components"]["clip"] = {"clip": {"mode": "quantile", "q": 0.9}}
    small_study.write_text(yaml.safe_dump(params))
    methods = {}

    def record(cfg: Config, cell: Cell) -> None:
        methods[cell.name] = cfg.method
        _fake_cell(cfg, cell)

    report = run_study(small_study, {}, "compare", record)
    full, sft, base = methods["unisd-full-s42"], methods["sft-s42"], methods["base-s42"]
    assert (full.teacher.kind, full.teacher.ema_every, full.clip.mode, full.clip.q) == ("ema", 4, "quantile", 0.99)
    assert full.agreement.enabled and full.contrastive.enabled  # the recipe's own settings stay
    assert (sft.loss, sft.data, sft.gold_mix) == ("sft", "gold", 0.5) and base.gold_mix == 0.0
    budget = json.loads((report.parent / "report.json").read_text())["study"]["budget"]
    assert budget["recipe_components"] == params["study"]["recipe_components"]

    run_study(small_study, {}, "ablation", record)
    no_ema, ema = methods["unisd-full-no-ema-s42"], methods["ema-s42"]
    assert (no_ema.teacher.kind, no_ema.clip.mode) == ("frozen", "quantile")
    assert ema.teacher.ema_every == 10  # the `ema` component recipe has no entry: untouched
    clip, pair = methods["clip-s42"], methods["ema+clip-s42"]
    assert (clip.clip.mode, clip.clip.q) == (pair.clip.mode, pair.clip.q) == ("quantile", 0.9)  # the pair as its single
    assert pair.teacher.kind == "ema" and pair.teacher.ema_every == 10


def test_the_ablation_runs_at_its_own_seeds(small_study):
    cfg = load_config(small_study, {"study.seeds": [1, 2]})
    assert {c.seed for c in compare_cells(cfg)} == {1, 2} and {c.seed for c in ablation_cells(cfg)} == {42}
    cfg = load_config(small_study, {"study.seeds": [1, 2], "study.ablation_seeds": None})
    assert {c.seed for c in ablation_cells(cfg)} == {1, 2}


def test_report_of_a_partly_run_study(small_study):
    with pytest.raises(ReportError, match="no cell of the compare study"):
        run_study(small_study, {}, "compare")
    with pytest.raises(KeyboardInterrupt):
        run_study(small_study, {}, "compare", Launcher(crash_on="unisd-full-s42"))
    report = run_study(small_study, {}, "compare")  # `unisd report compare`: runs nothing
    data = json.loads((report.parent / "report.json").read_text())
    assert list(data["runs"]) == ["base-s42", "sft-s42"]
    assert [c["status"] for c in data["study"]["cells"].values()] == ["done", "done", "missing"]
    assert data["study"]["wall_time_s"] == pytest.approx(
        sum(c["wall_time_s"] for c in list(data["study"]["cells"].values())[:2])
    )
    text = report.read_text()
    assert "- cells: 2 of 3 evaluated; not in this report: unisd-full-s42 (missing)" in text
    assert "## Wall time per cell" in text


@pytest.fixture
def project(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(tmp_path / "prefect-results"))
    params = tiny_params(tiny_model_dir)
    params["study"] = {
        "recipes": ["base", "sft", "unisd-full"],
        "seeds": [42],
        "components": ["ema", "clip"],
        "agreement_variants": False,
        "leave_one_out": True,
        "size": {"train_set.limit": 4},
        "ablation_size": {"train.lr": 5.0e-5},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def check_report(report: Path, expected_labels: set[str]) -> dict:
    data = json.loads((report.parent / "report.json").read_text())
    assert {r["label"] for r in data["runs"].values()} == expected_labels
    for name in data["runs"]:
        cell = report.parent.parents[1] / "artifacts" / "study" / report.parent.name / name
        (metrics_file,) = (cell / "eval" / "recipes").glob("*/metrics.json")  # the cell's trained model
        metrics = json.loads(metrics_file.read_text())
        row = data["scores"][name]
        assert row["overall"]["score"] == pytest.approx(metrics["overall"])
        for bench, m in metrics["benchmarks"].items():
            assert row[bench]["score"] == pytest.approx(m["score"])
            assert row[bench]["lo"] <= m["score"] <= row[bench]["hi"]
    for fig in data["figures"].values():
        png = report.parent / fig
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = report.read_text()
    assert "95%" in text and "seed" in text.lower()
    return data


@pytest.mark.integration
@pytest.mark.usefixtures("one_thread")
def test_compare_and_ablation_flows(project):
    from unisd.orchestration.study import ablation, compare

    report = Path(compare(str(project / "params.yaml")))
    data = check_report(report, {"base", "sft", "unisd-full"})
    assert data["best_baseline"] == "sft"
    assert [c["status"] for c in data["study"]["cells"].values()] == ["done"] * 3
    assert set(data["vs_base"]) >= {"sft-s42", "unisd-full-s42"}
    assert data["study"]["split_sizes"]["train_examples_per_benchmark"] == 4  # study.size
    assert data["study"]["budget"]["lr"] != 5.0e-5

    report = Path(ablation(str(project / "params.yaml")))
    data = check_report(
        report,
        {
            "base",
            "sd",
            "ema",
            "clip",
            "ema+clip",
            "unisd-full",
            "unisd-full-no-agreement",
            "unisd-full-no-ema",
            "unisd-full-no-contrastive",
            "unisd-full-no-feature",
        },
    )
    assert set(data["components"]) == {"ema-s42", "clip-s42"}
    assert list(data["interactions"]) == ["ema+clip-s42"]
    assert len(data["leave_one_out"]) == 4
    assert set(data["vs_base"]) >= {"sd-s42", "unisd-full-s42"}
    assert data["study"]["split_sizes"]["train_examples_per_benchmark"] == 4
    assert data["study"]["budget"]["lr"] == 5.0e-5  # study.ablation_size, on top of study.size
