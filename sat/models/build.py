"""A task's new model: the LRA encoder for LRA tasks, the ViT for image folders (a checkpoint's model is
sat/run_state.py's `model_from_checkpoint`)."""

from __future__ import annotations

import torch.nn as nn

from sat.config import TaskConfig
from sat.models.lra import LRAModel


def build_model(cfg: TaskConfig, vocab_size: int, backend: str = "auto") -> nn.Module:
    """A new model as the config describes it; `vocab_size` is the LRA task's (unused for images)."""
    if cfg.dataset.kind == "image_folder":
        from sat.models.vit import ViT

        return ViT(cfg, backend)
    return LRAModel(cfg, vocab_size, backend)
