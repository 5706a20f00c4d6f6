"""The study report on a small fake study written to disk: files, figures, and numbers
that match the metrics files."""

import json
import random
import struct
from pathlib import Path

import pytest

from unisd.report import ReportError, write_report

BENCHES = ("sciq", "mbpp")
N = 40

# run name -> (accuracy per benchmark, study entry extras)
MODELS = {
    "base": ((0.40, 0.30), {"seed": 0}),
    "sft": ((0.45, 0.30), {"seed": 0, "curves": True}),
    "gkd": ((0.50, 0.35), {"seed": 0, "curves": True}),
    "sd": ((0.45, 0.35), {"seed": 0, "curves": True}),
    "ema": ((0.50, 0.40), {"seed": 0, "curves": True}),
    "contrastive": ((0.55, 0.35), {"seed": 0, "curves": True}),
    "ema+contrastive": ((0.60, 0.40), {"seed": 0, "kind": "pair", "components": ["ema", "contrastive"]}),
    "unisd-full@0": ((0.65, 0.45), {"seed": 0, "label": "unisd-full", "curves": True, "filter": True}),
    "unisd-full@1": ((0.60, 0.50), {"seed": 1, "label": "unisd-full", "curves": True, "filter": True}),
    "full-no-ema": ((0.55, 0.45), {"seed": 0, "kind": "leave_one_out", "components": ["ema"]}),
    "agreement_tok_retrieval": ((0.55, 0.40), {"seed": 0}),
    "agreement_seq_retrieval": ((0.50, 0.35), {"seed": 0}),
}


def _write_eval(folder: Path, label: str, accs: tuple[float, ...], rng: random.Random) -> None:
    """An evaluation folder as unisd.evaluate writes it: predictions and metrics.json."""
    (folder / "predictions").mkdir(parents=True)
    benchmarks = {}
    for bench, acc in zip(BENCHES, accs):
        correct = [i < round(acc * N) for i in range(N)]
        rng.shuffle(correct)
        rows = [{"id": f"{bench}-{i}", "benchmark": bench, "correct": c, "ppl_ret": 1.5 + rng.random(),
                 "gold_ppl": 3.0 + rng.random()} for i, c in enumerate(correct)]
        (folder / "predictions" / f"{bench}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        benchmarks[bench] = {"n": N, "score": 100.0 * sum(correct) / N,
                             "ppl_ret": sum(r["ppl_ret"] for r in rows) / N,
                             "gold_ppl": sum(r["gold_ppl"] for r in rows) / N, "jsd_to_base": rng.random() / 10}
    overall = sum(b["score"] for b in benchmarks.values()) / len(benchmarks)
    metrics = {"label": label, "split": "test", "overall": overall, "benchmarks": benchmarks}
    (folder / "metrics.json").write_text(json.dumps(metrics))


