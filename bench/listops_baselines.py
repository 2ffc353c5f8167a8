"""What a ListOps accuracy means: the test accuracy of two rules that need no model, on processed data.

    python bench/listops_baselines.py DATA_DIR [DATA_DIR ...]

- majority: always the most frequent training label;
- outermost operator: the most frequent training label among trees whose first token (the outermost operator,
  the sequence's first token once the parentheses are removed) is the same as the test tree's.

A Transformer whose accuracy sits near the second rule has learned to read the first token and little more.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def rule_accuracies(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> dict:
    """(n, N) ids and (n,) labels of both splits -> {'majority': acc, 'outermost operator': acc}."""
    majority = Counter(train_y.tolist()).most_common(1)[0][0]
    by_op: dict[int, int] = {}
    for op in np.unique(train_x[:, 0]):
        by_op[int(op)] = Counter(train_y[train_x[:, 0] == op].tolist()).most_common(1)[0][0]
    guess = np.array([by_op.get(int(op), majority) for op in test_x[:, 0]])
    return {"majority": float(np.mean(test_y == majority)), "outermost operator": float(np.mean(guess == test_y))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("data_dirs", nargs="+", help="folders holding lra-listops.{train,test}.npz")
    a = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from sat.data.format import load_split  # reads the .npz without pickle

    print(f"{'data':<40} {'test trees':>10} {'mean length':>12} {'majority %':>11} {'outermost op %':>15}")
    for d in a.data_dirs:
        train, test = load_split(Path(d), "lra-listops", "train"), load_split(Path(d), "lra-listops", "test")
        acc = rule_accuracies(train.x, train.y, test.x, test.y)
        print(f"{d:<40} {len(test.y):>10} {float(np.mean(train.lengths)):>12.1f} {100 * acc['majority']:>11.2f} "
              f"{100 * acc['outermost operator']:>15.2f}")


if __name__ == "__main__":
    main()
