"""The run configuration: one typed schema with defaults, merged once, unknown keys rejected.

A run is fully described by a :class:`RunConfig`.  It is built from (in order):
the schema defaults, an optional YAML file, and optional dotted overrides
(``{"model.patch_size": 8}``) — the orchestrator uses the overrides for sweep axes.
The resolved config is saved as ``config.yaml`` beside every run's outputs, and its
content hash (:func:`config_hash`) identifies the run in the results database.

Each section is a small pydantic model; the model/loss/trainer code receives only
the section(s) it needs (never the whole tree).
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration problem; the message names the file and the key."""


class Section(BaseModel):
    # extra="forbid": a misspelt key is an error, never silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class DataConfig(Section):
    name: Literal["synthetic", "imagefolder", "fashion_mnist"] = "synthetic"
    root: str | None = None  # ImageFolder root holding train/ and val/; fashion_mnist: idx folder, None = Debian's
    image_size: int = 32  # H = W; ImageFolder: resize + center crop to this (ImageNet-256 protocol)
    num_classes: int = 10  # synthetic only; ImageFolder counts its folders
    train_size: int = 4096  # synthetic only
    val_size: int = 512  # synthetic only
    seed: int = 0  # dataset seed, independent of the training seed
    batch_size: int = 32  # per process
    num_workers: int = 0
    hflip: bool = False  # random horizontal flip of training images (ADM/DiT/RAE ImageNet recipe)


class ModelConfig(Section):
    encoder_size: str = "micro"  # key of core.models.tokenizer.VIT_SIZES
    decoder_size: str = "micro"
    patch_size: int = 4
    split_depth: int | None = None  # k; None = encoder depth (vanilla, no staged compression)
    compression: Literal["conv", "shuffle_mlp"] = "conv"
    latent_size: int = 4  # h: latent grid side
    latent_channels: int = 16  # c
    class_token: bool = False  # needed by SSL; dropped before the bottleneck


class LossConfig(Section):
    l1: float = 1.0
    perceptual: float = 1.0  # λ_perc
    lpips_weights: str | None = None  # local LPIPS/VGG16 weights; None -> named substitute
    ssl: float = 0.1  # λ_ssl (used only when ssl.method != none)
    adversarial: float = 0.0  # λ_adv (decoder fine-tuning: 0.75)


class SSLConfig(Section):
    method: Literal["none", "ibot", "dino", "dinov2"] = "none"
    out_dim: int = 1024  # prototypes (iBOT 8192, DINO 65536 at paper scale)
    patch_out_dim: int | None = None  # None = shared head for class and patch outputs
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_steps: int = 0
    center_momentum: float = 0.9
    teacher_momentum: float = 0.996  # cosine schedule to 1.0
    freeze_last_layer_steps: int = 0
    local_crops: int = 2
    global_crop_scale: tuple[float, float] = (0.25, 1.0)
    local_crop_scale: tuple[float, float] = (0.05, 0.25)
    local_crop_size: int | None = None  # None = image_size * 3 // 7 rounded to a patch multiple
    mask_prob: float = 0.5  # share of images that get a mask
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    koleo: float = 0.1  # dinov2 only


class FinetuneConfig(Section):
    """Decoder fine-tuning (paper App. A): encoder frozen, adversarial loss on."""

    enabled: bool = False
    init_from: str | None = None  # checkpoint of the joint-training phase
    dino_weights: str | None = None  # local timm vit_small_patch8_224 state dict; None -> substitute
    disc_start_step: int = 0
    adv_start_step: int = 0
    disc_lr: float = 2e-4
    diffaug: bool = True
    disc_image_size: int = 224  # D input side (DINO: 224); smaller for CPU runs with the substitute
    # Phase-2 recipe (paper Table 7 / App. A) used by finetune_phase() (the orchestrator's `finetune`
    # stage).  In the paper's units: epochs, converted to steps at run time from the number of
    # training images and the global batch (core.finetune.resolve_epochs).  Set `epochs: null` to
    # give steps instead (steps / warmup_steps / disc_start_step / adv_start_step).
    epochs: float | None = 16
    warmup_epochs: float = 1
    disc_start_epoch: float = 6
    adv_start_epoch: float = 8
    batch_size: int | None = 256  # global batch of the epoch recipe (split over ranks); None = data.batch_size x ranks
    steps: int | None = None  # step recipe (epochs: null): None = train.steps
    lr: float = 2e-4
    min_lr: float = 2e-5
    warmup_steps: int = 0
    adversarial: float = 0.75  # λ_adv of the fine-tuning phase


