import pytest
import torch
import torch_fidelity
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

from core.config import EvalConfig
from core.data.synthetic import SyntheticShapes
from core.eval.featnet import DEFAULT_WEIGHTS, FEATNET_NAME
from core.eval.fid import (
    INCEPTION_NAME, Uint8Images, compute_fid_is, fidelity_kwargs, resolve_backbone, write_random_inception_weights,
)


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    # An empty TORCH_HOME and a loader that fails: any download attempt is a test failure.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def no_download(*args, **kwargs):
        raise AssertionError(f"download attempted: {args}")

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", no_download)


def _images(n, start=0, size=32):
    ds = SyntheticShapes("val", start + n, size, 10, 0)
    return torch.stack([torch.from_numpy(ds.render_uint8(i)).permute(2, 0, 1) for i in range(start, start + n)])


needs_featnet = pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason="featnet weights not built yet")


@needs_featnet
def test_embedded_fid_properties():
    real, other = _images(96), _images(96, start=96)
    noise = torch.randn(other.shape, generator=torch.Generator().manual_seed(0)) * 60
    noisy = (other.float() + noise).clamp(0, 255).to(torch.uint8)

    same = compute_fid_is(real, real, "embedded")
    assert abs(same["fid"]) < 1e-3
    assert same["backbone"] == FEATNET_NAME and same["num_fake"] == same["num_real"] == 96
    fid_other = compute_fid_is(other, real, "embedded")["fid"]
    fid_noisy = compute_fid_is(noisy, real, "embedded")["fid"]
    assert 0 < fid_other < fid_noisy
    assert 1.0 < same["inception_score"] <= 24.0  # IS is bounded by the 24 featnet classes


@needs_featnet
def test_embedded_equals_torch_fidelity_directly():
    fake, real = _images(40, start=40), _images(40)
    ours = compute_fid_is(fake, real, "embedded", device="cpu")
    # ADM's IS rule (consecutive chunks of 5000, no shuffle) is one unshuffled split for 40 images
    ref = torch_fidelity.calculate_metrics(
        input1=Uint8Images(fake, "fake"), input2=Uint8Images(real, "real"), fid=True, isc=True, isc_splits=1,
        samples_shuffle=False, feature_extractor=FEATNET_NAME, cuda=False, cache=False, save_cpu_ram=True,
        verbose=False,
    )
    # float64 running sums here, np.cov of the float32 features there
    assert ours["fid"] == pytest.approx(ref["frechet_inception_distance"], rel=1e-6)
    assert ours["inception_score"] == pytest.approx(ref["inception_score_mean"], rel=1e-9)
    assert ours["inception_score_std"] == pytest.approx(ref["inception_score_std"], rel=1e-9)


@needs_featnet
def test_embedded_accepts_other_resolutions():
    a, b = _images(12, size=48), _images(12, start=12, size=48)
    out = compute_fid_is(a, b, "embedded", isc=False)
    assert out["fid"] > 0 and out["inception_score"] is None


@pytest.mark.slow  # torch-fidelity Inception resizes to 299 px: ~1 min on a shared CPU
def test_inception_from_local_weights(tmp_path):
    path = write_random_inception_weights(tmp_path / "inception.pth", seed=0)
    sd = torch.load(path, weights_only=True)
    assert sd["fc.weight"].shape == (1008, 2048) and "Mixed_7c.branch_pool.conv.weight" in sd

    # Features on a few images straight from torch-fidelity's extractor, loaded from the file.
    extractor = torch_fidelity.utils.create_feature_extractor(
        INCEPTION_NAME, ["2048", "logits_unbiased"], cuda=False, feature_extractor_weights_path=str(path),
        verbose=False,
    )
    assert torch.equal(extractor.fc.weight, sd["fc.weight"])
    fake, real = _images(4, start=4), _images(4)
    with torch.no_grad():
        pool, logits = extractor(fake)
    assert pool.shape == (4, 2048) and logits.shape == (4, 1008)
    assert torch.isfinite(pool).all() and pool.std(0).mean() > 0  # features differ between images

    ours = compute_fid_is(fake, real, "inception", inception_weights=str(path), device="cpu")
    assert ours["backbone"] == INCEPTION_NAME and ours["fid"] > 0
    ref = torch_fidelity.calculate_metrics(
        input1=Uint8Images(fake, "fake"), input2=Uint8Images(real, "real"), fid=True, isc=True, isc_splits=1,
        samples_shuffle=False, feature_extractor=INCEPTION_NAME, feature_extractor_weights_path=str(path),
        cuda=False, cache=False, save_cpu_ram=True, verbose=False,
    )
    assert ours["fid"] == pytest.approx(ref["frechet_inception_distance"], rel=1e-6)
    assert ours["inception_score"] == pytest.approx(ref["inception_score_mean"], rel=1e-6)


