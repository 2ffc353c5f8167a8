"""Pillow image transforms for the ViT tasks (no torchvision): DeiT-style random resized crop and flip for
training, resize and centre crop for evaluation, normalisation to a float tensor."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def to_normalized_tensor(
    img: Image.Image, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """RGB or grayscale ("L") PIL image -> float32 tensor (C, H, W), C = 3 or 1: ``(pixel / 255 - mean) / std``
    with one mean and std per channel. Grayscale stays one channel (Fashion-MNIST, sat/data/idx_images.py);
    other modes are converted to RGB."""
    arr = np.array(img if img.mode in ("RGB", "L") else img.convert("RGB"), dtype=np.uint8)  # (H, W[, 3]), a copy
    arr = arr.reshape(arr.shape[0], arr.shape[1], -1)                                         # (H, W, C)
    c = arr.shape[2]
    if len(mean) != c or len(std) != c:
        raise ValueError(f"the {img.mode} image has {c} channel(s) but the normalisation gives {len(mean)} mean(s) "
                         f"and {len(std)} std(s); give one of each per channel")
    x = torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)                            # (C, H, W)
    m = torch.tensor(mean, dtype=torch.float32).view(c, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(c, 1, 1)
    return x.sub_(m).div_(s).contiguous()


def random_resized_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: random.Random,
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a random crop covering ``scale`` of the area with aspect ``w/h`` in ``ratio``
    (log-uniform); after ``attempts`` misses, the largest centred crop whose aspect is within ``ratio``."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, min(height, max(1, round(width / ratio[0])))
    elif in_ratio > ratio[1]:
        w, h = min(width, max(1, round(height * ratio[1]))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class TrainTransform:
    """Random resized crop -> random horizontal flip -> normalised float tensor (C, size, size): C = 3 for RGB,
    1 for grayscale ("L") images, with ``mean`` / ``std`` giving one value per channel.

    Draws from ``self.rng`` (a ``random.Random``); `reseed` resets it. Picklable (works with workers).
    """

    def __init__(
        self,
        img_size: int,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        interpolation: str = "bicubic",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        seed: int = 0,
    ) -> None:
        if interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}, got {interpolation!r}")
        if not (0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1]):
            raise ValueError(f"bad scale {scale} or ratio {ratio}")
        self.img_size = int(img_size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.hflip = float(hflip)
        self.resample = _RESAMPLE[interpolation]
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.rng = random.Random(seed)

    def reseed(self, seed: int) -> None:
        self.rng.seed(seed)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        left, top, w, h = random_resized_crop_box(img.width, img.height, self.scale, self.ratio, self.rng)
        out = img.resize((self.img_size, self.img_size), self.resample, box=(left, top, left + w, top + h))
        if self.rng.random() < self.hflip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        return to_normalized_tensor(out, self.mean, self.std)


class EvalTransform:
    """Resize the shorter side to ``floor(img_size / crop_pct)`` (aspect kept), centre-crop ``img_size``
    (offset ``(extra) // 2``), normalised float tensor (C, img_size, img_size) as `TrainTransform`'s.
    Deterministic."""

    def __init__(
        self,
        img_size: int,
        crop_pct: float = 0.875,
        interpolation: str = "bicubic",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}, got {interpolation!r}")
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        self.img_size = int(img_size)
        self.resize_to = int(math.floor(img_size / crop_pct + 1e-9))
        self.resample = _RESAMPLE[interpolation]
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        w, h = img.size
        s = self.resize_to
        new = (s, max(s, int(h * s / w))) if w <= h else (max(s, int(w * s / h)), s)
        if new != (w, h):
            img = img.resize(new, self.resample)
        left = (new[0] - self.img_size) // 2
        top = (new[1] - self.img_size) // 2
        img = img.crop((left, top, left + self.img_size, top + self.img_size))
        return to_normalized_tensor(img, self.mean, self.std)


def train_transform(img_size: int, seed: int = 0, **kwargs: Any) -> TrainTransform:
    """ImageNet training augmentation; ``kwargs`` go to `TrainTransform` (scale, ratio, interpolation...)."""
    return TrainTransform(img_size, seed=seed, **kwargs)


def eval_transform(img_size: int, crop_pct: float = 0.875, **kwargs: Any) -> EvalTransform:
    """ImageNet evaluation preprocessing (resize to img_size / crop_pct, centre crop)."""
    return EvalTransform(img_size, crop_pct=crop_pct, **kwargs)
