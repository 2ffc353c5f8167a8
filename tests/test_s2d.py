"""S2D: the scheduler's densify swap leaves an LRA encoder's outputs unchanged and reports parameter counts;
optimizer state of surviving parameters continues, the new dense parameters start fresh."""

import torch
import torch.nn.functional as F

from sat.config import load_config
from sat.data.batch import Batch
from sat.models.build import build_model
from sat.models.monarch import MonarchLinear
from sat.optim import make_optimizer
from sat.sparsity.scheduler import TransitionScheduler


def small_cfg(**sparsity):
    return load_config("lra-listops", overrides={
        "dataset": {"max_seq_len": 64},
        "model": {"num_layers": 2, "dim": 24, "hidden_dim": 40, "head_dim": 8, "mlp": "monarch", "nblocks": 4,
                  "dropout": 0.0, "attn_dropout": 0.0},
        "training": {"train_steps": 10},
        "sparsity": {"block_size": 16, "density": 0.25, "s2d_fraction": 0.7, **sparsity}})


def batch(n=64, b=3):
    x = torch.randint(1, 18, (b, n))
    mask = torch.arange(n) < torch.tensor([[n], [40], [17]])[:b]
    return Batch(x * mask, mask, torch.randint(0, 10, (b,)))


def test_densify_keeps_outputs_and_reports_counts():
    torch.manual_seed(0)
    cfg = small_cfg()
    model = build_model(cfg, vocab_size=18).eval()
    assert sum(isinstance(m, MonarchLinear) for m in model.modules()) == 2 * cfg.model.num_layers
    data = batch()
    with torch.no_grad():
        before = model(data)
    sched = TransitionScheduler(cfg.sparsity, cfg.model.num_layers, cfg.training.train_steps, has_monarch=True)
    assert sched.after_step(6, model) == []  # densify at int(0.7 * 10) = 7
    events = sched.after_step(7, model)
    assert [e.kind for e in events] == ["densify"] and sched.densify_step == 7
    d = events[0].details
    assert len(d["layers"]) == 4 and d["params_after"] > d["params_before"]
    assert not any(isinstance(m, MonarchLinear) for m in model.modules())
    with torch.no_grad():
        after = model(data)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_optimizer_state_survives_except_for_new_dense_parameters():
    torch.manual_seed(0)
    cfg = small_cfg(enabled=False)
    model = build_model(cfg, vocab_size=18)
    opt = make_optimizer(model, cfg)
    data = batch()
    F.cross_entropy(model(data), data.y).backward()
    opt.step()
    embed_state = {k: v.clone() for k, v in opt.state[model.embed.weight].items()}
    sched = TransitionScheduler(cfg.sparsity, cfg.model.num_layers, cfg.training.train_steps, has_monarch=True)
    sched.after_step(7, model)
    new_opt = make_optimizer(model, cfg, old=opt)
    assert all(torch.equal(new_opt.state[model.embed.weight][k], v) for k, v in embed_state.items())
    fc1 = model.blocks[0].mlp.fc1
    assert isinstance(fc1, torch.nn.Linear) and fc1.weight not in new_opt.state
