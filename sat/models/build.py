"""A task's model, new or from a checkpoint: the LRA encoder for LRA tasks, the ViT for image folders."""

from __future__ import annotations

import torch
import torch.nn as nn

from sat.checkpoint import CheckpointError
from sat.config import TaskConfig, from_dict
from sat.models.lra import LRAModel


def build_model(cfg: TaskConfig, vocab_size: int, backend: str = "auto") -> nn.Module:
    """A new model as the config describes it; `vocab_size` is the LRA task's (unused for images)."""
    if cfg.dataset.kind == "image_folder":
        from sat.models.vit import ViT

        return ViT(cfg, backend)
    return LRAModel(cfg, vocab_size, backend)


def load_weights(model: nn.Module, state: dict) -> None:
    """Load a checkpoint's weights, densifying the Monarch MLPs first if the run had densified them."""
    if state["scheduler"]["densify_step"] is not None:
        from sat.models.monarch import densify

        densify(model)
    model.load_state_dict(state["model"])


def model_from_checkpoint(state: dict, device: torch.device, backend: str = "auto") -> nn.Module:
    """Rebuild the model of a loaded checkpoint (densified if the run had densified) with its weights, on
    `device`; a checkpoint that does not fit its own config's model raises CheckpointError."""
    cfg = from_dict(state["config"])
    model = build_model(cfg, state["vocab_size"], backend)
    try:
        load_weights(model, state)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint does not match the model of task {cfg.task} "
                              f"({str(e).splitlines()[0]}); use the checkpoint of this task and config") from e
    return model.to(device)
