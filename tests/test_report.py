"""The study report on a small fake study written to disk: files, figures, and numbers
checked against the metrics files and against counts taken straight from the
prediction files (independent of the report's code)."""

import json
import random
import re
import struct
from pathlib import Path

import pytest

from unisd.report import ReportError, write_report

MCQ = ("sciq", "commonsense_qa")
BENCHES = (*MCQ, "mbpp")
N = 40

# run name -> ((generative sciq, csqa, mbpp), (rot sciq, csqa), study entry extras)
MODELS = {
    "base": ((0.40, 0.30, 0.30), (0.30, 0.25), {"seed": 0}),
    "sft": ((0.40, 0.30, 0.30), (0.50, 0.40), {"seed": 0, "curves": True}),  # best baseline on rot_acc
    "gkd": ((0.50, 0.35, 0.35), (0.40, 0.30), {"seed": 0, "curves": True}),  # best on generative
    "sd": ((0.45, 0.35, 0.35), (0.35, 0.30), {"seed": 0, "curves": True}),
    "ema": ((0.50, 0.40, 0.40), (0.40, 0.35), {"seed": 0, "curves": True}),
    "contrastive": ((0.55, 0.35, 0.35), (0.45, 0.30), {"seed": 0, "curves": True}),
    "ema+contrastive": (
        (0.60, 0.40, 0.40),
        (0.50, 0.35),
        {"seed": 0, "kind": "pair", "components": ["ema", "contrastive"]},
    ),
    "unisd-full@0": (
        (0.65, 0.45, 0.45),
        (0.70, 0.40),
        {"seed": 0, "label": "unisd-full", "curves": True, "filter": True},
    ),
    "unisd-full@1": (
        (0.60, 0.50, 0.50),
        (0.60, 0.45),
        {"seed": 1, "label": "unisd-full", "curves": True, "filter": True},
    ),
    "full-no-ema": ((0.55, 0.45, 0.45), (0.55, 0.40), {"seed": 0, "kind": "leave_one_out", "components": ["ema"]}),
    "agreement_tok_retrieval": ((0.55, 0.40, 0.40), (0.45, 0.35), {"seed": 0}),
    "agreement_seq_retrieval": ((0.50, 0.35, 0.35), (0.40, 0.30), {"seed": 0}),
}
# the filter stage's stats.json of unisd-full, two rounds
FILTER_ROUNDS = [
    {
        "kept": 30,
        "filtered_fraction": 0.25,
        "disagreement_mean": 0.5,
        "teacher_eos_logp": -0.69,
        "student_eos_logp": -0.37,
        "teacher_letter_acc": 0.5,
        "student_letter_acc": 0.25,
        "student_sample_acc": 0.3,
        "dropped_truncated": 3,
        "token_weight_mean": 0.998,
    },
    {
        "kept": 28,
        "filtered_fraction": 0.3,
        "disagreement_mean": 0.4,
        "teacher_eos_logp": -1.2,
        "student_eos_logp": -0.4,
        "teacher_letter_acc": 0.55,
        "student_letter_acc": 0.3,
        "student_sample_acc": 0.35,
        "dropped_truncated": 1,
        "token_weight_mean": 0.99,
    },
]


def _outcomes(acc: float, rng: random.Random) -> list[bool]:
    correct = [i < round(acc * N) for i in range(N)]
    rng.shuffle(correct)
    return correct


def _with_tie(outcomes: list[bool]) -> list[float]:
    """The first wrong answer becomes a two-way tie with the gold: half a credit."""
    i = outcomes.index(False)
    return [*outcomes[:i], 0.5, *outcomes[i + 1 :]]


