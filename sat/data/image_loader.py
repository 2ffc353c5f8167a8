"""A seeded DataLoader for the image datasets.

Randomness: the train transform draws from its own ``random.Random``. `build_loader` gives the DataLoader
a ``torch.Generator`` seeded with ``seed``; each worker's ``torch.initial_seed()`` is then a deterministic
function of (seed, epoch number, worker id) and the worker init function reseeds the transform (and
``random`` / ``numpy``) from it. With ``num_workers=0`` `build_loader` reseeds the transform with ``seed``
once. Same seed, same ``num_workers``, same batch size -> the same batches; a different ``num_workers``
gives a different (equally valid) random stream.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


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
