"""Experiment grids of the report's tables: row definitions, training and table building.

A row is a set of overrides on top of a profile. The same row definition
gives the same RunConfig in every notebook, and `train` reuses a finished run
folder with the same settings. A configuration that appears in several tables
(MatchCLIP-Large with balancing is in Tables 2, 3 and 4) therefore trains once.

Model variants come in two families:

- published: the profiles on real data use the report's presets
  (MatchCLIP-Base on ViT-B/16, -Large and -Huge on ViT-L/14 at 336 px);
- scaled: profiles on the demo preset (tiny random backbone) use scaled-down
  analogues defined in SCALED_VARIANTS, relative to the profile's own head.
  "large" is the profile's head and "base" is half as wide. "huge" is 1.5625x
  wider than "large" (the report's 1600/1024) and keeps the profile's
  dropout: the report's 0.3 suits a 1600-wide head, but on the demo data a
  100-wide head with dropout 0.3 (0.1) reached a val mean recall@3 of 0.08
  (0.09) after 12 epochs, against about 0.38 without dropout. They train with the profile's schedule, except the ResNet, which
  trains from images and gets SCALED_RESNET_DEFAULTS; an override replaces
  those defaults.

Balanced rows use a batch of BALANCED_BATCH_SIZE images, because a
class-balanced batch must hold one example of every class with train
examples (up to 50 in PSG) and the report's batch of 32 cannot.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from . import published
from .config import RunConfig, load_profile, resolve_config

logger = logging.getLogger(__name__)

BALANCED_BATCH_SIZE = 64
# The report's "MatchCLIP-Huge" is "MatchCLIP-Large" with width 1600 instead of 1024.
HUGE_WIDTH_RATIO = 1600 / 1024

PUBLISHED_VARIANTS: dict[str, dict[str, Any]] = {
    "base": {"preset": "base"},
    "large": {"preset": "large"},
    "huge": {"preset": "huge"},
}
# The scaled variants are the report's widths (Base 512, Large 1024, Huge
# 1600) divided by SCALED_WIDTH_DIVISOR; the demo preset's head is 64 wide.
SCALED_WIDTH_DIVISOR = 16
SCALED_VARIANTS: dict[str, dict[str, Any]] = {
    "base": {"hidden": 32, "mlp": 64},
    "large": {},
    "huge": {"hidden": 100},
}
# Cost settings of the scaled ResNet row, which trains from images (no
# feature cache); they yield to the caller's overrides.
SCALED_RESNET_DEFAULTS: dict[str, Any] = {"epochs": 1, "warmup_epochs": 0}
VARIANT_LABELS = {"base": "MatchCLIP-Base", "large": "MatchCLIP-Large", "huge": "MatchCLIP-Huge"}

BALANCED_MARK = "\u2020"  # dagger: trained with class-balanced batches
NO_TEXT_MARK = "\u2021"  # double dagger: no relation (text) tokens
CHECK = "\u2713"
NOT_USED = "/"


@dataclass(frozen=True)
class GridRow:
    """One row of a results table.

    `overrides` define the row and win over the caller's overrides;
    `defaults` only lower the cost of the row and yield to the caller's
    overrides. `reference` names the row that deltas are measured against.
    """

    key: str
    label: str
    overrides: Mapping[str, Any]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    reference: str | None = None
    published_eval: float | None = None
    published_test: float | None = None


def variant_family(profile: str) -> str:
    """"scaled" for profiles on the demo preset, "published" otherwise."""
    preset = load_profile(profile).get("preset")
    return "scaled" if preset == "demo" else "published"


def variant_overrides(profile: str, variant: str, *, hidden: int | None = None) -> dict[str, Any]:
    """Settings of a model variant ("base", "large", "huge") in `profile`; `hidden` replaces the head width."""
    table = SCALED_VARIANTS if variant_family(profile) == "scaled" else PUBLISHED_VARIANTS
    if variant not in table:
        raise KeyError(f"unknown model variant {variant!r}; choose one of {', '.join(table)}")
    settings = dict(table[variant])
    if hidden is not None:
        settings["hidden"] = int(hidden)
    return settings


def profile_width(profile: str, report_width: int) -> int:
    """Head width that `profile` trains for a width in the report's units (512, 1024, 1600, ...).

    Profiles on the report's presets train the width as given. Scaled
    profiles divide it by SCALED_WIDTH_DIVISOR, so `hidden=1600` on the demo
    profile trains the demo analogue of the report's D=1600 (100), which a CPU
    can train, where D=1600 itself would take hours per row.
    """
    report_width = int(report_width)
    if report_width < 1:
        raise ValueError(f"head width must be a positive number of channels, got {report_width}")
    if variant_family(profile) != "scaled":
        return report_width
    return max(1, round(report_width / SCALED_WIDTH_DIVISOR))


def default_widths(profile: str) -> tuple[int, int]:
    """(reference width D of "large", wide width of "huge") of a profile's variants."""
    large = resolve_config(profile, variant_overrides(profile, "large"))
    huge = resolve_config(profile, variant_overrides(profile, "huge"))
    return int(large.hidden), int(huge.hidden)


