import math

import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from core.eval.metrics import psnr, psnr_mean, ssim, to_uint8


def _pair(seed=0, shape=(4, 3, 32, 32), noise=20.0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    # smooth-ish images so SSIM is far from 0 and the test is not trivial
    a = torch.nn.functional.avg_pool2d(a.float(), 3, 1, 1).round().to(torch.uint8)
    b = (a.float() + noise * torch.randn(shape, generator=g)).clamp(0, 255).round().to(torch.uint8)
    return a, b


def test_to_uint8_range_and_rounding():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 5)
    u = to_uint8(x)
    assert u.dtype == torch.uint8
    assert u.flatten().tolist() == [0, 0, 128, 255, 255]  # 127.5 rounds half to even -> 128
    with pytest.raises(TypeError, match="float"):
        to_uint8(u)


@pytest.mark.parametrize("shape", [(3, 3, 32, 32), (2, 3, 17, 23)])
def test_psnr_ssim_match_scikit_image(shape):
    a, b = _pair(shape=shape)
    p, s = psnr(a, b), ssim(a, b)
    for i in range(shape[0]):
        ai = a[i].permute(1, 2, 0).numpy()
        bi = b[i].permute(1, 2, 0).numpy()
        ref_p = peak_signal_noise_ratio(ai, bi, data_range=255)
        ref_s = structural_similarity(
            ai, bi, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
            channel_axis=-1, data_range=255,
        )
        assert abs(float(p[i]) - ref_p) < 1e-4
        assert abs(float(s[i]) - ref_s) < 1e-4
    assert 0.0 < float(s.mean()) < 1.0


def test_identical_images():
    a, _ = _pair()
    assert torch.isinf(psnr(a, a)).all()
    assert torch.allclose(ssim(a, a), torch.ones(a.shape[0], dtype=torch.float64))
    assert psnr_mean(psnr(a, a)) == math.inf


def test_more_noise_is_worse():
    a, b1 = _pair(noise=5.0)
    _, b2 = _pair(noise=40.0)
    assert psnr(a, b1).mean() > psnr(a, b2).mean()
    assert ssim(a, b1).mean() > ssim(a, b2).mean()


def test_bad_input_errors():
    a, b = _pair()
    with pytest.raises(TypeError, match="uint8"):
        psnr(a.float(), b.float())
    with pytest.raises(ValueError, match="shape"):
        ssim(a, b[:, :, :16])
    small = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="11x11"):
        ssim(small, small)
