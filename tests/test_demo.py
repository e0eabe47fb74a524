"""Tests of the synthetic demo data set in the PSG classification format."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from matchclip import demo
from matchclip.classes import FIRST_SCORED_CLASS, NUM_CLASSES, PREDICATE_CLASSES
from matchclip.errors import ConfigError
from matchclip.labels import check_dataset, load_labels

SMALL = {"num_train": 24, "num_val": 8, "num_test": 8}
TINY = {"num_train": 6, "num_val": 2, "num_test": 2}
FILE_NAME = re.compile(r"^(train2017|val2017)/\d{12}\.jpg$")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _split_entries(payload: dict, split: str) -> list[dict]:
    by_id = {entry["image_id"]: entry for entry in payload["data"]}
    return [by_id[image_id] for image_id in payload[f"{split}_image_ids"]]


def _tree_bytes(folder: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("small") / "demo"
    demo.generate_demo_dataset(out_dir, seed=3, **SMALL)
    return out_dir


@pytest.fixture(scope="module")
def split_relations() -> dict[str, list[list[int]]]:
    """Relation lists of default-size train and val splits, sampled without images."""
    return {
        "train": demo.sample_split_labels(np.random.default_rng(0), 1000),
        "val": demo.sample_split_labels(np.random.default_rng(1), 200),
    }


# ---------------------------------------------------------------------------
# Format


def test_label_file_top_level_keys(small_dataset):
    payload = _read_json(small_dataset / "psg_cls_basic.json")
    assert sorted(payload) == [
        "data",
        "predicate_classes",
        "test_image_ids",
        "train_image_ids",
        "val_image_ids",
    ]
    assert payload["predicate_classes"] == list(PREDICATE_CLASSES)


def test_label_file_split_sizes_and_ids(small_dataset):
    payload = _read_json(small_dataset / "psg_cls_basic.json")
    splits = {split: payload[f"{split}_image_ids"] for split in ("train", "val", "test")}
    assert {split: len(ids) for split, ids in splits.items()} == {
        "train": 24,
        "val": 8,
        "test": 8,
    }

    all_ids = [image_id for ids in splits.values() for image_id in ids]
    assert all(isinstance(image_id, str) for image_id in all_ids)
    assert len(set(all_ids)) == len(all_ids), "an image id is in two splits or twice in one"
    assert sorted(entry["image_id"] for entry in payload["data"]) == sorted(all_ids)


def test_label_file_entries(small_dataset):
    payload = _read_json(small_dataset / "psg_cls_basic.json")
    file_names = [entry["file_name"] for entry in payload["data"]]
    assert len(set(file_names)) == len(file_names)

    for split, folder in (("train", "train2017"), ("val", "val2017"), ("test", "val2017")):
        for entry in _split_entries(payload, split):
            assert sorted(entry) == ["file_name", "image_id", "relations"]
            assert FILE_NAME.match(entry["file_name"]), entry["file_name"]
            assert entry["file_name"].startswith(folder + "/")
            assert entry["image_id"] not in entry["file_name"], "ids should not mirror file names"
            assert all(type(relation) is int for relation in entry["relations"])
            if split == "test":
                assert entry["relations"] == []


def test_load_labels_accepts_demo(small_dataset):
    labels = check_dataset(small_dataset / "psg_cls_basic.json", small_dataset / "coco")
    assert [len(labels.split(split)) for split in ("train", "val", "test")] == [24, 8, 8]
    assert labels.targets("train").shape == (24, NUM_CLASSES)
    assert not labels.has_labels("test")


def test_images_are_rgb_jpeg_224(small_dataset):
    payload = _read_json(small_dataset / "psg_cls_basic.json")
    for entry in payload["data"]:
        with Image.open(small_dataset / "coco" / entry["file_name"]) as image:
            assert image.format == "JPEG"
            assert image.mode == "RGB"
            assert image.size == (224, 224)


def test_image_folders_hold_only_listed_files(small_dataset):
    payload = _read_json(small_dataset / "psg_cls_basic.json")
    listed = {entry["file_name"] for entry in payload["data"]}
    on_disk = {
        str(path.relative_to(small_dataset / "coco")) for path in (small_dataset / "coco").rglob("*.jpg")
    }
    assert on_disk == listed


# ---------------------------------------------------------------------------
# Determinism


def test_same_seed_byte_identical(tmp_path):
    first = demo.generate_demo_dataset(tmp_path / "a", seed=7, **SMALL).parent
    second = demo.generate_demo_dataset(tmp_path / "b", seed=7, **SMALL).parent
    first_files, second_files = _tree_bytes(first), _tree_bytes(second)
    assert sorted(first_files) == sorted(second_files)
    differing = [name for name in first_files if first_files[name] != second_files[name]]
    assert differing == []


def test_different_seeds_differ(tmp_path):
    first = demo.generate_demo_dataset(tmp_path / "a", seed=1, **TINY)
    second = demo.generate_demo_dataset(tmp_path / "b", seed=2, **TINY)
    first_payload, second_payload = _read_json(first), _read_json(second)
    first_relations = [entry["relations"] for entry in first_payload["data"]]
    second_relations = [entry["relations"] for entry in second_payload["data"]]
    assert first_relations != second_relations

    first_image = (first.parent / "coco" / first_payload["data"][0]["file_name"]).read_bytes()
    second_image = (second.parent / "coco" / second_payload["data"][0]["file_name"]).read_bytes()
    assert first_image != second_image


def test_jpeg_encoding_repeatable():
    pixels = demo.render_image(np.random.default_rng(0), [6, 30, 55])
    assert demo.encode_jpeg(pixels) == demo.encode_jpeg(pixels.copy())


# ---------------------------------------------------------------------------
# Label statistics of the default-size data set


def test_unlabeled_classes_never_occur(small_dataset, split_relations):
    payload = _read_json(small_dataset / "psg_cls_basic.json")
    used = {relation for entry in payload["data"] for relation in entry["relations"]}
    used |= {relation for split in split_relations.values() for image in split for relation in image}
    assert used.isdisjoint(range(FIRST_SCORED_CLASS))
    assert used <= set(range(FIRST_SCORED_CLASS, NUM_CLASSES))


@pytest.mark.parametrize("split", ["train", "val"])
def test_labels_per_image_two_to_six(split_relations, split):
    images = split_relations[split]
    counts = Counter(len(relations) for relations in images)
    assert set(counts) <= {2, 3, 4, 5, 6}
    assert all(len(set(relations)) == len(relations) for relations in images)
    assert counts[2] < len(images), "every image has exactly 2 labels"
    assert max(counts) >= 5, "no image has 5 or more labels"


def test_train_long_tail_shape(split_relations):
    counts = Counter(relation for image in split_relations["train"] for relation in image)
    ordered = sorted(counts.values(), reverse=True)
    assert len(counts) == NUM_CLASSES - FIRST_SCORED_CLASS, "a scored class is missing from train"
    assert 500 <= ordered[0] <= 600
    assert 8 <= ordered[-1] <= 15
    assert ordered[0] >= 30 * ordered[-1]
    assert ordered[4] < ordered[0] / 3, "the top 5 classes have similar counts"


def test_val_has_every_scored_class(split_relations):
    counts = Counter(relation for image in split_relations["val"] for relation in image)
    assert len(counts) == NUM_CLASSES - FIRST_SCORED_CLASS


def test_class_frequency_follows_rank(split_relations):
    counts = Counter(relation for image in split_relations["train"] for relation in image)
    table = demo.describe_demo_classes()
    expected = dict(zip(table["class_id"], table["image_fraction"] * 1000))
    assert all(abs(counts[class_id] - expected[class_id]) <= 1 for class_id in expected)


@pytest.mark.parametrize("seed", range(10))
def test_label_sampling_meets_quotas(seed):
    images = demo.sample_split_labels(np.random.default_rng(seed), 200)
    counts = Counter(relation for image in images for relation in image)
    quotas = demo.class_quotas(200)
    assert all(counts[class_id] == quotas[class_id] for class_id in range(NUM_CLASSES))
    assert min(len(image) for image in images) >= 2


@pytest.mark.slow
def test_default_split_sizes(tmp_path):
    path = demo.generate_demo_dataset(tmp_path / "demo", seed=0)
    payload = _read_json(path)
    assert len(payload["train_image_ids"]) == 1000
    assert len(payload["val_image_ids"]) == 200
    # As many test images as the real test split, so a demo submission has 500 lines.
    assert len(payload["test_image_ids"]) == 500


def test_tiny_splits(tmp_path):
    path = demo.generate_demo_dataset(tmp_path / "demo", seed=0, num_train=1, num_val=0, num_test=2)
    payload = _read_json(path)
    assert payload["val_image_ids"] == []
    train = _split_entries(payload, "train")
    assert len(train[0]["relations"]) >= 2
    assert len(_split_entries(payload, "test")) == 2


@pytest.mark.parametrize("sizes", [{"num_train": 0}, {"num_val": -1}, {"num_test": 2.5}])
def test_invalid_sizes_rejected(tmp_path, sizes):
    with pytest.raises(ConfigError):
        demo.generate_demo_dataset(tmp_path / "demo", **sizes)


# ---------------------------------------------------------------------------
# Drawings match the class table


def _colour_map(pixels: np.ndarray) -> np.ndarray:
    """[H, W] index into demo.COLOURS of each pixel's colour, -1 for background."""
    values = np.array([value for _, value in demo.COLOURS], dtype=np.float32)
    distances = np.linalg.norm(pixels.astype(np.float32)[:, :, None, :] - values, axis=-1)
    return np.where(distances.min(-1) < 70, distances.argmin(-1), -1)


