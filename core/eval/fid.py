"""FID and Inception Score through torch-fidelity, with two backbones.

* ``inception-v3-compat``: torch-fidelity's own TF-compatible InceptionV3, loaded from a
  LOCAL weights file (``eval.inception_weights``, torch-fidelity's
  ``weights-inception-2015-12-05-*.pth``) via its ``feature_extractor_weights_path``
  argument — nothing is downloaded.  These are the paper's rFID/gFID/IS.
* ``embedded-featnet-v1``: the project's offline feature network (``core.eval.featnet``),
  registered with torch-fidelity as a feature extractor: 'pool' (B, 128) for FID,
  'logits_unbiased' for IS (mirroring Inception's protocol).  A proxy: its numbers are
  recorded with this backbone name and never compared with Inception FID.
* ``embedded-featnet-fmnist-v1``: the same network trained on Fashion-MNIST's train split
  (``eval.fid_backbone: embedded-fmnist``), the proxy for that dataset.

:func:`compute_fid_is` takes two in-memory image sets; the evaluation stages stream them (bounded
memory at ImageNet size) through the same pieces: :class:`FidelityFeatures`
runs torch-fidelity's extractor on each batch, :class:`FeatureStatistics` keeps running float64
sums (mean, covariance; O(D²) memory), IS keeps only the logits, and the distance and the score
are torch-fidelity's own (``fid_statistics_to_metric``, ``isc_features_to_metric``), with the
Inception Score split as the ADM evaluator splits it (:data:`IS_RULE`, recorded beside every IS).
Data-parallel stages add the feature sums over ranks (:meth:`FeatureStatistics.all_reduce`).  A
precomputed reference (``eval.fid_reference``, npz with ``mu``/``sigma``) replaces the real set.
"""
from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, isc_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from torch_fidelity.utils import create_feature_extractor

from core.eval.featnet import FEATNET_FMNIST_NAME, FEATNET_NAME, FMNIST_WEIGHTS, load_featnet
from core.io import write_atomic

INCEPTION_NAME = "inception-v3-compat"
IS_SPLIT_SIZE = 5000  # ADM evaluator: Inception Score over consecutive chunks of 5,000 samples
IS_RULE = f"adm: consecutive splits of {IS_SPLIT_SIZE} samples in sample order, no shuffle"
# the rule of results written before IS_RULE (torch-fidelity's default), named for like-with-like
LEGACY_IS_RULE = "torch-fidelity: 10 splits (N if fewer) after a shuffle with seed 2020"
_BACKBONES = {"embedded": FEATNET_NAME, FEATNET_NAME: FEATNET_NAME,
              "embedded-fmnist": FEATNET_FMNIST_NAME, FEATNET_FMNIST_NAME: FEATNET_FMNIST_NAME,
              "inception": INCEPTION_NAME, INCEPTION_NAME: INCEPTION_NAME}


class FeatureExtractorFeatNet(FeatureExtractorBase):
    """torch-fidelity feature extractor around the embedded feature network.

    Takes uint8 (B, 3, H, W); any H, W (resized to the native 32x32 inside).
    ``feature_extractor_weights_path`` (torch-fidelity's kwarg) selects a weights file;
    None = the committed ``core/assets/featnet_v1.pt``.
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.net = load_featnet(feature_extractor_weights_path)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"{self.name} expects uint8 (B, 3, H, W), got {x.dtype} {tuple(x.shape)}")
        pool, logits = self.net.features(x.float() / 127.5 - 1.0)  # (B, 128), (B, K)
        out = {"pool": pool, "logits": logits, "logits_unbiased": logits - self.net.head.bias}
        return tuple(out[name].float() for name in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return "pool", "logits_unbiased", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits_unbiased", "fid": "pool", "kid": "pool", "prc": "pool"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)


class FeatureExtractorFeatNetFMNIST(FeatureExtractorFeatNet):
    """The same extractor with the Fashion-MNIST weights (``core/assets/featnet_fmnist_v1.pt``) by default."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list, feature_extractor_weights_path or FMNIST_WEIGHTS, **kwargs)


if FEATNET_NAME not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(FEATNET_NAME, FeatureExtractorFeatNet)
if FEATNET_FMNIST_NAME not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(FEATNET_FMNIST_NAME, FeatureExtractorFeatNetFMNIST)