def _write_curves(path: Path, steps: int, rng: random.Random) -> None:
    rows = [{"step": s, "loss": 2.0 / s + rng.random() / 10, "divergence": 1.0 / s, "feature": 0.1 / s,
             "lr": 1e-5, "grad_norm": 1.0, "ema_update": int(s == 3), "clipped_frac": 0.1 * s, "token_weight_mean": 1.0 - 0.01 * s,
             "token_weight_min": 1.0 - 0.1 * s} for s in range(1, steps + 1)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("study")
    rng = random.Random(0)
    models = {}
    for name, (accs, extra) in MODELS.items():
        label = extra.get("label", name)
        _write_eval(root / name / "eval", label, accs, rng)
        entry = {"eval_dir": str(root / name / "eval"), "label": label, "seed": extra["seed"]}
        entry.update({k: extra[k] for k in ("kind", "components") if k in extra})
        if extra.get("curves"):
            rounds = [root / name / f"curves-{i}.jsonl" for i in range(2)]
            for path in rounds:
                _write_curves(path, 5, rng)
            entry["curves"] = [str(p) for p in rounds]
        if extra.get("filter"):
            (root / name / "stats.json").write_text(json.dumps({"kept": 30, "filtered_fraction": 0.25,
                                                                "disagreement_mean": 0.5}))
            entry["filter_stats"] = str(root / name / "stats.json")
        models[name] = entry
    return {"title": "fake study", "model": "tiny", "split": "test", "split_sizes": {b: N for b in BENCHES},
            "seeds": [0, 1], "budget": "2 rounds", "wall_time_s": 123.0, "n_boot": 2000, "models": models}


@pytest.fixture(scope="module")
def report(study, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    path = write_report(study, out)
    return path, json.loads((out / "report.json").read_text())


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


def test_scores_match_metrics_files(report, study):
    path, data = report
    text = path.read_text()
    for name, entry in study["models"].items():
        metrics = json.loads((Path(entry["eval_dir"]) / "metrics.json").read_text())
        cells = data["scores"][name]
        assert cells["overall"]["score"] == pytest.approx(metrics["overall"])
        for bench, m in metrics["benchmarks"].items():
            assert cells[bench]["score"] == pytest.approx(m["score"]) and cells[bench]["n"] == m["n"]
        for cell in cells.values():
            assert cell["lo"] <= cell["score"] <= cell["hi"]
        overall = cells["overall"]
        assert f"{overall['score']:.1f} [{overall['lo']:.1f}, {overall['hi']:.1f}] |" in text


def test_sections_and_references(report, study):
    path, data = report
    text = path.read_text()
    assert data["best_baseline"] == "gkd"  # the baseline with the best overall test score
    assert "most demanding comparison" in text
    assert data["components"]["ema"]["reference"] == "sd" and "base" not in data["vs_base"]
    ema = data["components"]["ema"]["overall"]
    assert ema["diff_pct"] == pytest.approx(data["scores"]["ema"]["overall"]["score"]
                                            - data["scores"]["sd"]["overall"]["score"])
    pair = data["interactions"]["ema+contrastive"]
    overall = {n: data["scores"][n]["overall"]["score"] for n in ("sd", "ema", "contrastive", "ema+contrastive")}
    assert pair["interaction"] == pytest.approx(overall["ema+contrastive"] - overall["ema"]
                                                - overall["contrastive"] + overall["sd"])
    loo = data["leave_one_out"]["full-no-ema"]
    assert loo["reference"] == "unisd-full@0" and loo["overall"]["diff_pct"] > 0
    assert "token − sequence (retrieval)" in data["agreement"]
    seeds = data["seeds"]["unisd-full"]["overall"]
    assert seeds["n_seeds"] == 2 and seeds["mean"] == pytest.approx(
        (data["scores"]["unisd-full@0"]["overall"]["score"] + data["scores"]["unisd-full@1"]["overall"]["score"]) / 2)
    last_round = Path(study["models"]["unisd-full@0"]["curves"][-1]).read_text().splitlines()
    # two rounds of 5 steps (s = 1..5 each): mean clipped 0.1*3, mean weight 1 - 0.01*3, min weight 1 - 0.1*5
    train = data["training"]["unisd-full@0"]
    assert {k: train[k] for k in ("steps", "final_loss", "teacher_updates", "disagreement", "filtered_fraction")} == {
        "steps": 10, "teacher_updates": 2, "final_loss": json.loads(last_round[-1])["loss"], "disagreement": [0.5], "filtered_fraction": [0.25]}
    assert (train["token_weight_mean"], train["token_weight_min"], train["clipped_frac"]) == pytest.approx((0.97, 0.5, 0.3))
    for heading in ("## Scores", "### Over seeds", "## Gain over the base model", "## Gain over the best baseline",
                    "## Drift and fit", "## Component gains", "## Interactions", "## Leave-one-out",
                    "## Agreement variants", "## Training", "- wall time: 123 s"):
        assert heading in text


def test_missing_inputs_skip_sections_and_figures(study, tmp_path):
    small = {**study, "models": {n: {k: v for k, v in study["models"][n].items() if k != "curves"}
                                 for n in ("base", "sft")}}
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "components.png").write_bytes(b"from an earlier report")
    data = json.loads((write_report(small, tmp_path).parent / "report.json").read_text())
    assert set(data["figures"]) == {"scores", "drift"}
    assert set(data["skipped_figures"]) == {"components", "curves"}
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["drift.png", "scores.png"]
    text = (tmp_path / "report.md").read_text()
    assert "components: skipped" in text and "## Component gains" not in text


def test_stale_predictions_are_an_error(study, tmp_path):
    entry = study["models"]["base"]
    folder = tmp_path / "eval"
    (folder / "predictions").mkdir(parents=True)
    for bench in BENCHES:
        rows = (Path(entry["eval_dir"]) / "predictions" / f"{bench}.jsonl").read_text().splitlines()
        (folder / "predictions" / f"{bench}.jsonl").write_text("\n".join(rows[:-1]) + "\n")
    (folder / "metrics.json").write_text((Path(entry["eval_dir"]) / "metrics.json").read_text())
    with pytest.raises(ReportError, match="metrics.json says"):
        write_report({**study, "models": {"base": {"eval_dir": str(folder)}}}, tmp_path / "out")


def test_against_the_paper_says_reached_or_not(report):
    path, data = report
    text = path.read_text()
    section = text[text.index("## Against the paper"):text.index("## Scores")]
    rows = [line for line in section.splitlines() if line.startswith("| unisd-full")]
    overall = {name: data["scores"][name]["overall"]["score"] for name in data["scores"]}
    expected = {"base": ("base", 5.4), "best baseline": (data["best_baseline"], 2.8)}
    assert len(rows) == 4  # both seeds of unisd-full, each against base and the best baseline
    for row in rows:
        name = row.split()[1]
        what = "best baseline" if "best baseline" in row else "base"
        reference, target = expected[what]
        gap = overall[name] - overall[reference]
        assert f"({reference})" in row and f"+{target}" in row
        assert row.rstrip(" |").endswith("reached" if gap >= target else "**not reached**")
