"""Train an embedded feature network, deterministically.

    python -m core.eval.train_featnet --arch featnet     # core/assets/featnet_v1.pt   (FID/IS)
    python -m core.eval.train_featnet --arch percepnet   # core/assets/percepnet_v1.pt (LPIPS substitute)
    python -m core.eval.train_featnet --arch featnet-fmnist  # core/assets/featnet_fmnist_v1.pt (FID/IS, Fashion-MNIST)

CPU, one thread, fixed seeds, deterministic algorithms: the same command gives the same
weights on the same torch build.  Both train on all 24 classes of the synthetic set (so
their features cover every ``data.num_classes`` setting) at the native 32x32, drawn with
dataset seeds that no run uses by default (1000 resp. 2000), and report the accuracy on
the default evaluation data (seed 0 val split, 24 classes).  The two differ in widths,
pooling, init seed, data draw and size of the training set, so they share no weights.

``featnet-fmnist`` has featnet's layout but its own init seed and data: a seeded random
subset of the Fashion-MNIST *train* split (``--data-root``, default Debian's folder), padded
to 32x32, 10 classes; its reported ``val_acc`` is the accuracy on the whole 10,000-image test
split, which no training step sees.
"""
from __future__ import annotations

import argparse
import io
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from core.data.fashion_mnist import FashionMNIST
from core.data.subset import balanced_subset
from core.data.synthetic import MAX_CLASSES, SyntheticShapes
from core.eval.featnet import (
    DEFAULT_WEIGHTS, FMNIST_WEIGHTS, NATIVE_SIZE, PERCEPNET_WEIGHTS, PERCEPNET_WIDTHS, WIDTHS, FeatNet,
)
from core.io import write_atomic
from core.seed import seed_everything

# --arch -> (weights file, widths, pooling, dataset, defaults for train size, epochs, data seed, seed)
ARCHS = {
    "featnet": (DEFAULT_WEIGHTS, WIDTHS, "avg", "synthetic", dict(train_size=8192, epochs=10, data_seed=1000, seed=0)),
    # narrower: trains in about 2 minutes on one shared CPU core
    "percepnet": (PERCEPNET_WEIGHTS, PERCEPNET_WIDTHS, "max", "synthetic",
                  dict(train_size=8192, epochs=12, data_seed=2000, seed=1)),
    # data_seed = seed of the balanced train subset; ~5 minutes on one core; stored as float16
    # (featnet's widths take 1.25 MB in float32, the issue allows 1 MB)
    "featnet-fmnist": (FMNIST_WEIGHTS, WIDTHS, "avg", "fashion_mnist",
                       dict(train_size=20000, epochs=3, data_seed=3000, seed=3, half=True)),
}