class Uint8Images(Dataset):
    """Dataset view of a uint8 (N, 3, H, W) tensor, the input type torch-fidelity expects."""

    def __init__(self, images: torch.Tensor, name: str):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{name}: expected uint8 (N, 3, H, W) images, got {images.dtype} {tuple(images.shape)}")
        self.images = images.cpu()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def resolve_backbone(eval_cfg) -> str:
    """The FID backbone name for an :class:`core.config.EvalConfig`.

    'auto' = Inception when ``eval.inception_weights`` is an existing file, else the
    embedded network (with a warning when a path was given but is missing; the backbone
    name recorded beside every number says which one ran).  'inception' with a missing
    file is an error.  'embedded-fmnist' = the Fashion-MNIST feature network, always.
    """
    if eval_cfg.fid_backbone == "embedded-fmnist":
        return FEATNET_FMNIST_NAME
    weights = eval_cfg.inception_weights
    have = weights is not None and Path(weights).expanduser().is_file()
    if eval_cfg.fid_backbone == "inception" and not have:
        raise FileNotFoundError(
            f"eval.inception_weights: file not found: {weights} "
            "(eval.fid_backbone='inception' needs the local torch-fidelity Inception weights)"
        )
    if eval_cfg.fid_backbone == "embedded" or not have:
        if weights is not None and not have:
            warnings.warn(f"eval.inception_weights: file not found: {weights}; using {FEATNET_NAME}", stacklevel=2)
        return FEATNET_NAME
    return INCEPTION_NAME


def fidelity_kwargs(backbone: str, inception_weights: str | None = None, device: str | None = None,
                    batch_size: int = 64) -> dict:
    """The torch-fidelity keyword arguments selecting ``backbone`` offline (no download, no cache)."""
    name = _BACKBONES.get(backbone)
    if name is None:
        raise ValueError(f"unknown FID backbone {backbone!r}; use one of {sorted(_BACKBONES)}")
    weights = None
    if name == INCEPTION_NAME:
        if inception_weights is None or not Path(inception_weights).expanduser().is_file():
            raise FileNotFoundError(f"eval.inception_weights: file not found: {inception_weights}")
        weights = str(Path(inception_weights).expanduser())
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return {
        "feature_extractor": name,
        "feature_extractor_weights_path": weights,  # None -> featnet's committed asset
        "cuda": torch.device(device).type == "cuda",
        "batch_size": batch_size,
        "cache": False,  # never write feature caches under $TORCH_HOME
        "save_cpu_ram": True,  # DataLoader without worker processes
        "verbose": False,
    }


def compute_fid_is(fake_uint8: torch.Tensor, real_uint8: torch.Tensor, backbone: str = "embedded",
                   inception_weights: str | None = None, isc: bool = True, device: str | None = None,
                   batch_size: int = 64) -> dict:
    """FID between two in-memory image sets and the Inception Score of the first.

    The streaming path of the stages (:class:`FidelityFeatures`, :class:`FeatureStatistics`)
    on whole tensors; equal to ``torch_fidelity.calculate_metrics`` on the same images
    (tests/core/test_fid.py), with the IS splits of :func:`inception_score`.

    Parameters
    ----------
    fake_uint8, real_uint8 : uint8 (N, 3, H, W) images (reconstructions or samples; data).
    backbone : 'embedded' | 'inception' (or the full names from :func:`resolve_backbone`).
    inception_weights : local torch-fidelity Inception weights file (backbone 'inception').
    isc : also compute the Inception Score of ``fake_uint8`` (rule :data:`IS_RULE`).
    device : 'cpu' | 'cuda'; None = cuda when available.

    Returns
    -------
    dict(fid, inception_score, inception_score_std (None when isc=False), backbone=NAME,
    num_fake, num_real).
    """
    fake, real = Uint8Images(fake_uint8, "fake images"), Uint8Images(real_uint8, "real images")
    if len(fake) < 2 or len(real) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {len(fake)} fake and {len(real)} real")
    features = FidelityFeatures(backbone, inception_weights, isc=isc, device=device)
    stats, logits = {"fake": FeatureStatistics(), "real": FeatureStatistics()}, []
    for name, images in (("fake", fake.images), ("real", real.images)):
        for i in range(0, len(images), batch_size):
            feats, lg = features.features(images[i : i + batch_size])
            stats[name].update(feats)
            if isc and name == "fake":
                logits.append(lg)
    is_mean, is_std = inception_score(torch.cat(logits)) if isc else (None, None)
    return {
        "fid": frechet_distance(stats["fake"].statistics(), stats["real"].statistics()),
        "inception_score": is_mean, "inception_score_std": is_std,
        "backbone": features.backbone, "num_fake": len(fake), "num_real": len(real),
    }


