"""Report figures and the geometry that places the patch grid on the original image."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from matchclip import plots, reports
from matchclip.config import resolve_config

TARGET = 224


def preprocess_config(mode: str, size=(TARGET, TARGET)) -> dict:
    return {"size": list(size), "resize_mode": mode, "interpolation": "bicubic", "mean": [0.0] * 3, "std": [1.0] * 3}


def marker_image(width: int, height: int, x: int, y: int, half: int = 6) -> Image.Image:
    """Black image with a white square centred on (x, y)."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[y - half : y + half, x - half : x + half] = 255
    return Image.fromarray(pixels)


def marker_centre(tensor: torch.Tensor) -> tuple[float, float]:
    """Centre (x, y) of the bright pixels of a preprocessed [3, H, W] image."""
    brightness = tensor.mean(dim=0).numpy()
    ys, xs = np.nonzero(brightness > 0.5)
    return xs.mean() + 0.5, ys.mean() + 0.5


@pytest.mark.parametrize(
    ("mode", "width", "height", "x", "y"),
    [
        ("shortest", 448, 224, 300, 100),
        ("shortest", 300, 500, 150, 330),
        ("shortest", 333, 250, 200, 140),
        ("longest", 448, 224, 300, 100),
        ("longest", 250, 333, 60, 300),
        ("squash", 448, 224, 300, 100),
    ],
)
def test_crop_box_matches_open_clip_transform(mode, width, height, x, y):
    config = preprocess_config(mode)
    transform = image_transform_v2(PreprocessCfg(**{**config, "size": (TARGET, TARGET)}), is_train=False)
    seen_x, seen_y = marker_centre(transform(marker_image(width, height, x, y)))

    left, top, right, bottom = plots.crop_box((width, height), config)
    expected_x = (x - left) * TARGET / (right - left)
    expected_y = (y - top) * TARGET / (bottom - top)
    assert seen_x == pytest.approx(expected_x, abs=1.0)
    assert seen_y == pytest.approx(expected_y, abs=1.0)


def test_crop_box_shortest_landscape_exact():
    assert plots.crop_box((448, 224), preprocess_config("shortest")) == (112.0, 0.0, 336.0, 224.0)


def test_crop_box_longest_extends_past_image():
    left, top, right, bottom = plots.crop_box((448, 224), preprocess_config("longest"))
    assert (left, right) == (0.0, 448.0)
    assert top < 0 < 224 < bottom


def test_crop_box_square_image_is_whole_image():
    assert plots.crop_box((224, 224), preprocess_config("shortest")) == (0.0, 0.0, 224.0, 224.0)


def test_crop_box_unknown_mode():
    with pytest.raises(ValueError):
        plots.crop_box((100, 100), preprocess_config("fisheye"))


def test_patch_attention_drops_prefix_and_reshapes():
    grid = (3, 4)
    prefix = 1
    tokens = prefix + grid[0] * grid[1]
    attention = np.zeros((tokens, 5))
    attention[:, 2] = np.arange(tokens)  # token index as the attention value
    patches = plots.patch_attention(attention, 2, num_prefix_tokens=prefix, grid_size=grid)
    assert patches.shape == grid
    assert patches[0, 0] == 1  # first patch, not the class token
    assert patches[1, 0] == 1 + grid[1]  # row-major: the second row starts after one row of patches
    assert patches[2, 3] == tokens - 1


def test_patch_attention_wrong_token_count():
    with pytest.raises(ValueError):
        plots.patch_attention(np.zeros((12, 5)), 0, num_prefix_tokens=1, grid_size=(3, 3))


def test_overlay_attention_extent():
    figure, ax = plt.subplots()
    image = np.zeros((224, 448, 3), dtype=np.uint8)
    plots.overlay_attention(ax, image, np.eye(7), (112.0, 0.0, 336.0, 224.0))
    heatmap = ax.get_images()[1]
    assert tuple(heatmap.get_extent()) == (112.0, 336.0, 224.0, 0.0)
    assert ax.get_xlim() == (0.0, 448.0)
    plt.close(figure)


@pytest.fixture
def provenance():
    return reports.provenance(resolve_config("demo"), source="test", date="2024-01-01 00:00 UTC")


def test_class_count_figure_file(tmp_path, provenance):
    counts = {
        "train": pd.Series({"riding": 500, "eating": 30, "kissing": 0}),
        "val": pd.Series({"riding": 50, "eating": 0, "kissing": 1}),
    }
    figure = plots.class_count_figure(counts, title="Label counts (demo)")
    axes = figure.get_axes()
    assert axes[0].get_yscale() == "log"
    assert [label.get_text() for label in axes[0].get_xticklabels()] == ["riding", "eating"]
    assert "kissing" in axes[0].get_title()
    png = reports.save_figure(figure, "counts", caption="c", provenance=provenance, out_dir=tmp_path)
    plt.close(figure)
    assert png.stat().st_size > 1000


def test_per_class_recall_figure_file(tmp_path, provenance):
    table = pd.DataFrame(
        {
            "class_id": [6, 7, 8],
            "predicate": ["hanging from", "on back of", "falling off"],
            "occurrences": [10, 0, 4],
            "hits": [5, 0, 4],
            "recall": [0.5, np.nan, 1.0],
        }
    )
    figure = plots.per_class_recall_figure(table, title="Per-class recall (demo)")
    ax = figure.get_axes()[0]
    assert [label.get_text() for label in ax.get_xticklabels()] == ["falling off", "hanging from", "on back of"]
    assert ax.get_ylabel() == "recall@3"
    png = reports.save_figure(figure, "recall", caption="c", provenance=provenance, out_dir=tmp_path)
    plt.close(figure)
    assert png.stat().st_size > 1000


def test_attention_figure_file(tmp_path, provenance):
    image_path = tmp_path / "photo.jpg"
    marker_image(448, 224, 300, 100).save(image_path)
    example = plots.AttentionExample(
        image_id="42",
        image_path=image_path,
        labels=["riding"],
        predicted=[(46, "riding", 0.9), (20, "wearing", 0.4), (21, "holding", 0.2)],
        maps=np.random.default_rng(0).random((3, 7, 7)),
        box=plots.crop_box((448, 224), preprocess_config("shortest")),
    )
    figure = plots.attention_figure([example, example], title="Matching attention (demo)")
    assert len(figure.get_axes()) == 8 + 6  # 2 images, 3 overlays each with a colour bar
    assert figure.get_axes()[1].get_title().startswith("riding (label)")
    png = reports.save_figure(figure, "attention", caption="c", provenance=provenance, out_dir=tmp_path)
    plt.close(figure)
    assert png.stat().st_size > 1000


def test_per_class_recall_legend_without_absent():
    table = pd.DataFrame(
        {"class_id": [6, 7], "predicate": ["hanging from", "on back of"], "occurrences": [3, 1], "hits": [1, 1], "recall": [1 / 3, 1.0]}
    )
    figure = plots.per_class_recall_figure(table, title="Per-class recall (demo)")
    labels = [text.get_text() for text in figure.get_axes()[0].get_legend().get_texts()]
    plt.close(figure)
    assert labels == ["recall@3"]
