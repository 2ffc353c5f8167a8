"""ImageNet-style image folders (no torchvision).

Layout read by `ImageFolderDataset`::

    {root}/{split}/{class_name}/**/*.{JPEG,jpg,jpeg,png,PNG}      split is usually "train" or "val"

Class index = position of the class folder name in the sorted list of the train split's class folders;
the val split is built with ``classes=train_set.classes`` so both splits agree.

Samples are ``(image, label, substituted)``:

* ``image``: whatever the transform returns (a float tensor (3, H, W) for sat/data/image_transforms.py);
* ``label``: int class index of the image actually returned;
* ``substituted``: 1 when the requested file could not be read (corrupt, truncated, not an image) and the
  next readable file (index + 1, + 2, ... wrapping around; deterministic) was returned instead, else 0.

Counting unreadable files: ``dataset.num_skipped`` counts them in the *current process* only, so with
``num_workers > 0`` it stays 0 in the main process (the workers hold their own copies). The count that is
always right is the sum of the ``substituted`` column over an epoch: each index is visited once per epoch,
so ``sum(batch[2].sum() for batch in loader)`` is the number of unreadable files the epoch met.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from sat.data.format import DataError

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")  # compared case-insensitively
CHANNELS = 3  # every folder image is decoded as RGB (load_rgb)
# What Pillow raises on a file it cannot decode (DecompressionBombError is not an OSError).
_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


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
