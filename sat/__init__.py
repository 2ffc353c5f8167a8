"""SAT: an adaptive sparse-attention Transformer trainer (dense -> block-sparse attention, Monarch -> dense MLPs)."""

__version__ = "0.1.0"
