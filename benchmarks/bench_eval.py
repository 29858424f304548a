"""Evaluation speed: images/s through each FID backbone, and one full ``evaluate()``.

* FID backbones, through torch-fidelity's own extractor objects on uint8 images of the
  synthetic set: ``embedded-featnet-v1`` (committed weights) and ``inception-v3-compat``
  (random weights written locally: the same compute as the real file; Inception resizes
  every image to 299 px, so its cost does not depend on the input size).
* ``evaluate()`` of a quickstart-size tokenizer (micro, 32 px, defaults: 512 rec.
  samples, probe on 2048 train / 512 val images) trained for ``--train-steps`` steps;
  the tokenizer training time is not included.

    OMP_NUM_THREADS=1 python benchmarks/bench_eval.py --threads 1
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from core.config import load_config  # noqa: E402
from core.data.synthetic import SyntheticShapes  # noqa: E402
from core.eval.featnet import FEATNET_NAME  # noqa: E402
from core.eval.fid import INCEPTION_NAME, write_random_inception_weights  # noqa: E402


def images(n: int, size: int) -> torch.Tensor:
    ds = SyntheticShapes("val", n, size, 10, 0)
    return torch.stack([torch.from_numpy(ds.render_uint8(i)).permute(2, 0, 1) for i in range(n)])


def backbone_rate(name: str, weights: str | None, imgs: torch.Tensor, batch: int, device: str) -> float:
    from torch_fidelity.utils import create_feature_extractor

    feats = ["pool", "logits_unbiased"] if name == FEATNET_NAME else ["2048", "logits_unbiased"]
    ext = create_feature_extractor(name, feats, cuda=device == "cuda", feature_extractor_weights_path=weights,
                                   verbose=False)
    imgs = imgs.to(device)
    with torch.no_grad():
        ext(imgs[:batch])  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(0, len(imgs), batch):
            ext(imgs[i:i + batch])
        if device == "cuda":
            torch.cuda.synchronize()
    return len(imgs) / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--embedded-images", type=int, default=1024)
    p.add_argument("--inception-images", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--skip-evaluate", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    out: dict = {"device": a.device, "threads": a.threads, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        imgs = images(max(a.embedded_images, a.inception_images), 32)
        out["embedded_img_per_s"] = round(backbone_rate(FEATNET_NAME, None, imgs[:a.embedded_images], a.batch,
                                                        a.device), 1)
        print(json.dumps(out), flush=True)
        weights = str(write_random_inception_weights(Path(tmp) / "inception.pth"))
        out["inception_img_per_s"] = round(backbone_rate(INCEPTION_NAME, weights, imgs[:a.inception_images],
                                                         min(a.batch, a.inception_images), a.device), 2)
        print(json.dumps(out), flush=True)
        if not a.skip_evaluate:
            from core.evaluate import evaluate
            from core.train import train

            cfg = load_config(None, {"train.steps": a.train_steps, "train.ckpt_every": a.train_steps,
                                     "train.device": a.device})
            t0 = time.perf_counter()
            train(cfg, Path(tmp) / "tok")
            out["tokenizer_train_s"] = round(time.perf_counter() - t0, 1)
            t0 = time.perf_counter()
            result = evaluate(cfg, Path(tmp) / "tok", Path(tmp) / "eval")
            out["evaluate_s"] = round(time.perf_counter() - t0, 1)
            out["evaluate_metrics"] = {m["name"]: round(m["value"], 4) for m in result["metrics"]}
            out["evaluate_backbones"] = {k: result["info"][k] for k in ("lpips_backbone", "fid_backbone")}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
