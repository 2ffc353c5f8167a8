"""Batch-wise Mixup / CutMix with label smoothing for the image tasks: soft targets for cross-entropy."""

from __future__ import annotations

import math

import numpy as np
import torch


def smooth_one_hot(y: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """(B,) class ids -> (B, C) float32 targets ``(1 - smoothing) * one_hot + smoothing / C``
    (the same targets as ``F.cross_entropy(label_smoothing=smoothing)``)."""
    off = smoothing / num_classes
    out = torch.full((y.shape[0], num_classes), off, dtype=torch.float32, device=y.device)
    return out.scatter_(1, y.long().view(-1, 1), 1.0 - smoothing + off)


class Mixup:
    """Batch-wise Mixup / CutMix with label smoothing: ``mixup(x, y) -> (x_mixed, soft_targets)``.

    With probability ``prob`` the batch is mixed with its reverse (``x.flip(0)``): CutMix with probability
    ``switch_prob`` when both alphas are > 0 (else whichever alpha is > 0), ``lam ~ Beta(alpha, alpha)``;
    CutMix pastes a box of area ``(1 - lam) H W`` and recomputes ``lam`` from the clipped box. Targets are
    ``lam * smooth(y) + (1 - lam) * smooth(y.flip(0))``. With both alphas 0 only label smoothing applies.
    Randomness from a numpy Generator seeded with ``seed``; `state_dict` / `load_state_dict` for resume.
    """

    def __init__(
        self,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
        num_classes: int = 1000,
        seed: int = 0,
    ) -> None:
        if mixup_alpha < 0 or cutmix_alpha < 0 or not 0 <= prob <= 1 or not 0 <= switch_prob <= 1:
            raise ValueError("alphas must be >= 0, prob and switch_prob in [0, 1]")
        if not 0 <= label_smoothing < 1 or num_classes < 1:
            raise ValueError("label_smoothing must be in [0, 1), num_classes >= 1")
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix_alpha = float(cutmix_alpha)
        self.prob = float(prob)
        self.switch_prob = float(switch_prob)
        self.label_smoothing = float(label_smoothing)
        self.num_classes = int(num_classes)
        self.rng = np.random.default_rng(seed)

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]

    def _choose(self) -> tuple[str, float]:
        """("none" | "mixup" | "cutmix", lam)."""
        if self.mixup_alpha == 0 and self.cutmix_alpha == 0:
            return "none", 1.0
        if self.rng.random() >= self.prob:
            return "none", 1.0
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = bool(self.rng.random() < self.switch_prob)
        else:
            use_cutmix = self.cutmix_alpha > 0
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        return ("cutmix" if use_cutmix else "mixup"), float(self.rng.beta(alpha, alpha))

    def _box(self, lam: float, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) of a box of area about (1 - lam) H W, centre uniform, clipped."""
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(height * cut), int(width * cut)
        cy, cx = int(self.rng.integers(0, height)), int(self.rng.integers(0, width))
        return (
            max(cy - ch // 2, 0), min(cy + ch // 2, height),
            max(cx - cw // 2, 0), min(cx + cw // 2, width),
        )

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mode, lam = self._choose()
        if mode == "mixup":
            x = x * lam + x.flip(0) * (1.0 - lam)
        elif mode == "cutmix":
            t, b, l, r = self._box(lam, x.shape[-2], x.shape[-1])
            x = x.clone()
            x[..., t:b, l:r] = x.flip(0)[..., t:b, l:r]
            lam = 1.0 - (b - t) * (r - l) / float(x.shape[-2] * x.shape[-1])
        targets = smooth_one_hot(y, self.num_classes, self.label_smoothing)
        if mode != "none":
            targets = targets * lam + targets.flip(0) * (1.0 - lam)
        return x, targets