def _decode_relations(pixels: np.ndarray) -> list[tuple[str, str, str]]:
    """(subject colour, arrangement, object colour) of every patch that shows two colours."""
    colour_map = _colour_map(pixels)
    names = [name for name, _ in demo.COLOURS]
    found = []
    for cell in range(demo.GRID_CELLS**2):
        for slot in ((0, 0), (0, 1), (1, 0), (1, 1)):
            top, left = demo.patch_origin(cell, slot)
            patch = colour_map[top : top + demo.PATCH_SIZE, left : left + demo.PATCH_SIZE]
            present = [index for index in range(len(names)) if (patch == index).sum() >= 20]
            if len(present) != 2:
                continue

            centres = {index: np.argwhere(patch == index).mean(0) for index in present}
            areas = {index: int((patch == index).sum()) for index in present}
            first, second = present
            dy, dx = centres[second] - centres[first]
            if max(abs(dy), abs(dx)) < 4:
                inner, outer = sorted(present, key=areas.get)
                found.append((names[inner], "inside", names[outer]))
            elif abs(dx) > abs(dy):
                west, east = (first, second) if dx > 0 else (second, first)
                found.append((names[west], "left of", names[east]))
            else:
                north, south = (first, second) if dy > 0 else (second, first)
                found.append((names[north], "above", names[south]))
    return found


