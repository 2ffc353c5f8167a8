"""The monitor's switch step equals a plain numpy implementation of docs/switch.md."""

import numpy as np
import pytest
import torch

from sat.sparsity.monitor import TransitionMonitor, frobenius_distance, skewness


def numpy_switch_step(seq, sk, ds):
    """docs/switch.md written out with numpy, independently of the project's code."""
    prev_map, prev_dist = None, None
    for t, maps in enumerate(seq):
        ok = True
        dists = []
        for l, a in enumerate(maps):
            z = (a - a.mean()) / a.std()
            skew = np.mean(z ** 3)
            dist = 0.0 if prev_map is None else np.linalg.norm(a - prev_map[l])
            dists.append(dist)
            pd = 0.0 if prev_dist is None else prev_dist[l]
            if pd == 0:
                ok = False
                continue
            drift = abs(dist - pd) / pd * 100
            ok = ok and skew >= sk and drift < ds
        if ok:
            return t
        prev_map, prev_dist = maps, dists
    return None


def make_sequence(rng, steps, layers, n, decay):
    """Maps converging geometrically to a skewed target, so that drift shrinks and a switch happens."""
    targets = [rng.exponential(size=(n, n)) ** 3 for _ in range(layers)]
    noise = [rng.normal(size=(n, n)) for _ in range(layers)]
    seq = []
    for t in range(steps):
        jitter = 1 + 0.02 * rng.normal(size=layers)
        seq.append([targets[l] + noise[l] * decay ** t * jitter[l] for l in range(layers)])
    return seq


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("layers", [1, 2, 4])
def test_switch_step_matches_numpy(seed, layers):
    rng = np.random.default_rng(seed)
    seq = make_sequence(rng, steps=60, layers=layers, n=16, decay=rng.uniform(0.8, 0.99))
    sk, ds = rng.uniform(0.5, 3.0), rng.uniform(0.5, 5.0)
    expected = numpy_switch_step(seq, sk, ds)
    mon = TransitionMonitor(sk, ds, layers)
    got = None
    for t, maps in enumerate(seq):
        if mon.update([torch.from_numpy(m) for m in maps]):
            got = t
            break
    assert got == expected


def test_random_sequences_agree_including_no_switch():
    rng = np.random.default_rng(123)
    hits = 0
    for trial in range(40):
        layers = int(rng.integers(1, 4))
        seq = [[rng.random((8, 8)) ** rng.uniform(1, 6) for _ in range(layers)] for _ in range(30)]
        sk, ds = rng.uniform(0.0, 2.5), rng.uniform(1.0, 60.0)
        expected = numpy_switch_step(seq, sk, ds)
        mon = TransitionMonitor(sk, ds, layers)
        got = next((t for t, maps in enumerate(seq) if mon.update([torch.from_numpy(m) for m in maps])), None)
        assert got == expected, trial
        hits += expected is not None
    assert 0 < hits < 40  # the sample exercises both outcomes


def test_earliest_switch_is_third_step():
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    b = a * 1.01 + 0.001
    c = b * 1.01 + 0.001
    mon = TransitionMonitor(sk=0.0, ds=1e9, num_layers=1)
    assert mon.update([a]) is False  # only stores A
    assert mon.update([b]) is False  # dist_{t-1} is 0
    assert mon.update([c]) is True


def test_statistics_values():
    rng = np.random.default_rng(0)
    x = rng.exponential(size=(12, 12))
    z = (x - x.mean()) / x.std()
    assert skewness(torch.from_numpy(x)).item() == pytest.approx(np.mean(z ** 3), rel=1e-12)
    y = rng.random((12, 12))
    assert frobenius_distance(torch.from_numpy(x), torch.from_numpy(y)).item() == pytest.approx(np.linalg.norm(x - y))
    assert skewness(torch.ones(4, 4)).item() == 0.0


def test_state_roundtrip_continues_identically():
    rng = np.random.default_rng(5)
    seq = make_sequence(rng, 40, 2, 8, 0.9)
    a = TransitionMonitor(1.0, 3.0, 2)
    for maps in seq[:10]:
        a.update([torch.from_numpy(m) for m in maps])
    b = TransitionMonitor(0, 0, 2)
    b.load_state_dict(a.state_dict())
    for maps in seq[10:]:
        ra = a.update([torch.from_numpy(m) for m in maps])
        rb = b.update([torch.from_numpy(m) for m in maps])
        assert ra == rb
