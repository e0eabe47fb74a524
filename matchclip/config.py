"""Run configuration: one flat dataclass, filled from a profile, a preset and overrides.

Resolution order, later wins: the dataclass defaults (the report's recipe),
the model preset named by the profile (backbone and head shape), the profile
itself, then explicit overrides such as command-line options.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from .classes import DEFAULT_PROMPT_TEMPLATE
from .errors import ConfigError
from .paths import PACKAGE_DIR

PROFILE_DIR = PACKAGE_DIR / "profiles"
MODEL_KINDS = ("matchclip", "linear_probe", "resnet", "zero_shot")
AUGMENTATIONS = ("none", "flip", "autoaugment", "randaugment")
OPTIMIZERS = ("adamw", "sgd")


@dataclass
class RunConfig:
    """Everything that determines a training run; saved as config.json in the run folder."""

    # Data. None means the profile's default location.
    labels: str | None = None
    images: str | None = None
    cache_dir: str | None = None
    out: str | None = None

    # Frozen backbone.
    backbone: str = "ViT-B-16"
    pretrained: str | None = "openai"
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE

    # Trained model. `preset` fills the backbone and head fields below.
    model: str = "matchclip"
    preset: str | None = "base"
    hidden: int = 512
    mlp: int = 1024
    heads: int = 8
    fusion_depth: int = 3
    readout_depth: int = 3
    matching_blocks: int = 1
    cls_tokens: int = 1
    dropout: float = 0.1
    attention_dropout: float = 0.0
    relation_tokens: bool = True
    resnet_arch: str = "resnet50"
    resnet_weights: str | None = "imagenet"
    resnet_image_size: int = 224

    # Optimisation: the report's recipe.
    epochs: int = 64
    batch_size: int = 32
    lr: float = 2.5e-4
    warmup_epochs: float = 2.0
    weight_decay: float = 5e-4
    optimizer: str = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    amsgrad: bool = True
    momentum: float = 0.9
    loss: str = "bce"
    loss_options: dict = field(default_factory=dict)
    balanced: bool = False
    augment: str = "none"
    logit_adjustment: float = 0.0
    prior_bias: bool = False

    # Execution.
    seed: int = 0
    device: str = "auto"
    # torch's intra-op CPU threads while training; 0 keeps torch's default. It
    # is part of the run's identity: torch splits float reductions by thread
    # count, so one seed gives different weights with 1, 2 or 16 threads.
    threads: int = 0
    workers: int = 0
    eval_batch_size: int = 256
    mask_unlabeled: bool = True
    profile: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> "RunConfig":
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(
                f"unknown setting(s) {unknown} in {source}; "
                f"valid settings are: {', '.join(f.name for f in dataclasses.fields(cls))}"
            )
        values = dict(data)
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        config = cls(**values)
        config.validate(source=source)
        return config

    def validate(self, *, source: str = "config") -> None:
        problems = []
        if self.model not in MODEL_KINDS:
            problems.append(f"model {self.model!r} is not one of {MODEL_KINDS}")
        if self.augment not in AUGMENTATIONS:
            problems.append(f"augment {self.augment!r} is not one of {AUGMENTATIONS}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer {self.optimizer!r} is not one of {OPTIMIZERS}")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if int(self.threads) < 0:
            problems.append(f"threads must be at least 0 (0 keeps torch's default), got {self.threads}")
        if self.lr <= 0:
            problems.append(f"lr must be positive, got {self.lr}")
        if self.warmup_epochs < 0:
            problems.append(f"warmup_epochs must be at least 0, got {self.warmup_epochs}")
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if problems:
            raise ConfigError(f"invalid {source}: " + "; ".join(problems))


def profile_names() -> list[str]:
    return sorted(path.stem for path in PROFILE_DIR.glob("*.json"))


def load_profile(name: str) -> dict[str, Any]:
    """Return the settings of a named profile (a JSON file in matchclip/profiles)."""
    path = PROFILE_DIR / f"{name}.json"
    if not path.is_file():
        raise ConfigError(
            f"unknown profile {name!r}; choose one of {', '.join(profile_names())}"
        )
    data = json.loads(path.read_text(encoding="utf-8"))
    data.pop("description", None)
    return data


def preset_settings(name: str) -> dict[str, Any]:
    """Flatten a model preset into RunConfig fields (backbone name, weights, head shape)."""
    from .model import load_preset

    preset = load_preset(name)
    settings = dict(preset["head"])
    settings["backbone"] = preset["backbone"]["name"]
    settings["pretrained"] = preset["backbone"]["pretrained"]
    return settings


def resolve_config(
    profile: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> RunConfig:
    """Build a RunConfig from a profile plus overrides (every key given overrides, None included)."""
    overrides = dict(overrides or {})
    profile_values = load_profile(profile) if profile else {}

    preset = overrides.get("preset", profile_values.get("preset", RunConfig.preset))
    values: dict[str, Any] = {}
    if preset:
        values.update(preset_settings(preset))
    # A preset chosen explicitly replaces the profile's head shape.
    profile_head = {
        key: value
        for key, value in profile_values.items()
        if not ("preset" in overrides and key in values)
    }
    values.update(profile_head)
    values.update(overrides)
    values["preset"] = preset
    values["profile"] = profile
    return RunConfig.from_dict(values, source=f"profile {profile!r}" if profile else "settings")
