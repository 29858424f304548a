"""Raw-pixel linear probe on the embedded synthetic dataset (how hard is it?).

Standardised pixels -> multinomial logistic regression, trained on the train split and
scored on the val split.  With ``--cnn`` also trains a small conv net for a few epochs to
show the classes are learnable.  Run by hand:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pixel_probe.py --sizes 32 64 [--cnn]
"""
from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from core.data import SyntheticShapes


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--train", type=int, default=4096)
    ap.add_argument("--val", type=int, default=1024)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--cnn", action="store_true", help="also train a small conv net (32 px recommended)")
    ap.add_argument("--cnn-epochs", type=int, default=8)
    args = ap.parse_args()
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