class OptimConfig(Section):
    lr: float = 1e-3
    min_lr: float = 1e-6
    warmup_steps: int = 20
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.04  # never applied to 1-D params (norms, biases, tokens)
    grad_clip: float = 3.0
    ema: float | None = None  # EMA decay of the weights; None = off


class TrainConfig(Section):
    steps: int = 200
    seed: int = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    ckpt_every: int = 50
    keep_last: int = 3
    log_every: int = 10
    compile: bool | None = None  # torch.compile the tokenizer's encoder/decoder (the DiT whole); None/false = eager (benchmarks/README.md)


class EvalConfig(Section):
    num_samples: int = 512  # held-out images for PSNR/SSIM/LPIPS/rFID
    fid_backbone: Literal["auto", "inception", "embedded", "embedded-fmnist"] = "auto"  # embedded-fmnist: Fashion-MNIST featnet
    inception_weights: str | None = None  # local pt_inception-2015-12-05 weights
    probe: Literal["ridge", "sgd"] = "ridge"
    probe_train: int = 2048
    probe_val: int = 512
    batch_size: int = 64
    subset_seed: int = 0  # seed of every class-balanced subset (core.data.balanced_subset)
    fid_reference: str | None = None  # npz with mu/sigma (torch-fidelity statistics) for gFID; None = balanced val subset


class GeneratorConfig(Section):
    enabled: bool = True
    size: str = "micro"  # key of core.models.dit.DIT_SIZES
    steps: int = 300
    batch_size: int = 64  # global batch, split over the stage's ranks (data.batch_size is per process)
    lr: float = 2e-4
    ema: float = 0.9995
    class_dropout: float = 0.1
    sampler: Literal["euler", "heun"] = "euler"
    sample_steps: int = 50
    cfg_scale: float = 1.0
    num_samples: int = 512
    eval_at: list[int] = []  # extra steps at which gFID/IS are measured (Fig. 6); the last step always is
    time_shift: float | None = None  # flow time shift s; None = RAE's sqrt(prod(latent_shape) / 4096)


class RunConfig(Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    ssl: SSLConfig = SSLConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    generator: GeneratorConfig = GeneratorConfig()

    @model_validator(mode="after")
    def _geometry(self) -> "RunConfig":
        # torch-free (validating a sweep must not import the model code); imports nothing from config.
        from core.models.geometry import check_geometry

        check_geometry(
            image_size=self.data.image_size,
            patch_size=self.model.patch_size,
            encoder_size=self.model.encoder_size,
            decoder_size=self.model.decoder_size,
            split_depth=self.model.split_depth,
            latent_size=self.model.latent_size,
        )
        if self.ssl.method != "none" and not self.model.class_token:
            self.model.class_token = True  # SSL needs it; resolved once, saved in config.yaml
        return self


# ----------------------------------------------------------------------------- phases


def joint_phase(cfg: RunConfig) -> RunConfig:
    """The joint-training (phase 1) config of a run: fine-tuning off, whatever the run's
    ``finetune`` section says (that section configures phase 2)."""
    return cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"enabled": False, "init_from": None})})


