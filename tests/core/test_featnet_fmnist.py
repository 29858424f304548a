"""The Fashion-MNIST proxy FID/IS backbone (issue 19 §2): selected by config, named in its rows,
small, its own weights, and a feature space that tells the test split's classes apart."""
import numpy as np
import pytest
import torch

from core.config import EvalConfig
from core.eval.featnet import (
    FEATNET_FMNIST_NAME, FEATNET_NAME, FMNIST_WEIGHTS, PERCEPNET_WEIGHTS, load_featnet,
)
from core.eval.fid import FidelityFeatures, compute_fid_is, resolve_backbone

from fmnist_fixture import HAVE_REAL, NO_REAL, write_fmnist


def test_selected_by_config_and_named():
    assert resolve_backbone(EvalConfig(fid_backbone="embedded-fmnist")) == FEATNET_FMNIST_NAME
    assert resolve_backbone(EvalConfig()) == FEATNET_NAME  # 'auto' without Inception weights: unchanged
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8, generator=g)
    b = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8, generator=g)
    out = compute_fid_is(a, b, backbone="embedded-fmnist", device="cpu")
    assert out["backbone"] == FEATNET_FMNIST_NAME and out["fid"] > 0
    ref = compute_fid_is(a, b, backbone="embedded", device="cpu")
    assert ref["backbone"] == FEATNET_NAME and ref["fid"] != pytest.approx(out["fid"])  # other weights, other FID
    feats = FidelityFeatures("embedded-fmnist", isc=False, device="cpu")
    assert feats.backbone == FEATNET_FMNIST_NAME and feats.features(a)[0].shape == (24, 128)


def test_asset_small_own_weights_trained_on_fmnist_train():
    assert FMNIST_WEIGHTS.stat().st_size <= 1_000_000
    blob = torch.load(FMNIST_WEIGHTS, weights_only=True)
    info = blob["info"]
    assert info["dataset"] == "fashion_mnist" and info["arch"] == "featnet-fmnist" and info["val_size"] == 10000
    assert blob["num_classes"] == 10 and info["val_acc"] >= 0.85
    fm, percep, synth = load_featnet(FMNIST_WEIGHTS), load_featnet(PERCEPNET_WEIGHTS), load_featnet()
    fm_tensors = [p.detach().flatten() for p in fm.parameters()]
    for other in (percep, synth):
        for q in other.parameters():
            for p in fm_tensors:
                assert p.shape != q.flatten().shape or not torch.equal(p, q.detach().flatten())


@pytest.mark.skipif(not HAVE_REAL, reason=NO_REAL)
def test_accuracy_on_real_test_split():
    """The recorded test-split accuracy is what the committed weights give (2,000 balanced images:
    SE ~= 0.007 at 0.88, so 0.03 is > 4 SE)."""
    from core.data import balanced_subset
    from core.data.fashion_mnist import FashionMNIST

    torch.set_num_threads(1)
    val = FashionMNIST(None, "val", 32)
    idx = balanced_subset(val.labels, 2000, 1)
    x = torch.from_numpy(np.stack([val.render_uint8(i) for i in idx])).permute(0, 3, 1, 2).float() / 127.5 - 1
    net = load_featnet(FMNIST_WEIGHTS)
    with torch.no_grad():
        acc = float((torch.cat([net(b) for b in x.split(500)]).argmax(1).numpy() == val.labels[idx]).mean())
    recorded = torch.load(FMNIST_WEIGHTS, weights_only=True)["info"]["val_acc"]
    assert abs(acc - recorded) < 0.03 and acc >= 0.85


def test_train_featnet_on_idx_files(tmp_path):
    """``train_featnet --arch featnet-fmnist`` on tiny idx files: float16 file, 10 classes, loadable."""
    from core.eval.train_featnet import main

    write_fmnist(tmp_path / "fm", n_train=60, n_val=20)
    out = tmp_path / "w.pt"
    main(["--arch", "featnet-fmnist", "--data-root", str(tmp_path / "fm"), "--train-size", "40", "--epochs", "1",
          "--batch", "20", "--out", str(out)])
    blob = torch.load(out, weights_only=True)
    assert blob["info"]["train_size"] == 40 and blob["info"]["val_size"] == 20 and blob["num_classes"] == 10
    assert blob["info"]["stored_as"] == "float16"
    assert all(v.dtype == torch.float16 for v in blob["state_dict"].values() if v.is_floating_point())
    assert load_featnet(out).num_classes == 10
