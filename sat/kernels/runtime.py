"""What the CPU attention code keeps and chooses at run time, in one object: `KernelRuntime`.

It holds the torch backend's bucket plans (a cache keyed by the layout's content), its measured threading
choice per kind of call (`ThreadChoice`), its worker threads and their per-thread workspaces, and the choices
that tests and benchmarks vary:
- `threading`: "auto" measures which way of using the CPU threads is faster; "team" or "workers" forces one;
- `piece_blocks` / `team_piece_blocks`: active blocks per batched product of a worker / of the intra-op team;
- `bucket_overhead`: the fixed cost of one bucket's operations in the torch backend's cost model, which merges
  the buckets of rows with different block counts (sat/kernels/blocksparse_torch.py); 0 never merges;
- `cpu_dropout_path`: how sat/models/attention.py runs unmonitored CPU training steps with attention dropout,
  "fused" (sat.kernels.dense.dense_attention without statistics) or "sdpa" (scaled_dot_product_attention).
The threading choice, the piece sizes and the bucket overhead change speed, memory and the rounding (by an
ulp or a few: the batched products are split differently); `cpu_dropout_path` also changes which random draws
attention dropout uses.

Lifetime: one instance per process, `RUNTIME`, made at import and kept until the process ends (the plans and
workspaces are caches, the worker threads idle between calls). A forked child keeps the caches and starts
without worker threads. `RUNTIME.override(...)` changes choices for the duration of a `with` block.
"""

from __future__ import annotations

import os
import statistics
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from threading import Barrier, local
from typing import Any

import torch

THREADING_MODES = ("auto", "team", "workers")
CPU_DROPOUT_PATHS = ("fused", "sdpa")


class ThreadChoice:
    """How the CPU threads share one kind of call, chosen by timing live calls.

    "team": every operation runs on PyTorch's intra-op threads, which fork and join each time; the best way
    on an idle machine. "workers": the batch is split over single-threaded workers that join once; when
    other processes hold cores a team stalls at each of its few hundred joins and this way is faster. The
    slower way is timed again now and then (less often the slower it was): the load changes.
    """

    def __init__(self) -> None:
        self.times = {"team": deque(maxlen=3), "workers": deque(maxlen=3)}  # recent seconds per call
        self.warm: set[str] = set()  # the ways run once already: a first call pays for warm-up, so it is not timed
        self.calls = 0
        self.next_probe = 8

    def choose(self) -> str:
        self.calls += 1
        for mode, times in self.times.items():
            if not times:
                return mode
        best, other = sorted(self.times, key=lambda mode: statistics.median(self.times[mode]))
        if self.calls < self.next_probe:
            return best
        ratio = statistics.median(self.times[other]) / statistics.median(self.times[best])
        self.next_probe = self.calls + int(min(128.0, 8.0 * ratio))
        return other

    def record(self, mode: str, seconds: float) -> None:
        if mode in self.warm:
            self.times[mode].append(seconds)
        self.warm.add(mode)


def _start_worker(started: Barrier) -> None:
    """First task of a new worker thread: its first torch call fixes the thread's intra-op thread count to the
    process-wide setting of that moment (1 while the pool starts); the barrier puts each task on its own thread."""
    torch.get_num_threads()
    started.wait()


def _unthreaded(fn: Callable[[int, int, int], None], g0: int, g1: int, piece_blocks: int) -> None:
    with torch.no_grad():  # grad mode is per thread
        fn(g0, g1, piece_blocks)


