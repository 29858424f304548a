"""``train.compile``: whether to compile, and which regions.

Off by default everywhere: on an H200, compiling each transformer block separately ran at
0.81–1.08× eager, while compiling the whole tokenizer ran 1.36× (``benchmarks/README.md``).
"""
from __future__ import annotations

import torch
import torch.nn as nn


def use_compile(train_cfg, device: torch.device) -> bool:
    """``train.compile`` (default off: per-block compile measured 0.81–1.08× eager on an H200)."""
    return bool(train_cfg.compile)


def compile_model(model: nn.Module, **compile_kwargs) -> list[str]:
    """``torch.compile`` the largest regions every entry point runs through, in place.

    The tokenizer's objectives call ``model(x)``, ``model.forward_tokens`` (through
    ``encoder.tokens``) and the encoder alone, so its ``encoder`` and ``decoder`` are compiled
    whole (``Module.compile``: the state-dict keys stay those of an eager run) and so is
    ``encoder.tokens``; a model without them (the DiT) is compiled whole.  Returns the
    compiled parts' names.
    """
    parts = [n for n in ("encoder", "decoder") if isinstance(getattr(model, n, None), nn.Module)]
    for name in parts:
        getattr(model, name).compile(**compile_kwargs)  # e.g. backend="aot_eager" (CPU tests)
    if "encoder" in parts and callable(getattr(model.encoder, "tokens", None)):
        model.encoder.tokens = torch.compile(model.encoder.tokens, **compile_kwargs)
        parts.append("encoder.tokens")
    if not parts:
        model.compile(**compile_kwargs)
    return parts or ["model"]
