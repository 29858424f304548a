import json

import pytest
import torch

from core.config import ConfigError, load_config
from core.eval.featnet import DEFAULT_WEIGHTS, FEATNET_NAME
from core.eval.metrics import psnr, to_uint8
from core.evaluate import METRICS, evaluate, main

pytestmark = pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason="featnet weights not built yet")

OVERRIDES = {
    "train.steps": 5, "train.ckpt_every": 5, "train.log_every": 1, "train.device": "cpu",
    "data.train_size": 96, "data.val_size": 48, "data.batch_size": 8, "data.num_classes": 4,
    "eval.num_samples": 40, "eval.probe_train": 96, "eval.probe_val": 48, "eval.batch_size": 16,
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from core.train import train

    torch.set_num_threads(1)
    cfg = load_config(None, OVERRIDES)
    run_dir = tmp_path_factory.mktemp("tok")
    train(cfg, run_dir)
    return cfg, run_dir


def test_evaluate_end_to_end(tokenizer, tmp_path):
    from core.data import build_dataset
    from core.models.load import load_tokenizer

    cfg, run_dir = tokenizer
    out = tmp_path / "eval"
    result = evaluate(cfg, run_dir, out)

    on_disk = json.loads((out / "result.json").read_text())
    assert on_disk == result and (out / "config.yaml").is_file()
    m = {x["name"]: x for x in result["metrics"]}
    assert set(m) == set(METRICS)
    assert m["psnr"]["backbone"] is None and m["psnr"]["num_samples"] == 40 and m["psnr"]["step"] == 5
    assert m["lpips"]["backbone"] == "lpips-substitute-percepnet-v1" == result["info"]["lpips_backbone"]
    assert m["rfid"]["backbone"] == FEATNET_NAME and m["rfid"]["value"] > 0
    assert 0 < m["ssim"]["value"] < 1 and m["lpips"]["value"] > 0
    for name in ("probe_acc_before", "probe_acc_after"):
        assert 0 <= m[name]["value"] <= 1 and m[name]["num_samples"] == 48
    before, after = m["probe_acc_before"]["value"], m["probe_acc_after"]["value"]
    assert m["structure_loss"]["value"] == pytest.approx(1 - after / before)

    # Independent check of PSNR: reconstruct the same (class-balanced) val images outside evaluate().
    from core.data import balanced_subset

    model, _ = load_tokenizer(run_dir)
    val = build_dataset(cfg.data, "val")
    idx = balanced_subset(val.labels, 40, cfg.eval.subset_seed)
    x = torch.stack([val[i][0] for i in idx])
    subsets = result["info"]["subsets"]
    assert subsets["reconstruction"]["size"] == 40 and subsets["reconstruction"]["classes_covered"] == 4
    assert subsets["probe_train"] == {"key": "eval.probe_train", "size": 96, "seed": 0, "of": 96, "classes_covered": 4,
                                      "num_classes": 4, "per_class_min": 24, "per_class_max": 24}
    with torch.no_grad():
        x_hat, _ = model(x)
    assert m["psnr"]["value"] == pytest.approx(float(psnr(to_uint8(x_hat), to_uint8(x)).mean()), rel=1e-5)

    # Idempotent: the complete result is returned without recomputation.
    (out / "config.yaml").unlink()
    assert evaluate(cfg, run_dir, out) == result
    assert not (out / "config.yaml").exists()


def test_cli_and_config_errors(tokenizer, tmp_path):
    cfg, run_dir = tokenizer
    too_many = load_config(None, {**OVERRIDES, "eval.num_samples": 1000})
    with pytest.raises(ConfigError, match="eval.num_samples"):
        evaluate(too_many, run_dir, tmp_path / "a")
    other_model = load_config(None, {**OVERRIDES, "model.latent_channels": 8})
    with pytest.raises(ConfigError, match=r"holds a tokenizer of a different config \(model.latent_channels: 16 there, 8 here"):
        evaluate(other_model, run_dir, tmp_path / "b")
    assert main(["--tokenizer-dir", str(tmp_path / "missing"), "--out-dir", str(tmp_path / "c")]) == 2


def test_cli_writes_result(tokenizer, tmp_path):
    from core.config import save_config

    cfg, run_dir = tokenizer
    save_config(cfg, tmp_path / "run.yaml")
    out = tmp_path / "cli"
    assert main([str(tmp_path / "run.yaml"), "--tokenizer-dir", str(run_dir), "--out-dir", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert {m["name"] for m in result["metrics"]} == set(METRICS)
    assert load_config(out / "config.yaml") == cfg


# ----------------------------------------------------------------------------- class-sorted ImageFolder


@pytest.fixture(scope="module")
def imagefolder_tokenizer(tmp_path_factory):
    """A tokenizer trained briefly on a class-sorted 20-class ImageFolder (PNG + JPEG)."""
    from imagefolder_fixture import write_imagefolder

    from core.train import train

    torch.set_num_threads(1)
    root = write_imagefolder(tmp_path_factory.mktemp("imagefolder"), num_classes=20, train_per_class=32,
                             val_per_class=6)
    cfg = load_config(None, {
        "data.name": "imagefolder", "data.root": str(root), "data.image_size": 32, "data.batch_size": 8,
        "model.patch_size": 8, "model.latent_size": 4, "model.latent_channels": 8, "loss.perceptual": 0.0,
        "optim.warmup_steps": 1, "train.steps": 2, "train.log_every": 1, "train.ckpt_every": 2, "train.device": "cpu",
        # subsets smaller than the splits (640 train, 120 val images): the first 240 train
        # images are 7.5 of the 20 classes, the first 60 val images 10 of them
        "eval.num_samples": 60, "eval.probe_train": 240, "eval.probe_val": 60, "eval.batch_size": 20,
    })
    run_dir = tmp_path_factory.mktemp("tok_if")
    train(cfg, run_dir)
    return cfg, run_dir


def test_probe_on_class_sorted_imagefolder_uses_balanced_subsets(imagefolder_tokenizer, tmp_path):
    cfg, run_dir = imagefolder_tokenizer
    result = evaluate(cfg, run_dir, tmp_path / "eval")
    m = {x["name"]: x["value"] for x in result["metrics"]}
    # Solid-colour classes are linearly separable in the pooled tokens: a probe that sees
    # every class scores ~1; first-N subsets score <= 0.8 (val classes 8, 9 never trained on).
    assert m["probe_acc_before"] >= 0.95
    info = result["info"]["subsets"]
    for key, size in (("reconstruction", 60), ("probe_train", 240), ("probe_val", 60)):
        assert info[key]["size"] == size and info[key]["classes_covered"] == 20 == info[key]["num_classes"]
        assert info[key]["per_class_max"] - info[key]["per_class_min"] <= 1
    assert result["info"]["subset_seed"] == 0 and m["rfid"] >= 0
