"""SAT's dense-phase monitor (docs/switch.md), computed on the device.

For each layer l and monitored step t, with A_t the batch- and head-averaged attention probabilities (N x N):
skew_t = mean(z^3), z = (A - mean) / std (population std); dist_t = ||A_t - A_{t-1}||_F;
drift_t = |dist_t - dist_{t-1}| / dist_{t-1} * 100. Switch at the first step where every layer has
skew >= sk, dist_{t-1} != 0 and drift < ds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def skewness(x: torch.Tensor) -> torch.Tensor:
    """Population skewness mean(z^3) over all entries, as a 0-dim tensor on x's device (float64)."""
    x = x.detach().reshape(-1).double()
    centred = x - x.mean()
    std = centred.pow(2).mean().sqrt()
    # A constant map has no skew (numpy would give nan); 0 keeps the comparison >= sk well defined (False).
    return torch.where(std > 0, (centred / std.clamp_min(1e-300)).pow(3).mean(), torch.zeros_like(std))


def frobenius_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a - b||_F as a 0-dim float64 tensor on the maps' device."""
    return torch.linalg.vector_norm((a.detach().double() - b.detach().double()).reshape(-1))


@dataclass
class MonitorRecord:
    """Statistics of one monitored step, one entry per layer (drift is nan where it is undefined)."""

    step: int
    skew: list[float]
    dist: list[float]
    drift: list[float]
    passed: bool


@dataclass
class TransitionMonitor:
    """Feeds on the per-layer mean attention maps of consecutive monitored steps; says when to switch."""

    sk: float
    ds: float
    num_layers: int
    prev_maps: list[torch.Tensor] | None = None
    prev_dist: list[float] = field(default_factory=list)
    history: list[MonitorRecord] = field(default_factory=list)
    calls: int = 0

    def update(self, maps: list[torch.Tensor], step: int | None = None) -> bool:
        """Add one monitored step's maps (list of N x N tensors, one per layer); True on the switching step."""
        if len(maps) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} attention maps, got {len(maps)}")
        step = self.calls if step is None else step
        self.calls += 1
        maps = [m.detach() for m in maps]
        skews = torch.stack([skewness(m) for m in maps])
        if self.prev_maps is None:
            dists = torch.zeros(self.num_layers, dtype=torch.float64, device=skews.device)
        else:
            dists = torch.stack([frobenius_distance(a, b) for a, b in zip(maps, self.prev_maps, strict=True)])
        # One host transfer per monitored step: the decision needs the numbers on the host anyway.
        skew_l, dist_l = torch.stack([skews, dists.to(skews.device)]).cpu().tolist()
        prev_dist = self.prev_dist or [0.0] * self.num_layers
        drift_l = [abs(d - p) / p * 100.0 if p != 0 else math.nan for d, p in zip(dist_l, prev_dist, strict=True)]
        passed = all(s >= self.sk and p != 0 and dr < self.ds
                     for s, p, dr in zip(skew_l, prev_dist, drift_l, strict=True))
        self.history.append(MonitorRecord(step, skew_l, dist_l, drift_l, passed))
        self.prev_maps = maps
        self.prev_dist = dist_l
        return passed

    def state_dict(self) -> dict:
        return {
            "sk": self.sk, "ds": self.ds, "num_layers": self.num_layers, "calls": self.calls,
            "prev_maps": None if self.prev_maps is None else [m.cpu() for m in self.prev_maps],
            "prev_dist": list(self.prev_dist),
            "history": [[r.step, r.skew, r.dist, r.drift, r.passed] for r in self.history],
        }

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        self.sk, self.ds, self.num_layers, self.calls = state["sk"], state["ds"], state["num_layers"], state["calls"]
        self.prev_maps = None if state["prev_maps"] is None else [m.to(device) for m in state["prev_maps"]]
        self.prev_dist = list(state["prev_dist"])
        self.history = [MonitorRecord(*r) for r in state["history"]]
