"""The attention module's three paths compute the same function: SDPA (unmonitored dense steps), the explicit
form of monitored steps (which also yields the monitor's map and the pattern loss), and block-sparse with a
full layout."""

import torch

from sat.models.attention import Attention


def setup():
    torch.manual_seed(0)
    attn = Attention(16, 2, 8, 64, 16, attn_dropout=0.0).eval()
    x = torch.randn(3, 64, 16)
    mask = torch.arange(64) < torch.tensor([[64], [30], [5]])
    return attn, x, mask


def test_monitored_and_unmonitored_dense_paths_agree():
    attn, x, mask = setup()
    monitored = attn(x, mask, collect=True)
    stats = attn.stats
    plain = attn(x, mask)
    torch.testing.assert_close(monitored, plain, atol=1e-5, rtol=1e-5)
    assert stats.mean_map.shape == (64, 64)
    torch.testing.assert_close(stats.mean_map.sum(-1), torch.ones(64))  # rows of probabilities
    assert stats.mean_map[:, 30:].max() < stats.mean_map[:, :5].min()  # padded keys get less mass
    stats.pattern_loss.backward()
    assert attn.pattern.weight.grad is not None and attn.pattern.weight.grad.abs().sum() > 0
    assert attn.qkv.weight.grad is None  # the pattern loss does not pull the attention towards G


def test_sparse_with_full_layout_equals_dense():
    attn, x, mask = setup()
    dense = attn(x, mask)
    attn.sparsify(1.0)
    assert attn.is_sparse and bool(attn.pattern.layout.all()) and not attn.pattern.weight.requires_grad
    torch.testing.assert_close(attn(x, mask), dense, atol=1e-5, rtol=1e-5)


def test_a_loaded_sparse_state_makes_the_layer_sparse():
    attn, x, mask = setup()
    attn.sparsify(0.5)
    state = attn.state_dict()
    assert state["pattern._extra_state"].dtype == torch.bool and bool(state["pattern._extra_state"])
    fresh, _, _ = setup()
    assert not fresh.is_sparse and fresh._attend == fresh._dense_cpu
    fresh.load_state_dict(state)
    assert fresh.is_sparse and fresh._attend == fresh._sparse and not fresh.pattern.weight.requires_grad
    torch.testing.assert_close(fresh(x, mask), attn(x, mask))


def test_a_checkpoint_from_before_the_pattern_state_module_loads():
    attn, x, mask = setup()
    attn.sparsify(0.5)
    renamed = {"pattern.weight": "pattern_weight", "pattern.mean": "pattern_mean", "pattern.count": "pattern_count",
               "pattern.layout": "layout"}
    old = {renamed.get(k, k): v for k, v in attn.state_dict().items() if k != "pattern._extra_state"}
    old["sparse"] = torch.tensor(True)
    fresh, _, _ = setup()
    fresh.load_state_dict(old)
    assert fresh.is_sparse and torch.equal(fresh.pattern.layout, attn.pattern.layout)
    torch.testing.assert_close(fresh(x, mask), attn(x, mask))


# --- the fused dense path of monitored steps (and of unmonitored CPU training steps with attention dropout) ----

import math  # noqa: E402

import pytest  # noqa: E402

from sat.kernels.dense import dense_attention  # noqa: E402
from sat.kernels.dropout_mask import keep_mask, keep_mask_scale, masked_scale  # noqa: E402
from sat.kernels.runtime import RUNTIME  # noqa: E402
from sat.models.dropout import Dropout  # noqa: E402
from sat.sparsity.pattern import block_pool  # noqa: E402


def explicit_attention(q, k, v, mask, keep=None, scale=1.0):
    """softmax(q k^T / sqrt(d) + padding bias), NaN rows (no unmasked key) -> 0, then dropout by `keep`."""
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    dropped = p if keep is None else p * keep * scale
    return dropped @ v, p


