"""The Triton kernels compiled for sm_80 and sm_90 without a GPU, as training launches them (docs/gpu.md).

The launches are recorded from an attention layer's forward and backward (sat/compile_report.py) and built by
the kernels' own launcher for the target (sat.kernels.triton_compile): the runtime's constants (stride 1,
per-head flag 1) and divisibility hints, the launch options. A few binaries stand for the full table that
`python -m sat.warmup --report` writes to bench/results: the ones that used to spill, and the
Hopper tiles for blocks of 32.
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                reason="compiles the real kernels; the interpreter replaces them")
triton = pytest.importorskip("triton")

from sat.compile_report import record_training_launches  # noqa: E402
from sat.kernels.triton_compile import Binary, compile_launch, launch_key, ptxas_report  # noqa: E402
from sat.kernels.triton_support import fp32_precision  # noqa: E402
from sat.warmup import Shape  # noqa: E402

VIT_S = Shape("vit-s", 224, 6, 64, 32, 0.1)
LISTOPS = Shape("lra-listops", 2048, 2, 32, 64, 0.04)


def _launches(shape: Shape, dtype: torch.dtype, arch: int, padded: bool = True, precision: str = "ieee") -> dict:
    with fp32_precision(precision):
        launches = record_training_launches(shape, dtype, padded, (arch // 10, arch % 10))
    return {launch.name: launch for launch in launches}


def test_recorded_launches_are_what_training_hands_the_kernels():
    launches = _launches(VIT_S, torch.bfloat16, 90)
    assert list(launches) == ["_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq"]
    fwd, pre = launches["_attn_fwd"], launches["_attn_bwd_preprocess"]
    names = fwd.kernel.arg_names
    arg = dict(zip(names, fwd.args, strict=False))
    H, D, N = VIT_S.heads, VIT_S.head_dim, VIT_S.seq_len
    assert arg["stride_qn"] == arg["stride_kn"] == 3 * H * D  # q, k, v: views of one projection
    assert arg["K"].data_ptr() - arg["Q"].data_ptr() == H * D * 2
    assert arg["stride_kpmn"] == 1 and arg["stride_kpmb"] == N and arg["lut_per_head"] == 0
    dkdv = dict(zip(launches["_attn_bwd_dkdv"].kernel.arg_names, launches["_attn_bwd_dkdv"].args, strict=False))
    assert dkdv["stride_don"] == H * D  # dO: the transposed gradient of (B, N, H*D)
    assert fwd.grid == (4, H, 2) and fwd.options["GROUP"] == 2  # 7 blocks of 32 in 64-row programs
    for launch in launches.values():  # every launch states its warps and stages (none left to defaults)
        assert {"num_warps", "num_stages", "enable_fp_fusion"} <= set(launch.options)
    assert pre.options["num_warps"] == 4 and pre.options["num_stages"] == 1
    assert launch_key(fwd) == launch_key(_launches(VIT_S, torch.bfloat16, 90)["_attn_fwd"])  # deterministic
    assert launch_key(fwd) != launch_key(_launches(VIT_S, torch.bfloat16, 90, padded=False)["_attn_fwd"])


def test_delta_pre_pass_compiles_as_launched():
    """Launched with Triton's default warps it was compiled with others; fp32 32 x 64 spilled with 2 warps."""
    launch = _launches(VIT_S, torch.float32, 90)["_attn_bwd_preprocess"]
    b = compile_launch(launch, 90)
    assert (b.num_warps, b.num_stages) == (launch.options["num_warps"], launch.options["num_stages"]) == (4, 1)
    assert b.problems() == []


def test_exact_fp32_backward_compiles_without_spills():
    """ViT-S fp32 dK/dV used 255 registers and spilled on sm_90 with 4 warps."""
    launch = _launches(VIT_S, torch.float32, 90)["_attn_bwd_dkdv"]
    assert launch.options["DOT_PREC"] == "ieee"
    b = compile_launch(launch, 90)
    assert b.problems() == [] and b.spills == 0 and b.mma == "none"
    assert b.constants == ("stride_kpmn",) and b.divisible >= 25  # the runtime's own specialisation
    assert b.num_warps == launch.options["num_warps"] and b.num_stages == launch.options["num_stages"]


def test_tf32_backward_on_ampere_compiles_without_spills():
    """Block 64 in TF32 walked 64 query rows per step and spilled on sm_80; now tensor cores, no spill."""
    launch = _launches(LISTOPS, torch.float32, 80, precision="tf32")["_attn_bwd_dkdv"]
    assert launch.options["DOT_PREC"] == "tf32"
    b = compile_launch(launch, 80)
    assert b.problems() == [] and b.mma == "mma.sync"


@pytest.mark.parametrize("arch,mma", [(90, "wgmma"), (80, "mma.sync")])
def test_block_32_tiles_use_each_gpus_tensor_core_instruction(arch, mma):
    b = compile_launch(_launches(VIT_S, torch.bfloat16, arch, padded=False)["_attn_fwd"], arch)
    assert b.mma == mma and b.problems() == [] and b.constants == ()  # no padding mask: no stride of 1


def test_per_head_layouts_get_the_runtime_constant():
    shape = Shape("per-head", 256, 2, 32, 32, 0.25, per_head=True)
    launch = _launches(shape, torch.float16, 80, padded=False)["_attn_bwd_dq"]
    assert compile_launch(launch, 80).constants == ("lut_per_head",)


def test_ptxas_report_parsing_and_problems():
    log = ("ptxas info    : Used 255 registers, used 1 barriers, 548 bytes cumulative stack size\n"
           "ptxas info    : Function properties for k\n    548 bytes stack frame, 548 bytes spill stores, "
           "520 bytes spill loads\n")
    assert ptxas_report(log) == (255, 548, 520)
    with pytest.raises(RuntimeError, match="no register report"):
        ptxas_report("ptxas fatal")
    b = Binary("k", 80, 4, 2, 200 * 1024, 255, 548, 520, "none", (), 0)
    assert len(b.problems()) == 2 and b.spills == 1068
    assert Binary("k", 90, 4, 2, 200 * 1024, 96, 0, 0, "wgmma", (), 0).problems() == []
