import hashlib
from types import SimpleNamespace

import pytest
import torch
import torchvision
from torchvision.models.vgg import cfgs, make_layers

import torch_fidelity.sample_similarity_lpips as tf_lpips
from core.config import LossConfig
from core.eval.featnet import FEATNET_NAME
from core.losses.perceptual import LPIPS, build_perceptual_loss

CHANNELS = (64, 128, 256, 512, 512)


def _vgg_features_state_dict(seed=0):
    # torchvision's vgg16 'features.*' tensors (random init); the 120M-parameter classifier
    # is left out to keep the file small — the loader ignores it anyway.
    torch.manual_seed(seed)
    return {f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}


def _lin_state_dict(seed=1):
    g = torch.Generator().manual_seed(seed)
    return {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) / c for i, c in enumerate(CHANNELS)}


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("lpips") / "vgg16_lpips.pth"
    torch.save({**_vgg_features_state_dict(), **_lin_state_dict(), "classifier.6.bias": torch.zeros(1000)}, path)
    return path


def _images(seed=0, n=2, size=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    return torch.nn.functional.avg_pool2d(x, 3, 1, 1)


def test_vgg_state_dict_keys_match_torchvision():
    with torch.device("meta"):
        ref = torchvision.models.vgg16(weights=None).state_dict()
    ours = _vgg_features_state_dict()
    ref_feats = {k: v.shape for k, v in ref.items() if k.startswith("features.")}
    assert {k: v.shape for k, v in ours.items()} == ref_feats


def test_vgg_lpips_matches_torch_fidelity_reference(vgg_file, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # nothing may be downloaded
    lpips, name = build_perceptual_loss(LossConfig(lpips_weights=str(vgg_file)))
    assert name == "lpips-vgg16"

    # Reference: torch-fidelity's LPIPS (a port of the lpips package) with the same weights,
    # its two weight loaders pointed at our tensors instead of the network.
    def load_vgg():  # it reads only `.features` of the torchvision model
        features = make_layers(cfgs["D"])
        features.load_state_dict({k[len("features."):]: v for k, v in _vgg_features_state_dict().items()})
        return SimpleNamespace(features=features)

    monkeypatch.setattr(tf_lpips, "load_state_dict_from_url", lambda *a, **k: _lin_state_dict())
    monkeypatch.setattr(tf_lpips, "torchvision_load_pretrained_vgg16", load_vgg)
    ref = tf_lpips.SampleSimilarityLPIPS("lpips-ref")

    x, y = _images(0), _images(1)
    ours = lpips(x, y)
    theirs = ref((x + 1) * 127.5, (y + 1) * 127.5)  # it takes [0, 255]
    assert ours.shape == (2,)
    assert torch.allclose(ours, theirs.flatten(), rtol=1e-4, atol=1e-6)
    assert (ours > 0).all()


def test_vgg_without_lin_weights_is_named_uniform(tmp_path):
    path = tmp_path / "vgg16.pth"
    torch.save(_vgg_features_state_dict(), path)
    lpips, name = build_perceptual_loss(LossConfig(lpips_weights=str(path)))
    assert name == "lpips-vgg16-uniformlin"
    assert float(lpips(_images(0), _images(0)).abs().max()) == 0.0


def test_bad_weight_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="loss.lpips_weights"):
        build_perceptual_loss(LossConfig(lpips_weights=str(tmp_path / "missing.pth")))
    only_lins = tmp_path / "vgg.pth"
    torch.save(_lin_state_dict(), only_lins)  # the lpips package's file alone has no backbone
    with pytest.raises(ValueError, match="features.0.weight"):
        build_perceptual_loss(LossConfig(lpips_weights=str(only_lins)))
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        build_perceptual_loss(LossConfig(lpips_weights=str(garbage)))


def _hashes(module: torch.nn.Module) -> set[str]:
    return {hashlib.sha256(t.detach().float().contiguous().numpy().tobytes()).hexdigest()
            for t in module.state_dict().values() if t.numel() > 1}


def test_substitute_shares_no_weights_with_the_fid_backbone():
    # Training's perceptual loss must not be built on the offline FID/IS network: otherwise a
    # tokenizer trained with it optimises the very features its rFID is measured on.
    from core.eval.fid import FeatureExtractorFeatNet

    lpips, name = build_perceptual_loss(LossConfig(lpips_weights=None))
    fid_net = FeatureExtractorFeatNet(FEATNET_NAME, ["pool"]).net
    assert name == "lpips-substitute-percepnet-v1" and FEATNET_NAME not in name
    assert _hashes(lpips.backbone) and _hashes(fid_net)
    assert not _hashes(lpips.backbone) & _hashes(fid_net)  # no parameter/buffer tensor in common
    # and they are different functions, not just differently stored weights
    x = _images(0, n=4)
    shapes_fid = [tuple(t.shape) for t in fid_net.taps(x)]
    shapes_lpips = [tuple(t.shape) for t in lpips.backbone(x)]
    assert shapes_fid != shapes_lpips


def test_substitute_properties():
    lpips, name = build_perceptual_loss(LossConfig(lpips_weights=None))
    assert name == "lpips-substitute-percepnet-v1"
    x = _images(0, n=4)
    assert float(lpips(x, x).abs().max()) == 0.0
    # monotone in the noise level
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(x.shape, generator=g)
    d = [float(lpips(x, (x + s * noise).clamp(-1, 1)).mean()) for s in (0.02, 0.1, 0.3, 0.8)]
    assert d == sorted(d) and d[0] > 0
    assert d[-1] <= 2.0  # ReLU taps: mean over layers of 2(1 - cos) with cos >= 0
    # frozen backbone, gradient reaches the reconstruction, .train() keeps BatchNorm frozen
    parent = torch.nn.ModuleDict({"lpips": lpips}).train()
    assert not lpips.training and not any(m.training for m in lpips.modules())
    assert all(not p.requires_grad for p in lpips.parameters())
    x_hat = (x + 0.1 * noise).requires_grad_(True)
    lpips(x_hat, x).mean().backward()
    assert x_hat.grad is not None and x_hat.grad.abs().sum() > 0
    assert all(p.grad is None for p in lpips.parameters())
    # other resolutions run (fully convolutional taps)
    assert lpips(_images(0, n=1, size=48), _images(1, n=1, size=48)).shape == (1,)


class _ReluTap(torch.nn.Module):
    def forward(self, x):
        return [torch.relu(x)]


def test_all_zero_features_give_finite_gradients():
    # Positions where every channel of a ReLU tap is 0 (flat dark areas) must not make NaNs.
    lpips = LPIPS(_ReluTap())
    x_hat = (-torch.ones(1, 3, 4, 4)).requires_grad_(True)
    y = _images(0, n=1, size=4).abs()
    d = lpips(x_hat, y)
    d.sum().backward()
    assert torch.isfinite(d).all() and torch.isfinite(x_hat.grad).all()
    assert float(d.detach()) == pytest.approx(1.0)  # |0 - unit|² = 1 at each position
