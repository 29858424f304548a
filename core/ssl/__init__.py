"""Joint self-supervised training of the tokenizer's encoder: iBOT (default), DINO, DINOv2-style.

``SSLObjective(cfg.ssl, model, weight=cfg.loss.ssl, total_steps=cfg.train.steps, seed=cfg.train.seed)``
is the trainer Objective; the rest of the package are its parts (heads, masking, multi-crop,
EMA teacher, one module per loss).
"""
from core.ssl.objective import SSLObjective

__all__ = ["SSLObjective"]
