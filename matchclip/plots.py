"""Figures of the reports: class counts, per-class recall and matching-attention maps.

Every function returns a matplotlib Figure with labelled axes and a title,
ready for `reports.save_figure`. The attention helpers also hold the
geometry that places a backbone's patch grid on the original image. The
model receives the image after open_clip's preprocessing (resize, then center
crop or pad), so patch (i, j) covers a region of the crop, not of the photo.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

ABSENT_COLOR = "#bbbbbb"
BAR_COLOR = "#3b6ea8"
HEATMAP_ALPHA = 0.55
HEATMAP_CMAP = "inferno"


def class_count_figure(counts: Mapping[str, pd.Series], *, title: str) -> Figure:
    """Sorted bar charts of label counts per class on a log scale, one panel per split.

    `counts` maps a split name to a Series of label counts indexed by class
    name. Classes with zero count are listed in the panel's subtitle, because
    a log axis cannot show a bar of height 0.
    """
    splits = list(counts)
    width = max(10.0, 0.22 * max(len(series) for series in counts.values()))
    figure, axes = plt.subplots(len(splits), 1, figsize=(width, 4.2 * len(splits)), squeeze=False)

    for ax, split in zip(axes[:, 0], splits):
        series = counts[split].sort_values(ascending=False, kind="stable")
        present = series[series > 0]
        missing = list(series[series == 0].index)
        ax.bar(range(len(present)), present.to_numpy(), color=BAR_COLOR)
        ax.set_yscale("log")
        ax.set_xticks(range(len(present)))
        ax.set_xticklabels(present.index, rotation=90, fontsize=8)
        ax.set_xlim(-0.6, len(present) - 0.4)
        ax.set_ylabel("images with the label (log scale)")
        ax.set_xlabel("predicate class (sorted by count)")
        subtitle = f"{split}: {int(series.sum())} labels over {len(present)} classes"
        if missing:
            subtitle += f"; no labels for {len(missing)}: {', '.join(missing)}"
        ax.set_title(subtitle, fontsize=10)
        ax.grid(axis="y", which="major", alpha=0.3)

    figure.suptitle(title)
    figure.tight_layout()
    return figure


def per_class_recall_figure(table: pd.DataFrame, *, title: str) -> Figure:
    """Bar chart of recall@3 per predicate, sorted, from `metrics.per_class_recall`'s table.

    Classes absent from the split (recall NaN) are drawn as grey stubs at 0
    and named "absent" in the legend.
    """
    table = table.copy()
    table["sort_key"] = table["recall"].fillna(-1.0)
    table = table.sort_values(["sort_key", "occurrences"], ascending=[False, False], kind="stable")
    present = table["recall"].notna().to_numpy()
    heights = table["recall"].fillna(0.0).to_numpy()

    figure, ax = plt.subplots(figsize=(max(10.0, 0.22 * len(table)), 4.8))
    positions = np.arange(len(table))
    ax.bar(positions[present], heights[present], color=BAR_COLOR, label="recall@3")
    if (~present).any():
        ax.bar(positions[~present], np.full((~present).sum(), 0.01), color=ABSENT_COLOR, label="absent from split")
    ax.set_xticks(positions)
    ax.set_xticklabels(table["predicate"], rotation=90, fontsize=8)
    ax.set_xlim(-0.6, len(table) - 0.4)
    ax.set_ylim(0, 1.0)
    ax.set_ylabel("recall@3")
    ax.set_xlabel("predicate class (sorted by recall)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper right")
    ax.set_title(title)
    figure.tight_layout()
    return figure


def crop_box(image_size: tuple[int, int], preprocess_config: Mapping) -> tuple[float, float, float, float]:
    """Region of the original image that the model's input covers, as (left, top, right, bottom) in pixels.

    `image_size` is the original (width, height); `preprocess_config` is the
    backbone's (size [H, W], resize_mode). The box follows open_clip's eval
    transform and torchvision's integer rounding:

    - "shortest": shortest side resized to the target, then center crop; the
      box lies inside the image.
    - "longest": longest side resized to the target, then centered padding;
      the box extends beyond the image on the padded sides.
    - "squash": the image is resized to the target; the box is the whole image.
    """
    width, height = image_size
    target_height, target_width = _target_size(preprocess_config["size"])
    mode = preprocess_config.get("resize_mode", "shortest")

    if mode == "squash":
        return 0.0, 0.0, float(width), float(height)

    if mode == "shortest":
        resized_width, resized_height = _resize_shortest(width, height, target_width, target_height)
        # torchvision center_crop: offsets rounded half to even, as Python's round does.
        left = int(round((resized_width - target_width) / 2.0))
        top = int(round((resized_height - target_height) / 2.0))
    elif mode == "longest":
        ratio = max(height / target_height, width / target_width)
        resized_width, resized_height = round(width / ratio), round(height / ratio)
        # open_clip center_crop_or_pad pads (target - size) // 2 on the left and top.
        left = -((target_width - resized_width) // 2) if target_width > resized_width else int(
            round((resized_width - target_width) / 2.0)
        )
        top = -((target_height - resized_height) // 2) if target_height > resized_height else int(
            round((resized_height - target_height) / 2.0)
        )
    else:
        raise ValueError(f"unknown resize_mode {mode!r} in the preprocessing config; expected shortest, longest or squash")

    scale_x = resized_width / width
    scale_y = resized_height / height
    return (
        left / scale_x,
        top / scale_y,
        (left + target_width) / scale_x,
        (top + target_height) / scale_y,
    )


def _target_size(size) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    height, width = size
    return int(height), int(width)


def _resize_shortest(width: int, height: int, target_width: int, target_height: int) -> tuple[int, int]:
    """Size after the "shortest" resize step, as (width, height)."""
    if target_width == target_height:
        # torchvision Resize(int): the short side becomes the target, the long side is truncated.
        if width <= height:
            return target_width, int(target_width * height / width)
        return int(target_height * width / height), target_height
    # open_clip ResizeKeepRatio(longest=0) for non-square targets rounds both sides.
    ratio = min(height / target_height, width / target_width)
    return round(width / ratio), round(height / ratio)


def patch_attention(
    attention: np.ndarray,
    class_id: int,
    *,
    num_prefix_tokens: int,
    grid_size: tuple[int, int],
) -> np.ndarray:
    """Attention of every patch to one relation, as a [grid_h, grid_w] map.

    `attention` is one image's matching attention [T, C] (rows are image
    tokens, prefix tokens first, patches in row-major order).
    """
    attention = np.asarray(attention)
    grid_height, grid_width = grid_size
    expected = num_prefix_tokens + grid_height * grid_width
    if attention.ndim != 2 or attention.shape[0] != expected:
        raise ValueError(
            f"attention has shape {attention.shape}; expected [{expected}, C] for {num_prefix_tokens} prefix "
            f"tokens and a {grid_height}x{grid_width} patch grid"
        )
    return attention[num_prefix_tokens:, class_id].reshape(grid_height, grid_width)


@dataclass
class AttentionExample:
    """One image with its top predictions and the matching attention of each."""

    image_id: str
    image_path: Path
    labels: list[str]
    predicted: list[tuple[int, str, float]]  # (class id, predicate, sigmoid score)
    maps: np.ndarray  # [k, grid_h, grid_w]
    box: tuple[float, float, float, float]


def attention_examples(run, image_ids: Sequence[str], *, split: str = "val", k: int = 3, block: int = 0) -> list[AttentionExample]:
    """Top-k predictions of a trained MatchCLIP run and their matching attention maps.

    `run` is an `inference.TrainedRun`; tokens come from the split's feature
    cache. `block` selects the matching block whose attention is shown.
    """
    import torch

    from .images import load_image
    from .metrics import top_k

    experiment = run.experiment
    if run.config.model != "matchclip" or not run.config.relation_tokens:
        raise ValueError(
            f"run {run.run_dir} trains model {run.config.model!r} with relation_tokens={run.config.relation_tokens}; "
            "attention maps need a MatchCLIP run with relation tokens"
        )
    backbone = experiment.load_backbone()
    samples = experiment.labels.split(split)
    row_of = {sample.image_id: index for index, sample in enumerate(samples)}
    missing = [image_id for image_id in image_ids if str(image_id) not in row_of]
    if missing:
        raise ValueError(f"image id(s) {missing} are not in the {split} split of {experiment.labels_path}")
    rows = [row_of[str(image_id)] for image_id in image_ids]

    cache = experiment.cache(split)
    tokens = torch.as_tensor(np.asarray(cache.tokens[rows], dtype=np.float32), device=experiment.device)
    relations = torch.as_tensor(experiment.relation_embeddings(), dtype=torch.float32, device=experiment.device)
    with torch.no_grad():
        logits, attentions = run.model(tokens, relations, return_attention=True)
    logits = logits.float().cpu().numpy()
    attention = attentions[block].float().cpu().numpy()  # [B, T, C]
    scores = run.scores(logits)
    top = top_k(scores, k=k, mask_unlabeled=run.config.mask_unlabeled)
    names = experiment.labels.predicate_classes

    examples = []
    for position, row in enumerate(rows):
        sample = samples[row]
        path = experiment.image_root / sample.file_name
        with load_image(path) as image:
            box = crop_box(image.size, backbone.preprocess_config)
        predicted = [
            (int(c), names[int(c)], float(1.0 / (1.0 + math.exp(-logits[position, c])))) for c in top[position]
        ]
        maps = np.stack(
            [
                patch_attention(
                    attention[position], int(c), num_prefix_tokens=backbone.num_prefix_tokens, grid_size=backbone.grid_size
                )
                for c in top[position]
            ]
        )
        examples.append(
            AttentionExample(
                image_id=sample.image_id,
                image_path=path,
                labels=[names[c] for c in sample.relations],
                predicted=predicted,
                maps=maps,
                box=box,
            )
        )
    return examples


def overlay_attention(ax, image: np.ndarray, attention_map: np.ndarray, box: tuple[float, float, float, float]):
    """Draw `image` [H, W, 3] with `attention_map` [gh, gw] stretched over `box` (left, top, right, bottom).

    Returns the heat map's AxesImage (for a colour bar).
    """
    height, width = image.shape[:2]
    left, top, right, bottom = box
    ax.imshow(image, extent=(0, width, height, 0), interpolation="bilinear")
    heatmap = ax.imshow(
        attention_map,
        extent=(left, right, bottom, top),
        cmap=HEATMAP_CMAP,
        alpha=HEATMAP_ALPHA,
        interpolation="nearest",
    )
    ax.add_patch(Rectangle((left, top), right - left, bottom - top, fill=False, edgecolor="white", linewidth=1, linestyle="--"))
    ax.set_xlim(min(0.0, left), max(float(width), right))
    ax.set_ylim(max(float(height), bottom), min(0.0, top))
    ax.set_xticks([])
    ax.set_yticks([])
    return heatmap


def attention_figure(examples: Sequence[AttentionExample], *, title: str) -> Figure:
    """Draw one row per image: the image with its labels, then one attention overlay per predicted relation."""
    from .images import load_image

    columns = 1 + max(len(example.predicted) for example in examples)
    figure, axes = plt.subplots(len(examples), columns, figsize=(3.6 * columns, 3.4 * len(examples)), squeeze=False)
    for row_axes, example in zip(axes, examples):
        with load_image(example.image_path) as image:
            pixels = np.asarray(image)
        height, width = pixels.shape[:2]
        row_axes[0].imshow(pixels, extent=(0, width, height, 0))
        row_axes[0].set_title(f"image {example.image_id}\nlabels: {', '.join(example.labels) or 'none'}", fontsize=9)
        row_axes[0].set_xticks([])
        row_axes[0].set_yticks([])
        for ax, (class_id, predicate, score), attention_map in zip(row_axes[1:], example.predicted, example.maps):
            heatmap = overlay_attention(ax, pixels, attention_map, example.box)
            figure.colorbar(heatmap, ax=ax, fraction=0.046, pad=0.02, label="attention weight")
            marker = " (label)" if predicate in example.labels else ""
            ax.set_title(f"{predicate}{marker}\nscore {score:.2f}, class {class_id}", fontsize=9)
        for ax in row_axes[1 + len(example.predicted):]:
            ax.axis("off")
    figure.suptitle(title)
    figure.tight_layout()
    return figure
