"""Block masks: configured ratio distribution, determinism, and the compressed-grid mapping."""
import math
import random

import pytest
import torch

from core.ssl.masking import block_masks, pool_mask


def reference_mask(T, ratio, rng, aspect=(0.3, 1 / 0.3)):
    """iBOT's per-image Python loop (re-derived), for comparison in distribution."""
    mask = [[False] * T for _ in range(T)]
    high, count = ratio * T * T, 0
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    while count < high:
        remaining, delta = high - count, 0
        for _ in range(10):
            area = rng.uniform((T // 3) ** 2, remaining)
            ar = math.exp(rng.uniform(*log_aspect))
            h, w = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
            if 1 <= w < T and 1 <= h < T:
                top, left = rng.randint(0, T - h), rng.randint(0, T - w)
                covered = sum(mask[i][j] for i in range(top, top + h) for j in range(left, left + w))
                if 0 < h * w - covered <= remaining:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if not mask[i][j]:
                                mask[i][j] = True
                                delta += 1
            if delta > 0:
                break
        if delta == 0:
            break
        count += delta
    return count / (T * T)


@pytest.mark.parametrize("T", [8, 16])
def test_mask_ratio_distribution_matches_configured_and_reference(T):
    n = 2000
    masks = block_masks(n, T, torch.Generator().manual_seed(1), mask_prob=0.5, mask_ratio=(0.1, 0.5))
    assert masks.shape == (n, T, T) and masks.dtype == torch.bool
    ratios = masks.float().mean(dim=(1, 2))
    share = (ratios > 0).float().mean().item()
    assert abs(share - 0.5) < 3 * math.sqrt(0.25 / n)  # Bernoulli(mask_prob), 3 sigma
    r = ratios[ratios > 0]
    assert r.max().item() <= 0.5  # never more than the largest target
    # realised ratios follow U(0.1, 0.5) up to the last block that did not fit
    rng = random.Random(0)
    ref = torch.tensor([reference_mask(T, rng.uniform(0.1, 0.5), rng) for _ in range(600)])
    assert r.mean().item() == pytest.approx(ref.mean().item(), abs=0.015)
    for q in (0.1, 0.5, 0.9):
        assert torch.quantile(r, q).item() == pytest.approx(torch.quantile(ref, q).item(), abs=0.03)
    assert 0.27 < r.mean().item() < 0.31  # U(0.1, 0.5) has mean 0.3


def test_mask_prob_and_ratio_edges():
    g = torch.Generator().manual_seed(0)
    assert not block_masks(64, 8, g, mask_prob=0.0).any()
    full = block_masks(200, 8, g, mask_prob=1.0, mask_ratio=(0.3, 0.3)).float().mean(dim=(1, 2))
    assert (full > 0).all() and (full <= 0.3).all() and full.mean() > 0.2
    with pytest.raises(ValueError, match="mask_prob"):
        block_masks(4, 8, g, mask_prob=1.5)


def test_masks_are_deterministic_given_the_generator():
    a = block_masks(32, 16, torch.Generator().manual_seed(7))
    b = block_masks(32, 16, torch.Generator().manual_seed(7))
    c = block_masks(32, 16, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_pool_mask_any_child():
    m = torch.zeros(2, 4, 4, dtype=torch.bool)
    m[0, 0, 1] = True  # child of compressed token (0, 0)
    m[1, 3, 3] = True  # child of compressed token (1, 1)
    assert pool_mask(m, (4, 4)).shape == (2, 16)
    assert pool_mask(m, (2, 2)).tolist() == [[True, False, False, False], [False, False, False, True]]
    with pytest.raises(ValueError, match="3x3"):
        pool_mask(m, (3, 3))


def test_rank_masks_are_rows_of_the_global_batch_masks():
    from core.seed import BatchRNG, step_generator

    full = block_masks(16, 8, step_generator(0, 3, 1), mask_prob=1.0)
    ranks = [block_masks(8, 8, BatchRNG(step_generator(0, 3, 1), r, 2), mask_prob=1.0) for r in range(2)]
    assert torch.equal(ranks[0], full[0::2]) and torch.equal(ranks[1], full[1::2])
    assert not torch.equal(ranks[0], ranks[1])