def balanced(settings: Mapping[str, Any]) -> dict[str, Any]:
    return {**settings, "balanced": True, "batch_size": BALANCED_BATCH_SIZE}


def baseline_rows(profile: str) -> list[GridRow]:
    """ResNet, linear probe and zero-shot CLIP rows (Table 2's baselines plus zero-shot)."""
    family = variant_family(profile)
    clip = {} if family == "scaled" else {"preset": "base"}
    clip_name = "CLIP" if family == "scaled" else "CLIP-B/16"
    resnet_label = "ResNet" if family == "scaled" else "ResNet50"
    rows = [
        GridRow(
            key="resnet",
            label=resnet_label,
            # The report trains the ResNet with SGD, momentum 0.9; architecture,
            # weights and input size come from the profile.
            overrides={"model": "resnet", "optimizer": "sgd", "momentum": 0.9},
        ),
        GridRow(key="linear_probe", label=f"Linear probe {clip_name}", overrides={"model": "linear_probe", **clip}),
        GridRow(key="zero_shot", label=f"Zero-shot {clip_name}", overrides={"model": "zero_shot", **clip}),
    ]
    return _finish_rows(rows, profile, "table2")


def main_rows(profile: str, *, wide_hidden: int | None = None) -> list[GridRow]:
    """MatchCLIP-Base, -Large, -Large with balancing and -Huge with balancing (Table 2)."""
    large = variant_overrides(profile, "large")
    huge = variant_overrides(profile, "huge", hidden=wide_hidden)
    rows = [
        GridRow(key="base", label=VARIANT_LABELS["base"], overrides=variant_overrides(profile, "base")),
        GridRow(key="large", label=VARIANT_LABELS["large"], overrides=large),
        GridRow(key="large-balanced", label=VARIANT_LABELS["large"] + BALANCED_MARK, overrides=balanced(large)),
        GridRow(key="huge-balanced", label=VARIANT_LABELS["huge"] + BALANCED_MARK, overrides=balanced(huge)),
    ]
    return _finish_rows(rows, profile, "table2")


def ablation_rows(profile: str, *, hidden: int | None = None, wide_hidden: int | None = None) -> list[GridRow]:
    """Table 3: MatchCLIP-Large at width `hidden` and one change per row, deltas against it.

    The depth row adds one layer to both transformer stacks (the report goes
    from 3 to 4); the width rows are MatchCLIP-Huge at `wide_hidden`.
    """
    large = variant_overrides(profile, "large", hidden=hidden)
    huge = variant_overrides(profile, "huge", hidden=wide_hidden)
    reference = resolve_config(profile, large)
    rows = [
        GridRow(key="large", label=VARIANT_LABELS["large"], overrides=large),
        GridRow(
            key="large-depth",
            label=VARIANT_LABELS["large"],
            overrides={**large, "fusion_depth": reference.fusion_depth + 1, "readout_depth": reference.readout_depth + 1},
        ),
        GridRow(
            key="large-matching",
            label=VARIANT_LABELS["large"],
            overrides={**large, "matching_blocks": reference.matching_blocks + 1},
        ),
        GridRow(key="large-cls", label=VARIANT_LABELS["large"], overrides={**large, "cls_tokens": 5}),
        GridRow(key="large-balanced", label=VARIANT_LABELS["large"], overrides=balanced(large)),
        GridRow(key="huge", label=VARIANT_LABELS["huge"], overrides=huge),
        GridRow(key="huge-balanced", label=VARIANT_LABELS["huge"] + BALANCED_MARK, overrides=balanced(huge)),
    ]
    rows = _finish_rows(rows, profile, "table3")
    return [row if row.key == "large" else _replace(row, reference="large") for row in rows]


