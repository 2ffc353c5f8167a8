"""The CPU attention runtime: worker threads run unthreaded without touching a thread setting, choices are
overridden for a `with` block only, and the plan cache keeps the most recently used plans."""

from __future__ import annotations

import threading

import pytest
import torch

from sat.kernels.runtime import RUNTIME, KernelRuntime


def test_workers_run_unthreaded_and_never_set_the_thread_count(monkeypatch):
    calls = []  # the threads that call torch.set_num_threads
    set_threads = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(threading.current_thread()),
                                                             set_threads(n)))
    seen = []  # (range, thread, its intra-op thread count, grad mode) per call of part

    def part(g0, g1, max_blocks):
        seen.append(((g0, g1), threading.current_thread(), torch.get_num_threads(), torch.is_grad_enabled()))

    runtime = KernelRuntime(threading="workers", piece_blocks=5)
    threads = torch.get_num_threads()
    set_threads(2)
    try:
        for _ in range(2):  # the pool's first call and a later one
            seen.clear()
            runtime.run(part, 4, torch.device("cpu"), ("test",))
            assert sorted(r for r, _, _, _ in seen) == [(0, 2), (2, 4)]
            assert all(t is not threading.main_thread() and n == 1 and not grad for _, t, n, grad in seen)
            assert torch.get_num_threads() == 2
    finally:
        set_threads(threads)
    assert calls and all(t is threading.main_thread() for t in calls)


def test_override_restores_the_choices_after_the_block_and_after_an_error():
    assert (RUNTIME.threading, RUNTIME.cpu_dropout_path) == ("auto", "fused")
    with RUNTIME.override(threading="team", cpu_dropout_path="sdpa", piece_blocks=3) as runtime:
        assert runtime is RUNTIME
        assert (RUNTIME.threading, RUNTIME.cpu_dropout_path, RUNTIME.piece_blocks) == ("team", "sdpa", 3)
    assert (RUNTIME.threading, RUNTIME.cpu_dropout_path, RUNTIME.piece_blocks) == ("auto", "fused", 64)
    with pytest.raises(RuntimeError), RUNTIME.override(threading="workers"):
        raise RuntimeError("inside")
    assert RUNTIME.threading == "auto"
    with pytest.raises(ValueError, match="threading"), RUNTIME.override(threading="fast"):
        pass
    with pytest.raises(TypeError, match="unknown"), RUNTIME.override(THREADING="team"):
        pass
    assert RUNTIME.threading == "auto"


def test_plan_cache_keeps_the_most_recently_used():
    runtime = KernelRuntime(max_plans=2)
    made = []

    def make(key):
        made.append(key)
        return object()

    a = runtime.plan(("a",), lambda: make("a"))
    runtime.plan(("b",), lambda: make("b"))
    assert runtime.plan(("a",), lambda: make("a")) is a  # a hit, and now the most recent
    runtime.plan(("c",), lambda: make("c"))  # evicts b
    assert runtime.plan(("a",), lambda: make("a")) is a
    runtime.plan(("b",), lambda: make("b"))
    assert made == ["a", "b", "c", "b"]