def test_resolve_backbone(tmp_path):
    assert resolve_backbone(EvalConfig()) == FEATNET_NAME
    assert resolve_backbone(EvalConfig(fid_backbone="embedded")) == FEATNET_NAME
    missing = str(tmp_path / "missing.pth")
    with pytest.warns(UserWarning, match="eval.inception_weights"):
        assert resolve_backbone(EvalConfig(inception_weights=missing)) == FEATNET_NAME
    with pytest.raises(FileNotFoundError, match="eval.inception_weights"):
        resolve_backbone(EvalConfig(fid_backbone="inception", inception_weights=missing))
    present = tmp_path / "inception.pth"
    present.write_bytes(b"x")
    assert resolve_backbone(EvalConfig(inception_weights=str(present))) == INCEPTION_NAME
    assert resolve_backbone(EvalConfig(fid_backbone="embedded", inception_weights=str(present))) == FEATNET_NAME


def test_bad_input(tmp_path):
    imgs = _images(4)
    with pytest.raises(ValueError, match="uint8"):
        compute_fid_is(imgs.float(), imgs)
    with pytest.raises(ValueError, match="unknown FID backbone"):
        fidelity_kwargs("vgg")
    with pytest.raises(FileNotFoundError, match="eval.inception_weights"):
        compute_fid_is(imgs, imgs, "inception", inception_weights=str(tmp_path / "nope.pth"))


# ----------------------------------------------------------------------------- streaming, reference file


def _stream(images, backbone="embedded", isc=True, batch=16, **kw):
    from core.eval.fid import FeatureStatistics, FidelityFeatures

    feats, stats, logits = FidelityFeatures(backbone, isc=isc, device="cpu", **kw), FeatureStatistics(), []
    for i in range(0, len(images), batch):  # uneven last batch on purpose
        f, lg = feats.features(images[i:i + batch])
        stats.update(f)
        logits.append(lg)
    return stats, (torch.cat(logits) if isc else None)


@needs_featnet
def test_streaming_statistics_equal_torch_fidelity_in_memory():
    from torch_fidelity.metric_fid import fid_features_to_statistics

    from core.eval.fid import frechet_distance, inception_score

    fake, real = _images(40, start=40), _images(40)
    s_fake, logits = _stream(fake, batch=12)
    s_real, _ = _stream(real, isc=False, batch=7)
    ours = compute_fid_is(fake, real, "embedded", device="cpu")
    assert frechet_distance(s_fake.statistics(), s_real.statistics()) == pytest.approx(ours["fid"], rel=1e-5)
    assert inception_score(logits)[0] == pytest.approx(ours["inception_score"], rel=1e-5)
    # The running sums equal numpy's mean/cov of all the features at once.
    from core.eval.fid import FidelityFeatures

    all_feats, _ = FidelityFeatures("embedded", isc=False, device="cpu").features(real)
    ref = fid_features_to_statistics(all_feats.float())
    got = s_real.statistics()
    assert got["mu"] == pytest.approx(ref["mu"], abs=1e-5)
    assert got["sigma"] == pytest.approx(ref["sigma"], abs=1e-5)


@needs_featnet
def test_reference_statistics_file(tmp_path):
    from core.eval.fid import frechet_distance, load_reference_statistics, save_statistics

    real, fake = _images(48), _images(48, start=48)
    s_real, _ = _stream(real, isc=False)
    path = save_statistics(s_real.statistics(), tmp_path / "ref.npz")
    stats, desc = load_reference_statistics(path, dim=128)
    assert desc.startswith("file:ref.npz:sha256:") and len(desc.split(":")[-1]) == 16
    s_fake, _ = _stream(fake, isc=False)
    direct = compute_fid_is(fake, real, "embedded", isc=False, device="cpu")["fid"]
    assert frechet_distance(s_fake.statistics(), stats) == pytest.approx(direct, rel=1e-5)

    # Hostile files: named in the error with the config key.
    with pytest.raises(FileNotFoundError, match="eval.fid_reference"):
        load_reference_statistics(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not an npz")
    with pytest.raises(ValueError, match="eval.fid_reference.*junk.npz"):
        load_reference_statistics(tmp_path / "junk.npz")
    import numpy as np

    np.savez(tmp_path / "nosigma.npz", mu=np.zeros(128))
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        load_reference_statistics(tmp_path / "nosigma.npz")
    with pytest.raises(ValueError, match="2048-d"):
        load_reference_statistics(path, dim=2048)
