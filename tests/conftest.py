"""Shared fixtures."""
from __future__ import annotations

import pytest

from core.config import RunConfig, load_config

# A run that trains in seconds on a CPU: micro ViT, 32 px, 16 tokens, batch 8, no perceptual term.
TINY = {
    "data.image_size": 32, "data.batch_size": 8, "data.train_size": 64, "data.val_size": 16,
    "model.patch_size": 8, "model.latent_size": 4, "model.latent_channels": 8,
    "loss.perceptual": 0.0,
    "optim.warmup_steps": 2, "train.steps": 6, "train.log_every": 2, "train.ckpt_every": 2, "train.device": "cpu",
}


@pytest.fixture
def tiny_config():
    """``tiny_config(**{"train.steps": 8, ...}) -> RunConfig``: the tiny run with overrides."""

    def make(**overrides) -> RunConfig:
        return load_config(None, {**TINY, **overrides}, origin="<tiny test config>")

    return make
