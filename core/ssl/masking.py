"""BEiT/iBOT block-wise masks on the patch grid, drawn for the whole batch at once, on the device.

iBOT's reference builds each mask in a Python loop over images and token positions.  Here
one round adds one block to every image at once: each image draws 10 proposals, the
patches each would newly cover are read off a summed-area table of the current masks, and
the first acceptable one is kept — the reference's "10 attempts" rule.

Per image: ratio = 0 with probability ``1 - mask_prob`` else U(mask_ratio); target
``ratio·T²`` patches.  A proposal has area U(min_area, remaining) with
``min_area = (T // 3)²`` (iBOT), aspect log-uniform in (0.3, 1/0.3); it is accepted when it
adds between 1 and ``remaining`` new patches.

The masks are built where the generator lives (the training device): a fixed number of
rounds (:func:`rounds_for`), no branch on the masks, so a GPU never waits for the host
nor the host for the GPU.  An image that reached its target, or found no acceptable
proposal, takes no more blocks; one still short after the last round keeps what it has
(measured: none of 20,000 images at T = 8..32 needs that many rounds).  Given a
:class:`core.seed.BatchRNG`, the masks of the whole global batch are drawn and this rank
keeps its rows (ranks mask differently; the global batch is one process's).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from core.seed import BatchRNG, as_batch_rng

ATTEMPTS = 10  # proposals per block; an image stops when none of them fits (iBOT)


def rounds_for(grid: int, mask_ratio: tuple[float, float]) -> int:
    """Rounds that let every image reach its target: a block covers at least ``(T // 3)²`` patches
    while that many remain, so ``high·T² / (T // 3)²`` blocks plus the small ones at the end."""
    min_area = max(1, (grid // 3) ** 2)
    return int(math.ceil(mask_ratio[1] * grid * grid / min_area)) + grid


def block_masks(
    batch: int,
    grid: int,
    generator: "torch.Generator | BatchRNG",
    mask_prob: float = 0.5,
    mask_ratio: tuple[float, float] = (0.1, 0.5),
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    max_rounds: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Block masks (batch, grid, grid) bool, True = masked patch, on the generator's device.

    Parameters
    ----------
    batch, grid : number of masks and token grid side T.
    generator : generator or :class:`core.seed.BatchRNG` (then ``batch`` is this rank's
        share); the masks are a pure function of its state.
    mask_prob : share of images that get a mask at all.
    mask_ratio : (low, high) of the uniform per-image masking ratio.
    max_rounds : blocks per image at most (default :func:`rounds_for`).
    device : where the result goes (default: the generator's device).
    """
    if not 0.0 <= mask_prob <= 1.0 or not 0.0 <= mask_ratio[0] <= mask_ratio[1] <= 1.0:
        raise ValueError(f"need 0 <= mask_prob <= 1 and 0 <= low <= high <= 1; got {mask_prob}, {mask_ratio}")
    rng = as_batch_rng(generator)
    mine = slice(rng.rank, None, rng.world_size)  # this rank's masks among the global batch's
    batch, generator = batch * rng.world_size, rng.generator
    dev = generator.device
    T = grid
    masked = torch.rand(batch, generator=generator, device=dev) < mask_prob
    ratio = mask_ratio[0] + (mask_ratio[1] - mask_ratio[0]) * torch.rand(batch, generator=generator, device=dev)
    target = torch.where(masked, ratio * T * T, 0.0)  # (B,) fractional, like iBOT
    min_area = float((T // 3) ** 2)
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])

    mask = torch.zeros(batch, T, T, dtype=torch.bool, device=dev)
    count = torch.zeros(batch, device=dev)
    stopped = torch.zeros(batch, dtype=torch.bool, device=dev)
    coords = torch.arange(T, device=dev)
    side = T + 1
    for _ in range(rounds_for(T, mask_ratio) if max_rounds is None else max_rounds):
        active = (count < target) & ~stopped  # (B,); inactive images draw too (the stream stays fixed)
        # Every image draws its ATTEMPTS proposals; failed attempts leave the mask as it is,
        # so testing them all at once and keeping the first success is the sequential rule.
        u = torch.rand(4, batch, ATTEMPTS, generator=generator, device=dev)
        remaining = (target - count)[:, None]  # (B, 1)
        area = min_area + (remaining - min_area) * u[0]  # (B, A); uniform(a, b) allows b < a
        ar = torch.exp(log_lo + (log_hi - log_lo) * u[1])
        h = torch.round(torch.sqrt(area * ar)).long()
        w = torch.round(torch.sqrt(area / ar)).long()
        fits = (h >= 1) & (w >= 1) & (h < T) & (w < T)
        top = torch.floor(u[2] * (T - h + 1).clamp(min=1)).long()  # randint(0, T - h)
        left = torch.floor(u[3] * (T - w + 1).clamp(min=1)).long()
        # patches each proposal would newly cover: h·w minus those already masked, read off
        # a summed-area table of the current masks (no (B, A, T, T) rasterisation)
        sat = F.pad(mask.float().cumsum(1).cumsum(2), (1, 0, 1, 0)).view(batch, side * side)
        bottom, right = (top + h).clamp(max=T), (left + w).clamp(max=T)
        corners = torch.stack([bottom * side + right, top * side + right, bottom * side + left,
                               top * side + left], dim=1).view(batch, 4 * ATTEMPTS)
        s = sat.gather(1, corners).view(batch, 4, ATTEMPTS).long()  # exact: counts < 2^24
        new = h * w - (s[:, 0] - s[:, 1] - s[:, 2] + s[:, 3])  # (B, A)
        ok = fits & (new > 0) & (new <= remaining)
        hit = ok.any(dim=1) & active
        first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)  # first accepted attempt, (B, 1)
        box = torch.cat([top.gather(1, first), bottom.gather(1, first), left.gather(1, first),
                         right.gather(1, first)], dim=1)  # (B, 4)
        rows = (coords >= box[:, 0:1]) & (coords < box[:, 1:2])  # (B, T)
        cols = (coords >= box[:, 2:3]) & (coords < box[:, 3:4])
        mask |= rows[:, :, None] & cols[:, None, :] & hit[:, None, None]
        count += torch.where(hit, new.gather(1, first)[:, 0], 0).float()
        stopped |= active & ~hit  # no attempt fitted: the image keeps what it has
    out = mask[mine]
    return out if device is None else out.to(device, non_blocking=True)


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