class KernelRuntime:
    """Caches, worker threads and run-time choices of the CPU attention code (see the module docstring)."""

    _CHOICES = ("threading", "piece_blocks", "team_piece_blocks", "bucket_overhead", "cpu_dropout_path")

    def __init__(self, threading: str = "auto", piece_blocks: int = 64, team_piece_blocks: int = 512,
                 cpu_dropout_path: str = "fused", max_plans: int = 16, bucket_overhead: float = 6e4) -> None:
        self.threading = threading
        # 64 active blocks per product: the scores are then 1 MiB at block 64, L2-resident. A team's pieces are
        # larger (its cost is per operation) but bounded, so that its buffers stay small.
        self.piece_blocks, self.team_piece_blocks = piece_blocks, team_piece_blocks
        # In units of one fp32 score element's elementwise work (~4.7 ns on one core): ~170-450 us, calibrated
        # in sat/kernels/blocksparse_torch.py.
        self.bucket_overhead = bucket_overhead
        self.cpu_dropout_path = cpu_dropout_path
        self.max_plans = max_plans
        self._check()
        self._plans: OrderedDict[tuple, Any] = OrderedDict()
        self._choices: dict[tuple, ThreadChoice] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0
        self._local = local()
        me = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: me() is not None and me()._forget_workers())

    def _check(self) -> None:
        if self.threading not in THREADING_MODES:
            raise ValueError(f"threading must be one of {THREADING_MODES}, got {self.threading!r}")
        if self.cpu_dropout_path not in CPU_DROPOUT_PATHS:
            raise ValueError(f"cpu_dropout_path must be one of {CPU_DROPOUT_PATHS}, got {self.cpu_dropout_path!r}")
        if self.piece_blocks < 1 or self.team_piece_blocks < 1:
            raise ValueError("piece sizes must be at least one block")
        if not self.bucket_overhead >= 0:
            raise ValueError(f"bucket_overhead must be >= 0, got {self.bucket_overhead!r}")

    @contextmanager
    def override(self, **choices: Any) -> Iterator[KernelRuntime]:
        """Within the `with` block, use these choices (threading, piece_blocks, team_piece_blocks,
        bucket_overhead, cpu_dropout_path); the previous ones come back afterwards, also after an exception."""
        unknown = set(choices) - set(self._CHOICES)
        if unknown:
            raise TypeError(f"unknown runtime choice(s) {sorted(unknown)}; choose from {self._CHOICES}")
        before = {name: getattr(self, name) for name in choices}
        try:
            for name, value in choices.items():
                setattr(self, name, value)
            self._check()
            yield self
        finally:
            for name, value in before.items():
                setattr(self, name, value)

    def plan(self, key: tuple, make: Callable[[], Any]) -> Any:
        """The cached plan of `key`, made by make() on a miss; beyond max_plans the least recently used goes."""
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = make()
            if len(self._plans) > self.max_plans:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return plan

    def workspace(self, slot: str, numel: int, like: torch.Tensor) -> torch.Tensor:
        """This thread's buffer `slot` with at least numel elements, kept between calls: fresh CPU memory costs a
        page fault per 4 KiB on first touch, which is a sizeable part of the whole computation here."""
        buffers = self._local.__dict__.setdefault("buffers", {})
        key = (slot, like.device, like.dtype)
        if key not in buffers or buffers[key].numel() < numel:
            buffers[key] = like.new_empty(numel)
        return buffers[key][:numel]

    def run(self, fn: Callable[[int, int, int], None], batch: int, device: torch.device, kind: tuple) -> None:
        """fn(g0, g1, max_blocks) over [0, batch): in one call off the CPU or with one thread, else on the intra-op
        team (pieces of up to team_piece_blocks blocks) or split over single-threaded workers (pieces of
        piece_blocks), as `threading` says ("auto": the measured choice for this `kind` of call)."""
        threads = torch.get_num_threads() if device.type == "cpu" else 1
        parts = min(batch, threads)
        if parts == 1:
            fn(0, batch, self.piece_blocks if threads == 1 else self.team_piece_blocks)
            return
        choice = self._choices.setdefault(kind, ThreadChoice())
        mode = choice.choose() if self.threading == "auto" else self.threading
        start = time.perf_counter()
        if mode == "team":
            fn(0, batch, self.team_piece_blocks)
        else:
            bounds = [batch * i // parts for i in range(parts + 1)]
            pool = self._workers(parts)
            for future in [pool.submit(_unthreaded, fn, g0, g1, self.piece_blocks)
                           for g0, g1 in zip(bounds[:-1], bounds[1:], strict=True)]:
                future.result()
        choice.record(mode, time.perf_counter() - start)

    def _workers(self, n: int) -> ThreadPoolExecutor:
        """A pool of at least n threads whose torch operations run unthreaded. The workers never change a thread
        setting: a thread takes its intra-op thread count from the process-wide one when it first calls torch,
        so the calling thread sets that to 1 while the pool's threads start, and puts it back."""
        if self._pool_size < n:
            if self._pool is not None:
                self._pool.shutdown(wait=False)
            pool = ThreadPoolExecutor(n, thread_name_prefix="sat-attention")
            started = Barrier(n)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                for future in [pool.submit(_start_worker, started) for _ in range(n)]:
                    future.result()
            finally:
                torch.set_num_threads(threads)
            self._pool, self._pool_size = pool, n
        return self._pool

    def _forget_workers(self) -> None:
        self._pool, self._pool_size = None, 0  # a forked child has none of the parent's threads


RUNTIME = KernelRuntime()
