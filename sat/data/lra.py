"""LRA batches (`Batch`, sat/data/batch.py: one input (B, N) or two inputs (B, 2, N)) from a resumable loader.

Processed splits (sat/data/format.py) are held in memory as int arrays (LRA's largest split, Retrieval,
is ~0.5 GB as int16 ids; ListOps 96000 x 2048 int32 ~ 0.8 GB). Shuffling uses a torch.Generator whose
state, with the epoch and position, is part of the loader's state_dict so a resumed run sees the same batches.
"""

from __future__ import annotations

import numpy as np
import torch

from sat.data.batch import Batch
from sat.data.format import DataError, Split


def check_split(split: Split, seq_len: int, vocab_size: int, name: str, reserved: int = 0) -> None:
    """Refuse data that does not fit the model: too long, ids outside the vocabulary. `reserved` positions of
    the seq_len are the model's own (a class token)."""
    room = seq_len - reserved
    if split.x.shape[-1] > room:
        longest = int(split.lengths.max())
        if longest > room:
            held = f" less the {reserved} the class token takes (model.pooling 'cls')" if reserved else ""
            raise DataError(f"{name}: sequences of up to {longest} tokens exceed max_seq_len {seq_len}{held}; "
                            f"raise dataset.max_seq_len or re-run preprocessing with --max_len {room}")
    if split.x.size and (split.x.min() < 0 or split.x.max() >= vocab_size):
        raise DataError(f"{name}: token ids outside [0, {vocab_size - 1}]; the data does not match its meta.json")


class LRALoader:
    """Iterates a Split in batches padded to `seq_len`; infinite (epochs) when `repeat`, else one pass."""

    def __init__(self, split: Split, batch_size: int, seq_len: int, shuffle: bool, seed: int = 0,
                 repeat: bool = False, drop_last: bool = False) -> None:
        self.split, self.batch_size, self.seq_len = split, batch_size, seq_len
        self.shuffle, self.repeat, self.drop_last = shuffle, repeat, drop_last
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch, self.pos = 0, 0
        self._order = self._new_order()
        width = split.x.shape[-1]
        self._x = torch.from_numpy(np.ascontiguousarray(split.x[..., : min(width, seq_len)]))
        self._lengths = torch.from_numpy(split.lengths)
        self._y = torch.from_numpy(split.y)
        self._padded = bool((self._lengths < seq_len).any())

    def _new_order(self) -> torch.Tensor:
        n = len(self.split)
        return torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        n = len(self.split)
        end = self.pos + self.batch_size
        if self.pos >= n or (self.drop_last and end > n):
            if not self.repeat:
                raise StopIteration
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._new_order()
            end = self.batch_size
        idx = self._order[self.pos:end]
        self.pos = end
        return self._make(idx)

    def _make(self, idx: torch.Tensor) -> Batch:
        x = self._x[idx].long()  # (B, L) or (B, 2, L), L <= seq_len
        if x.shape[-1] < self.seq_len:
            x = torch.nn.functional.pad(x, (0, self.seq_len - x.shape[-1]))
        mask = None
        if self._padded:
            positions = torch.arange(self.seq_len)
            mask = positions < self._lengths[idx].unsqueeze(-1)  # (B, N) or (B, 2, N)
        return Batch(x=x, mask=mask, y=self._y[idx])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "generator": self.generator.get_state(),
                "order": self._order.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self.generator.set_state(state["generator"])
        self._order = state["order"].clone()
