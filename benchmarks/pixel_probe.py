"""Raw-pixel linear probes: how hard is a dataset, and what must a tokenizer's probe beat?

Two uses, run by hand:

* The synthetic set's difficulty: standardised pixels -> multinomial logistic regression,
  trained on the train split and scored on the val split; ``--cnn`` also trains a small conv
  net for a few epochs to show the classes are learnable::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pixel_probe.py --sizes 32 64 [--cnn]

* The baselines of ``core.evaluate``'s probe (:func:`probe_baselines`): the *same* probe
  (``eval.probe``, ridge by default) on the *same* class-balanced subsets (``eval.probe_train``
  / ``eval.probe_val``, ``eval.subset_seed``) as a sweep's evaluate stage, fed raw pixels
  (3·H·W dims) and pooled raw patches (each p×p×3 patch flattened, averaged over the
  (H/p)·(W/p) positions: the pooling of the encoder's tokens, without the encoder).  A probe
  before the bottleneck that does not beat its pooled-raw-patch baseline has learned no class
  information beyond pooled pixel statistics::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pixel_probe.py --sweep sweeps/science_check_fmnist.yaml
"""
from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from core.config import RunConfig
from core.data import SyntheticShapes, balanced_subset, build_dataset, dataset_labels
from core.eval.probe import linear_probe


def load(split: str, n: int, size: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    ds = SyntheticShapes(split, n, size, classes)
    x = np.stack([ds.render_uint8(i) for i in range(n)]).astype(np.float32)  # (n, H, W, 3)
    return x, np.array([ds.label(i) for i in range(n)])


def pixel_probe(xtr, ytr, xva, yva, c: float) -> float:
    scaler = StandardScaler().fit(xtr.reshape(len(xtr), -1))
    clf = LogisticRegression(C=c, max_iter=500)
    clf.fit(scaler.transform(xtr.reshape(len(xtr), -1)), ytr)
    return float(clf.score(scaler.transform(xva.reshape(len(xva), -1)), yva))


def cnn_probe(xtr, ytr, xva, yva, classes: int, epochs: int) -> float:
    torch.manual_seed(0)
    to_t = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2) / 127.5 - 1
    xtr_t, xva_t = to_t(xtr), to_t(xva)
    ytr_t = torch.from_numpy(ytr)
    block = lambda i, o: nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))
    net = nn.Sequential(block(3, 32), block(32, 64), block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(128, classes))
    opt = torch.optim.AdamW(net.parameters(), 2e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(xtr_t)).split(64):
            loss = nn.functional.cross_entropy(net(xtr_t[idx]), ytr_t[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        pred = torch.cat([net(b).argmax(1) for b in xva_t.split(256)])
    return float((pred.numpy() == yva).mean())


def _images(dataset, indices: np.ndarray) -> torch.Tensor:
    """float32 (n, 3, H, W) in [-1, 1] of ``indices``, as the evaluate stage's loader gives them."""
    return torch.stack([dataset[int(i)][0] for i in indices])


def pooled_patches(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(n, 3·p·p) mean over positions of the p×p patches of x (n, 3, H, W)."""
    return F.unfold(x, kernel_size=patch, stride=patch).mean(2)  # unfold: (n, 3·p·p, L)


def probe_baselines(cfg: RunConfig, patch_sizes=(16, 8, 4)) -> dict:
    """Accuracies of the evaluate stage's probe on raw pixels and on pooled raw patches.

    Parameters
    ----------
    cfg : a run's config; its ``data`` and ``eval`` sections fix dataset, probe and subsets.
    patch_sizes : the p of the pooled-raw-patch baselines (one per tokenizer patch size).

    Returns
    -------
    dict(raw_pixels=acc, pooled_patch={p: acc}, chance=1/K, probe_train=n, probe_val=n,
    method=cfg.eval.probe); accuracies are fractions.
    """
    train, val = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "val")
    ytr_np, yva_np = dataset_labels(train), dataset_labels(val)
    itr = balanced_subset(ytr_np, cfg.eval.probe_train, cfg.eval.subset_seed)
    iva = balanced_subset(yva_np, cfg.eval.probe_val, cfg.eval.subset_seed)
    xtr, xva = _images(train, itr), _images(val, iva)
    ytr, yva = torch.from_numpy(ytr_np[itr]), torch.from_numpy(yva_np[iva])
    k = int(max(ytr_np.max(), yva_np.max())) + 1

    def acc(ftr: torch.Tensor, fva: torch.Tensor) -> float:
        return linear_probe(ftr, ytr, fva, yva, method=cfg.eval.probe, num_classes=k)["acc"]

    return {
        "raw_pixels": acc(xtr.flatten(1), xva.flatten(1)),
        "pooled_patch": {p: acc(pooled_patches(xtr, p), pooled_patches(xva, p)) for p in patch_sizes},
        "chance": 1.0 / k, "probe_train": len(itr), "probe_val": len(iva), "method": cfg.eval.probe,
    }


def _sweep_baselines(path: str) -> None:
    """Print :func:`probe_baselines` for the base config and patch sizes of a sweep file."""
    import yaml

    spec = yaml.safe_load(open(path))
    cfg = RunConfig.model_validate(spec.get("base", {}))
    patches = sorted({int(v) for z in spec.get("zip", []) for v in z.get("model.patch_size", [])}
                     | {int(v) for v in spec.get("axes", {}).get("model.patch_size", [])} or {cfg.model.patch_size},
                     reverse=True)
    t0 = time.time()
    out = probe_baselines(cfg, patches)
    print(f"{path}: data.name={cfg.data.name}, probe={out['method']}, train {out['probe_train']} / "
          f"val {out['probe_val']} (balanced, eval.subset_seed={cfg.eval.subset_seed}), chance {out['chance']:.3f}")
    print(f"  raw pixels ({3 * cfg.data.image_size ** 2} dims): {out['raw_pixels']:.4f}")
    for p, a in out["pooled_patch"].items():
        print(f"  pooled raw {p}x{p} patches ({3 * p * p} dims): {a:.4f}")
    print(f"  ({time.time() - t0:.0f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--train", type=int, default=4096)
    ap.add_argument("--val", type=int, default=1024)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--cnn", action="store_true", help="also train a small conv net (32 px recommended)")
    ap.add_argument("--cnn-epochs", type=int, default=8)
    ap.add_argument("--sweep", default=None,
                    help="print the evaluate-probe baselines of this sweep's base config")
    args = ap.parse_args()
    if args.sweep:
        torch.set_num_threads(1)
        _sweep_baselines(args.sweep)
        return
    warnings.filterwarnings("ignore", module="sklearn")  # lbfgs iteration-limit notices
    print(f"chance = {1 / args.classes:.3f}; {args.train} train / {args.val} val images, {args.classes} classes")
    for size in args.sizes:
        t0 = time.time()
        xtr, ytr = load("train", args.train, size, args.classes)
        xva, yva = load("val", args.val, size, args.classes)
        t_gen = time.time() - t0
        accs = {c: pixel_probe(xtr, ytr, xva, yva, c) for c in (1e-3, 1e-2, 1e-1)}
        line = f"{size:4d} px: pixel linear probe acc (C: acc) = " + ", ".join(f"{c:g}: {a:.3f}" for c, a in accs.items())
        line += f"  (generation {t_gen:.1f} s"
        line += f", {1e3 * t_gen / (args.train + args.val):.2f} ms/image)"
        if args.cnn:
            line += f"; small CNN ({args.cnn_epochs} epochs) acc = "
            line += f"{cnn_probe(xtr, ytr, xva, yva, args.classes, args.cnn_epochs):.3f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
