"""bench/parity.py's statistics: paired differences with a 95% t interval, means and spreads per mode."""

import importlib.util
import math

import pytest

from sat.runlog import RunPaths
from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("parity", ROOT / "bench" / "parity.py")
parity = importlib.util.module_from_spec(spec)
spec.loader.exec_module(parity)


def result(seed, acc, wall, step=None, recall=None, density=None):
    return {"seed": seed, "test_accuracy": acc, "wall_s": wall, "transition_step": step,
            "transition_reason": "criteria" if step else None, "density_used": density,
            "layout_recall": None if recall is None else {"mean": recall}, "dense_steps_per_sec": 5.0,
            "sparse_steps_per_sec": 9.0 if step else None}


def test_ci95_matches_the_t_interval():
    m, h = parity.ci95([1.0, 2.0, 3.0])
    assert m == 2.0 and math.isclose(h, 4.303 * 1.0 / math.sqrt(3))
    assert math.isnan(parity.ci95([1.0])[1])


def test_report_pairs_seeds_and_reports_ratio():
    results = {"dense": [result(1, 0.40, 100.0), result(2, 0.42, 110.0)],
               "learned": [result(1, 0.39, 50.0, 30, 0.5, 0.25), result(2, 0.43, 55.0, 40, 0.7, 0.25)]}
    text = parity.report("lra-listops", "quick", results)
    assert "learned - dense (paired, 2 seeds): +0.00 points" in text
    assert "per seed -1.0, +1.0" in text and "wall-time ratio dense/learned 2.00x" in text
    assert "0.600" in text  # mean recall of the learned runs


def test_cached_run_records_each_run_and_does_not_repeat_it(tmp_path, monkeypatch):
    calls = []

    def fake_run(root, task, preset, seed, mode, extra, threads=0):
        calls.append((seed, mode))
        return {**result(seed, 0.5, 10.0), "mode": mode}

    monkeypatch.setattr(parity, "run", fake_run)
    first = parity.cached_run(tmp_path, "lra-listops", "quick", 7, "dense", [])
    again = parity.cached_run(tmp_path, "lra-listops", "quick", 7, "dense", [])
    other = parity.cached_run(tmp_path, "lra-listops", "quick", 7, "coverage", [])
    assert calls == [(7, "dense"), (7, "coverage")]
    assert again == first and other["mode"] == "coverage"
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("mode, pattern, diagonal", [
    ("learned", "learned", False), ("measured", "measured", False), ("coverage", "coverage", False),
    ("measured-diag", "measured", True), ("random-diag", "random", True), ("forced-first", "measured", True),
    ("rows-diag", "measured", True), ("stripes-diag", "measured", True)])
def test_each_mode_fixes_its_settings_whatever_the_defaults(tmp_path, monkeypatch, mode, pattern, diagonal):
    """A mode passes main_train.py both its settings, and they parse as the config keys they name, so a row
    means the same rule whatever the task's default pattern is."""
    import json

    from sat.cli import overrides_from_args, run_parser
    from sat.config import load_config

    seen = []

    def fake_subprocess_run(cmd, **kwargs):
        seen.append(cmd)
        name = cmd[cmd.index("--name") + 1]
        out = RunPaths.make(tmp_path, 7, "lra-listops", name).summary
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result(7, 0.5, 1.0, 30, 0.9, 0.1)))

    monkeypatch.setattr(parity.subprocess, "run", fake_subprocess_run)
    r = parity.run(tmp_path, "lra-listops", "quick", 7, mode, [])
    assert r["mode"] == mode and seen[0][seen[0].index("--name") + 1] == f"{mode}-7"
    args = run_parser("main_train.py", "", ["train", "eval"]).parse_args(seen[0][2:])  # after python, script
    o = overrides_from_args(args)  # merged over the task's values: both keys set here win over its defaults
    assert (o["sparsity"]["pattern"], o["sparsity"]["keep_diagonal"]) == (pattern, diagonal)
    cfg = load_config(args.task, args.preset, o)
    assert (cfg.sparsity.pattern, cfg.sparsity.keep_diagonal) == (pattern, diagonal)
    assert (cfg.sparsity.max_dense_steps == 1) == (mode == "forced-first")  # the control switches at once
    assert cfg.sparsity.selection == {"rows-diag": "rows", "stripes-diag": "stripes"}.get(mode, "global")


def test_jobs_run_every_planned_run_once_and_keep_the_table_order(tmp_path, monkeypatch):
    import sys

    seen = []

    def fake_run(root, task, preset, seed, mode, extra, threads=0):
        seen.append((seed, mode, threads))
        return {**result(seed, 0.5 + seed / 100, 10.0), "mode": mode}

    monkeypatch.setattr(parity, "run", fake_run)
    monkeypatch.setattr(parity, "prepare_data", lambda *a: None, raising=False)
    monkeypatch.setattr(sys, "argv", ["parity.py", "--preset", "quick", "--modes", "dense", "measured-diag",
                                      "random-diag", "--seeds", "1", "2", "--extra_seeds", "1", "--jobs", "2",
                                      "--root", str(tmp_path), "--out", str(tmp_path / "t.txt")])
    monkeypatch.setattr("sat.data.loading.prepare_data", lambda *a: None)
    parity.main()
    assert sorted(seen) == sorted([(1, "dense", 1), (1, "measured-diag", 1), (2, "dense", 1),
                                   (2, "measured-diag", 1), (1, "random-diag", 1)])
    lines = (tmp_path / "t.txt").read_text().split("per run:")[1].splitlines()
    assert [ln.split()[1] for ln in lines if ln.startswith("  ")] == [
        "dense", "dense", "measured-diag", "measured-diag", "random-diag"]
    assert [ln.split()[0] for ln in lines if ln.startswith("  ")] == ["1", "2", "1", "2", "1"]


def test_report_says_which_tested_checkpoints_were_trained_sparse():
    dense = {**result(1, 0.40, 100.0), "best_step": 500}
    early = {**result(1, 0.41, 60.0, 300, 0.9, 0.2), "best_step": 1250}  # best after the switch
    late = {**result(2, 0.40, 90.0, 1000, 0.9, 0.2), "best_step": 500}  # best before: a dense model
    assert parity.tested_phase(early) == "sparse" and parity.tested_phase(late) == "dense"
    assert parity.tested_phase({**late, "best_step": 1000}) == "dense"  # evaluated at the switch step
    text = parity.report("lra-listops", "quick", {"dense": [dense], "coverage": [early, late]})
    assert "1 of 2 tested checkpoints trained past the switch" in text
    assert "1250(sparse)" in text and "500(dense)" in text


def test_listops_rules_read_the_first_token():
    import numpy as np

    spec = importlib.util.spec_from_file_location("listops_baselines", ROOT / "bench" / "listops_baselines.py")
    rules = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rules)
    # operator 2 ([MAX) -> mostly 9, operator 1 ([MIN) -> mostly 0; 9 is the majority overall
    train_x = np.array([[2, 7], [2, 6], [2, 8], [1, 7], [1, 9], [2, 6]])
    train_y = np.array([9, 9, 4, 0, 0, 9])
    test_x = np.array([[1, 5], [2, 5], [1, 6], [3, 6]])  # operator 3 never seen: the majority's answer
    test_y = np.array([0, 9, 3, 9])
    acc = rules.rule_accuracies(train_x, train_y, test_x, test_y)
    assert acc == {"majority": 0.5, "outermost operator": 0.75}