def _write_eval(folder: Path, label: str, gen: tuple, rot: tuple | None, rng: random.Random) -> None:
    """An evaluation folder as unisd.evaluate writes it; without `rot`, as it wrote it
    before the letter-probability metrics existed."""
    (folder / "predictions").mkdir(parents=True)
    benchmarks = {}
    for i, (bench, acc) in enumerate(zip(BENCHES, gen)):
        rows = [
            {
                "id": f"{bench}-{j}",
                "benchmark": bench,
                "correct": c,
                "ppl_ret": 1.5 + rng.random(),
                "gold_ppl": 3.0 + rng.random(),
            }
            for j, c in enumerate(_outcomes(acc, rng))
        ]
        m = {
            "n": N,
            "score": 100.0 * sum(r["correct"] for r in rows) / N,
            "ppl_ret": sum(r["ppl_ret"] for r in rows) / N,
            "gold_ppl": sum(r["gold_ppl"] for r in rows) / N,
            "jsd_to_base": rng.random() / 10,
        }
        if rot and bench in MCQ:
            outcomes = {
                "rot_correct": _with_tie(_outcomes(rot[i], rng)),
                "circular_correct": _outcomes(rot[i] / 2, rng),
                "ll_correct": _with_tie(_outcomes(0.3, rng)),
                "ll_norm_correct": _outcomes(0.35, rng),
            }
            for key, values in outcomes.items():
                for row, v in zip(rows, values):
                    row[key] = v
            m.update(
                {
                    metric: 100.0 * sum(outcomes[key]) / N
                    for metric, key in (
                        ("rot_acc", "rot_correct"),
                        ("circular_acc", "circular_correct"),
                        ("ll_acc", "ll_correct"),
                        ("ll_norm_acc", "ll_norm_correct"),
                    )
                }
            )
            m.update(
                rot_gold_prob=31.0,
                parse_rate=0.9,
                finish_rate=0.75,
                one_letter_baseline=27.5,
                letter_hist={"A": 30, "B": 6, "none": 4},
                gold_hist={"A": 11, "B": 10, "C": 9, "D": 10},
            )
        (folder / "predictions" / f"{bench}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        benchmarks[bench] = m
    metrics = {
        "label": label,
        "split": "test",
        "benchmarks": benchmarks,
        "overall": sum(b["score"] for b in benchmarks.values()) / len(benchmarks),
    }
    if rot:
        mcq = [benchmarks[b] for b in MCQ]
        metrics.update(
            mcq_overall=sum(b["score"] for b in mcq) / 2,
            mcq_rot_overall=sum(b["rot_acc"] for b in mcq) / 2,
            code_overall=benchmarks["mbpp"]["score"],
            headline={"benchmark": "sciq", "metric": "rot_acc", "value": benchmarks["sciq"]["rot_acc"]},
        )
    (folder / "metrics.json").write_text(json.dumps(metrics))


def _write_curves(path: Path, steps: int, rng: random.Random) -> None:
    rows = [
        {
            "step": s,
            "loss": 2.0 / s + rng.random() / 10,
            "divergence": 1.0 / s,
            "feature": 0.1 / s,
            "lr": 1e-5,
            "grad_norm": 1.0,
            "ema_update": int(s == 3),
            "clipped_frac": 0.1 * s,
            "token_weight_mean": 1.0 - 0.01 * s,
            "token_weight_min": 1.0 - 0.1 * s,
        }
        for s in range(1, steps + 1)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _study(root: Path, models: dict, new: bool = True) -> dict:
    rng = random.Random(0)
    entries = {}
    for name, (gen, rot, extra) in models.items():
        label = extra.get("label", name)
        _write_eval(root / name / "eval", label, gen, rot if new else None, rng)
        entry = {"eval_dir": str(root / name / "eval"), "label": label, "seed": extra["seed"]}
        entry.update({k: extra[k] for k in ("kind", "components") if k in extra})
        if extra.get("curves"):
            rounds = [root / name / f"curves-{i}.jsonl" for i in range(2)]
            for path in rounds:
                _write_curves(path, 5, rng)
            entry["curves"] = [str(p) for p in rounds]
        if extra.get("filter"):
            entry["filter_stats"] = [str(root / name / f"stats-{i}.json") for i in range(2)]
            for path, stats in zip(entry["filter_stats"], FILTER_ROUNDS):
                Path(path).write_text(json.dumps(stats))
        entries[name] = entry
    return {
        "title": "fake study",
        "model": "tiny",
        "split": "test",
        "split_sizes": {b: N for b in BENCHES},
        "seeds": [0, 1],
        "budget": "2 rounds",
        "wall_time_s": 123.0,
        "n_boot": 2000,
        "models": entries,
    }


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
    return _study(tmp_path_factory.mktemp("study"), MODELS)


@pytest.fixture(scope="module")
def report(study, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    path = write_report(study, out)
    return path, json.loads((out / "report.json").read_text())


def _metrics(study: dict, name: str) -> dict:
    return json.loads((Path(study["models"][name]["eval_dir"]) / "metrics.json").read_text())


def _predictions(study: dict, name: str, bench: str) -> dict[str, dict]:
    path = Path(study["models"][name]["eval_dir"]) / "predictions" / f"{bench}.jsonl"
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


def _section(text: str, heading: str) -> str:
    start = text.index(heading + "\n")
    end = text.find("\n## ", start + len(heading))
    return text[start : end if end > 0 else None]


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG header (signature, then the IHDR chunk)."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_report_and_figures_exist(report):
    path, data = report
    text = path.read_text()
    assert path.name == "report.md" and text.startswith("# fake study")
    assert set(data["figures"]) == {"scores", "components", "drift", "curves"} and not data["skipped_figures"]
    for rel in data["figures"].values():
        png = path.parent / rel
        width, height = _png_size(png)
        assert width > 100 and height > 100 and png.stat().st_size > 1000
        assert f"]({rel})" in text
    headings = re.findall(r"^## (.+)$", text, re.M)
    assert headings[:7] == [
        "Headline: sciq rotation-invariant letter accuracy (rot_acc)",
        "Against the paper",
        "Elsewhere: rotation-invariant letter accuracy (rot_acc) on the other benchmarks",
        "MCQ benchmarks",
        "Code benchmarks (pass@1 %)",
        "Flips against the base model",
        "Over seeds",
    ]
    assert "- evaluation split: **test**" in text


def test_scores_match_metrics_files(report, study):
    path, data = report
    text = path.read_text()
    for name in study["models"]:
        metrics = _metrics(study, name)
        cells = data["scores"][name]
        assert cells["overall"]["score"] == pytest.approx(metrics["overall"])
        for bench, m in metrics["benchmarks"].items():
            assert cells[bench]["score"] == pytest.approx(m["score"]) and cells[bench]["n"] == m["n"]
        for cell in cells.values():
            assert cell["lo"] <= cell["score"] <= cell["hi"]
        mcq = data["mcq"]["runs"][name]
        for bench in MCQ:
            m = metrics["benchmarks"][bench]
            assert mcq[bench]["rot_acc"]["score"] == pytest.approx(m["rot_acc"])
            assert mcq[bench]["score"]["score"] == pytest.approx(m["score"])
            assert mcq[bench]["ll_acc"]["score"] == pytest.approx(m["ll_acc"]) and mcq[bench]["parse_rate"] == 0.9
        assert mcq["pooled"]["rot_acc"]["score"] == pytest.approx(metrics["mcq_rot_overall"])
        assert mcq["pooled"]["score"]["score"] == pytest.approx(metrics["mcq_overall"])
        code = data["code"]["runs"][name]
        assert code["mbpp"]["score"] == code["pooled"]["score"] == pytest.approx(metrics["code_overall"])
        rot = mcq["sciq"]["rot_acc"]
        assert f"| {name} | {rot['score']:.1f} [{rot['lo']:.1f}, {rot['hi']:.1f}] |" in _section(text, "### sciq")
    assert data["mcq"]["gold_hist"]["sciq"] == {"A": 11, "B": 10, "C": 9, "D": 10}
    sciq = _section(text, "### sciq")
    assert "| 31.0 | 90% | 75% | 27.5 | A 30 · B 6 · none 4 |" in sciq
    assert "Gold letters: A 11 · B 10 · C 9 · D 10." in sciq
    assert "mbpp" not in _section(text, "## MCQ benchmarks") and "sciq" not in _section(
        text, "## Code benchmarks (pass@1 %)"
    )


def test_dvc_metrics_file_states_each_runs_headline_scores_and_gain(report, study):
    path, _ = report
    data = json.loads((path.parent / "metrics.json").read_text())
    assert data["headline"] == "sciq rot_acc" and set(data["runs"]) == set(study["models"])
    base = _metrics(study, "base")
    for name, row in data["runs"].items():
        metrics = _metrics(study, name)
        assert row["headline"]["score"] == pytest.approx(metrics["benchmarks"]["sciq"]["rot_acc"])
        assert row["headline"]["lo"] <= row["headline"]["score"] <= row["headline"]["hi"]
        assert row["score"] == pytest.approx(
            {"overall": metrics["overall"], **{b: m["score"] for b, m in metrics["benchmarks"].items()}}
        )
        if name != "base":  # same examples, so the paired gain is the difference of the overall scores
            assert row["gain_over_base"] == pytest.approx(metrics["overall"] - base["overall"])


def test_headline_gains_per_run_and_pooled(report, study):
    path, data = report
    hl = data["headline"]
    rot = {name: _metrics(study, name)["benchmarks"]["sciq"]["rot_acc"] for name in study["models"]}
    assert (hl["benchmark"], hl["metric"], data["best_baseline"]) == ("sciq", "rot_acc", "sft")
    for name, row in hl["runs"].items():
        assert row["value"]["score"] == pytest.approx(rot[name])
        assert row["generative"]["score"] == pytest.approx(_metrics(study, name)["benchmarks"]["sciq"]["score"])
    full = hl["runs"]["unisd-full@1"]
    assert (full["vs_base"]["reference"], full["vs_best_baseline"]["reference"]) == ("base", "sft")
    assert full["vs_base"]["diff_pct"] == pytest.approx(rot["unisd-full@1"] - rot["base"])
    assert "vs_best_baseline" not in hl["runs"]["gkd"] and "vs_base" not in hl["runs"]["base"]
    pooled = hl["pooled"]["unisd-full"]
    seed_mean = (rot["unisd-full@0"] + rot["unisd-full@1"]) / 2
    assert pooled["seeds"] == 2 and pooled["value"]["score"] == pytest.approx(seed_mean)
    assert pooled["vs_base"]["diff_pct"] == pytest.approx(seed_mean - rot["base"])
    assert pooled["vs_best_baseline"]["diff_pct"] == pytest.approx(seed_mean - rot["sft"])
    assert pooled["vs_base"]["lo"] <= pooled["vs_base"]["diff_pct"] <= pooled["vs_base"]["hi"]
    text = path.read_text()
    assert "### Pooled over seeds" in _section(text, "## Headline: sciq rotation-invariant letter accuracy (rot_acc)")


def test_elsewhere_pairs_every_other_benchmark_with_the_base_model(report, study):
    """The headline's metric (rot_acc) on csqa, the one other benchmark that has it: each
    label's seed-mean minus the base's, from the prediction files; mbpp (no rot_acc) is
    left out; significant harm exactly where the interval lies below zero."""
    path, data = report
    other = data["elsewhere"]
    assert list(other) == ["commonsense_qa"]

    def rot(name: str) -> float:
        rows = _predictions(study, name, "commonsense_qa").values()
        return 100.0 * sum(float(r["rot_correct"]) for r in rows) / len(rows)

    full = other["commonsense_qa"]["unisd-full"]
    assert full["seeds"] == 2
    assert full["diff_pct"] == pytest.approx((rot("unisd-full@0") + rot("unisd-full@1")) / 2 - rot("base"))
    assert other["commonsense_qa"]["gkd"]["diff_pct"] == pytest.approx(rot("gkd") - rot("base"))
    assert "base" not in other["commonsense_qa"]
    table = _section(
        path.read_text(), "## Elsewhere: rotation-invariant letter accuracy (rot_acc) on the other benchmarks"
    )
    for label, row in other["commonsense_qa"].items():
        line = next(line for line in table.splitlines() if line.startswith(f"| {label} |"))
        assert line.rstrip(" |").endswith("commonsense_qa" if row["hi"] < 0 else "none")


def test_against_the_paper_on_the_headline(report, study):
    path, data = report
    section = _section(path.read_text(), "## Against the paper")
    assert "sciq rotation-invariant letter accuracy (rot_acc), test split), each model pooled over its seeds" in section
    assert "interval lies above zero" in section
    rows = [line for line in section.splitlines() if line.startswith("| unisd-full (2 seeds) − ")]
    assert len(rows) == 2  # the label pooled over its seeds, against base and against the best baseline
    rot = {
        name: _metrics(study, name)["benchmarks"]["sciq"]["rot_acc"]
        for name in ("unisd-full@0", "unisd-full@1", "base", "sft")
    }
    for row, reference, target in zip(rows, ("base", "sft"), (5.4, 2.8)):
        gap = (rot["unisd-full@0"] + rot["unisd-full@1"]) / 2 - rot[reference]
        lo = float(re.search(r"\[([-+0-9.]+),", row).group(1))
        verdict = "reached" if gap >= target and lo > 0 else "not resolved" if gap >= target else "**not reached**"
        assert f"({reference})" in row and f"+{target}" in row and f"{gap:+.1f} [" in row
        assert row.rstrip(" |").endswith(f"| {verdict}")


def test_flips_count_the_prediction_files(report, study):
    path, data = report
    flips = data["flips"]["unisd-full@1"]
    assert flips["reference"] == "base"  # no base run of seed 1: the first base run
    for bench in BENCHES:
        run, base = _predictions(study, "unisd-full@1", bench), _predictions(study, "base", bench)
        for metric, key in (("rot_acc", "rot_correct"), ("score", "correct")):
            if key not in run[f"{bench}-0"]:
                assert metric not in flips["benchmarks"][bench]
                continue
            gained = sum(max(0.0, run[i][key] - base[i][key]) for i in run)  # a tie's half credit counts half
            lost = sum(max(0.0, base[i][key] - run[i][key]) for i in run)
            assert flips["benchmarks"][bench][metric] == {"wrong_to_right": gained, "right_to_wrong": lost}
    assert "base" not in data["flips"]
    row = next(
        line
        for line in _section(path.read_text(), "## Flips against the base model").splitlines()
        if line.startswith("| unisd-full@1 |")
    )
    c = flips["benchmarks"]["sciq"]
    assert (
        f"rot +{c['rot_acc']['wrong_to_right']} −{c['rot_acc']['right_to_wrong']} · gen "
        f"+{c['score']['wrong_to_right']} −{c['score']['right_to_wrong']}"
    ) in row


def test_sections_and_references(report, study):
    path, data = report
    text = path.read_text()
    assert "most demanding comparison" in text
    assert data["vs_best_baseline"]["unisd-full@0"]["reference"] == "sft"
    assert data["components"]["ema"]["reference"] == "sd" and "base" not in data["vs_base"]
    ema = data["components"]["ema"]["overall"]
    assert ema["diff_pct"] == pytest.approx(
        data["scores"]["ema"]["overall"]["score"] - data["scores"]["sd"]["overall"]["score"]
    )
    pair = data["interactions"]["ema+contrastive"]
    overall = {n: data["scores"][n]["overall"]["score"] for n in ("sd", "ema", "contrastive", "ema+contrastive")}
    assert pair["interaction"] == pytest.approx(
        overall["ema+contrastive"] - overall["ema"] - overall["contrastive"] + overall["sd"]
    )
    loo = data["leave_one_out"]["full-no-ema"]
    assert loo["reference"] == "unisd-full@0" and loo["overall"]["diff_pct"] > 0
    assert "token − sequence (retrieval)" in data["agreement"]
    seeds = data["seeds"]["unisd-full"]
    rot = [_metrics(study, f"unisd-full@{s}")["benchmarks"]["sciq"]["rot_acc"] for s in (0, 1)]
    assert seeds["overall"]["n_seeds"] == 2 and seeds["headline"]["mean"] == pytest.approx(sum(rot) / 2)
    assert seeds["overall"]["mean"] == pytest.approx(
        (data["scores"]["unisd-full@0"]["overall"]["score"] + data["scores"]["unisd-full@1"]["overall"]["score"]) / 2
    )
    for heading in (
        "## Gain over the base model (generative)",
        "## Gain over the best baseline (generative)",
        "## Drift and fit",
        "## Component gains",
        "## Interactions",
        "## Leave-one-out",
        "## Agreement variants",
        "## Training",
        "- wall time: 123 s",
    ):
        assert heading in text


def test_training_and_teacher_diagnostics(report, study):
    path, data = report
    last_round = Path(study["models"]["unisd-full@0"]["curves"][-1]).read_text().splitlines()
    # two rounds of 5 steps (s = 1..5 each): mean clipped 0.1*3, mean weight 1 - 0.01*3, min weight 1 - 0.1*5
    train = data["training"]["unisd-full@0"]
    assert (train["steps"], train["teacher_updates"]) == (10, 2)
    assert train["final_loss"] == json.loads(last_round[-1])["loss"]
    assert (train["token_weight_mean"], train["token_weight_min"], train["clipped_frac"]) == pytest.approx(
        (0.97, 0.5, 0.3)
    )
    assert train["rounds"] == {k: [r[k] for r in FILTER_ROUNDS] for k in FILTER_ROUNDS[0] if k != "kept"}
    section = _section(path.read_text(), "## Training")
    row = next(
        line for line in section.split("### Teacher diagnostics")[1].splitlines() if line.startswith("| unisd-full@0 |")
    )
    assert row == (
        "| unisd-full@0 | -0.69 / -0.37; -1.2 / -0.4 | 0.5 / 0.25; 0.55 / 0.3 | 0.3; 0.35 | 3; 1 "
        "| 0.25; 0.3 | 0.5; 0.4 | 0.998; 0.99 |"
    )
    assert "| sft |" not in section.split("### Teacher diagnostics")[1]  # no filter stats


def test_partial_study_names_missing_cells(study, tmp_path):
    cells = {
        "base-s0": {
            "status": "done",
            "wall_time_s": 7200.0,
            "computed": True,
            "finished": "2026-12-01T10:00",
            "code": {"evaluate": "abcdef0123456789", "train": "0123456789ab"},
        },
        "sft-s0": {"status": "unrecorded"},
        "gkd-s0": {"status": "missing"},
        "opsd-s0": {"status": "stale", "wall_time_s": 60.0, "computed": False},
    }
    small = {**study, "cells": cells, "models": {n: study["models"][n] for n in ("base", "sft")}}
    text = write_report(small, tmp_path).read_text()
    assert "- cells: 2 of 4 evaluated; not in this report: gkd-s0 (missing), opsd-s0 (stale)" in text
    table = _section(text, "## Wall time per cell")
    assert "| base-s0 | done | 7200 s (2.00 h) | 2026-12-01T10:00 | evaluate abcdef01 / train 01234567 |" in table
    assert "| opsd-s0 | stale | 60 s (0.02 h), from cache | — | — |" in table
    assert "| gkd-s0 | missing | — | — | — |" in table


def test_missing_inputs_skip_sections_and_figures(study, tmp_path):
    small = {
        **study,
        "models": {n: {k: v for k, v in study["models"][n].items() if k != "curves"} for n in ("base", "sft")},
    }
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "components.png").write_bytes(b"from an earlier report")
    data = json.loads((write_report(small, tmp_path).parent / "report.json").read_text())
    assert set(data["figures"]) == {"scores", "drift"}
    assert set(data["skipped_figures"]) == {"components", "curves"}
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["drift.png", "scores.png"]
    text = (tmp_path / "report.md").read_text()
    assert "components: skipped" in text and "## Component gains" not in text
    assert "## Against the paper" not in text and "## Wall time per cell" not in text


def test_old_metrics_files_fall_back_to_generative(tmp_path):
    """Evaluations from before the letter-probability metrics: the report still builds,
    leads with generative accuracy, says why, and leaves the new columns out."""
    models = {n: MODELS[n] for n in ("base", "gkd", "unisd-full@0")}
    old = _study(tmp_path / "old", models, new=False)
    text = write_report(old, tmp_path / "out").read_text()
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (data["headline"]["metric"], data["headline"]["benchmark"]) == ("score", "sciq")
    assert "rot_acc is missing for every run" in text
    assert "| model | gen |" in _section(text, "### sciq")  # no other columns: no run states them
    gkd = _metrics(old, "gkd")["benchmarks"]["sciq"]["score"] - _metrics(old, "base")["benchmarks"]["sciq"]["score"]
    assert data["headline"]["runs"]["gkd"]["vs_base"]["diff_pct"] == pytest.approx(gkd)
    # one new evaluation among old ones: every run must have the headline metric
    new = _study(tmp_path / "new", {"sft": MODELS["sft"]})["models"]
    mixed = {**old, "models": {**old["models"], **new}}
    text = write_report(mixed, tmp_path / "mixed").read_text()
    assert "rot_acc is missing for base, gkd, unisd-full@0" in text


LETTER_ONLY = ("rot_correct", "circular_correct", "rot_acc", "circular_acc", "rot_gold_prob", "mcq_rot_overall")


def test_open_answer_study_leads_with_option_log_likelihood(study, tmp_path):
    """`mcq_format: open_answer` evaluations have no letter scores: the report leads with
    the declared ll_acc headline, gives it intervals, and picks the best baseline by it."""
    names = ("base", "sft", "gkd", "unisd-full@0")
    models = {}
    for name in names:
        folder = _copy_eval(study, name, tmp_path / name)
        for bench in BENCHES:
            path = folder / "predictions" / f"{bench}.jsonl"
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            path.write_text(
                "".join(json.dumps({k: v for k, v in r.items() if k not in LETTER_ONLY}) + "\n" for r in rows)
            )
        metrics = json.loads((folder / "metrics.json").read_text())
        for m in metrics["benchmarks"].values():
            for key in LETTER_ONLY:
                m.pop(key, None)
        metrics.pop("mcq_rot_overall")
        sciq = metrics["benchmarks"]["sciq"]
        metrics["headline"] = {"benchmark": "sciq", "metric": "ll_acc", "value": sciq["ll_acc"]}
        (folder / "metrics.json").write_text(json.dumps(metrics))
        models[name] = {**study["models"][name], "eval_dir": str(folder)}
    text = write_report({**study, "models": models}, tmp_path / "out").read_text()
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    ll = {name: _metrics({"models": models}, name)["benchmarks"]["sciq"]["ll_acc"] for name in names}
    assert (data["headline"]["metric"], data["headline"]["benchmark"]) == ("ll_acc", "sciq")
    assert "## Headline: sciq option log-likelihood accuracy (ll_acc)" in text
    assert data["best_baseline"] == max(("sft", "gkd"), key=ll.get)
    gain = data["headline"]["runs"]["unisd-full@0"]["vs_base"]["diff_pct"]
    assert gain == pytest.approx(ll["unisd-full@0"] - ll["base"])
    cell = data["mcq"]["runs"]["gkd"]["sciq"]["ll_acc"]
    assert cell["score"] == pytest.approx(ll["gkd"]) and cell["lo"] <= cell["score"] <= cell["hi"]
    assert "| model | LL | gen | LL norm | parsed |" in _section(text, "### sciq")
    assert "| model | LL | gen |" in _section(text, "### MCQ pooled")


def _copy_eval(study: dict, name: str, folder: Path) -> Path:
    source = Path(study["models"][name]["eval_dir"])
    (folder / "predictions").mkdir(parents=True)
    for bench in BENCHES:
        (folder / "predictions" / f"{bench}.jsonl").write_text((source / "predictions" / f"{bench}.jsonl").read_text())
    (folder / "metrics.json").write_text((source / "metrics.json").read_text())
    return folder


def test_stale_predictions_are_an_error(study, tmp_path):
    folder = _copy_eval(study, "base", tmp_path / "eval")
    rows = (folder / "predictions" / "mbpp.jsonl").read_text().splitlines()
    (folder / "predictions" / "mbpp.jsonl").write_text("\n".join(rows[:-1]) + "\n")
    with pytest.raises(ReportError, match="metrics.json says"):
        write_report({**study, "models": {"base": {"eval_dir": str(folder)}}}, tmp_path / "out")


def test_rot_acc_must_match_its_predictions(study, tmp_path):
    folder = _copy_eval(study, "base", tmp_path / "eval")
    path = folder / "predictions" / "sciq.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "rot_correct"}) + "\n" for r in rows))
    with pytest.raises(ReportError, match="has rot_acc but predictions lack rot_correct"):
        write_report({**study, "models": {"base": {"eval_dir": str(folder)}}}, tmp_path / "out")
    rows[0]["rot_correct"] = not rows[0]["rot_correct"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ReportError, match="rot_acc="):
        write_report({**study, "models": {"base": {"eval_dir": str(folder)}}}, tmp_path / "out")


def test_aggregates_must_be_the_mean_of_their_benchmarks(study, tmp_path):
    folder = _copy_eval(study, "base", tmp_path / "eval")
    metrics = json.loads((folder / "metrics.json").read_text())
    (folder / "metrics.json").write_text(json.dumps({**metrics, "mcq_rot_overall": metrics["mcq_rot_overall"] + 1}))
    with pytest.raises(ReportError, match="mcq_rot_overall"):
        write_report({**study, "models": {"base": {"eval_dir": str(folder)}}}, tmp_path / "out")
