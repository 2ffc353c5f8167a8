"""The one owner of every transition, asked once per training step.

Ordered transitions: (1) attention sparsify, fired by the monitor's criteria (docs/switch.md) or forced at
`max_dense_steps`; it freezes each layer's pattern, installs the top-k (or coverage) layouts, measures their
recall and scales the learning rate;
(2) MLP densify (S2D), at `s2d_fraction` of the steps when the model has Monarch MLPs. Steps are counted as
optimizer steps completed: a transition recorded at step t takes effect from step t + 1 on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sat import distributed
from sat.config import SparsityConfig
from sat.sparsity.monitor import TransitionMonitor
from sat.sparsity.pattern import coverage_layout
from sat.sparsity.recall import recall_summary


@dataclass
class Event:
    kind: str                 # "sparsify" | "densify"
    step: int
    reason: str = ""          # sparsify: "criteria" | "forced"
    details: dict = field(default_factory=dict)


class TransitionScheduler:
    """`probe(model)`, when given, returns each attention layer's dense block mass (H, nb, nb) measured on a
    fixed set of dev batches; at the switch it gives the layout recall, and the blocks of the coverage pattern."""

    def __init__(self, cfg: SparsityConfig, num_layers: int, total_steps: int, has_monarch: bool = False,
                 probe: Callable[[torch.nn.Module], list[torch.Tensor]] | None = None) -> None:
        self.cfg = cfg
        self.probe = probe
        self.layout_recall: dict | None = None
        self.monitor = TransitionMonitor(cfg.sk, cfg.ds, num_layers)
        self.transition_step: int | None = None
        self.transition_reason: str | None = None
        self.densify_step: int | None = None
        self.densify_at = max(1, int(cfg.s2d_fraction * total_steps)) if has_monarch else None
        self.lr_scale = 1.0
        self.added_diagonal = 0
        self.density_used: float | None = None
        self._passed = False

    @property
    def sparse(self) -> bool:
        return self.transition_step is not None

    def wants_stats(self, step: int) -> bool:
        """Monitor (and train the pattern) on this step? `step` = optimizer steps done before it."""
        return not self.sparse and step % self.cfg.monitor_every == 0

    def observe(self, step: int, maps: list[torch.Tensor]) -> None:
        """Feed one monitored step's per-layer mean attention maps."""
        self._passed = self.monitor.update(maps, step=step)

    def after_step(self, step: int, model) -> list[Event]:
        """Called after optimizer step number `step` (1-based); applies and returns the transitions due."""
        events = []
        passed, self._passed = self._passed, False
        if not self.sparse and self.cfg.enabled:
            forced = self.cfg.max_dense_steps > 0 and step >= self.cfg.max_dense_steps
            if passed or forced:
                events.append(self._sparsify(step, model, "criteria" if passed else "forced"))
        if self.densify_at is not None and self.densify_step is None and step >= self.densify_at:
            from sat.models.monarch import count_parameters, densify

            before = count_parameters(model)
            names = densify(model)
            self.densify_step = step
            events.append(Event("densify", step, details={"layers": names, "params_before": before,
                                                          "params_after": count_parameters(model)}))
        return events

    def _sparsify(self, step: int, model, reason: str) -> Event:
        c = self.cfg
        layers = model.attention_layers()
        masses = self.probe(model) if self.probe is not None else None  # measured before any layout changes
        if c.pattern == "coverage":
            if masses is None:
                raise ValueError("the coverage pattern needs the block-mass probe")
            chosen = [coverage_layout(m, c.recall_target, c.min_density, c.max_density, c.per_head,
                                      c.keep_diagonal) for m in masses]
            self.added_diagonal = sum(ch.added for ch in chosen)
            for layer, ch in zip(layers, chosen, strict=True):
                layer.sparsify(c.density, ch.layout, ch.added_blocks)
        else:
            if c.pattern == "random":
                _draw_random_importance(layers)
            self.added_diagonal = sum(layer.sparsify(c.density, keep_diagonal=c.keep_diagonal, selection=c.selection)
                                      for layer in layers)
        for layer in layers:
            distributed.broadcast_(layer.pattern.layout)  # under torchrun every rank takes rank 0's layouts
        per_layer = [float(layer.pattern.layout.float().mean()) for layer in layers]
        active = sum(int(layer.pattern.layout.sum()) for layer in layers)
        total = sum(layer.pattern.layout.numel() for layer in layers)
        self.density_used = active / total
        self.transition_step, self.transition_reason = step, reason
        self.lr_scale = c.lr_scale_after_transition
        details = {"added_diagonal": self.added_diagonal, "density_used": self.density_used,
                   "density_per_layer": per_layer, "layouts": [layer.pattern.layout.cpu() for layer in layers],
                   "added_blocks": [layer.pattern.added_blocks for layer in layers]}  # rank 0's, like the layouts
        if masses is not None:
            layer_recall = [recall_summary(m, layer.pattern.layout.cpu(), c.per_head)
                            for m, layer in zip(masses, layers, strict=True)]
            values = [r["recall"] for r in layer_recall if r["recall"] is not None]
            self.layout_recall = {"mean": sum(values) / len(values) if values else None, "layers": layer_recall,
                                  "density_per_layer": per_layer}
            details["recall"] = self.layout_recall
            details["block_mass"] = [m.float() for m in masses]
        return Event("sparsify", step, reason, details)

    def state_dict(self) -> dict:
        return {"monitor": self.monitor.state_dict(), "transition_step": self.transition_step,
                "transition_reason": self.transition_reason, "densify_step": self.densify_step,
                "densify_at": self.densify_at, "lr_scale": self.lr_scale, "added_diagonal": self.added_diagonal,
                "density_used": self.density_used, "layout_recall": self.layout_recall}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        self.monitor.load_state_dict(state["monitor"], device)
        for key in ("transition_step", "transition_reason", "densify_step", "densify_at", "lr_scale",
                    "added_diagonal", "density_used"):
            setattr(self, key, state[key])
        self.layout_recall = state.get("layout_recall")  # absent in checkpoints written before it existed


def _draw_random_importance(layers) -> None:
    """The negative control's block map: uniform noise in each layer's pattern map, so that its top-k is a random
    layout at the configured density (with the same diagonal rule as the others). Drawn from the run's seed
    and the layer's index, without touching the training's random stream."""
    for i, layer in enumerate(layers):
        g = torch.Generator().manual_seed((torch.initial_seed() * 1000 + i) % 2**63)
        noise = torch.rand(layer.pattern.mean.shape, generator=g)
        layer.pattern.mean.copy_(noise.to(layer.pattern.mean.device))
