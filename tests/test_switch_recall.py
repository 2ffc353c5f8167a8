"""The layout recall measured at the switch (and the coverage pattern that uses the same measurement) through
the real command line: written to the log and summary.json, and the training trajectory left unchanged."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, small_listops
from tests.fixtures import TinyRun

RUN = TinyRun(seed=4, steps=10, dense_steps=5).replace(sets={
    "model.num_layers": 2, "training.eval_frequency": 5, "training.warmup_steps": 2, "sparsity.block_size": 8,
    "sparsity.density": 0.2})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return small_listops(tmp_path_factory.mktemp("listops"), 40, 12, 8, seed=3)


def run(root, data, name, *extra) -> tuple[dict, list[str], str]:
    argv = RUN.argv(*extra, root=root, data=data, name=name)
    r = subprocess.run([sys.executable, str(ROOT / "main_train.py"), *argv], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    paths = RUN.paths(root=root, name=name)
    return (json.loads(paths.summary.read_text()), paths.losses.read_text().splitlines(), paths.text_log.read_text())


def test_recall_is_reported_and_changes_nothing(tmp_path, data):
    one, losses_one, log = run(tmp_path, data, "one", "--set=sparsity.recall_batches=1")
    three, losses_three, _ = run(tmp_path, data, "three", "--set=sparsity.recall_batches=3")
    assert losses_one == losses_three  # measuring on more dev batches does not move the run
    rec = one["layout_recall"]
    assert len(rec["layers"]) == 2 and 0 < rec["mean"] <= 1
    assert rec["mean"] == pytest.approx(sum(x["recall"] for x in rec["layers"]) / 2)
    assert rec["layers"][0]["curve"]["0.5"] >= rec["layers"][0]["curve"]["0.1"]
    assert one["layout_recall"] != three["layout_recall"]  # ... but it measures on them
    assert "layer 1 layout recall" in log and "mean layout recall" in log
    assert "step 5: dev accuracy" in log and "(sparse, switched at step 5)" in log  # evaluated after the switch
    assert "None" not in log and "switched to sparse at step 5 (forced)" in log
    assert (one["pattern"], one["keep_diagonal"]) == ("measured", True)  # the LRA default
    assert len(rec["density_per_layer"]) == 2


def test_coverage_keeps_the_target_mass(tmp_path, data):
    s, _, log = run(tmp_path, data, "cov", "--set=sparsity.pattern=\"coverage\"", "--set=sparsity.recall_target=0.8",
                    "--set=sparsity.max_density=1.0")
    rec = s["layout_recall"]
    assert s["pattern"] == "coverage" and s["transition_step"] == 5
    for layer in rec["layers"]:
        assert layer["recall"] >= 0.8 - 1e-9  # the mass it was chosen to keep, on the same batches
        assert layer["density_for_recall"]["0.9"] is not None
    assert s["density_used"] == pytest.approx(sum(rec["density_per_layer"]) / 2)


@pytest.mark.parametrize("pattern", ["measured", "coverage"])
def test_keep_diagonal_layouts_keep_every_diagonal_block(tmp_path, data, pattern):
    import torch

    s, _, _ = run(tmp_path, data, pattern, f"--set=sparsity.pattern=\"{pattern}\"", "--set=sparsity.keep_diagonal=true")
    assert s["transition_step"] == 5 and s["added_diagonal_blocks"] == 0  # no row can be left empty
    ckpt = torch.load(RUN.paths(root=tmp_path, name=pattern).last, map_location="cpu", weights_only=True)
    state = ckpt["model"] if "model" in ckpt else ckpt
    layouts = [v for k, v in state.items() if k.endswith("attn.pattern.layout")]
    assert len(layouts) == 2
    for layout in layouts:  # (1, nb, nb): nb = 64 / 8
        assert bool(layout[0].diagonal().all())
        if pattern == "measured":  # int(64 * 0.2) = 12 blocks, 8 of them the diagonal
            assert int(layout.sum()) == 12
