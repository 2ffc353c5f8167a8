"""Image-folder batches for the training loop, as `Batch` objects like the LRA loaders give.

`ImageTrainStream`: endless training batches of one rank. Every epoch builds a DataLoader (workers, seeded
augmentation, sat/data/image_transforms.py) over this rank's shard of a `DistributedSampler` (shuffled from the
run's seed and the epoch number; with one process the "shard" is the whole set). Resume: the state is (epoch,
batches taken in it); a resumed run rebuilds that epoch's permutation and skips the batches already taken,
so the sample order continues at the batch. The workers' augmentation streams restart from (seed, epoch,
rank), so the crops/flips of the rest of that epoch differ from the uninterrupted run's: resume is exact in
model, optimizer and sample order, and epoch-granular in augmentation randomness.

`eval_batches`: one deterministic pass (eval transform), optionally only every world-th image for rank-sharded
evaluation whose counts are summed over ranks.
"""

from __future__ import annotations

import copy
import itertools

from torch.utils.data import DistributedSampler, Sampler, Subset

from sat.data.batch import Batch
from sat.data.image_folder import ImageFolderDataset
from sat.data.image_loader import build_loader
from sat.data.image_transforms import EvalTransform, eval_transform


class _SkipSampler(Sampler):
    """The indices of `base` after its first `skip` (the batches a resumed run has already trained on)."""

    def __init__(self, base: Sampler, skip: int) -> None:
        self.base, self.skip = base, skip

    def __iter__(self):
        return itertools.islice(iter(self.base), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.base) - self.skip)


class ImageTrainStream:
    def __init__(self, dataset: ImageFolderDataset, batch_size: int, num_workers: int, seed: int,
                 rank: int = 0, world: int = 1) -> None:
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        self.seed, self.rank = seed, rank
        # drop_last in the sampler gives every rank the same number of samples, hence of batches and steps.
        self.sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                          drop_last=world > 1 and len(dataset) >= world)
        self.drop_last = len(self.sampler) >= batch_size
        self.epoch, self.pos = 0, 0
        self.substituted = 0  # unreadable files replaced by the next readable one (this rank, this process)
        self._it = None

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank)."""
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _open(self):
        self.sampler.set_epoch(self.epoch)
        skip = _SkipSampler(self.sampler, self.pos * self.batch_size)  # resumed mid-epoch: batches taken
        loader = build_loader(self.dataset, self.batch_size, shuffle=False, num_workers=self.num_workers,
                              seed=(self.seed * 1_000_003 + self.epoch * 1009 + self.rank) % 2**63,
                              drop_last=self.drop_last, sampler=skip, persistent_workers=False)
        return iter(loader)

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        if self._it is None:
            self._it = self._open()
        try:
            images, labels, substituted = next(self._it)
        except StopIteration:
            self.epoch, self.pos = self.epoch + 1, 0
            self._it = self._open()
            images, labels, substituted = next(self._it)
        self.pos += 1
        self.substituted += int(substituted.sum())
        return Batch(x=images, mask=None, y=labels)  # x: (B, C, H, W) float32

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._it = None


class _Batches:
    """Re-iterable one-pass view of a DataLoader of (image, label, substituted) as `Batch` objects."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, labels, _ in self.loader:
            yield Batch(x=images, mask=None, y=labels)


def eval_batches(dataset: ImageFolderDataset, batch_size: int, img_size: int, crop_pct: float,
                 num_workers: int, rank: int = 0, world: int = 1) -> _Batches:
    """One deterministic pass with the evaluation transform (normalised as the dataset's own transform: one mean
    and std per channel of its images); with world > 1, every world-th image."""
    if not isinstance(dataset.transform, EvalTransform):
        stats = {k: getattr(dataset.transform, k) for k in ("mean", "std") if hasattr(dataset.transform, k)}
        dataset = copy.copy(dataset)  # shares the file list (or the images); only the transform differs
        dataset.transform = eval_transform(img_size, crop_pct=crop_pct, **stats)
    part = dataset if world == 1 else Subset(dataset, range(rank, len(dataset), world))
    return _Batches(build_loader(part, batch_size, shuffle=False, num_workers=num_workers, seed=0,
                                 drop_last=False, persistent_workers=False))
