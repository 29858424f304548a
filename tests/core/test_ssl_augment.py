"""Multi-crop augmentation: shapes, ranges, exact determinism per (seed, step), photometric ops."""
import pytest
import torch

from core.ssl.augment import (MultiCrop, gaussian_blur, local_crop_size, random_grayscale, resized_crops,
                              solarize, step_generator)


def _images(b=4, s=32):
    return torch.rand(b, 3, s, s, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_multicrop_shapes_range_and_crop_major_order():
    mc = MultiCrop(32, 16, local_crops=3)
    g, l = mc(_images(), step_generator(0, 5))
    assert g.shape == (8, 3, 32, 32) and l.shape == (12, 3, 16, 16)
    assert g.min() >= -1 and g.max() <= 1 and l.min() >= -1 and l.max() <= 1
    assert mc(_images(), step_generator(0, 5))[1] is not None
    assert MultiCrop(32, 16, local_crops=0)(_images(), step_generator(0, 5))[1] is None


def test_multicrop_is_a_function_of_seed_and_step():
    mc = MultiCrop(32, 16, local_crops=2)
    a = mc(_images(), step_generator(3, 10))
    b = mc(_images(), step_generator(3, 10))
    c = mc(_images(), step_generator(3, 11))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_resized_crop_samples_inside_the_image():
    # a horizontal ramp: every crop's values lie in the image's range and a crop of
    # area <= 0.25 spans at most the matching share of the ramp
    ramp = torch.linspace(-1, 1, 64).view(1, 1, 1, 64).expand(16, 3, 64, 64).contiguous()
    out = resized_crops(ramp, 16, (0.05, 0.25), step_generator(0, 0))
    span = out[:, 0].amax(dim=(1, 2)) - out[:, 0].amin(dim=(1, 2))
    assert (span <= 2 * (0.25 * 4 / 3) ** 0.5 + 0.05).all()  # width <= sqrt(area·max aspect)
    assert out.min() >= -1 and out.max() <= 1


def test_photometric_ops():
    x = torch.rand(6, 3, 16, 16)
    gray = random_grayscale(x, step_generator(0, 0), p=1.0)
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    sol = solarize(x, step_generator(0, 0), p=1.0)
    assert torch.allclose(sol, torch.where(x >= 0.5, 1 - x, x))
    const = torch.full((2, 3, 16, 16), 0.3)
    assert torch.allclose(gaussian_blur(const, step_generator(0, 0), p=1.0), const, atol=1e-6)
    big = torch.rand(2, 3, 224, 224)  # sigma U(0.1, 2) is in 224-px units
    assert gaussian_blur(big, step_generator(0, 0), p=1.0).var() < 0.9 * big.var()
    assert torch.equal(gaussian_blur(x, step_generator(0, 0), p=0.0), x)


def test_local_crop_size_rounding_and_errors():
    assert local_crop_size(224, 16) == 96
    assert local_crop_size(32, 8) == 16
    assert local_crop_size(32, 4) == 12
    assert local_crop_size(32, 8, size=24) == 24
    with pytest.raises(ValueError, match="ssl.local_crop_size=20"):
        local_crop_size(32, 8, size=20)


def test_ranks_crop_differently_and_together_crop_like_one_process():
    """Rank r holds images r, r+2, ... of the global batch (DeterministicBatchSampler): its crops are
    exactly those rows of one process's crops of the global batch, so the two ranks' crops differ."""
    from core.seed import BatchRNG

    mc = MultiCrop(32, 16, local_crops=2)
    images = _images(b=8)
    glob, loc = mc(images, step_generator(0, 5))  # one process, global batch 8: (16, ...), (16, ...)
    ranks = [mc(images[r::2], BatchRNG(step_generator(0, 5), r, 2)) for r in range(2)]
    for r, (g, l) in enumerate(ranks):
        for crop in range(2):  # crop-major: [crop 0 of the rank's 4 images, crop 1 of them]
            assert torch.allclose(g[4 * crop: 4 * crop + 4], glob[8 * crop + r: 8 * crop + 8: 2], atol=1e-6)
            assert torch.allclose(l[4 * crop: 4 * crop + 4], loc[8 * crop + r: 8 * crop + 8: 2], atol=1e-6)
    # the same images on the two ranks get different crops (before: every rank cropped image j alike)
    same = images[:4]
    a = mc(same, BatchRNG(step_generator(0, 5), 0, 2))
    b = mc(same, BatchRNG(step_generator(0, 5), 1, 2))
    assert not torch.allclose(a[0], b[0]) and not torch.allclose(a[1], b[1])