class FidelityFeatures:
    """A torch-fidelity feature extractor applied batch by batch (streaming FID/IS).

    ``features(images uint8 (B, 3, H, W)) -> (fid features float64 (B, D), IS logits (B, C) or None)``,
    from the same extractor and layers that :func:`compute_fid_is` uses through
    ``torch_fidelity.calculate_metrics`` (Inception: '2048' and 'logits_unbiased').
    """

    def __init__(self, backbone: str = "embedded", inception_weights: str | None = None, isc: bool = True,
                 device: str | None = None):
        kwargs = fidelity_kwargs(backbone, inception_weights, device)
        self.backbone, self.cuda = kwargs["feature_extractor"], kwargs["cuda"]
        cls = FEATURE_EXTRACTORS_REGISTRY[self.backbone]
        self.fid_layer = cls.get_default_feature_layer_for_metric("fid")
        self.isc_layer = cls.get_default_feature_layer_for_metric("isc") if isc else None
        layers = [self.fid_layer] + ([self.isc_layer] if isc else [])
        self.extractor = create_feature_extractor(self.backbone, layers, **kwargs)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 (B, 3, H, W) images, got {images.dtype} {tuple(images.shape)}")
        images = images.cuda() if self.cuda else images.cpu()
        out = self.extractor.convert_features_tuple_to_dict(self.extractor(images))
        logits = out[self.isc_layer].cpu() if self.isc_layer else None
        return out[self.fid_layer].cpu().double(), logits


class FeatureStatistics:
    """Running mean and covariance of features, accumulated batch by batch in float64.

    Memory is O(D²) whatever the number of images (2048² float64 = 32 MB for Inception).
    Sums are kept around the first batch's mean (a shift that keeps the one-pass formula
    accurate); ``statistics()`` equals torch-fidelity's ``fid_features_to_statistics`` (np.mean,
    np.cov with N − 1) on the concatenated features up to float64 rounding.
    """

    def __init__(self):
        self.n, self.shift, self.sum, self.outer = 0, None, None, None

    def update(self, feats: torch.Tensor) -> None:
        x = feats.double().cpu()  # (B, D)
        if self.shift is None:
            self.shift = x.mean(0)
            self.sum = torch.zeros_like(self.shift)
            self.outer = torch.zeros(len(self.shift), len(self.shift), dtype=torch.float64)
        x = x - self.shift
        self.n += len(x)
        self.sum += x.sum(0)
        self.outer += x.T @ x

    def all_reduce(self, info) -> "FeatureStatistics":
        """Add the sums of every rank of ``info`` (a ``core.trainer.distributed.DistInfo``) in place.

        Collective; afterwards every rank holds the statistics of all ranks' features, as one
        process would have accumulated them up to float64 rounding.  The ranks' sums are
        re-centred on one common shift (the count-weighted mean of their shifts) before they
        are added: sums around x − c from sums around x − s, with d = s − c,
        Σ(x−c) = S + n·d and Σ(x−c)(x−c)ᵀ = O + S·dᵀ + d·Sᵀ + n·d·dᵀ.
        """
        if not info.enabled:
            return self
        dev = info.device  # nccl reduces device tensors; gloo CPU ones
        fewest = torch.tensor([float(self.n)], dtype=torch.float64, device=dev)
        dist.all_reduce(fewest, op=dist.ReduceOp.MIN)  # every rank raises alike, none waits for ever
        if fewest.item() == 0:
            raise ValueError("a rank has no features to reduce (fewer images than ranks)")
        head = torch.cat([torch.tensor([float(self.n)], dtype=torch.float64), self.n * self.shift]).to(dev)
        dist.all_reduce(head)
        head = head.cpu()
        n, centre = int(head[0]), head[1:] / head[0]
        d = self.shift - centre
        total = self.sum + self.n * d
        outer = self.outer + torch.outer(self.sum, d) + torch.outer(d, self.sum) + self.n * torch.outer(d, d)
        flat = torch.cat([total, outer.flatten()]).to(dev)
        dist.all_reduce(flat)
        flat = flat.cpu()
        dim = len(total)
        self.n, self.shift, self.sum, self.outer = n, centre, flat[:dim], flat[dim:].reshape(dim, dim)
        return self

    def statistics(self) -> dict[str, np.ndarray]:
        """{'mu': (D,), 'sigma': (D, D)} float64, torch-fidelity's statistics format."""
        if self.n < 2:
            raise ValueError(f"FID statistics need at least 2 images, got {self.n}")
        mean = self.sum / self.n
        sigma = (self.outer - self.n * torch.outer(mean, mean)) / (self.n - 1)
        return {"mu": (mean + self.shift).numpy(), "sigma": sigma.numpy()}


