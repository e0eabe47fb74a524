"""Feature caches: reuse, fingerprints, resume, damage detection, locking and disk errors."""

from __future__ import annotations

import errno
import json
import logging
import multiprocessing
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import matchclip.fileio
from matchclip.backbone import load_backbone, register_model_configs
from matchclip.cache import build_cache, open_cache, plan_shards, prompt_embeddings
from matchclip.classes import PREDICATE_CLASSES
from matchclip.errors import CacheError, WriteError
from matchclip.images import load_image
from matchclip.labels import load_labels

MODEL = "matchclip-test-cache-vit"
MODEL_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
NUM_TRAIN = 10


@pytest.fixture(scope="module")
def config_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model_configs")
    (folder / f"{MODEL}.json").write_text(json.dumps(MODEL_CONFIG), encoding="utf-8")
    register_model_configs(folder)
    return folder


@pytest.fixture(scope="module")
def backbone(config_folder):
    return load_backbone(MODEL, seed=0)


def write_dataset(root: Path, *, num_train: int = NUM_TRAIN, first_relation: int = 6) -> Path:
    """Write small JPEGs of different sizes and a label file; return the label file path."""
    rng = np.random.default_rng(0)
    entries = []
    splits = {"train": [], "val": [], "test": []}
    for index in range(num_train + 3):
        if index < num_train:
            split = "train"
        elif index < num_train + 2:
            split = "val"
        else:
            split = "test"
        folder = "val2017" if split == "val" else "train2017"
        file_name = f"{folder}/{index:012d}.jpg"
        path = root / "images" / file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        # Left half bright, right half random: mirrored images encode differently.
        pixels = rng.integers(0, 256, size=(24 + index, 40, 3), dtype=np.uint8)
        pixels[:, :20] = 255
        Image.fromarray(pixels, mode="RGB").save(path, quality=95)
        relations = [] if split == "test" else [first_relation + index % 40]
        entries.append({"image_id": str(1000 + index), "file_name": file_name, "relations": relations})
        splits[split].append(str(1000 + index))

    payload = {"data": entries, "predicate_classes": list(PREDICATE_CLASSES)}
    payload.update({f"{split}_image_ids": ids for split, ids in splits.items()})
    labels_path = root / "psg_cls_basic.json"
    labels_path.write_text(json.dumps(payload), encoding="utf-8")
    return labels_path


@pytest.fixture
def dataset(tmp_path):
    labels_path = write_dataset(tmp_path)
    return load_labels(labels_path), tmp_path / "images"


class EncodeCounter:
    """Wrap backbone.encode_images, count images, optionally raise at a given call."""

    def __init__(self, backbone, *, fail_at_call: int | None = None, delay: float = 0.0):
        self.encode = backbone.encode_images
        self.images = 0
        self.calls = 0
        self.fail_at_call = fail_at_call
        self.delay = delay

    def __call__(self, images):
        self.calls += 1
        if self.calls == self.fail_at_call:
            raise KeyboardInterrupt("interrupted during extraction")
        time.sleep(self.delay)
        self.images += len(images)
        return self.encode(images)


@pytest.fixture
def counter(backbone, monkeypatch):
    counting = EncodeCounter(backbone)
    monkeypatch.setattr(backbone, "encode_images", counting)
    return counting


def build(backbone, dataset, cache_root, **options):
    labels, image_root = dataset
    options.setdefault("split", "train")
    options.setdefault("batch_size", 2)
    options.setdefault("shard_size", 4)
    options.setdefault("progress", False)
    return build_cache(backbone, labels, image_root=image_root, cache_root=cache_root, **options)


def test_plan_shards_covers_rows():
    shards = plan_shards(10, 4)

    assert [(shard.start, shard.stop) for shard in shards] == [(0, 4), (4, 8), (8, 10)]
    assert [shard.index for shard in shards] == [0, 1, 2]


