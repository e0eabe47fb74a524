"""Inputs of a run: resolved paths, labels, backbone, feature caches and the trained module.

`prepare` turns a RunConfig into everything the training loop and the
evaluation code need, so that both build the model and read features in
exactly the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import paths
from .classes import NUM_CLASSES
from .config import RunConfig
from .errors import ConfigError, MatchclipError

logger = logging.getLogger(__name__)

# Settings that change how a run executes but not what it computes; they are
# left out of the run's identity so the same run can be resumed elsewhere.
EXECUTION_FIELDS = ("out", "device", "workers", "eval_batch_size", "profile", "cache_dir", "labels", "images")

# Revision of what the training code computes for given settings, part of
# every run's identity. Raise it when a change alters a run's numbers, so
# that runs trained by earlier code are retrained instead of reused.
# 2: fused AdamW and the CPU dropout mask of model.Dropout.
TRAINING_REVISION = 2


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_data_paths(config: RunConfig) -> tuple[Path, Path]:
    """Return (label file, image root); relative paths resolve against the project folder.

    The demo data set is generated on first use when the configuration points
    at its default location.
    """
    root = paths.project_root()
    labels = Path(config.labels) if config.labels else paths.real_labels_path()
    images = Path(config.images) if config.images else paths.real_image_root()
    labels = labels if labels.is_absolute() else root / labels
    images = images if images.is_absolute() else root / images

    demo_labels = paths.demo_dir() / "psg_cls_basic.json"
    if labels.resolve() == demo_labels.resolve():
        from .demo import ensure_demo_dataset

        ensure_demo_dataset(paths.demo_dir())

    if not labels.is_file():
        raise MatchclipError(
            f"label file {labels} not found. Download psg_cls_basic.json as data/README.md "
            "describes, pass --labels FILE, or use --profile demo for the built-in demo data"
        )
    if not images.is_dir():
        raise MatchclipError(
            f"image folder {images} not found. Run `python -m matchclip data download "
            f"--labels {labels} --out {images}` or pass --images DIR"
        )
    return labels, images


def run_identity(config: RunConfig, labels_sha256: str, images: str = "") -> str:
    """Short hash of everything that determines a run's results.

    `images` is a signature of the image files (cache.image_signature), so a
    regenerated data set with the same label file gets a new run folder.
    """
    settings = {k: v for k, v in config.to_dict().items() if k not in EXECUTION_FIELDS}
    settings["labels_sha256"] = labels_sha256
    settings["training_revision"] = TRAINING_REVISION
    if images:
        settings["images"] = images
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def default_run_dir(config: RunConfig, identity: str) -> Path:
    """runs/<profile>-<preset or model>-<identity>, naming the profile once when both agree."""
    prefix = config.profile or "custom"
    name = config.preset if config.model == "matchclip" and config.preset else config.model
    parts = [prefix] if name == prefix else [prefix, name]
    return paths.runs_dir() / "-".join([*parts, identity])


@dataclass
class Experiment:
    """Everything a run reads: labels, backbone (when needed) and feature caches."""

    config: RunConfig
    labels_path: Path
    image_root: Path
    labels: Any
    device: torch.device
    identity: str
    backbone: Any = None
    prompt_embeddings: np.ndarray | None = None
    caches: dict = field(default_factory=dict)

    @property
    def cache_root(self) -> Path:
        if self.config.cache_dir:
            return Path(self.config.cache_dir).expanduser().resolve()
        return paths.cache_dir()

    def targets(self, split: str) -> np.ndarray:
        return self.labels.targets(split)

    def uses_backbone(self) -> bool:
        return self.config.model != "resnet"

    def trains_from_images(self) -> bool:
        return self.config.model == "resnet" or self.config.augment in ("autoaugment", "randaugment")

    def load_backbone(self):
        if self.backbone is None:
            from .backbone import load_backbone

            self.backbone = load_backbone(
                self.config.backbone,
                self.config.pretrained,
                device=self.device,
                seed=self.config.seed,
            )
        return self.backbone

    def cache(self, split: str, view: str = "plain", *, context=None):
        """Feature cache of a split, built on first use."""
        key = (split, view)
        if key not in self.caches:
            from .cache import build_cache

            extra = {}
            if context is not None and context.enabled:
                extra = {"rank": context.rank, "world_size": context.world_size, "barrier": context.barrier}
            self.caches[key] = build_cache(
                self.load_backbone(),
                self.labels,
                split=split,
                image_root=self.image_root,
                cache_root=self.cache_root,
                view=view,
                workers=self.config.workers,
                **extra,
            )
        return self.caches[key]

    def relation_embeddings(self) -> np.ndarray:
        if self.prompt_embeddings is None:
            from .cache import prompt_embeddings

            self.prompt_embeddings = prompt_embeddings(
                self.load_backbone(),
                self.labels.predicate_classes,
                template=self.config.prompt_template,
                cache_root=self.cache_root,
            )
        return self.prompt_embeddings

    def build_module(self, *, image_width: int | None = None, text_width: int | None = None) -> torch.nn.Module:
        """Build the trained module of this run with freshly initialised weights."""
        return build_trained_module(self.config, image_width=image_width, text_width=text_width)

    def module_shape(self) -> dict[str, int]:
        """Input widths of the trained module, read from the features (never hard-coded)."""
        if self.config.model == "resnet":
            return {}
        train_cache = self.cache("train")
        return {
            "image_width": int(train_cache.tokens.shape[-1]),
            "text_width": int(train_cache.embeddings.shape[-1]),
        }


def build_trained_module(
    config: RunConfig,
    *,
    image_width: int | None,
    text_width: int | None,
    load_weights: bool = True,
) -> torch.nn.Module:
    """Build the module that `config` trains; `load_weights=False` skips the ResNet's pretrained weights."""
    if config.model == "matchclip":
        from .model import MatchCLIP

        return MatchCLIP(
            image_width=image_width,
            text_width=text_width,
            num_classes=NUM_CLASSES,
            hidden=config.hidden,
            mlp=config.mlp,
            heads=config.heads,
            fusion_depth=config.fusion_depth,
            readout_depth=config.readout_depth,
            matching_blocks=config.matching_blocks,
            cls_tokens=config.cls_tokens,
            dropout=config.dropout,
            attention_dropout=config.attention_dropout,
            relation_tokens=config.relation_tokens,
        )
    if config.model == "linear_probe":
        from .baselines import LinearProbe

        return LinearProbe(text_width, NUM_CLASSES)
    if config.model == "resnet":
        from .baselines import build_resnet

        weights = config.resnet_weights if load_weights else None
        return build_resnet(config.resnet_arch, weights=weights, num_classes=NUM_CLASSES)
    raise ConfigError(f"model {config.model!r} has no trainable module; zero_shot needs no training")


def prepare(config: RunConfig) -> Experiment:
    from .labels import load_labels

    from .cache import image_signature

    labels_path, image_root = resolve_data_paths(config)
    labels = load_labels(labels_path)
    images = "".join(image_signature(labels, split, image_root) for split in ("train", "val"))
    return Experiment(
        config=config,
        labels_path=labels_path,
        image_root=image_root,
        labels=labels,
        device=select_device(config.device),
        identity=run_identity(config, file_sha256(labels_path), images),
    )