@pytest.mark.parametrize("p_drop", [0.0, 0.3])
@pytest.mark.parametrize("chunk_elements", [1 << 21, 4096])  # one chunk; one batch element per chunk
def test_fused_dense_attention_matches_explicit_form(p_drop, chunk_elements):
    torch.manual_seed(0)
    B, H, N, D, bs = 3, 2, 32, 8, 8
    q, k, v = (torch.randn(B, H, N, D, dtype=torch.float64).float().requires_grad_() for _ in range(3))
    mask = torch.arange(N) < torch.tensor([[N], [11], [0]])  # full, padded, every key padded
    torch.manual_seed(5)
    out, head_sum, pooled = dense_attention(q, k, v, mask, p_drop, bs, collect=True, chunk_elements=chunk_elements)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    keep = None
    if p_drop:  # the same masks, drawn chunk by chunk in the same order from the same seed
        torch.manual_seed(5)
        rows = max(1, chunk_elements // (H * N * N)) * H
        keep = torch.cat([keep_mask((min(rows, B * H - r), N, N), p_drop, "cpu") for r in range(0, B * H, rows)])
        keep = keep.view(B, H, N, N)
    ref_out, ref_p = explicit_attention(q, k, v, mask, keep, keep_mask_scale(p_drop))
    ref_grads = torch.autograd.grad(ref_out, (q, k, v), grad)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head_sum, ref_p.sum(0), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(pooled, block_pool(ref_p, bs), atol=1e-6, rtol=1e-6)
    assert out[2].abs().max() == 0 and not out.isnan().any()  # every key padded -> zeros
    if p_drop:
        assert 0.2 < 1 - keep.float().mean() < 0.4  # the masks really drop


def test_fused_dense_attention_without_statistics_returns_empty_maps():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 16, 4) for _ in range(3))
    out, head_sum, pooled = dense_attention(q, k, v, None, 0.0, 8, collect=False)
    assert head_sum.numel() == 0 and pooled.numel() == 0
    torch.testing.assert_close(out, explicit_attention(q, k, v, None)[0], atol=1e-5, rtol=1e-5)


def test_keep_mask_rate_and_scale():
    torch.manual_seed(0)
    for p in (0.0, 0.1, 0.5):
        keep = keep_mask((1 << 20,), p, "cpu")
        dropped = round(p * 65536) / 65536
        assert keep.dtype == torch.bool
        assert abs((1 - keep.float().mean().item()) - dropped) < 5 * math.sqrt(dropped * (1 - dropped) / 2**20) + 1e-9
        assert keep_mask_scale(p) == pytest.approx(1 / (1 - dropped))
    assert keep_mask_scale(1.0) == 0.0 and not keep_mask((100,), 1.0, "cpu").any()


def test_dropout_module_is_masked_scaling_and_identity_in_eval():
    torch.manual_seed(0)
    drop = Dropout(0.25)
    x = torch.randn(64, 128, requires_grad=True)
    torch.manual_seed(3)
    y = drop(x)
    torch.manual_seed(3)
    keep = keep_mask((64, 128), 0.25, "cpu")
    torch.testing.assert_close(y, x * keep * keep_mask_scale(0.25))
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, keep * keep_mask_scale(0.25) * torch.ones_like(x))
    assert 0.2 < (y == 0).float().mean() < 0.3
    drop.eval()
    assert drop(x) is x


def test_monitored_and_unmonitored_training_steps_draw_the_same_dropout():
    """On a CPU with attention dropout both dense paths are the fused function: same seed, same output."""
    torch.manual_seed(0)
    attn = Attention(16, 2, 8, 32, 8, attn_dropout=0.2).train()
    x = torch.randn(2, 32, 16)
    mask = torch.arange(32) < torch.tensor([[32], [20]])
    torch.manual_seed(1)
    monitored = attn(x, mask, collect=True)
    torch.manual_seed(1)
    plain = attn(x, mask)
    torch.testing.assert_close(monitored, plain, atol=0, rtol=0)
    with RUNTIME.override(cpu_dropout_path="sdpa"):  # SDPA's own dropout: a different draw, same distribution
        sdpa = attn(x, mask)
    assert RUNTIME.cpu_dropout_path == "fused"
    assert sdpa.shape == plain.shape and not torch.equal(sdpa, plain)


