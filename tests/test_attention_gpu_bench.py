"""bench/attention_gpu.py covers what users train with: every configured block size the Triton kernels run and
every input dtype (fp32 exact and with TF32), so the GPU table, when a GPU is lent, answers for real runs."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from sat.kernels.triton_support import DTYPES, triton_shape_problem
from sat.warmup import configured_shapes
from tests.conftest import ROOT


def _bench():
    spec = importlib.util.spec_from_file_location("attention_gpu", ROOT / "bench" / "attention_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_defaults_cover_every_configured_block_and_dtype():
    bench = _bench()
    shapes, source = configured_shapes()
    assert source == "config.py"
    blocks = {s.block_size for s in shapes if not triton_shape_problem(torch.bfloat16, s.block_size, s.head_dim, 1)}
    assert {32, 64} <= blocks
    for argv in ([], ["--quick"]):
        args = bench.parse_args(argv)
        assert blocks <= set(args.block) and set(args.dtype) == set(DTYPES)
    assert bench.parse_args(["--dtype", "tf32", "--block", "32"]).dtype == ["tf32"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--dtype", "fp8"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_needs_a_gpu(capsys):
    assert _bench().main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