def finetune_phase(cfg: RunConfig, init_from: str | Path) -> RunConfig:
    """The decoder fine-tuning (phase 2) config of a run, starting from the phase-1 run dir
    ``init_from`` (paper App. A, Table 7): encoder frozen, λ_ssl = 0, λ_adv =
    ``finetune.adversarial``, its own lr schedule, no weight decay."""
    ft = cfg.finetune
    # An explicit finetune.steps selects the step recipe; otherwise the epochs are converted at run time.
    epochs = None if ft.steps is not None else ft.epochs
    return cfg.model_copy(update={
        "finetune": ft.model_copy(update={"enabled": True, "init_from": str(init_from), "epochs": epochs}),
        "loss": cfg.loss.model_copy(update={"ssl": 0.0, "adversarial": ft.adversarial}),
        "optim": cfg.optim.model_copy(update={"lr": ft.lr, "min_lr": ft.min_lr, "warmup_steps": ft.warmup_steps,
                                              "weight_decay": 0.0}),
        "train": cfg.train.model_copy(update={"steps": ft.steps or cfg.train.steps}),
    })


# ----------------------------------------------------------------------------- loading


def set_dotted(tree: dict, key: str, value: Any) -> None:
    """Set ``tree["a"]["b"] = value`` for ``key = "a.b"``, creating nothing new at the top level."""
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"key '{key}': '{part}' is not a section")
    node[parts[-1]] = copy.deepcopy(value)


def _format_error(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{origin}: key '{loc}': {msg}")
    return "\n".join(lines)


def load_config(
    source: str | Path | Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    origin: str | None = None,
) -> RunConfig:
    """Build a :class:`RunConfig` from defaults, a YAML file or dict, and dotted overrides.

    Parameters
    ----------
    source : path to a YAML file, a (nested) dict, or None for the defaults.
    overrides : ``{"model.patch_size": 8, ...}``, applied after ``source``.
    origin : text naming where the values came from, used in error messages
        (defaults to the file path).

    Raises
    ------
    ConfigError
        naming the origin and the offending key, for unknown keys, wrong types or
        impossible geometry.
    """
    if source is None:
        tree: dict = {}
        origin = origin or "<defaults>"
    elif isinstance(source, Mapping):
        tree = copy.deepcopy(dict(source))
        origin = origin or "<dict>"
    else:
        path = Path(source)
        origin = origin or str(path)
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{origin}: cannot read config: {e}") from e
        if not isinstance(tree, dict):
            raise ConfigError(f"{origin}: top level must be a mapping")
    for key, value in (overrides or {}).items():
        set_dotted(tree, key, value)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_error(e, origin)) from None
    except ValueError as e:  # geometry checks raise ValueError naming the parameter
        raise ConfigError(f"{origin}: {e}") from None


def config_dict(cfg: RunConfig) -> dict:
    return cfg.model_dump(mode="json")


def config_hash(cfg: RunConfig) -> str:
    """Content hash of the resolved config: 16 hex chars of sha256 over canonical JSON."""
    blob = json.dumps(config_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def non_default(tree: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> dict:
    """The leaves of a config dict (``config_dict``) that differ from the schema defaults,
    nested like the input.  A key added later with a default that keeps the old behaviour is
    therefore absent from old and new configs alike: identities built on this form do not move
    when the schema grows (orchestrator.identity)."""
    if defaults is None:
        defaults = _default_dict()
    out: dict = {}
    for k, v in tree.items():
        d = defaults.get(k, _MISSING)
        if isinstance(v, dict) and isinstance(d, dict):
            if v == d:  # a whole default section: one C-level comparison (most sections of a sweep)
                continue
            sub = non_default(v, d)
            if sub:
                out[k] = sub
        elif d is _MISSING or d != v or type(d) is not type(v):
            out[k] = v
    return out


_MISSING = object()


@functools.cache
def _default_dict() -> dict:
    return config_dict(RunConfig())  # read-only: shared by every caller


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_dict(cfg), sort_keys=False))
