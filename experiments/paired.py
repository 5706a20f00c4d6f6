"""Paired differences between two evaluations of the same items (b − a), with the
project's paired bootstrap and flip counts (unisd.stats), per score the files hold
(open_answer evaluations have no rotation score).

    python experiments/paired.py BASE/predictions/sciq.jsonl TRAINED/predictions/sciq.jsonl
"""

import json
import sys

from unisd.stats import flip_counts, paired_test

SCORES = ("correct", "rot_correct", "ll_correct", "ll_norm_correct")


def scores(path: str, key: str) -> dict[str, float]:
    with open(path) as fh:
        return {row["id"]: float(row[key]) for row in map(json.loads, fh) if key in row}


def main(base: str, trained: str) -> None:
    for key in SCORES:
        a, b = scores(base, key), scores(trained, key)
        if not a or not b:
            continue
        test = paired_test(b, a)
        print(key, json.dumps({**test, **flip_counts(b, a)}))


if __name__ == "__main__":
    main(*sys.argv[1:])
