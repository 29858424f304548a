"""BEiT/iBOT block-wise masks on the patch grid, drawn for the whole batch at once.

iBOT's reference builds each mask in a Python loop over images and token positions.  Here
one round adds one block to every image at once: each image draws 10 proposals, the
patches each would newly cover are read off a summed-area table of the current masks, and
the first acceptable one is kept — the reference's "10 attempts" rule.  The round loop (not an image or token loop) ends when every image has
reached its target or found no acceptable proposal.

Per image: ratio = 0 with probability ``1 - mask_prob`` else U(mask_ratio); target
``ratio·T²`` patches.  A proposal has area U(min_area, remaining) with
``min_area = (T // 3)²`` (iBOT), aspect log-uniform in (0.3, 1/0.3); it is accepted when it
adds between 1 and ``remaining`` new patches.

The masks are built on the CPU (they are a function of a CPU generator, and the round loop
branches on them: on a GPU every round would be a device-to-host sync) and copied to the
target device once.  Given a :class:`core.seed.BatchRNG`, the masks of the whole global
batch are drawn and this rank keeps its rows (ranks mask differently; the global batch is
one process's).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from core.seed import BatchRNG, as_batch_rng

ATTEMPTS = 10  # proposals per block; an image stops when none of them fits (iBOT)


def block_masks(
    batch: int,
    grid: int,
    generator: "torch.Generator | BatchRNG",
    mask_prob: float = 0.5,
    mask_ratio: tuple[float, float] = (0.1, 0.5),
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    max_rounds: int = 10_000,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Block masks (batch, grid, grid) bool on ``device``, True = masked patch.

    Parameters
    ----------
    batch, grid : number of masks and token grid side T.
    generator : CPU generator or :class:`core.seed.BatchRNG` (then ``batch`` is this rank's
        share); the masks are a pure function of its state (not of ``device``).
    mask_prob : share of images that get a mask at all.
    mask_ratio : (low, high) of the uniform per-image masking ratio.
    """
    if not 0.0 <= mask_prob <= 1.0 or not 0.0 <= mask_ratio[0] <= mask_ratio[1] <= 1.0:
        raise ValueError(f"need 0 <= mask_prob <= 1 and 0 <= low <= high <= 1; got {mask_prob}, {mask_ratio}")
    rng = as_batch_rng(generator)
    mine = slice(rng.rank, None, rng.world_size)  # this rank's masks among the global batch's
    batch, generator = batch * rng.world_size, rng.generator
    T = grid
    masked = torch.rand(batch, generator=generator) < mask_prob
    ratio = mask_ratio[0] + (mask_ratio[1] - mask_ratio[0]) * torch.rand(batch, generator=generator)
    target = torch.where(masked, ratio * T * T, torch.zeros(batch))  # (B,) fractional, like iBOT
    min_area = float((T // 3) ** 2)
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])

    mask = torch.zeros(batch, T, T, dtype=torch.bool)
    count = torch.zeros(batch)
    stopped = torch.zeros(batch, dtype=torch.bool)
    coords = torch.arange(T)
    for _ in range(max_rounds):
        active = (count < target) & ~stopped
        if not active.any():
            break
        # every image draws its ATTEMPTS proposals (so the stream does not depend on who is
        # active); only active images are rasterised.  Failed attempts leave the mask as it
        # is, so testing them all at once and keeping the first success is the sequential rule.
        u = torch.rand(4, batch, ATTEMPTS, generator=generator)
        idx = active.nonzero()[:, 0]
        remaining = (target - count)[idx, None]  # (n, 1)
        area = min_area + (remaining - min_area) * u[0, idx]  # (n, A); uniform(a, b) allows b < a
        ar = torch.exp(log_lo + (log_hi - log_lo) * u[1, idx])
        h = torch.round(torch.sqrt(area * ar)).long()
        w = torch.round(torch.sqrt(area / ar)).long()
        fits = (h >= 1) & (w >= 1) & (h < T) & (w < T)
        top = torch.floor(u[2, idx] * (T - h + 1).clamp(min=1)).long()  # randint(0, T - h)
        left = torch.floor(u[3, idx] * (T - w + 1).clamp(min=1)).long()
        # patches each proposal would newly cover: h·w minus those already masked, read off
        # a summed-area table of the current masks (no (n, A, T, T) rasterisation)
        n, side = len(idx), T + 1
        sat = F.pad(mask[idx].float().cumsum(1).cumsum(2), (1, 0, 1, 0)).view(n, side * side)
        bottom, right = (top + h).clamp(max=T), (left + w).clamp(max=T)
        corners = torch.stack([bottom * side + right, top * side + right, bottom * side + left,
                               top * side + left], dim=1).view(n, 4 * ATTEMPTS)
        s = sat.gather(1, corners).view(n, 4, ATTEMPTS).long()  # exact: counts < 2^24
        new = h * w - (s[:, 0] - s[:, 1] - s[:, 2] + s[:, 3])  # (n, A)
        ok = fits & (new > 0) & (new <= remaining)
        hit = ok.any(dim=1)
        first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)  # first accepted attempt, (n, 1)
        box = torch.cat([top.gather(1, first), bottom.gather(1, first), left.gather(1, first),
                         right.gather(1, first)], dim=1)  # (n, 4)
        rows = (coords >= box[:, 0:1]) & (coords < box[:, 1:2])  # (n, T)
        cols = (coords >= box[:, 2:3]) & (coords < box[:, 3:4])
        chosen = rows[:, :, None] & cols[:, None, :]  # (n, T, T)
        mask[idx[hit]] |= chosen[hit]
        count[idx] += torch.where(hit, new.gather(1, first)[:, 0], 0).float()
        stopped[idx[~hit]] = True  # no attempt fitted: the image keeps what it has
    return mask[mine].to(device, non_blocking=True)


def pool_mask(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Map a patch-grid mask (B, T, T) to the encoder's output token grid, flattened (B, N').

    With staged compression the output grid is T/2: a compressed token counts as masked
    when ANY of its 2×2 children was masked (its input saw a mask token), so the MIM loss
    asks it to predict the teacher's unmasked token at the same place.
    """
    B, T, _ = mask.shape
    gh, gw = grid
    if (gh, gw) == (T, T):
        return mask.reshape(B, T * T)
    if T % gh or T // gh != T // gw or T % gw:
        raise ValueError(f"cannot map a {T}x{T} patch mask onto a {gh}x{gw} token grid")
    r = T // gh
    pooled = F.max_pool2d(mask[:, None].float(), kernel_size=r)  # (B, 1, gh, gw)
    return pooled.reshape(B, gh * gw) > 0
