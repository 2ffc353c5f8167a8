"""What a tiny run writes to TensorBoard, read back from its event file: the switch's pictures (layouts with the
added diagonal blocks in their own colour, the dense attention with the layout outlined) at a readable size, the
monitor's scalars beside their thresholds and the custom-scalars layout that plots them together; and the text
log of a run that never switches."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import sat.train
from sat.config import load_config
from sat.runlog import RunPaths
from sat.viz import ACTIVE, ADDED, OUTLINE
from tests.fixtures import TASK, write_lra_data

# N=16 in blocks of 4: a 4x4 grid; density 0.125 keeps 2 blocks, so with SAT's top-k (the diagonal not kept, as
# it is by the LRA default) at least two query-block rows are empty and get their diagonal block from the
# "no empty row" rule
SMALL = {"dataset": {"max_seq_len": 16},
         "model": {"num_layers": 2, "dim": 8, "hidden_dim": 16, "head_dim": 4, "dropout": 0.0, "attn_dropout": 0.0},
         "training": {"batch_size": 4, "train_steps": 6, "warmup_steps": 1, "eval_frequency": 3},
         "sparsity": {"block_size": 4, "density": 0.125, "max_dense_steps": 4, "pattern": "learned",
                      "keep_diagonal": False}}


def _run(tmp_path, **sparsity):
    data = write_lra_data(tmp_path / "data")
    cfg = load_config(TASK, overrides={**SMALL, "sparsity": {**SMALL["sparsity"], **sparsity}})
    paths = RunPaths.make(tmp_path, 1, TASK, "tb")
    summary = sat.train.train(cfg, paths, data, backend="torch", progress=False)
    return paths, summary


def _events(paths: RunPaths):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(paths.tensorboard), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _pixels(event) -> np.ndarray:
    """An image event as an (H, W, 3) uint8 array, decoded from the PNG TensorBoard stores."""
    return np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))


def _has(img: np.ndarray, colour: tuple[int, int, int]) -> bool:
    return bool((img == np.array(colour, dtype=np.uint8)).all(axis=-1).any())


@pytest.fixture(scope="module")
def switched(tmp_path_factory):
    paths, summary = _run(tmp_path_factory.mktemp("tb"))
    return paths, summary, _events(paths)


def test_switch_pictures_are_readable_and_mark_the_added_blocks(switched):
    paths, summary, acc = switched
    assert summary["transition_step"] == 4 and summary["added_diagonal_blocks"] >= 2 * 2  # both layers
    images = acc.Tags()["images"]
    for layer in (0, 1):
        (layout,) = acc.Images(f"layout/layer{layer}")
        (overlay,) = acc.Images(f"attention_vs_layout/layer{layer}")
        assert layout.step == overlay.step == 4
        for event in (layout, overlay):
            assert event.width >= 256 and event.height >= 256, (event.width, event.height)
        lay = _pixels(layout)
        assert lay.shape[:2] == (layout.height, layout.width)
        assert _has(lay, ACTIVE) and _has(lay, ADDED)  # chosen blocks and the rule's blocks, told apart
        assert _has(_pixels(overlay), OUTLINE)
    assert sorted(images) == ["attention_vs_layout/layer0", "attention_vs_layout/layer1", "layout/layer0",
                              "layout/layer1"]


def test_monitor_scalars_and_their_custom_scalars_layout(switched):
    from tensorboard.plugins.custom_scalar import layout_pb2

    _, _, acc = switched
    scalars = set(acc.Tags()["scalars"])
    want = {"monitor/skewness/layer0", "monitor/skewness/layer1", "monitor/drift/layer0", "monitor/drift/layer1",
            "monitor/threshold/sk", "monitor/threshold/ds", "transition/sparsify", "train/loss", "val/accuracy"}
    assert want <= scalars, want - scalars
    assert {e.step for e in acc.Scalars("monitor/skewness/layer0")} == {1, 2, 3, 4}  # every dense step, logged after it
    assert [e.value for e in acc.Scalars("monitor/threshold/sk")][0] == pytest.approx(1.7)
    (config,) = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    skew = next(tags for title, tags in charts.items() if title.startswith("skewness"))
    drift = next(tags for title, tags in charts.items() if title.startswith("drift"))
    assert skew == ["monitor/skewness/layer0$", "monitor/skewness/layer1$", "monitor/threshold/sk$"]
    assert drift == ["monitor/drift/layer0$", "monitor/drift/layer1$", "monitor/threshold/ds$"]


def test_a_run_that_never_switches_logs_no_none(tmp_path):
    """No switch (criteria never met, no backstop): the log's lines say so in words, never `None`; start lines
    name the data folder and the batch; 10 classes, so top-5 is reported."""
    paths, summary = _run(tmp_path, sk=1e9, max_dense_steps=0)
    assert summary["transition_step"] is None
    log = paths.text_log.read_text()
    assert "None" not in log and "attention stayed dense" in log
    assert f"data: {tmp_path / 'data'};" in log
    assert "batch: 4 examples a step, 4 on each of 1 rank(s)" in log
    assert "step 3: dev accuracy" in log and "top-5" in log and "(dense)" in log
