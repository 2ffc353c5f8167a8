"""ImageNet ViT: the model (shared attention/MLP blocks, padding to the block size, densify equivalence), its
configs, and end-to-end runs on a tiny generated image folder: one process, a resumed run, and two ranks under
torchrun (gloo on CPU) that must take both transitions at the same step."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from sat.config import ConfigError, load_config
from sat.data.batch import Batch
from sat.data.loading import resolve_for_data
from sat.models.attention import Attention
from sat.models.layers import EncoderBlock, Mlp
from sat.models.monarch import MonarchLinear
from sat.models.vit import ViT
from sat.sparsity.scheduler import TransitionScheduler
from tests.conftest import ROOT
from tests.fixtures import CLASSES, TinyRun, make_image_folder

TASK = "imagenet-vit-ti"


def tiny_cfg(**model):
    cfg = load_config(TASK, "tiny", {"dataset": {"num_classes": CLASSES}, "model": model})
    return cfg


def images(n: int = 3, size: int = 32) -> Batch:
    return Batch(x=torch.randn(n, 3, size, size), mask=None, y=torch.zeros(n, dtype=torch.long))


# ------------------------------------------------------------------------------------------------ model

def test_vit_is_built_from_the_shared_blocks_and_pads_to_the_block_size():
    cfg = tiny_cfg()
    assert cfg.dataset.max_seq_len == 24  # 1 + (32/8)^2 = 17 tokens -> 3 blocks of 8
    model = ViT(cfg, backend="torch")
    assert model.num_tokens == 17
    assert all(isinstance(b, EncoderBlock) and isinstance(b.mlp, Mlp) for b in model.blocks)
    layers = model.attention_layers()
    assert len(layers) == 2 and all(isinstance(a, Attention) for a in layers)
    assert isinstance(model.blocks[0].mlp.fc1, MonarchLinear)
    assert model.token_mask.tolist() == [[True] * 17 + [False] * 7]
    out = model(images(), collect=True)
    assert out.shape == (3, CLASSES)
    stats = [a.stats for a in model.attention_layers()]
    assert stats[0].mean_map.shape == (24, 24)
    assert torch.all(stats[0].mean_map[:, 17:] == 0)  # pad tokens are masked keys
    with pytest.raises(ValueError, match="32x32"):
        model(images(size=40))


def test_vit_sparse_phase_runs_on_the_padded_tokens():
    model = ViT(tiny_cfg(), backend="torch")
    for layer in model.attention_layers():
        layer.sparsify(0.4)
    out = model(images())
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert model.patch_embed.weight.grad is not None


@pytest.mark.parametrize("sparse", [False, True])
def test_densify_keeps_vit_outputs(sparse):
    torch.manual_seed(1)
    cfg = tiny_cfg(dropout=0.0, attn_dropout=0.0)
    model = ViT(cfg, backend="torch").eval()
    if sparse:
        for layer in model.attention_layers():
            layer.sparsify(0.4)
    batch = images(5)
    with torch.no_grad():
        before = model(batch)
    scheduler = TransitionScheduler(cfg.sparsity, cfg.model.num_layers, total_steps=10, has_monarch=True)
    assert scheduler.after_step(6, model) == []
    events = [e for e in scheduler.after_step(7, model) if e.kind == "densify"]  # int(0.7 * 10)
    assert len(events) == 1 and scheduler.densify_step == 7
    d = events[0].details
    assert len(d["layers"]) == 4 and d["params_after"] > d["params_before"]
    assert not any(isinstance(m, MonarchLinear) for m in model.modules())
    with torch.no_grad():
        after = model(batch)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- config

@pytest.mark.parametrize("task,dim,heads", [("imagenet-vit-ti", 192, 3), ("imagenet-vit-s", 384, 6)])
def test_reference_configs(task, dim, heads):
    cfg = load_config(task)
    m, d, t, s = cfg.model, cfg.dataset, cfg.training, cfg.sparsity
    assert (m.dim, m.num_heads, m.num_layers, m.hidden_dim, m.head_dim) == (dim, heads, 12, 4 * dim, 64)
    assert (d.img_size, d.patch_size, d.max_seq_len, s.block_size) == (224, 16, 224, 32)  # 197 -> 224
    assert (t.batch_size, t.learning_rate, t.weight_decay, m.mlp, m.nblocks, s.s2d_fraction) == \
        (128, 1e-3, 0.03, "monarch", 4, 0.7)
    assert m.pooling == "cls" and t.amp == "auto"


def test_img_size_override_rederives_the_padded_length():
    cfg = load_config(TASK, overrides={"dataset": {"img_size": 160}})
    assert cfg.dataset.max_seq_len == 128  # 1 + 10^2 = 101 tokens -> 4 blocks of 32


@pytest.mark.parametrize("task,overrides,match", [
    (TASK, {"dataset": {"img_sise": 32}}, "did you mean 'img_size'"),
    (TASK, {"dataset": {"img_size": 100}}, "multiple of dataset.patch_size"),
    (TASK, {"dataset": {"max_seq_len": 64}}, "shorter than the 197 image tokens"),
    ("lra-image", {"training": {"mixup": 0.8}}, "image_folder tasks only"),
    ("lra-image", {"model": {"pooling": "max"}}, "pooling must be .mean. or .cls."),
])
def test_bad_image_config_values(task, overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(task, overrides=overrides)


def test_epochs_become_steps():
    cfg = resolve_for_data(load_config(TASK), num_classes=1000, batches_per_epoch=1251)  # 8 x 128 per step
    assert cfg.training.train_steps == 300 * 1251 and cfg.training.warmup_steps == 5 * 1251
    with pytest.raises(ConfigError, match="warmup_epochs"):
        resolve_for_data(load_config(TASK, overrides={"training": {"epochs": 4}}), 1000, 1251)
    tiny = resolve_for_data(load_config(TASK, "tiny"), num_classes=7, batches_per_epoch=3)
    assert tiny.dataset.num_classes == 7 and tiny.training.train_steps == 30  # epochs 0: steps kept


# ------------------------------------------------------------------------------------------------- data

def _label_order(stream, n):
    return [next(stream).y.tolist() for _ in range(n)]


def test_image_stream_shards_and_resumes_at_the_batch(image_data):
    from sat.data.image_folder import ImageFolderDataset
    from sat.data.image_stream import ImageTrainStream
    from sat.data.image_transforms import eval_transform

    ds = ImageFolderDataset(image_data, "train", eval_transform(16))  # deterministic pixels
    full = ImageTrainStream(ds, 4, num_workers=0, seed=3)
    assert len(full) == 12
    first = [next(full) for _ in range(14)]  # into the second epoch
    assert sorted(sum((b.y.tolist() for b in first[:12]), [])) == sorted(ds.targets.tolist())
    resumed = ImageTrainStream(ds, 4, num_workers=0, seed=3)
    probe = ImageTrainStream(ds, 4, num_workers=0, seed=3)
    for _ in range(5):
        next(probe)
    resumed.load_state_dict(probe.state_dict())  # {epoch 0, 5 batches taken}
    for want in first[5:14]:
        got = next(resumed)
        assert torch.equal(got.x, want.x) and torch.equal(got.y, want.y)
    ranks = [ImageTrainStream(ds, 4, num_workers=0, seed=3, rank=r, world=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 6
    seen = [torch.cat([next(s).x for _ in range(6)]) for s in ranks]  # one epoch of each rank
    both = torch.cat(seen).flatten(1)
    assert torch.unique(both, dim=0).shape[0] == 48  # the two shards cover the set without overlap


# ------------------------------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def image_data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imagenet"))


STEPS, FORCED = 30, 10
# the preset's model, no --train_steps (each test says how long), no --root (the working folder)
VIT = TinyRun(task=TASK, steps=None, dense_steps=FORCED, device="cpu",
              flags=("--preset", "tiny", *TinyRun.flags, "--amp", "off"), sets={})


def run(args, cwd, launcher=(sys.executable,)):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launcher, *args], capture_output=True, text=True, cwd=cwd, timeout=300, env=env)


def summary(root, name):
    return json.loads(VIT.paths(root=root, name=name).summary.read_text())


def evaluate_saved(root, name, which):
    e = run([str(ROOT / "main_inference.py"), "--mode", "eval", "--task", TASK, "--random", "5",
             "--name", name, "--which", which, "--device", "cpu"], cwd=root)
    assert e.returncode == 0, e.stderr[-3000:]
    return json.loads(e.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_vit_trains_with_both_transitions_and_evaluates(tmp_path, image_data):
    # 48 images / batch 8 = 6 steps per epoch: --epochs 5 -> 30 steps. The monitor's criteria do not fire on
    # a model this small (the zero pad columns keep the maps' skewness negative), so the switch is forced.
    r = run([str(ROOT / "main_train.py"), *VIT.argv("--epochs", "5", data=image_data, name="vit")], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    s = summary(tmp_path, "vit")
    assert s["steps"] == STEPS and s["transition_step"] == FORCED and s["transition_reason"] == "forced"
    assert s["densify_step"] == int(0.7 * STEPS)
    assert 0.0 <= s["test_accuracy"] <= s["test_top5"] <= 1.0 and 0.0 <= s["dev_top5"] <= 1.0
    assert s["seq_len"] == 24 and s["world_size"] == 1
    log = VIT.paths(root=tmp_path, name="vit").text_log.read_text()
    m = re.search(r"step 21: MLPs densified \(S2D\): 4 Monarch layers -> dense; parameters (\d+) -> (\d+)", log)
    assert m and (s["params_at_start"], s["params_at_end"]) == (int(m[1]), int(m[2]))
    assert s["params_at_start"] < s["params_at_end"]  # Monarch factors are smaller than the dense matrices
    best = evaluate_saved(tmp_path, "vit", "best")
    assert best["accuracy"] == pytest.approx(s["test_accuracy"])
    assert best["top5"] == pytest.approx(s["test_top5"])
    last = evaluate_saved(tmp_path, "vit", "last")  # the densified, sparse-attention model of step 30
    assert last["checkpoint_step"] == STEPS and last["attention"] == "block-sparse" and last["examples"] == 16


@pytest.mark.slow
def test_vit_resume_at_an_epoch_boundary_is_exact(tmp_path, image_data):
    # Resume continues the sample order at the batch; augmentation streams restart per epoch, so a resume at
    # an epoch boundary (12 = 2 epochs, between the switch and the densify) reproduces the losses exactly.
    vit = VIT.replace(steps=STEPS, data=image_data, sets={"training.eval_frequency": 6})
    main_train = str(ROOT / "main_train.py")
    assert run([main_train, *vit.argv(name="full")], cwd=tmp_path).returncode == 0
    r = run([main_train, *vit.argv("--stop_at", "12", name="cut")], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run([main_train, *vit.argv("--resume", name="cut")], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    losses = [vit.paths(root=tmp_path, name=n).losses.read_text() for n in ("full", "cut")]
    assert losses[0] == losses[1] and len(losses[0].splitlines()) == STEPS
    a, b = summary(tmp_path, "full"), summary(tmp_path, "cut")
    for key in ("transition_step", "densify_step", "test_accuracy", "test_top5", "best_step"):
        assert a[key] == b[key], key


@pytest.mark.slow
def test_vit_two_ranks_switch_at_the_same_step(tmp_path, image_data):
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    r = run([str(ROOT / "main_train.py"), *VIT.argv(steps=STEPS, data=image_data, name="ddp")], cwd=tmp_path,
            launcher=launcher)
    assert r.returncode == 0, r.stderr[-5000:]
    steps = {}
    for rank, kind, step in re.findall(r"rank (\d)/2: (sparsify|densify) at step (\d+)", r.stderr):
        steps.setdefault(kind, {})[int(rank)] = int(step)
    assert steps == {"sparsify": {0: FORCED, 1: FORCED}, "densify": {0: 21, 1: 21}}
    s = summary(tmp_path, "ddp")
    assert s["world_size"] == 2 and s["global_batch_size"] == 16
    assert s["transition_step"] == FORCED and s["densify_step"] == 21 and s["steps"] == STEPS
    assert len(list(VIT.paths(root=tmp_path).log_dir.glob("ddp.log"))) == 1  # rank 0 alone writes
    last = evaluate_saved(tmp_path, "ddp", "last")
    assert last["checkpoint_step"] == STEPS and last["attention"] == "block-sparse"
    assert 0.0 <= last["accuracy"] <= last["top5"] <= 1.0
