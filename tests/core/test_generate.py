"""Generator stage: latent encoding/normalisation, DiT training (overfit, exact resume), generate()."""
import json

import pytest
import torch
from torch.utils.data import TensorDataset

from core.config import ConfigError, GeneratorConfig, load_config
from core.generator.flow import sample_latents
from core.generator.latents import LatentStats, cached_latents, encode_dataset, load_or_compute_stats
from core.generator.train import ema_decay, eval_steps, resolve_shift, train_generator
from core.models.tokenizer import TokenizerArgs, build_tokenizer


def test_latent_stats_normalise_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([0.5, 2.0, 10.0]).view(1, 3, 1, 1)
    shift = torch.tensor([1.0, -3.0, 0.0]).view(1, 3, 1, 1)
    z = torch.randn(200, 3, 4, 4, generator=g) * scale + shift
    stats = LatentStats.compute(z)
    zn = stats.normalize(z)
    per_channel = zn.transpose(0, 1).reshape(3, -1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(per_channel.std(1), torch.ones(3), atol=1e-4)
    assert torch.allclose(stats.denormalize(zn), z, atol=1e-5)
    # computed once, then reused: other latents do not change the stored stats
    first = load_or_compute_stats(tmp_path / "latent_stats.pt", z)
    again = load_or_compute_stats(tmp_path / "latent_stats.pt", z * 5)
    assert torch.equal(first.mean, again.mean) and torch.equal(first.std, again.std)
    with pytest.raises(ValueError, match="4 channels"):
        stats.normalize(torch.zeros(1, 4, 2, 2))


def test_encode_dataset_matches_direct_encoding(tmp_path):
    torch.manual_seed(0)
    tok = build_tokenizer(TokenizerArgs(image_size=16, patch_size=4, latent_size=2, latent_channels=4)).eval()
    images = torch.rand(10, 3, 16, 16) * 2 - 1
    data = TensorDataset(images, torch.arange(10) % 3)
    z, y = encode_dataset(tok, data, batch_size=4)
    with torch.no_grad():
        assert torch.allclose(z, tok.encode(images), atol=1e-5)
    assert z.shape == (10, 4, 2, 2) and torch.equal(y, torch.arange(10) % 3)
    z1, _ = cached_latents(tok, data, tmp_path / "lat.pt", batch_size=4)
    z2, _ = cached_latents(None, data, tmp_path / "lat.pt")  # second call reads the file
    assert torch.equal(z1, z2)


def test_eval_steps_shift_and_ema_warmup():
    cfg = GeneratorConfig(steps=100, eval_at=[50, 10, 100])
    assert eval_steps(cfg) == [10, 50, 100]
    with pytest.raises(ValueError, match=r"generator.eval_at=\[0, 200\]"):
        eval_steps(GeneratorConfig(steps=100, eval_at=[0, 200]))
    assert resolve_shift(GeneratorConfig(), (16, 4, 4)) == pytest.approx(0.25)
    assert resolve_shift(GeneratorConfig(time_shift=2.0), (16, 4, 4)) == 2.0
    assert ema_decay(0.9995, 0) == pytest.approx(0.1)
    assert ema_decay(0.9995, 290) == pytest.approx(291 / 300)
    assert ema_decay(0.9995, 100_000) == 0.9995


def four_latents():
    # 4 fixed latents (c=4, h=2), 2 classes: latents 0, 1 are class 0; 2, 3 class 1.
    base = torch.randn(4, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    return base, torch.tensor([0, 0, 1, 1])


def test_generator_overfits_a_few_latents(tmp_path):
    base, lab = four_latents()
    cfg = GeneratorConfig(size="micro", steps=120, batch_size=64, lr=5e-3, ema=0.95, class_dropout=0.1,
                          time_shift=1.0)
    out = train_generator(cfg, base.repeat(16, 1, 1, 1), lab.repeat(16), 2, tmp_path, seed=0, ckpt_every=10**6)
    z, y = sample_latents(out["ema"], 64, 2, (4, 2, 2), steps=20, shift=out["shift"])
    dist = torch.cdist(z.flatten(1), base.flatten(1))  # (64, 4)
    nearest = dist.argmin(1)
    spacing = torch.cdist(base.flatten(1), base.flatten(1))[~torch.eye(4, dtype=torch.bool)].min()
    assert (lab[nearest] == y).float().mean() >= 0.95  # class k lands on class-k latents
    assert dist.min(1).values.median() < 0.3 * spacing
    assert len(torch.unique(nearest)) == 4  # both latents of each class are reached
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 120 and log[-1]["loss"] < log[0]["loss"]


def test_exact_resume_and_evaluation_bookkeeping(tmp_path):
    base, lab = four_latents()
    latents, labels = base.repeat(4, 1, 1, 1), lab.repeat(4)
    calls = []

    def evaluate(ema, step):
        calls.append(step)
        assert not ema.training
        return [{"name": "probe", "value": float(step), "step": step, "backbone": None, "num_samples": 1}]

    def run(path, stop=None):
        cfg = GeneratorConfig(size="micro", steps=6, batch_size=8, lr=1e-3, ema=0.9, eval_at=[2])
        return train_generator(cfg, latents, labels, 2, path, seed=3, evaluate=evaluate, ckpt_every=100,
                               stop_at_step=stop)

    straight = run(tmp_path / "a")
    assert calls == [2, 6]
    calls.clear()
    stopped = run(tmp_path / "b", stop=4)  # interrupted after step 4 (checkpoint written)
    assert stopped["step"] == 4 and calls == [2]
    calls.clear()
    resumed = run(tmp_path / "b")
    assert calls == [6]  # step 2 was evaluated before the interruption and is not repeated
    for key in ("model", "ema"):
        for (name, a), b in zip(straight[key].state_dict().items(), resumed[key].state_dict().values()):
            assert torch.equal(a, b), (key, name)
    assert resumed["metrics"] == straight["metrics"]
    calls.clear()
    again = run(tmp_path / "b")  # finished: nothing trained or evaluated again
    assert calls == [] and again["step"] == 6
    with pytest.raises(ValueError, match="generator.size='mini'"):
        cfg = GeneratorConfig(size="mini", steps=8, batch_size=8)
        train_generator(cfg, latents, labels, 2, tmp_path / "b", seed=3)


def test_generate_end_to_end_on_a_tiny_tokenizer(tmp_path, capsys):
    from core.config import save_config
    from core.generate import generate, main
    from core.train import train

    overrides = {
        "data.train_size": 128, "data.val_size": 64, "data.batch_size": 32,
        "loss.perceptual": 0.0, "train.steps": 10, "train.ckpt_every": 10, "train.device": "cpu",
        "eval.batch_size": 64,
        "generator.steps": 12, "generator.batch_size": 32, "generator.num_samples": 64,
        "generator.sample_steps": 8, "generator.eval_at": [6], "generator.sampler": "heun",
        "generator.cfg_scale": 1.5,
    }
    cfg = load_config(overrides=overrides)
    train(cfg, tmp_path / "tok")
    out = tmp_path / "gen"
    stopped = generate(cfg, tmp_path / "tok", out, stop_at_step=8)
    assert stopped["stopped_at"] == 8 and not (out / "result.json").exists()
    with pytest.raises(ValueError, match="different config"):
        generate(load_config(overrides={**overrides, "generator.lr": 1.0}), tmp_path / "tok", out)
    result = generate(cfg, tmp_path / "tok", out)  # resumes at step 8

    assert json.loads((out / "result.json").read_text()) == result
    rows = {(m["name"], m["step"]): m for m in result["metrics"]}
    assert set(rows) == {("gfid", 6), ("inception_score", 6), ("gfid", 12), ("inception_score", 12),
                         ("generator_train_time_s", 12)}
    for step in (6, 12):
        assert rows[("gfid", step)]["backbone"] == "embedded-featnet-v1"
        assert rows[("gfid", step)]["value"] > 0 and rows[("inception_score", step)]["value"] >= 1.0
        assert rows[("gfid", step)]["num_samples"] == 64
    assert rows[("generator_train_time_s", 12)]["value"] > 0
    assert result["info"]["num_classes"] == 10 and result["info"]["latent_shape"] == [16, 4, 4]
    for name in ("config.yaml", "log.jsonl", "samples.png", "latent_stats.pt", "latents_train/index.json"):
        assert (out / name).is_file(), name
    info = result["info"]
    assert info["latent_cache"] == {"dtype": "float32", "shards": 1} and info["num_train_latents"] == 128
    # 64 samples over 10 classes: labels i mod 10, 6 or 7 per class; reference = balanced val subset
    assert info["sample_labels"]["per_class_min"] == 6 and info["sample_labels"]["per_class_max"] == 7
    assert info["gfid_reference"] == "balanced-val-subset:64:seed=0" and info["num_real"] == 64
    assert info["real_subset"]["classes_covered"] == 10
    assert info["inception_score_rule"].startswith("adm: consecutive splits of 5000")
    assert info["sample_precision"] == "fp32" and info["continued_from"] == [] and info["steps"] == 12
    assert info["inception_score_rules"] == {info["inception_score_rule"]: [6, 12]}
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["eval"]["step"] for r in log if "eval" in r] == [6, 6, 12, 12]

    # The CLI on the finished directory returns the stored result without training again.
    save_config(cfg, tmp_path / "run.yaml")
    mtime = (out / "result.json").stat().st_mtime_ns
    assert main([str(tmp_path / "run.yaml"), "--tokenizer-dir", str(tmp_path / "tok"), "--out-dir", str(out)]) == 0
    assert (out / "result.json").stat().st_mtime_ns == mtime
    assert "gfid" in capsys.readouterr().out

    with pytest.raises(ConfigError, match=r"tok: holds a tokenizer of a different config \(.*model.latent_channels: 16 there, 8 here"):
        generate(load_config(overrides={"model.latent_channels": 8}), tmp_path / "tok", tmp_path / "other")


def test_gfid_against_a_reference_statistics_file(tmp_path, tiny_config):
    """eval.fid_reference replaces the real val subset; the file and its hash are recorded."""
    import numpy as np

    from core.data import build_dataset
    from core.eval.fid import FidelityFeatures, save_statistics
    from core.generate import generate
    from core.generator.gfid import real_statistics
    from core.train import train

    over = {"train.steps": 2, "generator.steps": 2, "generator.batch_size": 8, "generator.num_samples": 20,
            "generator.sample_steps": 2, "eval.batch_size": 8, "data.val_size": 30}
    cfg = tiny_config(**over)
    train(cfg, tmp_path / "tok")
    plain = generate(cfg, tmp_path / "tok", tmp_path / "plain")
    assert plain["info"]["gfid_reference"] == "balanced-val-subset:20:seed=0"

    # The same statistics as a file give the same gFID (same samples, same reference) ...
    features = FidelityFeatures("embedded", isc=False, device="cpu")
    val = build_dataset(cfg.data, "val")
    same, _ = real_statistics(val, 20, 0, features, batch_size=8)
    save_statistics(same, tmp_path / "same.npz")
    with_file = generate(tiny_config(**over, **{"eval.fid_reference": str(tmp_path / "same.npz")}),
                         tmp_path / "tok", tmp_path / "file")
    gfid = lambda r: [m["value"] for m in r["metrics"] if m["name"] == "gfid"][0]  # noqa: E731
    assert gfid(with_file) == pytest.approx(gfid(plain), rel=1e-6)
    ref = with_file["info"]["gfid_reference"]
    assert ref.startswith("file:same.npz:sha256:") and with_file["info"]["num_real"] is None
    # ... and other statistics (train images) give another number: the file is what is used.
    other, _ = real_statistics(build_dataset(cfg.data, "train"), 60, 0, features, batch_size=8)
    save_statistics(other, tmp_path / "other.npz")
    with_other = generate(tiny_config(**over, **{"eval.fid_reference": str(tmp_path / "other.npz")}),
                          tmp_path / "tok", tmp_path / "other")
    assert gfid(with_other) != pytest.approx(gfid(plain), rel=1e-3)

    # A file of the wrong width fails before any generator training.
    np.savez(tmp_path / "wide.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError, match="eval.fid_reference.*2048-d"):
        generate(tiny_config(**over, **{"eval.fid_reference": str(tmp_path / "wide.npz")}), tmp_path / "tok",
                 tmp_path / "wide")
    assert not (tmp_path / "wide" / "checkpoints").exists() and not (tmp_path / "wide" / "latents_train").exists()
