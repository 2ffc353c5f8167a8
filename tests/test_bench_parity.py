"""bench/parity.py's statistics: paired differences with a 95% t interval, means and spreads per mode."""

import importlib.util
import json
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
    assert "learned - dense (paired, 2 seeds) top-1: +0.00 points" in text
    assert "per seed -1.0, +1.0" in text and "wall-time ratio dense/learned 2.00x" in text
    assert "0.600" in text  # mean recall of the learned runs


def test_cached_run_records_each_run_and_does_not_repeat_it(tmp_path, monkeypatch):
    calls = []

    def fake_run(root, task, preset, seed, mode, extra, threads=0, data_dir=None):
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

    def fake_run(root, task, preset, seed, mode, extra, threads=0, data_dir=None):
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


@pytest.mark.parametrize("mode, mlp, switch", [
    ("all-dense", "dense", False), ("s2d", "monarch", False), ("switch", "dense", True), ("full", "monarch", True)])
def test_vit_modes_set_the_mlp_and_the_switch_and_read_the_release(tmp_path, monkeypatch, mode, mlp, switch):
    """The ViT rows: each names its MLP and whether attention switches, keeps the task's own switch rule, and
    passes no --data_dir (the ViT tasks read the installed release, not a folder under --root)."""
    from sat.cli import overrides_from_args, run_parser
    from sat.config import load_config

    seen = []

    def fake_subprocess_run(cmd, **kwargs):
        seen.append(cmd)
        out = RunPaths.make(tmp_path, 7, "imagenet-vit-ti", cmd[cmd.index("--name") + 1]).summary
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result(7, 0.5, 1.0)))

    monkeypatch.setattr(parity.subprocess, "run", fake_subprocess_run)
    parity.run(tmp_path, "imagenet-vit-ti", "fashion", 7, mode, [])
    assert "--data_dir" not in seen[0]
    args = run_parser("main_train.py", "", ["train", "eval"]).parse_args(seen[0][2:])
    cfg = load_config(args.task, args.preset, overrides_from_args(args))
    assert (cfg.model.mlp, cfg.sparsity.enabled) == (mlp, switch)
    assert (cfg.sparsity.pattern, cfg.sparsity.keep_diagonal) == ("learned", False)  # the ViT task's own rule


def vit_result(seed, acc, top5, wall, step, densify, start, end):
    return {**result(seed, acc, wall, step, 0.3 if step else None, 0.1 if step else None), "test_top5": top5,
            "densify_step": densify, "params_at_start": start, "params_at_end": end, "best_step": 1200}


def test_report_for_the_vit_rows_has_top5_parameters_and_the_extra_pairs():
    results = {
        "all-dense": [vit_result(1, 0.80, 0.99, 100.0, None, None, 160, 160),
                      vit_result(2, 0.82, 0.98, 100.0, None, None, 160, 160)],
        "full": [vit_result(1, 0.79, 0.97, 50.0, 480, 840, 90, 160),
                 vit_result(2, 0.80, 0.99, 50.0, 480, 840, 90, 160)],
        "s2d": [vit_result(1, 0.81, 0.98, 80.0, None, 840, 90, 160),
                vit_result(2, 0.83, 0.99, 80.0, None, 840, 90, 160)]}
    text = parity.report("imagenet-vit-ti", "fashion", results, [("full", "s2d")])
    assert "full - all-dense (paired, 2 seeds) top-1: -1.50 points" in text
    assert "full - all-dense (paired, 2 seeds) top-5: -0.50 points" in text
    assert "wall-time ratio all-dense/full 2.00x" in text
    assert "full - s2d (paired, 2 seeds) top-1: -2.50 points" in text and "per seed -2.0, -3.0" in text
    assert "parameters 90 at the start, 160 at the end (S2D at step 840)" in text
    assert "parameters 160 at the start, 160 at the end\n" in text
    assert "tested checkpoints trained past the switch" in text.split("s2d")[0]  # full switched
    assert "0 of 2" not in text  # no such line for the rows that never switch
    row = next(ln for ln in text.splitlines() if ln.startswith("  1 full"))
    assert row.split()[2:5] == ["79.00", "97.00", "50.0"]


def test_pairs_must_name_two_of_the_modes(tmp_path, monkeypatch):
    import sys

    monkeypatch.setattr(sys, "argv", ["parity.py", "--modes", "dense", "learned", "--pairs", "learned:coverage",
                                      "--root", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        parity.main()
    assert e.value.code == 2
