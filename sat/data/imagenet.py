"""ImageNet-style image folders, Pillow transforms, a seeded DataLoader and Mixup/CutMix (no torchvision).

Layout read by `ImageFolderDataset`::

    {root}/{split}/{class_name}/**/*.{JPEG,jpg,jpeg,png,PNG}      split is usually "train" or "val"

Class index = position of the class folder name in the sorted list of the train split's class folders;
the val split is built with ``classes=train_set.classes`` so both splits agree.

Samples are ``(image, label, substituted)``:

* ``image``: whatever the transform returns (a float tensor (3, H, W) for the transforms below);
* ``label``: int class index of the image actually returned;
* ``substituted``: 1 when the requested file could not be read (corrupt, truncated, not an image) and the
  next readable file (index + 1, + 2, ... wrapping around; deterministic) was returned instead, else 0.

Counting unreadable files: ``dataset.num_skipped`` counts them in the *current process* only, so with
``num_workers > 0`` it stays 0 in the main process (the workers hold their own copies). The count that is
always right is the sum of the ``substituted`` column over an epoch: each index is visited once per epoch,
so ``sum(batch[2].sum() for batch in loader)`` is the number of unreadable files the epoch met.

Randomness: the train transform draws from its own ``random.Random``. `build_loader` gives the DataLoader
a ``torch.Generator`` seeded with ``seed``; each worker's ``torch.initial_seed()`` is then a deterministic
function of (seed, epoch number, worker id) and the worker init function reseeds the transform (and
``random`` / ``numpy``) from it. With ``num_workers=0`` `build_loader` reseeds the transform with ``seed``
once. Same seed, same ``num_workers``, same batch size -> the same batches; a different ``num_workers``
gives a different (equally valid) random stream.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from sat.data.format import DataError

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")  # compared case-insensitively
CHANNELS = 3  # every folder image is decoded as RGB (load_rgb)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
# What Pillow raises on a file it cannot decode (DecompressionBombError is not an OSError).
_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


# --------------------------------------------------------------------------------------------- dataset


def list_classes(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def _list_images(class_dir: Path) -> list[str]:
    """Image files under ``class_dir`` (recursively), as paths relative to it, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(class_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, class_dir)
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(name if rel == "." else os.path.join(rel, name))
    return sorted(found)


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image as RGB (raises one of Pillow's errors if it is unreadable)."""
    with Image.open(path) as img:
        return img.convert("RGB")  # convert() forces the decode, so truncated files fail here


class ImageFolderDataset(Dataset):
    """Images under ``{root}/{split}/{class}/``; see the module docstring for the sample format.

    Raises `DataError` when the split folder is missing, has no class folders, holds no images, or (when
    ``classes`` is given) has class folders that are not in ``classes``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        transform: Callable[[Image.Image], Any] | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.transform = transform
        split_dir = self.root / split
        if not split_dir.is_dir():
            raise DataError(
                f"ImageNet folder {split_dir} not found: point the data dir at a folder holding "
                f"{split}/<class_name>/*.JPEG"
            )
        found = list_classes(split_dir)
        if classes is None:
            if not found:
                raise DataError(
                    f"no class folders in {split_dir}: put images in {split_dir}/<class_name>/ "
                    "(ImageNet's flat val/ must first be sorted into class folders)"
                )
            classes = found
        else:
            unknown = sorted(set(found) - set(classes))
            if unknown:
                raise DataError(
                    f"{split_dir} has class folders missing from the train split ({', '.join(unknown[:3])}"
                    f"{', ...' if len(unknown) > 3 else ''}): use the same class folders in train and {split}"
                )
        self.classes: list[str] = list(classes)
        self.class_to_idx: dict[str, int] = {c: i for i, c in enumerate(self.classes)}
        paths: list[str] = []
        labels: list[int] = []
        for c in self.classes:
            class_dir = split_dir / c
            if not class_dir.is_dir():
                continue
            for rel in _list_images(class_dir):
                paths.append(os.path.join(c, rel))
                labels.append(self.class_to_idx[c])
        if not paths:
            raise DataError(
                f"no images (.JPEG/.jpg/.jpeg/.png) in the class folders of {split_dir}: "
                "check the data dir and that the archive was extracted"
            )
        # numpy arrays rather than lists of Python objects: workers forked from this process do not copy
        # them page by page through reference-count updates.
        self._paths = np.array([os.fsencode(p) for p in paths])
        self.targets = np.asarray(labels, dtype=np.int64)
        self.num_skipped = 0  # unreadable files met by this process (see the module docstring)
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def path(self, index: int) -> Path:
        """Full path of sample ``index``."""
        return self.root / self.split / os.fsdecode(self._paths[index])

    def _read(self, index: int) -> Image.Image | None:
        if index in self._bad:
            return None
        try:
            return load_rgb(self.path(index))
        except _READ_ERRORS:
            self._bad.add(index)
            return None

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        n = len(self)
        index = int(index)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        img = self._read(index)
        substituted = 0
        actual = index
        if img is None:
            self.num_skipped += 1
            substituted = 1
            for step in range(1, n):
                actual = (index + step) % n
                img = self._read(actual)
                if img is not None:
                    break
            if img is None:
                raise DataError(f"no readable image in {self.root / self.split}: every file failed to decode")
        out = self.transform(img) if self.transform is not None else img
        return out, int(self.targets[actual]), substituted

    def reseed(self, seed: int) -> None:
        """Reseed the transform's random stream (used by the worker init function)."""
        reseed = getattr(self.transform, "reseed", None)
        if reseed is not None:
            reseed(seed)


# ------------------------------------------------------------------------------------------ transforms


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


# -------------------------------------------------------------------------------------------- loader


def _reseed_dataset(dataset: Any, seed: int) -> None:
    """Reseed ``dataset`` (or the dataset it wraps, e.g. a ``Subset``) if it knows how."""
    for _ in range(8):
        reseed = getattr(dataset, "reseed", None)
        if reseed is not None:
            reseed(seed)
            return
        if not hasattr(dataset, "dataset"):
            return
        dataset = dataset.dataset


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: seed ``random``, ``numpy`` and the dataset's transform from the
    worker's torch seed (base seed drawn from the loader's generator + worker id)."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    info = torch.utils.data.get_worker_info()
    if info is not None:
        _reseed_dataset(info.dataset, seed)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    seed: int,
    drop_last: bool,
    sampler: Sampler | None = None,
    *,
    pin_memory: bool | None = None,
    persistent_workers: bool = True,
    prefetch_factor: int | None = None,
) -> DataLoader:
    """A DataLoader whose shuffling and per-worker augmentation are seeded from ``seed``.

    ``sampler`` (e.g. a DistributedSampler; call its ``set_epoch`` yourself) replaces ``shuffle``.
    ``pin_memory`` defaults to ``torch.cuda.is_available()``. With ``num_workers=0`` the dataset's
    transform is reseeded with ``seed`` here (in place).
    """
    if sampler is not None and shuffle:
        raise ValueError("pass either shuffle=True or a sampler (which does its own shuffling), not both")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    if num_workers == 0:
        _reseed_dataset(dataset, int(seed))
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs["persistent_workers"] = persistent_workers
        if prefetch_factor is not None:
            kwargs["prefetch_factor"] = prefetch_factor
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        worker_init_fn=seed_worker,
        generator=generator,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        **kwargs,
    )


# ------------------------------------------------------------------------------------- mixup / loss


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


def soft_target_cross_entropy(logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum_c t_c log softmax(logits)_c`` (computed in float32)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(soft_targets.float() * logp).sum(dim=-1).mean()
