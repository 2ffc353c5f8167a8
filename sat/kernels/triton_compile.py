"""Compile recorded Triton launches for an NVIDIA GPU without one, and read what the binaries use.

`compile_launch(launch, arch)` hands a launch recorded by `blocksparse_triton.record_launches` to the
kernel's own launcher (`JITFunction.run(..., warmup=True)`) under a stand-in driver that reports a CUDA
target of compute capability `arch` (80, 90). Triton therefore derives the signature, the constant
arguments (integers equal to 1), the divisibility-by-16 hints of pointers and integers and the options
exactly as a launch on that GPU would, compiles down to a cubin with the ptxas it ships, and nothing runs.
Registers and spills come from ptxas's own report (Triton prints it with knobs.nvidia.dump_ptxas_log),
shared memory from the kernel's metadata, the kind of matrix instruction from the PTX.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass

from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver

from sat.kernels.blocksparse_triton import Launch

# Shared memory one program may use (opt-in maximum per block): A100 and H100/H200.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@dataclass(frozen=True)
class Binary:
    """What one compiled kernel uses on one target."""

    kernel: str
    arch: int
    num_warps: int
    num_stages: int
    shared: int  # bytes of shared memory per program
    registers: int  # per thread
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    mma: str  # "wgmma", "mma.sync", both ("wgmma+mma.sync") or "none" (FMA only)
    constants: tuple[str, ...]  # integer arguments the runtime turned into constants (equal to 1)
    divisible: int  # arguments the runtime marked divisible by 16

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads

    def problems(self) -> list[str]:
        """What would make this binary fail or run badly: spills, too much shared memory."""
        out = []
        if self.spills:
            out.append(f"{self.spill_stores} B spill stores, {self.spill_loads} B spill loads")
        if self.shared > SHARED_LIMIT[self.arch]:
            out.append(f"{self.shared} B shared memory > {SHARED_LIMIT[self.arch]} B (sm_{self.arch})")
        return out


class _TargetDriver:
    """The three questions JITFunction.run asks the active driver, answered for a GPU that is not here."""

    def __init__(self, target: GPUTarget) -> None:
        self.target = target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target


@contextlib.contextmanager
def _compiling_for(arch: int, kernels: list) -> Iterator[None]:
    """Make the kernels' launchers build for sm_{arch} with ptxas's report printed and no cache hit."""
    previous = driver._active
    driver.set_active(_TargetDriver(GPUTarget("cuda", arch, 32)))
    for kernel in kernels:
        kernel.device_caches.clear()  # their launcher state is per target
    try:
        with knobs.nvidia.scope(), knobs.compilation.scope():
            knobs.nvidia.dump_ptxas_log = True
            knobs.compilation.always_compile = True  # a cached binary would skip ptxas and its report
            yield
    finally:
        for kernel in kernels:
            kernel.device_caches.clear()
        driver._active = previous


def ptxas_report(log: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from `ptxas -v` output of one kernel."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spills is None:
        raise RuntimeError(f"no register report in ptxas's output:\n{log[-2000:]}")
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))


def _mma_kind(ptx: str) -> str:
    kinds = [kind for kind, text in (("wgmma", "wgmma.mma_async"), ("mma.sync", "mma.sync")) if text in ptx]
    return "+".join(kinds) or "none"


def compile_launch(launch: Launch, arch: int) -> Binary:
    """Compile one recorded launch for sm_{arch} through the kernel's own launcher; nothing is run."""
    kernel = launch.kernel
    log = io.StringIO()
    with _compiling_for(arch, [kernel]), contextlib.redirect_stdout(log):
        compiled = kernel.run(*launch.args, grid=launch.grid, warmup=True, **launch.options)
    registers, stores, loads = ptxas_report(log.getvalue())
    names = kernel.arg_names
    constants = tuple(names[path[0]] for path in compiled.src.constants
                      if names[path[0]] not in launch.options)
    divisible = sum(1 for attrs in compiled.src.attrs.values() if ["tt.divisibility", 16] in attrs)
    meta = compiled.metadata
    return Binary(kernel.__name__, arch, meta.num_warps, meta.num_stages, meta.shared, registers, stores, loads,
                  _mma_kind(compiled.asm["ptx"]), constants, divisible)


def launch_key(launch: Launch) -> tuple:
    """What decides the binary of a launch (Triton's own specialisation of the arguments), for de-duplication:
    kernel, options, and per argument its type, equality to 1 and divisibility by 16."""
    parts = []
    for arg in launch.args:
        if hasattr(arg, "data_ptr"):
            parts.append((str(arg.dtype), arg.data_ptr() % 16 == 0))
        elif isinstance(arg, bool) or not isinstance(arg, int):
            parts.append(type(arg).__name__)
        else:
            parts.append(("int", arg == 1, arg % 16 == 0, -2**31 <= arg < 2**31))
    return (launch.kernel.__name__, tuple(sorted(launch.options.items())), tuple(parts))


__all__ = ["Binary", "SHARED_LIMIT", "compile_launch", "launch_key"]