def test_build_stores_float16_rows(backbone, dataset, tmp_path):
    labels, image_root = dataset

    cache = build(backbone, dataset, tmp_path / "cache")
    samples = labels.split("train")
    images = torch.stack([backbone.preprocess(load_image(image_root / s.file_name)) for s in samples])
    tokens, embeddings = backbone.encode_images(images)

    assert cache.image_ids == labels.image_ids("train")
    assert cache.tokens.shape == (NUM_TRAIN, backbone.num_tokens, backbone.token_width)
    assert cache.embeddings.shape == (NUM_TRAIN, backbone.embed_dim)
    assert cache.tokens.dtype == np.float16
    assert not cache.tokens.flags.writeable
    assert cache.grid_size == backbone.grid_size
    assert cache.num_prefix_tokens == backbone.num_prefix_tokens
    np.testing.assert_allclose(cache.tokens, tokens.numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(cache.embeddings, embeddings.numpy(), rtol=2e-3, atol=2e-3)


def test_build_leaves_only_published_folder(backbone, dataset, tmp_path):
    cache = build(backbone, dataset, tmp_path / "cache")

    assert sorted(path.name for path in cache.root.iterdir()) == ["embeddings.npy", "meta.json", "tokens.npy"]
    assert not list((tmp_path / "cache").glob("*.partial"))


def test_reload_skips_encoding(backbone, dataset, tmp_path, counter):
    first = build(backbone, dataset, tmp_path / "cache")
    encoded = counter.images

    second = build(backbone, dataset, tmp_path / "cache")

    assert encoded == NUM_TRAIN
    assert counter.images == NUM_TRAIN
    assert second.root == first.root
    assert np.array_equal(second.tokens, first.tokens)


def test_other_label_content_rebuilds(backbone, tmp_path, counter):
    first = build(backbone, (load_labels(write_dataset(tmp_path / "a")), tmp_path / "a" / "images"), tmp_path / "cache")
    changed = write_dataset(tmp_path / "b", first_relation=7)

    second = build(backbone, (load_labels(changed), tmp_path / "b" / "images"), tmp_path / "cache")

    assert counter.images == 2 * NUM_TRAIN
    assert second.root != first.root
    assert second.meta["fingerprint"]["labels_sha256"] != first.meta["fingerprint"]["labels_sha256"]


def test_replaced_image_rebuilds(backbone, dataset, tmp_path, counter):
    labels, image_root = dataset
    first = build(backbone, dataset, tmp_path / "cache")
    # Same label file, new pixels in one image: a regenerated data set.
    path = image_root / labels.split("train")[0].file_name
    Image.fromarray(np.zeros((30, 40, 3), dtype=np.uint8)).save(path)

    second = build(backbone, dataset, tmp_path / "cache")

    assert counter.images == 2 * NUM_TRAIN
    assert second.root != first.root
    assert second.meta["fingerprint"]["labels_sha256"] == first.meta["fingerprint"]["labels_sha256"]
    assert not np.array_equal(second.tokens[0], first.tokens[0])
    np.testing.assert_array_equal(second.tokens[1:], first.tokens[1:])


def test_other_view_rebuilds(backbone, dataset, tmp_path, counter):
    plain = build(backbone, dataset, tmp_path / "cache")

    flipped = build(backbone, dataset, tmp_path / "cache", view="flip")

    assert counter.images == 2 * NUM_TRAIN
    assert flipped.root != plain.root
    assert not np.array_equal(flipped.tokens, plain.tokens)


def test_other_weights_rebuild(backbone, dataset, tmp_path):
    first = build(backbone, dataset, tmp_path / "cache")
    other = load_backbone(MODEL, seed=1)
    counting = EncodeCounter(other)
    other.encode_images = counting

    second = build(other, dataset, tmp_path / "cache")

    assert counting.images == NUM_TRAIN
    assert second.root != first.root
    assert second.meta["fingerprint"]["backbone"]["weights"] == "random:seed=1"


def test_mismatched_meta_rebuilds(backbone, dataset, tmp_path, counter, caplog):
    cache = build(backbone, dataset, tmp_path / "cache")
    meta_path = cache.root / "meta.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta["fingerprint"]["backbone"]["weights"] = "random:seed=7"
    meta_path.write_text(json.dumps(meta), encoding="utf-8")

    with caplog.at_level(logging.WARNING, logger="matchclip.cache"):
        rebuilt = build(backbone, dataset, tmp_path / "cache")

    assert counter.images == 2 * NUM_TRAIN
    assert "other inputs (differing: backbone)" in caplog.text
    assert rebuilt.meta["fingerprint"]["backbone"]["weights"] == "random:seed=0"


def test_flip_view_encodes_mirrored_images(backbone, dataset, tmp_path):
    labels, image_root = dataset

    cache = build(backbone, dataset, tmp_path / "cache", view="flip")
    mirrored = [ImageOps.mirror(load_image(image_root / s.file_name)) for s in labels.split("train")]
    tokens, embeddings = backbone.encode_images(torch.stack([backbone.preprocess(image) for image in mirrored]))

    np.testing.assert_allclose(cache.tokens, tokens.numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(cache.embeddings, embeddings.numpy(), rtol=2e-3, atol=2e-3)


def test_interrupted_build_resumes(backbone, dataset, tmp_path, monkeypatch):
    reference = build(backbone, dataset, tmp_path / "reference")
    # Shards of 4 rows in batches of 2: call 4 is the second batch of shard 1.
    interrupted = EncodeCounter(backbone, fail_at_call=4)
    monkeypatch.setattr(backbone, "encode_images", interrupted)

    with pytest.raises(KeyboardInterrupt):
        build(backbone, dataset, tmp_path / "cache")
    partial = next((tmp_path / "cache").glob("*.partial"))
    markers = sorted(path.name for path in (partial / "shards").iterdir())
    resumed = EncodeCounter(backbone)
    monkeypatch.setattr(backbone, "encode_images", resumed)
    cache = build(backbone, dataset, tmp_path / "cache")

    assert markers == ["000000.json"]
    assert resumed.images == NUM_TRAIN - 4
    assert np.array_equal(cache.tokens, reference.tokens)
    assert np.array_equal(cache.embeddings, reference.embeddings)
    assert cache.meta["shards"] == reference.meta["shards"]
    assert not partial.exists()


def test_resume_redoes_damaged_shard(backbone, dataset, tmp_path, monkeypatch, caplog):
    reference = build(backbone, dataset, tmp_path / "reference")
    # Call 5 is the first batch of shard 2, so shards 0 and 1 have markers.
    monkeypatch.setattr(backbone, "encode_images", EncodeCounter(backbone, fail_at_call=5))
    with pytest.raises(KeyboardInterrupt):
        build(backbone, dataset, tmp_path / "cache")
    partial = next((tmp_path / "cache").glob("*.partial"))
    tokens = np.load(partial / "tokens.npy", mmap_mode="r+")
    tokens[1] += 1
    tokens.flush()
    del tokens

    resumed = EncodeCounter(backbone)
    monkeypatch.setattr(backbone, "encode_images", resumed)
    with caplog.at_level(logging.WARNING, logger="matchclip.cache"):
        cache = build(backbone, dataset, tmp_path / "cache")

    assert "re-extracting shard 0" in caplog.text
    # Shard 0 (4 damaged rows) and shard 2 (2 rows, never finished) are encoded again.
    assert resumed.images == 4 + 2
    assert np.array_equal(cache.tokens, reference.tokens)


def test_damaged_tokens_detected_and_rebuilt(backbone, dataset, tmp_path, counter, caplog):
    cache = build(backbone, dataset, tmp_path / "cache")
    expected = np.array(cache.tokens)
    tokens_path = cache.root / "tokens.npy"
    data = bytearray(tokens_path.read_bytes())
    data[-10] ^= 0xFF
    tokens_path.write_bytes(bytes(data))

    with pytest.raises(CacheError, match="tokens.npy rows .* damaged"):
        open_cache(cache.root, verify=True)
    with caplog.at_level(logging.WARNING, logger="matchclip.cache"):
        rebuilt = build(backbone, dataset, tmp_path / "cache")

    assert "damaged" in caplog.text
    assert counter.images == 2 * NUM_TRAIN
    assert np.array_equal(rebuilt.tokens, expected)
    open_cache(rebuilt.root, verify=True)


def test_truncated_tokens_detected(backbone, dataset, tmp_path):
    cache = build(backbone, dataset, tmp_path / "cache")
    tokens_path = cache.root / "tokens.npy"
    tokens_path.write_bytes(tokens_path.read_bytes()[:-100])

    with pytest.raises(CacheError, match="tokens.npy"):
        open_cache(cache.root, verify=False)


def _build_in_process(config_folder, labels_path, image_root, cache_root, result_path, start):
    """Build a cache in a spawned process and record its folder and the images it encoded."""
    register_model_configs(config_folder)
    backbone = load_backbone(MODEL, seed=0)
    counting = EncodeCounter(backbone, delay=0.05)
    backbone.encode_images = counting
    start.wait(timeout=120)
    cache = build_cache(
        backbone,
        load_labels(labels_path),
        split="train",
        image_root=image_root,
        cache_root=cache_root,
        batch_size=2,
        shard_size=4,
        progress=False,
    )
    Path(result_path).write_text(json.dumps({"root": str(cache.root), "images": counting.images}))


@pytest.mark.slow
def test_concurrent_builders_share_cache(config_folder, dataset, tmp_path):
    labels, image_root = dataset
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    results = [tmp_path / f"result-{index}.json" for index in range(2)]
    processes = [
        context.Process(
            target=_build_in_process,
            args=(config_folder, labels.path, image_root, tmp_path / "cache", result, start),
        )
        for result in results
    ]

    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    outcomes = [json.loads(result.read_text()) for result in results]

    assert [process.exitcode for process in processes] == [0, 0]
    assert outcomes[0]["root"] == outcomes[1]["root"]
    assert sorted(outcome["images"] for outcome in outcomes) == [0, NUM_TRAIN]
    assert not list((tmp_path / "cache").glob("*.partial"))
    open_cache(outcomes[0]["root"], verify=True)


def test_ranks_split_shards(backbone, dataset, tmp_path, monkeypatch):
    reference = build(backbone, dataset, tmp_path / "reference")
    barrier = threading.Barrier(2, timeout=60)
    caches: dict[int, object] = {}
    encoded = {0: 0, 1: 0}
    errors: list[BaseException] = []
    encode = backbone.encode_images
    rank_of_thread: dict[int, int] = {}

    def counting_encode(images):
        encoded[rank_of_thread[threading.get_ident()]] += len(images)
        return encode(images)

    def run(rank: int) -> None:
        rank_of_thread[threading.get_ident()] = rank
        try:
            caches[rank] = build(backbone, dataset, tmp_path / "cache", rank=rank, world_size=2, barrier=barrier.wait)
        except BaseException as error:  # surfaced by the assert below
            errors.append(error)
            barrier.abort()

    monkeypatch.setattr(backbone, "encode_images", counting_encode)
    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert errors == []
    # Shards of 4 rows: rank 0 takes shards 0 and 2 (4 + 2 rows), rank 1 takes shard 1.
    assert encoded == {0: 6, 1: 4}
    assert caches[0].root == caches[1].root
    assert np.array_equal(caches[0].tokens, reference.tokens)
    assert caches[0].meta["shards"] == reference.meta["shards"]
    assert not list((tmp_path / "cache").glob("*.partial"))


def test_full_disk_on_allocation_keeps_previous_cache(backbone, dataset, tmp_path, monkeypatch):
    cache = build(backbone, dataset, tmp_path / "cache")
    expected = np.array(cache.tokens)

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(WriteError, match=r"tokens\.npy.*No space left on device"):
        build(backbone, dataset, tmp_path / "cache", rebuild=True)
    previous = open_cache(cache.root, verify=True)

    assert np.array_equal(previous.tokens, expected)


def test_full_disk_on_meta_keeps_previous_cache(backbone, dataset, tmp_path, monkeypatch):
    cache = build(backbone, dataset, tmp_path / "cache")
    expected = np.array(cache.embeddings)
    fsync_file = matchclip.fileio._fsync_file

    def no_space_for_meta(path):
        if path.name.startswith(".meta.json."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync_file(path)

    monkeypatch.setattr(matchclip.fileio, "_fsync_file", no_space_for_meta)
    with pytest.raises(WriteError, match=r"meta\.json.*No space left on device"):
        build(backbone, dataset, tmp_path / "cache", rebuild=True)
    previous = open_cache(cache.root, verify=True)
    monkeypatch.undo()
    counting = EncodeCounter(backbone)
    monkeypatch.setattr(backbone, "encode_images", counting)
    rerun = build(backbone, dataset, tmp_path / "cache", rebuild=True)

    assert np.array_equal(previous.embeddings, expected)
    # Every shard was finished before meta.json failed, so the rerun only publishes.
    assert counting.images == 0
    assert np.array_equal(rerun.embeddings, expected)


def test_invalid_view_rejected(backbone, dataset, tmp_path):
    with pytest.raises(ValueError, match="view"):
        build(backbone, dataset, tmp_path / "cache", view="mirror")


def test_prompt_embeddings_cached(backbone, tmp_path, monkeypatch):
    names = list(PREDICATE_CLASSES[:5])
    calls = []
    encode = backbone.encode_prompts
    monkeypatch.setattr(backbone, "encode_prompts", lambda *args: calls.append(args) or encode(*args))

    first = prompt_embeddings(backbone, names, template="a photo of {}", cache_root=tmp_path)
    second = prompt_embeddings(backbone, names, template="a photo of {}", cache_root=tmp_path)
    other = prompt_embeddings(backbone, names, template="One relation in the photo is {}.", cache_root=tmp_path)

    assert len(calls) == 2
    assert first.shape == (5, backbone.embed_dim)
    assert first.dtype == np.float32
    assert np.array_equal(first, second)
    assert np.array_equal(first, encode(names, "a photo of {}").numpy())
    assert not np.allclose(first, other)


def test_damaged_prompt_embeddings_recomputed(backbone, tmp_path, caplog):
    names = list(PREDICATE_CLASSES[:3])
    expected = prompt_embeddings(backbone, names, template="a photo of {}", cache_root=tmp_path)
    stored = next(tmp_path.glob("prompts-*.npy"))
    data = bytearray(stored.read_bytes())
    data[-1] ^= 0xFF
    stored.write_bytes(bytes(data))

    with caplog.at_level(logging.WARNING, logger="matchclip.cache"):
        recomputed = prompt_embeddings(backbone, names, template="a photo of {}", cache_root=tmp_path)

    assert "damaged" in caplog.text
    assert np.array_equal(recomputed, expected)
