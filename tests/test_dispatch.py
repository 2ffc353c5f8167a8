"""Which attention backend a call gets (docs/gpu.md): a function of dtype, block size, head dim, batch and device,
so it is tested without a GPU. "auto" never hands Triton a shape it cannot run; "triton" with one is a one-line
error before training starts. Also the fp32 precision policy and the launch configuration it selects."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sat.kernels import block_sparse_attention, check_backend, fp32_matmul_precision, reference_attention
from sat.kernels import triton_support as ts
from sat.kernels.triton_support import launch_config
from tests.conftest import ROOT, small_listops
from tests.fixtures import SMALL, nothing_written, refused

CUDA = torch.device("cuda")


@pytest.fixture
def triton_installed(monkeypatch):
    """Dispatch as on a machine with Triton installed (the decision must not depend on this one's)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(ts, "triton_installed", lambda: True)
    ts.forget_logged()


def _auto(caplog, *args, **kwargs) -> tuple[str, list[str]]:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sat.kernels"):
        choice = check_backend("auto", *args, **kwargs)
    return choice, [r.getMessage() for r in caplog.records]


SUPPORTED = [  # (dtype, block, head_dim, batch): every configured LRA / ViT shape and the limits
    (torch.bfloat16, 64, 32, 128), (torch.float16, 32, 32, 512), (torch.bfloat16, 32, 64, 128),
    (torch.float32, 32, 32, 32), (torch.float32, 16, 16, 1), (torch.bfloat16, 128, 128, 65535),
]
UNSUPPORTED = [  # (dtype, block, head_dim, batch, what the reason names)
    (torch.float32, 8, 16, 8, "block_size 8"),  # the ViT `tiny` preset
    (torch.float64, 32, 32, 4, "dtype float64"),
    (torch.bfloat16, 32, 8, 4, "head_dim 8"),
    (torch.bfloat16, 32, 256, 4, "head_dim 256"),
    (torch.bfloat16, 32, 32, 65536, "batch 65536"),
    (torch.bfloat16, 24, 32, 4, "block_size 24"),
]


@pytest.mark.parametrize("dtype,block,head_dim,batch", SUPPORTED)
def test_auto_takes_triton_for_supported_cuda_shapes(triton_installed, caplog, dtype, block, head_dim, batch):
    assert _auto(caplog, dtype, block, head_dim, batch, CUDA) == ("triton", [])
    assert check_backend("triton", dtype, block, head_dim, batch, CUDA) == "triton"


@pytest.mark.parametrize("dtype,block,head_dim,batch,reason", UNSUPPORTED)
def test_auto_falls_back_to_torch_once_with_the_reason(triton_installed, caplog, dtype, block, head_dim, batch,
                                                        reason):
    choice, logged = _auto(caplog, dtype, block, head_dim, batch, CUDA)
    assert choice == "torch"
    assert len(logged) == 1 and reason in logged[0] and "\n" not in logged[0], logged
    assert _auto(caplog, dtype, block, head_dim, batch, CUDA) == ("torch", [])  # said once


@pytest.mark.parametrize("dtype,block,head_dim,batch,reason", UNSUPPORTED)
def test_explicit_triton_with_unsupported_shape_is_a_one_line_error(triton_installed, dtype, block, head_dim,
                                                                     batch, reason):
    with pytest.raises(ValueError) as err:
        check_backend("triton", dtype, block, head_dim, batch, CUDA)
    assert reason in str(err.value) and "\n" not in str(err.value) and "--backend torch" in str(err.value)


def test_too_many_heads_go_to_torch(triton_installed, caplog):
    assert _auto(caplog, torch.bfloat16, 32, 32, 4, CUDA, heads=70000)[0] == "torch"
    with pytest.raises(ValueError, match="heads"):
        check_backend("triton", torch.bfloat16, 32, 32, 4, CUDA, heads=70000)


def test_cpu_and_missing_triton(triton_installed, caplog, monkeypatch):
    assert _auto(caplog, torch.float32, 32, 32, 4, torch.device("cpu")) == ("torch", [])  # nothing to explain
    with pytest.raises(ValueError, match="device cpu is not a CUDA GPU"):
        check_backend("triton", torch.float32, 32, 32, 4, "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter runs CPU tensors
    assert check_backend("triton", torch.float32, 32, 32, 4, "cpu") == "triton"
    monkeypatch.setattr(ts, "triton_installed", lambda: False)
    choice, logged = _auto(caplog, torch.bfloat16, 32, 32, 4, CUDA)
    assert choice == "torch" and len(logged) == 1 and "Triton is not installed" in logged[0]
    with pytest.raises(ValueError, match="Triton is not installed"):
        check_backend("triton", torch.bfloat16, 32, 32, 4, CUDA)


def test_other_backends_pass_through():
    for backend in ("torch", "reference"):
        assert check_backend(backend, torch.float64, 8, 4, 10**6, "cuda") == backend
    with pytest.raises(ValueError, match="unknown attention backend"):
        check_backend("fast", torch.float32, 32, 32, 4, "cpu")


def test_entry_point_dispatches_per_call(monkeypatch):
    """block_sparse_attention asks check_backend with the call's own shapes (heads included)."""
    seen = []

    def spy(backend, dtype, block, head_dim, batch, device, heads=1):
        seen.append((backend, dtype, block, head_dim, batch, torch.device(device).type, heads))
        return "torch"

    monkeypatch.setattr("sat.kernels.check_backend", spy)
    q, k, v = (torch.randn(3, 2, 32, 16) for _ in range(3))
    layout = torch.ones(1, 2, 2, dtype=torch.bool)
    out = block_sparse_attention(q, k, v, layout, 16)
    torch.testing.assert_close(out, reference_attention(q, k, v, layout, 16))
    assert seen == [("auto", torch.float32, 16, 16, 3, "cpu", 2)]


# ------------------------------------------------------------------------------------------- precision policy


@pytest.fixture
def restore_precision():
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    yield
    matmul.fp32_precision = before


def test_fp32_precision_follows_pytorch(restore_precision):
    matmul = torch.backends.cuda.matmul
    matmul.fp32_precision = "ieee"
    assert fp32_matmul_precision() == "ieee"
    matmul.fp32_precision = "tf32"
    assert fp32_matmul_precision() == "tf32"
    matmul.fp32_precision = "none"  # PyTorch's default: exact fp32
    assert fp32_matmul_precision() == "ieee"
    torch.set_float32_matmul_precision("high")  # the older switch, reflected by the newer one
    assert fp32_matmul_precision() == "tf32"
    torch.set_float32_matmul_precision("highest")
    assert fp32_matmul_precision() == "ieee"


def test_launch_config_follows_precision_and_gpu():
    for cap in ((8, 0), (9, 0)):
        exact = launch_config(32, 64, torch.float32, cap, "ieee")
        assert exact.dot_prec == "ieee" and exact.group == 1  # FMA loops: no tensor-core tile to widen
        assert launch_config(32, 64, torch.float32, cap, "tf32").dot_prec == "tf32"
    # Hopper: 64-row programs for blocks of 32 and 16 (wgmma); Ampere keeps one block per program
    assert launch_config(32, 64, torch.bfloat16, (9, 0)).group == 2
    assert launch_config(16, 32, torch.float16, (9, 0)).group == 4
    assert launch_config(32, 64, torch.float32, (9, 0), "tf32").group == 2
    assert launch_config(32, 64, torch.bfloat16, (8, 0)).group == 1
    assert launch_config(64, 32, torch.bfloat16, (9, 0)).group == 1
    with pytest.raises(ValueError, match="float64"):
        launch_config(32, 32, torch.float64, (8, 0))


@pytest.mark.parametrize("cap", [(8, 0), (9, 0)])
@pytest.mark.parametrize("dtype,precision", [(torch.bfloat16, "ieee"), (torch.float16, "ieee"),
                                             (torch.float32, "ieee"), (torch.float32, "tf32")])
@pytest.mark.parametrize("block", [16, 32, 64, 128])
@pytest.mark.parametrize("head_dim", [16, 32, 48, 64, 128])
def test_launch_config_tiles_fit_the_kernels(cap, dtype, precision, block, head_dim):
    """What the kernels assume of their tiles, for every supported case."""
    c = launch_config(block, head_dim, dtype, cap, precision)
    assert c.block_d >= head_dim and c.block_d & (c.block_d - 1) == 0
    assert block % c.step == 0 and c.step >= 16  # a loop step never straddles two layout blocks
    assert 1 <= c.group <= 4
    assert c.rows == c.group * block if c.group > 1 else block % c.rows == 0  # whole blocks, or within one
    assert block % c.pre_rows == 0 and c.num_warps in (2, 4, 8) and c.num_stages in (2, 3)


# ------------------------------------------------------------------------------------------------ training CLI


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return small_listops(tmp_path_factory.mktemp("listops"), 24, 6, 6, seed=4)


def _train(tmp_path: Path, data: Path, env: dict, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, str(ROOT / "main_train.py"), "--task", "lra-listops", *SMALL, "--data_dir", str(data),
            "--root", str(tmp_path), "--name", "run", "--device", "cpu", *extra]
    return subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)


def test_training_with_triton_it_cannot_run_stops_before_it_starts(data, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = _train(tmp_path, data, env, "--backend", "triton")
    refused(r, "device cpu is not a CUDA GPU")
    nothing_written(tmp_path)
    # in the interpreter the device is fine, and the shape (SMALL has head_dim 8) is what it cannot run
    r = _train(tmp_path, data, {**env, "TRITON_INTERPRET": "1"}, "--backend", "triton")
    refused(r, "head_dim 8 is outside 16..128")
    nothing_written(tmp_path)


# ------------------------------------------------------------------------------------------------ package


def test_kernels_package_has_no_import_cycle():
    """Every import between sat.kernels modules, function-level ones included, forms no cycle; the package's
    __init__ only imports from its modules, and no module takes a name from the package's __init__."""
    import ast

    pkg = ROOT / "sat" / "kernels"
    modules = {p.stem: p for p in pkg.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sat.kernels"):
                target = node.module.removeprefix("sat.kernels").lstrip(".") or "__init__"
                if target == "__init__":  # `from sat.kernels import x`: x is a module or a name of __init__
                    deps |= {a.name if a.name in modules else "__init__" for a in node.names}
                else:
                    deps.add(target)
            elif isinstance(node, ast.Import):
                deps |= {a.name.removeprefix("sat.kernels.") for a in node.names if a.name.startswith("sat.kernels.")}
        graph[name] = deps - {name}
    assert all("__init__" not in deps for name, deps in graph.items() if name != "__init__"), graph
    visiting, done = set(), set()

    def visit(name: str, path: list[str]) -> None:
        assert name not in visiting, f"import cycle: {' -> '.join(path + [name])}"
        if name in done:
            return
        visiting.add(name)
        for dep in graph.get(name, ()):
            visit(dep, path + [name])
        visiting.discard(name)
        done.add(name)

    for name in graph:
        visit(name, [])
    assert graph["blocksparse_triton"] == {"triton_support"} and "triton_support" in graph["__init__"]