def render_split(split: str, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of a synthetic split as uint8 (N, 3, 32, 32) and labels (N,)."""
    ds = SyntheticShapes(split, size, NATIVE_SIZE, MAX_CLASSES, seed)
    images = torch.stack([torch.from_numpy(ds.render_uint8(i)).permute(2, 0, 1) for i in range(size)])
    labels = torch.tensor([ds.label(i) for i in range(size)])
    return images, labels


def fmnist_split(root: str | None, split: str, size: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST ``split`` padded to uint8 (n, 3, 32, 32) and labels (n,): a balanced subset of
    ``size`` images (seeded), or the whole split when ``size`` is None."""
    ds = FashionMNIST(root, split, NATIVE_SIZE)
    idx = balanced_subset(ds.labels, size, seed) if size is not None and size < len(ds) else slice(None)
    pad = (NATIVE_SIZE - ds.images.shape[-1]) // 2
    images = torch.from_numpy(np.pad(ds.images[idx], ((0, 0), (pad, pad), (pad, pad))))  # (n, 32, 32)
    return images[:, None].expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(ds.labels[idx])


def load_data(dataset: str, train_size: int, data_seed: int, root: str | None = None):
    """((x_train, y_train), (x_val, y_val), num_classes) for ``dataset``."""
    if dataset == "fashion_mnist":
        return fmnist_split(root, "train", train_size, data_seed), fmnist_split(root, "val", None, 0), 10
    return render_split("train", train_size, data_seed), render_split("val", 2048, 0), MAX_CLASSES


def _to_float(u8: torch.Tensor) -> torch.Tensor:
    return u8.float() / 127.5 - 1.0


@torch.no_grad()
def accuracy(net: FeatNet, images: torch.Tensor, labels: torch.Tensor, batch: int = 512) -> float:
    net.eval()
    correct = 0
    for i in range(0, len(images), batch):
        correct += (net(_to_float(images[i:i + batch])).argmax(1) == labels[i:i + batch]).sum().item()
    return correct / len(images)


def round_to_half(net: FeatNet) -> FeatNet:
    """Round the float weights and statistics to float16 and back, as a float16 file stores them."""
    net.load_state_dict({k: v.half().float() if v.is_floating_point() else v for k, v in net.state_dict().items()})
    return net


def train(train_size: int, epochs: int, batch: int, lr: float, data_seed: int, seed: int,
          widths: tuple[int, ...] = WIDTHS, pool: str = "avg", dataset: str = "synthetic",
          root: str | None = None, half: bool = False) -> tuple[FeatNet, dict]:
    """Train one network; with ``half`` the reported accuracies are those of the float16-rounded weights."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    seed_everything(seed)
    (x_train, y_train), (x_val, y_val), num_classes = load_data(dataset, train_size, data_seed, root)
    train_size = len(x_train)

    net = FeatNet(num_classes=num_classes, widths=widths, pool=pool)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=5e-4)
    steps_per_epoch = train_size // batch
    total = epochs * steps_per_epoch
    gen = torch.Generator().manual_seed(seed)
    step, t0 = 0, time.time()
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(train_size, generator=gen)
        for b in range(steps_per_epoch):
            idx = order[b * batch:(b + 1) * batch]
            x = _to_float(x_train[idx])
            flip = torch.rand(len(idx), generator=gen) < 0.5  # horizontal flips keep every class
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
            for g in opt.param_groups:  # cosine decay, no warm-up needed at this size
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(net(x), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        print(f"epoch {epoch + 1}/{epochs} loss {loss.item():.3f} "
              f"val_acc {accuracy(net, x_val, y_val):.4f} ({time.time() - t0:.0f}s)", flush=True)
    if half:
        round_to_half(net)
    info = {
        "val_acc": accuracy(net, x_val, y_val),
        "train_acc": accuracy(net, x_train[:2048], y_train[:2048]),
        "dataset": dataset, "val_size": len(x_val), "num_classes": num_classes,
        "train_size": train_size, "epochs": epochs, "batch": batch, "lr": lr,
        "data_seed": data_seed, "seed": seed, "stored_as": "float16" if half else "float32",
        "train_time_s": round(time.time() - t0, 1),
    }
    return net.eval(), info


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=sorted(ARCHS), default="featnet")
    p.add_argument("--out", default=None, help="default: the committed file of --arch")
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--data-seed", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--data-root", default=None, help="fashion_mnist idx folder (default: Debian's)")
    a = p.parse_args(argv)
    a.half = None
    out, widths, pool, dataset, defaults = ARCHS[a.arch]
    a.out = a.out or str(out)
    for key, value in defaults.items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    half = bool(a.half)
    net, info = train(a.train_size, a.epochs, a.batch, a.lr, a.data_seed, a.seed, widths, pool, dataset, a.data_root,
                      half)
    info["arch"] = a.arch
    state = {k: v.half() if half and v.is_floating_point() else v for k, v in net.state_dict().items()}
    blob = {"state_dict": state, "num_classes": net.num_classes, "widths": list(widths), "pool": pool,
            "info": info}
    buf = io.BytesIO()
    torch.save(blob, buf)
    write_atomic(a.out, buf.getvalue())
    print(f"wrote {a.out}: {info}")


if __name__ == "__main__":
    main()
