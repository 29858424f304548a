"""Flow matching on latents (RAE stage-2 recipe) and its ODE samplers.

Convention: x_t = (1 − t)·x + t·ε with x data, ε ~ N(0, I); t = 0 is data, t = 1 noise.
The model predicts the velocity dx_t/dt = ε − x, trained with MSE.  Time is warped by the
resolution-dependent shift s = sqrt(prod(latent_shape) / 4096), t' = s·t / (1 + (s − 1)·t),
both for the training times (drawn logit-normal, then shifted) and for the sampler's grid.
Sampling integrates the ODE from t = 1 to t = 0 with Euler or Heun steps.

A velocity function here is any ``fn(x, t) -> v`` with x (B, ...), t (B,) — a DiT with its
labels bound (:func:`guided`) or a small MLP in tests.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def shift_for(latent_shape: Sequence[int]) -> float:
    """Time shift s = sqrt(prod(latent_shape) / 4096) for one latent of shape (c, h, w)."""
    return math.sqrt(math.prod(latent_shape) / 4096)


def time_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t' = s·t / (1 + (s − 1)·t): maps [0, 1] onto itself, s > 1 moves time toward noise."""
    return shift * t / (1 + (shift - 1) * t)


def sample_t(n: int, shift: float = 1.0, mean: float = 0.0, std: float = 1.0,
             generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """n logit-normal times sigmoid(N(mean, std²)), then shifted; (n,) float32."""
    u = torch.randn(n, generator=generator, device=device) * std + mean
    return time_shift(torch.sigmoid(u), shift)


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def flow_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    shift: float = 1.0,
    class_dropout: float = 0.0,
    null_class: int | None = None,
    generator: torch.Generator | None = None,
    shard: tuple[int, int] = (0, 1),
) -> torch.Tensor:
    """Flow-matching MSE of ``model(x_t, t, y)`` against the velocity ε − x.

    Parameters
    ----------
    model : callable (x_t (B, ...), t (B,), y (B,)) -> v (B, ...).
    x : data (B, ...); y : labels (B,).
    shift : time shift applied to the logit-normal t.
    class_dropout : probability of replacing a label by ``null_class`` (trains the
        unconditional branch used by classifier-free guidance).
    generator : source of all randomness (t, ε, dropout), so a checkpointed generator state
        resumes the exact sequence.
    shard : (rank, world_size) of data parallelism: ``x`` holds rows rank, rank + W, ... of
        the global batch (:class:`core.data.DeterministicBatchSampler`); t, ε and the dropout
        are drawn for the whole global batch and this rank keeps its rows, so the ranks' draws
        differ, every rank's generator stays in the same state, and W ranks compute exactly
        one process's loss terms (W times the noise draws: small beside the model).
    """
    rank, world = shard
    B = x.shape[0]
    rows = slice(rank, None, world)
    t = sample_t(B * world, shift, generator=generator, device=x.device)[rows]
    eps = torch.randn((B * world, *x.shape[1:]), generator=generator, device=x.device, dtype=x.dtype)[rows]
    tb = _bcast(t, x)
    x_t = (1 - tb) * x + tb * eps
    if class_dropout > 0:
        if null_class is None:
            raise ValueError("class_dropout > 0 needs null_class (the model's unconditional label)")
        drop = torch.rand(B * world, generator=generator, device=x.device)[rows] < class_dropout
        y = torch.where(drop, torch.full_like(y, null_class), y)
    return F.mse_loss(model(x_t, t, y), eps - x)


def guided(model: nn.Module, y: torch.Tensor, cfg_scale: float = 1.0) -> VelocityFn:
    """Bind labels (and CFG) to a DiT: returns fn(x, t) = model.forward_cfg(x, t, y, cfg_scale)."""
    return lambda x, t: model.forward_cfg(x, t, y, cfg_scale)


def time_grid(steps: int, shift: float = 1.0, device=None) -> torch.Tensor:
    """Decreasing times (steps + 1,) from 1 to 0: a uniform grid warped by the time shift."""
    if steps < 1:
        raise ValueError(f"sample_steps={steps} must be >= 1")
    return time_shift(torch.linspace(1.0, 0.0, steps + 1, device=device), shift)


@torch.no_grad()
def sample(
    velocity: VelocityFn,
    noise: torch.Tensor,
    steps: int = 50,
    sampler: str = "euler",
    shift: float = 1.0,
) -> torch.Tensor:
    """Integrate dx/dt = v(x, t) from t = 1 (``noise``) to t = 0; returns x_0 like ``noise``.

    Euler: x ← x + Δt·v(x, t).  Heun (2nd order): Euler predictor, then the average of the
    slopes at both ends (2 evaluations per step).
    """
    if sampler not in ("euler", "heun"):
        raise ValueError(f"generator.sampler={sampler!r} must be 'euler' or 'heun'")
    ts = time_grid(steps, shift, device=noise.device)
    x = noise
    B = x.shape[0]
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        dt = t_next - t  # negative
        v = velocity(x, t.expand(B))
        x_pred = x + dt * v
        if sampler == "heun":
            v_next = velocity(x_pred, t_next.expand(B))
            x_pred = x + dt * 0.5 * (v + v_next)
        x = x_pred
    return x


@torch.no_grad()
def sample_latents(
    model: nn.Module,
    num_samples: int,
    num_classes: int,
    latent_shape: Sequence[int],
    *,
    sampler: str = "euler",
    steps: int = 50,
    cfg_scale: float = 1.0,
    shift: float | None = None,
    seed: int = 0,
    batch_size: int = 256,
    device=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-balanced samples of a DiT (labels i mod num_classes), noise from ``seed``.

    ``shift`` must be the time shift the model was trained with (None: :func:`shift_for`).

    Returns
    -------
    latents (num_samples, *latent_shape) on ``device`` (in the model's normalised space), labels (num_samples,).
    """
    device = device or next(model.parameters()).device
    labels = torch.arange(num_samples, device=device) % num_classes
    g = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(num_samples, *latent_shape, generator=g).to(device)
    shift = shift_for(latent_shape) if shift is None else shift
    out = [
        sample(guided(model, labels[i : i + batch_size], cfg_scale), noise[i : i + batch_size], steps, sampler, shift)
        for i in range(0, num_samples, batch_size)
    ]
    return torch.cat(out), labels