def _matches(item: demo.DemoClass, drawn: tuple[str, str, str]) -> bool:
    mirrored = {"left of": "right of", "above": "below"}
    subject, arrangement, obj = drawn
    if (subject, arrangement, obj) == (item.subject_colour, item.arrangement, item.object_colour):
        return True
    return (obj, mirrored.get(arrangement), subject) == (
        item.subject_colour,
        item.arrangement,
        item.object_colour,
    )


@pytest.mark.parametrize("item", demo.demo_classes(), ids=lambda item: str(item.class_id))
def test_drawing_matches_class_table(item):
    for seed in range(5):
        pixels = demo.render_image(np.random.default_rng(seed), [item.class_id])
        drawn = _decode_relations(pixels)
        assert len(drawn) == 1, f"seed {seed}: expected one drawn relation, found {drawn}"
        assert _matches(item, drawn[0]), f"seed {seed}: class {item.class_id} drawn as {drawn[0]}"


def test_drawing_decodes_every_relation():
    relations = [6, 13, 27, 38, 44, 55]
    pixels = demo.render_image(np.random.default_rng(11), relations)
    by_id = {item.class_id: item for item in demo.demo_classes()}
    drawn = _decode_relations(pixels)
    assert len(drawn) == len(relations)
    for class_id in relations:
        assert any(_matches(by_id[class_id], relation) for relation in drawn), class_id


