"""Fashion-MNIST for the ViT tasks (dataset.kind "image_folder", dataset.source "fashion-mnist"), read straight
from Zalando's IDX release into memory: no preprocessing, no files written.

The release's four files (sat/data/prepare/fashion_mnist.py) are read with the checked IDX reader
(sat/data/prepare/idx.py), from `--data_dir DIR` or, by default, from where Debian's `dataset-fashion-mnist`
package installed them. The split protocol is the LRA path's: train = the first 54,000 images of the training
file, dev = its last 10% (6,000) in the file's order, test = t10k (10,000).

`IdxImageDataset` has `ImageFolderDataset`'s sample interface, `(image, label, substituted)`, `.targets`,
`.classes`, `.transform` and `reseed`, so `ImageTrainStream`, `eval_batches` and Mixup/CutMix run unchanged
(sat/data/image_stream.py). Images stay grayscale: each sample is a PIL "L" image, which the ViT transforms turn
into a (1, H, W) tensor normalised with `MEAN` / `STD`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from sat.data.image_transforms import eval_transform, train_transform
from sat.data.prepare.fashion_mnist import CLASSES, read_splits, release_files

NAME = "fashion-mnist"  # the log's and summary.json's "dataset"
CHANNELS = 1            # grayscale
# Fashion-MNIST's own pixel mean and std (pixel / 255, over the 60,000 training images: 0.2860 and 0.3530), as
# the RGB path uses ImageNet's own statistics: normalised inputs then have mean 0 and std 1. The common
# 0.5 / 0.5 would leave them at mean -0.43 and std 0.71 (the images are mostly black background).
MEAN = (0.2860,)
STD = (0.3530,)


class IdxImageDataset(Dataset):
    """In-memory grayscale images (n, H, W) uint8 and their labels, with ImageFolderDataset's sample
    interface. Every image was checked when its file was read, so none is ever substituted (always 0)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable[[Image.Image], Any] | None = None,
                 classes: Sequence[str] = CLASSES) -> None:
        self.images = images                                 # (n, H, W) uint8
        self.targets = np.asarray(labels, dtype=np.int64)     # (n,)
        self.classes: list[str] = list(classes)
        self.transform = transform

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        img = Image.fromarray(self.images[index])  # (H, W) uint8 -> a PIL "L" image
        out = self.transform(img) if self.transform is not None else img
        return out, int(self.targets[index]), 0

    def reseed(self, seed: int) -> None:
        """Reseed the transform's random stream (used by the worker init function)."""
        reseed = getattr(self.transform, "reseed", None)
        if reseed is not None:
            reseed(seed)


def installed_folder() -> Path:
    """Where Debian's package installed the release (the ViT tasks' default data folder); a DataError saying
    how to install it when it is not installed."""
    return release_files()["train"][0].parent


def fashion_mnist_splits(data_dir: Path, img_size: int, crop_pct: float,
                         need_train: bool = True) -> dict[str, IdxImageDataset]:
    """{train, dev, test} as `IdxImageDataset`s with the ViT transforms (train: random resized crop and flip;
    dev/test: resize to img_size / crop_pct, centre crop), split as the LRA path splits the release
    (`read_splits`). Without `need_train` only {dev, test} (the training file is read all the same: it holds
    dev)."""
    arrays = read_splits(release_files(data_dir))
    evaluation = eval_transform(img_size, crop_pct, mean=MEAN, std=STD)
    splits = {}
    if need_train:
        splits["train"] = IdxImageDataset(*arrays["train"], train_transform(img_size, mean=MEAN, std=STD))
    splits["dev"] = IdxImageDataset(*arrays["dev"], evaluation)
    splits["test"] = IdxImageDataset(*arrays["test"], evaluation)
    return splits