def save_statistics(stats: dict, path: str | Path) -> Path:
    """Write {'mu', 'sigma'} as an npz (the format :func:`load_reference_statistics` reads)."""
    buf = io.BytesIO()
    np.savez(buf, mu=stats["mu"], sigma=stats["sigma"])
    return write_atomic(path, buf.getvalue())


def load_reference_statistics(path: str | Path, dim: int | None = None) -> tuple[dict, str]:
    """Precomputed FID reference statistics (``eval.fid_reference``) and their description.

    Parameters
    ----------
    path : npz with ``mu`` (D,) and ``sigma`` (D, D) — torch-fidelity's statistics, e.g. the
        ADM ImageNet-256 reference batch turned into mu/sigma with the same Inception.
    dim : the feature width D of the backbone in use (checked when given).

    Returns
    -------
    (stats float64, "file:<name>:sha256:<first 16 hex>") — the description goes beside gFID.

    Raises
    ------
    FileNotFoundError / ValueError naming ``eval.fid_reference`` and the file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"eval.fid_reference: file not found: {path}")
    blob = path.read_bytes()
    try:
        with np.load(io.BytesIO(blob)) as npz:
            mu, sigma = np.asarray(npz["mu"], np.float64), np.asarray(npz["sigma"], np.float64)
    except (KeyError, ValueError, OSError) as e:
        raise ValueError(f"eval.fid_reference: {path} is not an npz with 'mu' and 'sigma' ({e})") from e
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"eval.fid_reference: {path}: mu {mu.shape} and sigma {sigma.shape} must be (D,) and (D, D)")
    if dim is not None and len(mu) != dim:
        raise ValueError(f"eval.fid_reference: {path} holds {len(mu)}-d statistics "
                         f"but the FID backbone gives {dim}-d features")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"eval.fid_reference: {path} contains NaN or inf")
    return {"mu": mu, "sigma": sigma}, f"file:{path.name}:sha256:{hashlib.sha256(blob).hexdigest()[:16]}"


def frechet_distance(stats_1: dict, stats_2: dict) -> float:
    """FID between two {'mu', 'sigma'} statistics (torch-fidelity's ``fid_statistics_to_metric``)."""
    as64 = lambda s: {"mu": np.asarray(s["mu"], np.float64), "sigma": np.asarray(s["sigma"], np.float64)}  # noqa: E731
    return float(fid_statistics_to_metric(as64(stats_1), as64(stats_2), verbose=False)[KEY_METRIC_FID])


def inception_score(logits: torch.Tensor, split_size: int = IS_SPLIT_SIZE) -> tuple[float, float]:
    """(mean, std over splits) Inception Score of logits (N, C), by the ADM evaluator's rule.

    The splits are consecutive chunks of ``split_size`` samples in the order given (the last
    one shorter when N is not a multiple), never shuffled: ADM's ``compute_inception_score``
    (50k samples -> 10 splits of 5,000).  Each split's score is torch-fidelity's
    (``isc_features_to_metric`` on that chunk, float64 softmax).  :data:`IS_RULE` names the rule.
    """
    if split_size < 1:
        raise ValueError(f"split_size={split_size} must be >= 1")
    scores = [isc_features_to_metric(logits[i : i + split_size], splits=1, shuffle=False)[KEY_METRIC_ISC_MEAN]
              for i in range(0, len(logits), split_size)]
    return float(np.mean(scores)), float(np.std(scores))


class _RandomInception(FeatureExtractorInceptionV3):
    # Keeps the random initialisation instead of loading weights.
    def load_state_dict(self, state_dict, strict=True, assign=False):
        return None


def write_random_inception_weights(path: str | Path, seed: int = 0) -> Path:
    """Save a randomly initialised state dict in torch-fidelity's Inception weights format.

    For offline tests and benchmarks of the loading path only: features from it are
    meaningless as a quality measure.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    empty = path.with_suffix(".empty.pt")
    torch.save({}, empty)  # any existing file stops the constructor from downloading
    torch.manual_seed(seed)
    model = _RandomInception(INCEPTION_NAME, ["2048"], feature_extractor_weights_path=str(empty))
    empty.unlink()
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            # He init keeps activations alive through the 40+ layers (torch's default
            # init shrinks them to a constant), so features still differ between images.
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(model.state_dict(), path)
    return path