def test_render_image_shape_and_type():
    pixels = demo.render_image(np.random.default_rng(0), [6, 7, 8, 9, 10, 11])
    assert pixels.shape == (224, 224, 3)
    assert pixels.dtype == np.uint8


# ---------------------------------------------------------------------------
# ensure_demo_dataset


def test_ensure_generates_and_reuses(tmp_path):
    out_dir = tmp_path / "demo"
    labels_path, image_root = demo.ensure_demo_dataset(out_dir, seed=0, **TINY)
    assert labels_path == out_dir / "psg_cls_basic.json"
    assert image_root == out_dir / "coco"
    assert load_labels(labels_path).image_ids("val") == _read_json(labels_path)["val_image_ids"]

    marker = out_dir / "marker.txt"
    marker.write_text("kept unless regenerated")
    demo.ensure_demo_dataset(out_dir, seed=0, **TINY)
    assert marker.exists(), "an up-to-date data set was regenerated"


def test_ensure_cleans_partial_folder(tmp_path):
    out_dir = tmp_path / "demo"
    partial = tmp_path / "demo.partial"
    (partial / "coco" / "train2017").mkdir(parents=True)
    (partial / "coco" / "train2017" / "000000000001.jpg").write_bytes(b"truncated")

    labels_path, _ = demo.ensure_demo_dataset(out_dir, seed=0, **TINY)
    assert not partial.exists()
    assert len(_read_json(labels_path)["train_image_ids"]) == 6

    partial.mkdir()
    demo.ensure_demo_dataset(out_dir, seed=0, **TINY)
    assert not partial.exists(), "a leftover folder beside an up-to-date data set was kept"


@pytest.mark.parametrize(
    "change",
    [
        {"seed": 1},
        {"generator_version": demo.GENERATOR_VERSION - 1},
        {"num_train": 7},
    ],
    ids=["seed", "version", "size"],
)
def test_ensure_regenerates_on_stamp_mismatch(tmp_path, change):
    out_dir = tmp_path / "demo"
    demo.ensure_demo_dataset(out_dir, seed=0, **TINY)
    stamp_path = out_dir / "demo_stamp.json"
    stamp = _read_json(stamp_path)
    stamp_path.write_text(json.dumps({**stamp, **change}))
    marker = out_dir / "marker.txt"
    marker.write_text("removed on regeneration")

    demo.ensure_demo_dataset(out_dir, seed=0, **TINY)
    assert not marker.exists()
    assert _read_json(stamp_path) == stamp


def test_ensure_switches_seed(tmp_path):
    out_dir = tmp_path / "demo"
    demo.ensure_demo_dataset(out_dir, seed=0, **TINY)
    first = _read_json(out_dir / "psg_cls_basic.json")
    demo.ensure_demo_dataset(out_dir, seed=5, **TINY)
    assert _read_json(out_dir / "demo_stamp.json")["seed"] == 5
    assert _read_json(out_dir / "psg_cls_basic.json") != first


def test_ensure_regenerates_missing_image(tmp_path):
    out_dir = tmp_path / "demo"
    demo.ensure_demo_dataset(out_dir, seed=0, **TINY)
    victim = next((out_dir / "coco" / "val2017").glob("*.jpg"))
    victim.unlink()

    demo.ensure_demo_dataset(out_dir, seed=0, **TINY)
    assert victim.exists()


def test_interrupted_generation_keeps_old_data(tmp_path, monkeypatch):
    out_dir = tmp_path / "demo"
    demo.ensure_demo_dataset(out_dir, seed=0, **TINY)
    before = _tree_bytes(out_dir)

    calls = {"count": 0}
    encode = demo.encode_jpeg

    def fail_midway(pixels):
        calls["count"] += 1
        if calls["count"] > 5:
            raise KeyboardInterrupt
        return encode(pixels)

    monkeypatch.setattr(demo, "encode_jpeg", fail_midway)
    with pytest.raises(KeyboardInterrupt):
        demo.ensure_demo_dataset(out_dir, seed=1, **TINY)
    assert _tree_bytes(out_dir) == before

    monkeypatch.setattr(demo, "encode_jpeg", encode)
    demo.ensure_demo_dataset(out_dir, seed=1, **TINY)
    assert _read_json(out_dir / "demo_stamp.json")["seed"] == 1
    assert not (tmp_path / "demo.partial").exists()