def test_sparse_phase_recompute_gives_the_same_gradients():
    """model.recompute=sparse replays each block's forward in the backward, dropout masks included."""
    from sat.config import load_config
    from sat.data.batch import Batch
    from sat.models.build import build_model

    results = []
    for recompute in ("off", "sparse"):
        cfg = load_config("lra-image", overrides={
            "dataset": {"max_seq_len": 64}, "model": {"recompute": recompute},
            "sparsity": {"block_size": 16, "density": 0.3}})
        torch.manual_seed(0)
        model = build_model(cfg, vocab_size=32, backend="torch").train()
        calls = []
        for layer in model.attention_layers():
            layer.sparsify(0.3)
            layer.register_forward_hook(lambda *args, calls=calls: calls.append(1))
        torch.manual_seed(1)
        data = Batch(torch.randint(0, 32, (4, 64)), torch.arange(64) < torch.tensor([[64], [40], [64], [9]]),
                     torch.randint(0, 10, (4,)))
        loss = torch.nn.functional.cross_entropy(model(data), data.y)
        loss.backward()
        assert len(calls) == (4 if recompute == "sparse" else 2)  # 2 layers, replayed in the backward
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss0, grads0), (loss1, grads1) = results
    torch.testing.assert_close(loss0, loss1, atol=0, rtol=0)
    assert grads0.keys() == grads1.keys() and len(grads0) > 10
    for name in grads0:
        torch.testing.assert_close(grads0[name], grads1[name], atol=1e-6, rtol=1e-5)


def test_low_precision_monitored_path_matches_fused_statistics():
    """bf16 inputs (mixed precision) take the unfused form; its output and statistics match the fp32 path."""
    attn, x, mask = setup()
    out32 = attn(x, mask, collect=True)
    stats32 = attn.stats
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = attn(x, mask, collect=True)
    stats16 = attn.stats
    torch.testing.assert_close(out16.float(), out32, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(stats16.mean_map, stats32.mean_map, atol=2e-2, rtol=0)
    torch.testing.assert_close(stats16.pattern_loss, stats32.pattern_loss, atol=1e-3, rtol=5e-2)


@pytest.mark.slow
def test_train_step_benchmark_runs():
    """bench/train_step.py end to end at the quick ListOps shapes (one layer and a class token, by --set: its
    random batch must leave a position free), one step per phase, under CPU autocast (bf16) and with SAT's
    learned layout (no diagonal rule) in place of the task's."""
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parent.parent / "bench" / "train_step.py"
    out = subprocess.run([sys.executable, str(bench), "--task", "lra-listops", "--preset", "quick", "--batch", "2",
                          "--steps", "1", "--set=model.num_layers=1", "--set=model.pooling=cls", "--amp", "bf16",
                          "--patterns", "learned"], capture_output=True, text=True, check=True).stdout
    assert ("lra-listops --preset quick shapes: 1 layers, dim 64, N=256, batch 2, block 32, density 0.25, "
            "pattern learned, amp bf16") in out
    for row in ("dense, monitored", "dense, not monitored", "dense, SDPA", "sparse", "model.recompute=sparse"):
        assert row in out
    assert "monitor share of a monitored dense step" in out


def test_float64_dense_steps_stay_in_float64():
    """The fused function computes in fp32, so float64 models take SDPA or the explicit form instead."""
    torch.manual_seed(0)
    attn = Attention(16, 2, 8, 32, 8, attn_dropout=0.0).double().eval()
    x = torch.randn(2, 32, 16, dtype=torch.float64)
    mask = torch.arange(32) < torch.tensor([[32], [0]])
    monitored = attn(x, mask, collect=True)
    plain = attn(x, mask)
    assert monitored.dtype == torch.float64 and not monitored.isnan().any()
    torch.testing.assert_close(monitored, plain, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("shape", [(7, 3), (3, 1 << 17), (2, 300, 1000)])
def test_masked_scale_is_the_product_without_a_float_mask(shape):
    """Chunk by chunk, any size (a chunk is 2^18 elements), non-contiguous inputs and bf16 included."""
    torch.manual_seed(8)
    x = torch.randn(shape)
    keep = keep_mask(shape, 0.3, "cpu")
    for inp in (x, x.transpose(0, -1).contiguous().transpose(0, -1), x.bfloat16()):
        for mask in (keep, keep.view(torch.uint8)):
            out = masked_scale(inp, mask, 1.25)
            assert out.is_contiguous() and out.dtype == inp.dtype
            assert torch.equal(out, inp * keep.to(inp.dtype) * 1.25)