def relation_token_rows(profile: str, *, hidden: int | None = None, wide_hidden: int | None = None) -> list[GridRow]:
    """Table 4: balanced MatchCLIP-Large and -Huge with and without relation (text) tokens."""
    large = balanced(variant_overrides(profile, "large", hidden=hidden))
    huge = balanced(variant_overrides(profile, "huge", hidden=wide_hidden))
    rows = [
        GridRow(key="large-balanced", label=VARIANT_LABELS["large"], overrides=large),
        GridRow(
            key="large-balanced-no-text",
            label=VARIANT_LABELS["large"] + NO_TEXT_MARK,
            overrides={**large, "relation_tokens": False},
            reference="large-balanced",
        ),
        GridRow(key="huge-balanced", label=VARIANT_LABELS["huge"], overrides=huge),
        GridRow(
            key="huge-balanced-no-text",
            label=VARIANT_LABELS["huge"] + NO_TEXT_MARK,
            overrides={**huge, "relation_tokens": False},
            reference="huge-balanced",
        ),
    ]
    return _finish_rows(rows, profile, "table4")


def row_defaults(profile: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Cost settings of a row with these overrides: the scaled ResNet's short schedule, none otherwise."""
    if variant_family(profile) != "scaled" or overrides.get("model") != "resnet":
        return {}
    return dict(SCALED_RESNET_DEFAULTS)


def _finish_rows(rows: list[GridRow], profile: str, table: str) -> list[GridRow]:
    """Attach the published scores of `table` and the profile's cost defaults to each row."""
    finished = []
    for row in rows:
        score = published.TABLE2.get(row.key) if table == "table2" else None
        finished.append(
            _replace(
                row,
                defaults={**row_defaults(profile, row.overrides), **row.defaults},
                published_eval=published.published_eval(row.key, table),
                published_test=score.test if score is not None else None,
            )
        )
    return finished


def _replace(row: GridRow, **changes: Any) -> GridRow:
    from dataclasses import replace

    return replace(row, **changes)


def resolve_row(row: GridRow, *, profile: str, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """RunConfig of a row: profile, then the row's defaults, the caller's overrides, the row's overrides."""
    overrides = {key: value for key, value in dict(overrides or {}).items() if value is not None}
    kept = sorted(key for key in overrides if key in row.overrides and overrides[key] != row.overrides[key])
    if kept:
        logger.warning(
            "row %s keeps its own %s; the override(s) apply to the other rows",
            row.key,
            ", ".join(f"{key}={row.overrides[key]!r}" for key in kept),
        )
    settings = {**row.defaults, **overrides, **row.overrides}
    return resolve_config(profile, settings)


@dataclass
class RowResult:
    """A trained (or reused) run of one grid row."""

    row: GridRow
    config: RunConfig
    run_dir: Any
    best_epoch: int
    metrics: dict

    @property
    def score(self) -> float:
        """Official mean recall@3 on val in percent (classes absent from val count as 0)."""
        return 100.0 * float(self.metrics["mean_recall@3"])

    @property
    def score_present(self) -> float:
        """Mean recall@3 on val in percent over the classes present in val."""
        return 100.0 * float(self.metrics["mean_recall@3_present"])


def run_rows(
    rows: Sequence[GridRow],
    *,
    profile: str,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, RowResult]:
    """Train every row (reusing finished runs) and return the results by row key."""
    from .train import train

    results: dict[str, RowResult] = {}
    for row in rows:
        config = resolve_row(row, profile=profile, overrides=overrides)
        logger.info("row %s: training or reusing run", row.key)
        result = train(config)
        results[row.key] = RowResult(
            row=row,
            config=result.config,
            run_dir=result.run_dir,
            best_epoch=result.best_epoch,
            metrics=result.best_metrics,
        )
    return results


def configs(rows: Iterable[GridRow], *, profile: str, overrides: Mapping[str, Any] | None = None) -> list[RunConfig]:
    return [resolve_row(row, profile=profile, overrides=overrides) for row in rows]


def format_score(value: float | None) -> str:
    """Format a percentage with two decimals, as the report prints it; None gives ""."""
    return "" if value is None else f"{value:.2f}"


def format_delta(value: float | None, reference: float | None) -> str:
    """Format a score with its difference from the reference, as the report prints it: "27.40 (-1.12)".

    Both numbers are rounded to two decimals before subtracting, so the
    printed delta is the difference of the printed scores.
    """
    if value is None:
        return ""
    if reference is None:
        return format_score(value)
    delta = round(value, 2) - round(reference, 2)
    return f"{value:.2f} ({delta:+.2f})"


def _scores_column(results: Mapping[str, RowResult], rows: Sequence[GridRow]) -> tuple[list[str], list[str]]:
    ours, theirs = [], []
    for row in rows:
        reference = results[row.reference] if row.reference else None
        ours.append(format_delta(results[row.key].score, reference.score if reference else None))
        published_reference = _find(rows, row.reference).published_eval if row.reference else None
        theirs.append(format_delta(row.published_eval, published_reference) if row.published_eval is not None else "")
    return ours, theirs


def _find(rows: Sequence[GridRow], key: str) -> GridRow:
    for row in rows:
        if row.key == key:
            return row
    raise KeyError(f"reference row {key!r} is not among the rows {[row.key for row in rows]}")


def results_table(results: Mapping[str, RowResult], rows: Sequence[GridRow]) -> pd.DataFrame:
    """Table 2 layout: our val scores beside the published eval and test scores."""
    records = []
    for row in rows:
        result = results[row.key]
        records.append(
            {
                "Model": row.label,
                "Best epoch": result.best_epoch + 1,
                "mR@3 val (ours)": format_score(result.score),
                "mR@3 val, present classes (ours)": format_score(result.score_present),
                "mR@3 eval (published)": format_score(row.published_eval) or "n/a",
                "mR@3 test (published)": format_score(row.published_test) or "n/a",
            }
        )
    return pd.DataFrame(records)


def ablation_table(results: Mapping[str, RowResult], rows: Sequence[GridRow]) -> pd.DataFrame:
    """Table 3 layout: the varied settings, then our score and the published one with deltas."""
    ours, theirs = _scores_column(results, rows)
    records = []
    for row, our_score, their_score in zip(rows, ours, theirs):
        config = results[row.key].config
        records.append(
            {
                "Model": row.label,
                "Transformer layers": _depth(config),
                "Matching block": config.matching_blocks,
                "cls number": config.cls_tokens,
                "Data balance": CHECK if config.balanced else NOT_USED,
                "Hidden size D": config.hidden,
                "mR@3 val (ours)": our_score,
                "mR@3 eval (published)": their_score,
            }
        )
    return pd.DataFrame(records)


def relation_token_table(results: Mapping[str, RowResult], rows: Sequence[GridRow]) -> pd.DataFrame:
    """Table 4 layout: with and without relation tokens, deltas against the row with them."""
    ours, theirs = _scores_column(results, rows)
    records = []
    for row, our_score, their_score in zip(rows, ours, theirs):
        config = results[row.key].config
        records.append(
            {
                "Model": row.label,
                "Text encoder": CHECK if config.relation_tokens else NOT_USED,
                "Data balance": CHECK if config.balanced else NOT_USED,
                "Hidden size D": config.hidden,
                "mR@3 val (ours)": our_score,
                "mR@3 eval (published)": their_score,
            }
        )
    return pd.DataFrame(records)


def _depth(config: RunConfig) -> str:
    if config.fusion_depth == config.readout_depth:
        return str(config.fusion_depth)
    return f"{config.fusion_depth}+{config.readout_depth}"


def settings_summary(results: Mapping[str, RowResult]) -> pd.DataFrame:
    """Training settings of each row's run (for the notebooks' fine print)."""
    records = []
    for key, result in results.items():
        config = result.config
        records.append(
            {
                "row": key,
                "model": config.model,
                "backbone": config.backbone,
                "epochs": config.epochs,
                "batch size": config.batch_size,
                "optimizer": config.optimizer,
                "lr": config.lr,
                "balanced": config.balanced,
                "seed": config.seed,
            }
        )
    return pd.DataFrame(records)


# ModifiedResNet towers (open_clip RN50, RN101, ...) end in a layer4 with
# 8 * width planes and a bottleneck expansion of 4, so their tokens are 32 * width wide.
RESNET_TOWER_TOKEN_WIDTH_FACTOR = 32
# Their last feature map is 1/32 of the input size on each side.
RESNET_TOWER_STRIDE = 32


@dataclass(frozen=True)
class BackboneShape:
    """Input widths and geometry of an open_clip model, read from its model config."""

    name: str
    image_width: int
    text_width: int
    image_size: int
    patch_size: int | None

    @property
    def grid(self) -> int:
        """Side of the square token grid: image size over patch size (over 32 for a ResNet tower)."""
        return self.image_size // (self.patch_size or RESNET_TOWER_STRIDE)

    @property
    def num_tokens(self) -> int:
        """Image tokens per image: one class (or pooled) token plus the grid."""
        return self.grid * self.grid + 1


def backbone_shape(name: str) -> BackboneShape:
    """Token width W, embedding width E, image and patch size of an open_clip model config.

    Reads open_clip.get_model_config, so no weights are loaded. Raises
    ConfigError for a model that open_clip does not know (such as a
    local-dir: folder).
    """
    import open_clip

    from .backbone import register_model_configs
    from .errors import ConfigError

    register_model_configs()
    model_config = open_clip.get_model_config(name)
    if model_config is None:
        raise ConfigError(
            f"open_clip has no model config named {name!r}; choose a name from open_clip.list_models() "
            "or register the config JSON with open_clip.add_model_config"
        )
    vision = model_config["vision_cfg"]
    if isinstance(vision.get("layers"), (list, tuple)):
        image_width = int(vision["width"]) * RESNET_TOWER_TOKEN_WIDTH_FACTOR
    else:
        image_width = int(vision["width"])
    image_size = vision["image_size"]
    image_size = int(image_size[0] if isinstance(image_size, (list, tuple)) else image_size)
    patch_size = vision.get("patch_size")
    return BackboneShape(
        name=name,
        image_width=image_width,
        text_width=int(model_config["embed_dim"]),
        image_size=image_size,
        patch_size=int(patch_size) if patch_size else None,
    )


def count_trainable(config: RunConfig, shape: BackboneShape) -> int:
    """Trainable parameters of the module a configuration trains, built with the backbone's real widths.

    The module is built on the meta device: shapes only, no memory and no
    initialisation, so counting the Huge head takes milliseconds.
    """
    import torch

    from .model import count_parameters

    if config.model == "zero_shot":
        return 0
    with torch.device("meta"):
        module = _build_for_counting(config, shape)
    return count_parameters(module)


def _build_for_counting(config: RunConfig, shape: BackboneShape):
    from .experiment import build_trained_module

    return build_trained_module(
        config, image_width=shape.image_width, text_width=shape.text_width, load_weights=False
    )


def format_count(count: int) -> str:
    """Parameter count as the report writes it, with one decimal: 14.6M, 28.7K, 950."""
    if count >= 1_000_000:
        return f"{count / 1_000_000:.1f}M"
    if count >= 1_000:
        return f"{count / 1_000:.1f}K"
    return str(count)


def variant_rows(profile: str) -> list[GridRow]:
    """Table 1 rows: the trained baselines and the three MatchCLIP variants."""
    baselines = [row for row in baseline_rows(profile) if row.key != "zero_shot"]
    variants = [
        GridRow(key=name, label=VARIANT_LABELS[name], overrides=variant_overrides(profile, name))
        for name in ("base", "large", "huge")
    ]
    return baselines + variants


def variant_table(profile: str, *, overrides: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Table 1: shape and trainable parameters of each model, beside the published counts.

    Widths, image size and patch size come from the open_clip config of each
    row's backbone; parameters are counted on the built modules.
    """
    records = []
    for row in variant_rows(profile):
        config = resolve_row(row, profile=profile, overrides=overrides)
        shape = backbone_shape(config.backbone)
        is_head = config.model == "matchclip"
        blank = NOT_USED
        if config.model == "resnet":
            image_size, patch_size, backbone = config.resnet_image_size, blank, config.resnet_arch
        else:
            image_size, patch_size, backbone = shape.image_size, shape.patch_size or blank, config.backbone
        publication = published.TABLE1.get(row.key, {})
        records.append(
            {
                "Model": row.label,
                "Backbone": backbone,
                "Image size": image_size,
                "Patch size": patch_size,
                "Transformer layers": _depth(config) if is_head else blank,
                "Matching block": config.matching_blocks if is_head else blank,
                "Hidden size D": config.hidden if is_head else blank,
                "MLP size": config.mlp if is_head else blank,
                "Heads": config.heads if is_head else blank,
                "Dropout": config.dropout if is_head else blank,
                "Params (ours)": format_count(count_trainable(config, shape)),
                "Params (published)": publication.get("Params", "n/a"),
            }
        )
    return pd.DataFrame(records).astype(str)
