"""The dense-phase monitor, the block-layout choice and the scheduler that owns every transition."""
