"""Linear probing (paper Sec. 3.3, Table 1) and the structure loss.

The same probe is fitted on the pooled tokens before the bottleneck (acc_before) and on
the pooled latent (acc_after); ``structure_loss = 1 - acc_after / acc_before``.

Two methods:

* ``ridge`` (default, CPU-cheap, deterministic): standardise features with the train
  statistics, closed-form ridge regression onto centred one-hot targets, λ chosen on a
  fixed held-out fifth of the train split, refit on the whole train split.
* ``sgd`` (GPU, ImageNet scale, as GigaTok/MAE): BatchNorm1d(affine=False) + Linear,
  SGD with momentum and a cosine schedule, full passes over the features.

Accuracies are fractions in [0, 1].
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# λ / n_fit: standardised features have XᵀX/n with O(1) eigenvalues, so this spans
# "almost unregularised" to "almost constant prediction".
_RIDGE_GRID = tuple(10.0**k for k in range(-5, 4))


def _check(feats: torch.Tensor, labels: torch.Tensor, name: str) -> None:
    if feats.dim() != 2 or labels.dim() != 1 or len(feats) != len(labels):
        raise ValueError(f"{name}: expected features (N, D) and labels (N,), got {tuple(feats.shape)} and {tuple(labels.shape)}")
    if not torch.isfinite(feats).all():
        raise ValueError(f"{name}: features contain NaN or inf")


def _ridge_solver(x: torch.Tensor, y: torch.Tensor):
    """Returns solve(lam) -> W (D, K) for centred x (N, D), centred targets y (N, K)."""
    gram = x.T @ x  # (D, D)
    evals, evecs = torch.linalg.eigh(gram)
    proj = evecs.T @ (x.T @ y)  # (D, K)

    def solve(lam: float) -> torch.Tensor:
        return evecs @ (proj / (evals.clamp_min(0) + lam).unsqueeze(1))

    return solve


def _stratified_fifth(labels: torch.Tensor) -> torch.Tensor:
    """(N,) bool mask holding out about a fifth of each class, deterministically.

    Sample i with occurrence index r within its class c is held out when (r + c) % 5 == 4:
    every class contributes every 5th occurrence (offset by class, so even classes with only
    a few samples are represented). A plain every-5th-index split would hold out only two
    classes when labels cycle i % 10, as the synthetic dataset's do.
    """
    onehot = F.one_hot(labels).long()  # (N, K)
    rank = (onehot.cumsum(0) * onehot).sum(1) - 1  # occurrence index of each sample within its class
    held = (rank + labels) % 5 == 4
    if held.all() or not held.any():  # degenerate tiny inputs: hold out the last fifth
        held = torch.zeros_like(held)
        held[-max(1, len(labels) // 5):] = True
    return held


def _ridge(train_x, train_y, val_x, val_y, num_classes: int) -> dict:
    # float64 throughout: the normal equations lose digits fast in float32.
    train_x, val_x = train_x.double(), val_x.double()
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-8)
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    onehot = F.one_hot(train_y, num_classes).double()

    # Held-out fifth for λ: every 5th sample *within each class* (deterministic and stratified;
    # a plain every-5th-index split would hold out only two classes when labels cycle i % 10).
    held = _stratified_fifth(train_y)
    fx, fy = train_x[~held], onehot[~held]
    fx_mean, fy_mean = fx.mean(0), fy.mean(0)
    solve = _ridge_solver(fx - fx_mean, fy - fy_mean)
    best_acc, best_lam = -1.0, None
    for r in _RIDGE_GRID:  # ascending; ties go to the larger λ (the smoother probe)
        lam = r * len(fx)
        w = solve(lam)
        pred = ((train_x[held] - fx_mean) @ w + fy_mean).argmax(1)
        acc = (pred == train_y[held]).double().mean().item()
        if acc >= best_acc:
            best_acc, best_lam = acc, r
    x_mean, y_mean = train_x.mean(0), onehot.mean(0)
    w = _ridge_solver(train_x - x_mean, onehot - y_mean)(best_lam * len(train_x))
    pred = ((val_x - x_mean) @ w + y_mean).argmax(1)
    return {"acc": (pred == val_y).double().mean().item(), "lam": best_lam, "heldout_acc": best_acc}


def _sgd(train_x, train_y, val_x, val_y, num_classes: int, epochs: int, batch_size: int, lr: float,
         seed: int, device) -> dict:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    probe = nn.Sequential(nn.BatchNorm1d(train_x.shape[1], affine=False), nn.Linear(train_x.shape[1], num_classes))
    nn.init.zeros_(probe[1].bias)
    nn.init.normal_(probe[1].weight, std=0.01)
    probe.to(device)
    opt = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9)
    steps = epochs * math.ceil(len(train_x) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(epochs):
        probe.train()
        order = torch.randperm(len(train_x), generator=gen)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            loss = F.cross_entropy(probe(train_x[idx].to(device).float()), train_y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    probe.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(val_x), 4096):
            logits = probe(val_x[i:i + 4096].to(device).float())
            correct += (logits.argmax(1).cpu() == val_y[i:i + 4096]).sum().item()
    return {"acc": correct / len(val_x), "lam": None}


def linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
                 val_labels: torch.Tensor, method: str = "ridge", num_classes: int | None = None,
                 epochs: int = 90, batch_size: int = 1024, lr: float = 0.1, seed: int = 0,
                 device: str | torch.device = "cpu") -> dict:
    """Fit a linear classifier on train features and report its val accuracy.

    Parameters
    ----------
    train_feats, val_feats : float (N, D) features (e.g. pooled tokens or latents).
    train_labels, val_labels : int64 (N,) class labels.
    method : 'ridge' (closed form, λ chosen on a held-out fifth of train) or 'sgd'
        (BatchNorm1d(affine=False) + Linear; ``epochs``, ``batch_size``, ``lr``, ``seed``,
        ``device`` apply to it only).
    num_classes : defaults to 1 + the largest label seen.

    Returns
    -------
    dict(acc=val accuracy in [0, 1], lam=chosen λ/n_train (ridge) or None, method=...).
    """
    _check(train_feats, train_labels, "train")
    _check(val_feats, val_labels, "val")
    if train_feats.shape[1] != val_feats.shape[1]:
        raise ValueError(f"train/val feature widths differ: {train_feats.shape[1]} vs {val_feats.shape[1]}")
    if len(train_feats) < 10:
        raise ValueError(f"linear_probe needs at least 10 train samples, got {len(train_feats)}")
    train_feats, val_feats = train_feats.detach().cpu(), val_feats.detach().cpu()
    train_labels, val_labels = train_labels.long().cpu(), val_labels.long().cpu()
    k = num_classes or int(max(train_labels.max(), val_labels.max())) + 1
    if method == "ridge":
        out = _ridge(train_feats, train_labels, val_feats, val_labels, k)
    elif method == "sgd":
        out = _sgd(train_feats, train_labels, val_feats, val_labels, k, epochs, batch_size, lr, seed, device)
    else:
        raise ValueError(f"eval.probe={method!r} must be 'ridge' or 'sgd'")
    return {**out, "method": method}


def structure_loss(acc_before: float, acc_after: float) -> float:
    """1 - acc_after / acc_before (paper Table 1: 1 - 6.3/29.5 = 0.786)."""
    if acc_before <= 0:
        raise ValueError(f"structure_loss: acc_before must be positive, got {acc_before}")
    return 1.0 - acc_after / acc_before
