"""Data-parallel training with PyTorch's own stack: torchrun starts one process per GPU (or per CPU slot) and
sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `init_from_env` joins the process group
(nccl on CUDA, gloo on CPU) and pins the process to cuda:LOCAL_RANK. Without torchrun (WORLD_SIZE unset or 1)
every helper here is a no-op on one process, so the training loop calls them unconditionally.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    """The world size torchrun announced (1 when not started by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device: str) -> tuple[DistInfo, str]:
    """Join torchrun's process group; returns (rank info, this process's device). `device` "cuda" or
    "cuda:K" becomes cuda:LOCAL_RANK; "cpu" stays (gloo)."""
    if env_world_size() <= 1:
        return DistInfo(), device
    rank, world, local = int(os.environ["RANK"]), env_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        _bind_group_defaults_early()
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method="env://")
    return DistInfo(rank, world, local), str(dev)


def _bind_group_defaults_early() -> None:
    """Import torch.distributed.nn.functional while no process group exists.

    Its functions bind `group=group.WORLD` as default arguments when the module is imported. DDP's
    constructor imports it (through torch._dynamo), and imported after init_process_group those defaults
    would hold the live group for the life of the process: `destroy_process_group` then leaves the backend
    and its worker threads running into interpreter shutdown, where a worker that is still releasing the
    last collective (its tensors and captured thread state hold Python objects) needs the GIL, is ended
    by Python with pthread_exit and aborts the process ("terminate called without an active exception").
    Imported first, the defaults are None (the default group at call time), and `shutdown` really
    destroys the group: its threads are joined while Python is fully alive."""
    import torch.distributed.nn.functional  # noqa: F401


def current() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


def shutdown() -> None:
    """Destroy the process group; its backend's threads are joined here, while Python is fully alive (see
    `_bind_group_defaults_early`). Free the DDP wrappers before: a group whose last holder is a DDP reducer
    is destroyed with the GIL held, and can wait forever for a backend worker that needs the GIL."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if current().enabled:
        dist.barrier()


def all_reduce_mean(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Element-wise mean over ranks of a list of same-shaped tensors (one collective). Every rank gets the
    same reduced buffer, so decisions taken from it agree bitwise."""
    info = current()
    if not info.enabled:
        return tensors
    stacked = torch.stack([t.detach() for t in tensors])  # (L, ...)
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
    return list((stacked / info.world).unbind(0))


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    if current().enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def finite_and_stop(finite: bool, stop: int, device: torch.device) -> tuple[bool, int]:
    """(`finite` on every rank, the largest `stop` request of any rank: a signal number or 0), in one
    collective. The training loop's per-step check: the stop request rides on the finiteness check it already
    makes, so every rank stops after the same step without a second collective and host sync per step."""
    if not current().enabled:
        return finite, stop
    t = torch.tensor([1.0 if finite else 0.0, -float(stop)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)  # min of -stop = -(max of stop)
    ok, neg_stop = t.tolist()
    return ok > 0, int(-neg_stop)


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite `t` in place with rank `src`'s copy (bool tensors travel as uint8)."""
    if not current().enabled:
        return t
    buf = t.to(torch.uint8) if t.dtype == torch.bool else t
    dist.broadcast(buf, src)
    if buf is not t:
        t.copy_(buf.bool())
    return t