def test_generate_refuses_foreign_folder(tmp_path):
    out_dir = tmp_path / "mine"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("user file")
    with pytest.raises(ConfigError, match="not a demo data set"):
        demo.generate_demo_dataset(out_dir, **TINY)
    assert (out_dir / "notes.txt").read_text() == "user file"


def test_ensure_default_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("MATCHCLIP_HOME", str(tmp_path))
    labels_path, image_root = demo.ensure_demo_dataset(seed=0, **TINY)
    assert labels_path == tmp_path / "data" / "demo" / "psg_cls_basic.json"
    assert labels_path.is_file()
    assert image_root.is_dir()


# ---------------------------------------------------------------------------
# Class table and frequency prior


def test_describe_demo_classes_table():
    table = demo.describe_demo_classes()
    assert list(table["class_id"]) == list(range(FIRST_SCORED_CLASS, NUM_CLASSES))
    assert list(table["predicate"]) == list(PREDICATE_CLASSES[FIRST_SCORED_CLASS:])
    assert set(table["arrangement"]) == set(demo.ARRANGEMENTS)
    assert sorted(table["frequency_rank"]) == list(range(1, 51))


def test_demo_classes_distinct_drawings():
    table = demo.describe_demo_classes()
    drawings = list(zip(table["subject_colour"], table["arrangement"], table["object_colour"]))
    assert len(set(drawings)) == len(drawings)
    pairs = set(zip(table["subject_colour"], table["object_colour"]))
    assert all((obj, subject) not in pairs for subject, obj in pairs), "a colour pair occurs in both orders"
    assert all(subject != obj for subject, obj in pairs)


def test_class_quotas_long_tail():
    quotas = demo.class_quotas(1000)
    assert quotas[:FIRST_SCORED_CLASS].sum() == 0
    assert quotas.max() == 550
    assert quotas[FIRST_SCORED_CLASS:].min() == 11


def test_frequency_prior_scores_rows():
    targets = np.zeros((4, NUM_CLASSES), dtype=np.float32)
    targets[:, 10] = 1
    targets[:2, 20] = 1
    targets[0, 30] = 1
    scores = demo.frequency_prior_scores(targets, 3)
    assert scores.shape == (3, NUM_CLASSES)
    np.testing.assert_allclose(scores[0, [10, 20, 30, 40]], [1.0, 0.5, 0.25, 0.0])
    assert (scores == scores[0]).all()


def test_frequency_prior_top3_is_commonest(split_relations):
    train = split_relations["train"]
    targets = np.zeros((len(train), NUM_CLASSES), dtype=np.float32)
    for row, relations in enumerate(train):
        targets[row, relations] = 1
    scores = demo.frequency_prior_scores(targets, 5)
    commonest = set(np.argsort(-targets.sum(0))[:3])
    assert set(np.argsort(-scores[0])[:3]) == commonest


@pytest.mark.parametrize(
    "targets, num_images",
    [(np.zeros((0, NUM_CLASSES)), 3), (np.zeros(NUM_CLASSES), 3), (np.zeros((2, NUM_CLASSES)), -1)],
    ids=["empty", "one-dimensional", "negative-count"],
)
def test_frequency_prior_rejects_bad_input(targets, num_images):
    with pytest.raises(ValueError):
        demo.frequency_prior_scores(targets, num_images)


def test_greedy_assignment_meets_quotas(monkeypatch):
    monkeypatch.setattr(demo, "_ASSIGNMENT_ATTEMPTS", 0)
    images = demo.sample_split_labels(np.random.default_rng(0), 1000)
    counts = Counter(relation for image in images for relation in image)
    quotas = demo.class_quotas(1000)
    assert all(counts[class_id] == quotas[class_id] for class_id in range(NUM_CLASSES))
    assert all(2 <= len(image) <= 6 for image in images)
