"""Loading a trained tokenizer: the one way every stage that consumes a tokenizer gets it."""
from __future__ import annotations

from pathlib import Path

import torch

from core.config import RunConfig, load_config
from core.models.tokenizer import TCAE, build_tokenizer, tokenizer_args
from core.trainer.checkpoint import LATEST, latest_checkpoint, load_checkpoint


def checkpoint_path(path: str | Path) -> Path:
    """A checkpoint file, or a run directory's newest checkpoint."""
    path = Path(path)
    if not path.is_dir():
        return path
    return latest_checkpoint(path / "checkpoints") or path / "checkpoints" / LATEST


def checkpoint_weights(ckpt: dict, ema: bool) -> dict:
    """The EMA weights of a tokenizer checkpoint when asked for and kept, else the raw weights."""
    return ckpt["ema"] if ema and ckpt.get("ema") is not None else ckpt["model"]


def load_tokenizer(run_dir: str | Path, ema: bool = True, map_location: str | torch.device = "cpu") -> tuple[TCAE, RunConfig]:
    """The trained tokenizer of a ``core.train`` run, in eval mode, and its config.

    Parameters
    ----------
    run_dir : the tokenizer run directory (holding ``config.yaml`` and ``checkpoints/latest.pt``).
    ema : load the EMA weights when the run kept them (``optim.ema``), else the raw weights.
    map_location : device for the weights.

    Raises
    ------
    FileNotFoundError naming the missing config or checkpoint.
    """
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"tokenizer run {run_dir}: no config.yaml (not a core.train run directory?)")
    cfg = load_config(cfg_path)
    ckpt = load_checkpoint(checkpoint_path(run_dir), map_location=map_location)
    model = build_tokenizer(tokenizer_args(cfg.model, cfg.data.image_size))
    model.load_state_dict(checkpoint_weights(ckpt, ema))
    return model.to(map_location).eval(), cfg
