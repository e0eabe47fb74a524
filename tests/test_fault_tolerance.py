"""Fault tolerance: killed processes, damaged files and full disks.

tests/test_cache.py covers an extraction interrupted by an exception, a
damaged shard found on resume, a damaged published cache, concurrent builders
and a full disk while allocating or marking a shard. The tests here add real
SIGKILLs of separate processes, a damaged cache met by a training run, and a
full disk while writing a checkpoint or the benchmark report.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from matchclip.backbone import TINY_MODEL, load_backbone
from matchclip.benchmark import write_report, write_synthetic_dataset
from matchclip.cache import build_cache, open_cache
from matchclip.config import resolve_config
from matchclip.demo import generate_demo_dataset
from matchclip.errors import WriteError
from matchclip.labels import load_labels
from matchclip.train import train

SHARD_SIZE = 16
NUM_IMAGES = 96
POLL_SECONDS = 0.05
PROCESS_TIMEOUT = 300


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def wait_for(condition, *, process: subprocess.Popen, timeout: float = PROCESS_TIMEOUT) -> None:
    """Poll `condition()` until it holds; fail when the process exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            pytest.fail(f"process exited with {process.returncode} before the kill point:\n{output[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("kill point not reached in time")
        time.sleep(POLL_SECONDS)


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)


# ---------------------------------------------------------------------------
# Extraction killed with SIGKILL

EXTRACT_SCRIPT = """
import sys, time
from matchclip.backbone import load_backbone
from matchclip.cache import build_cache
from matchclip.labels import load_labels

labels_path, image_root, cache_root = sys.argv[1:4]
backbone = load_backbone({model!r}, None)
encode = backbone.encode_images

def slow_encode(images):
    # Slow enough that the test can kill the process between two shards.
    time.sleep(0.3)
    return encode(images)

backbone.encode_images = slow_encode
build_cache(backbone, load_labels(labels_path), split="train", image_root=image_root,
            cache_root=cache_root, batch_size=8, shard_size={shard_size}, progress=False)
"""


@pytest.fixture(scope="module")
def image_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    labels_path, image_root = write_synthetic_dataset(root, num_train=NUM_IMAGES, image_size=(96, 72), seed=3)
    return load_labels(labels_path), image_root


@pytest.fixture(scope="module")
def tiny_backbone():
    return load_backbone(TINY_MODEL, None)


def build(backbone, image_set, cache_root: Path):
    labels, image_root = image_set
    return build_cache(
        backbone, labels, split="train", image_root=image_root, cache_root=cache_root,
        batch_size=8, shard_size=SHARD_SIZE, progress=False,
    )


@pytest.mark.slow
def test_sigkilled_extraction_resumes_finished_shards(image_set, tiny_backbone, tmp_path, monkeypatch):
    labels, image_root = image_set
    cache_root = tmp_path / "cache"
    script = EXTRACT_SCRIPT.format(model=TINY_MODEL, shard_size=SHARD_SIZE)
    process = subprocess.Popen(
        [sys.executable, "-c", script, str(labels.path), str(image_root), str(cache_root)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )

    def markers() -> list[Path]:
        return list(cache_root.glob("*.partial/shards/*.json"))

    wait_for(lambda: len(markers()) >= 2, process=process)
    kill(process)
    finished = len(markers())
    encoded = []
    encode = tiny_backbone.encode_images
    monkeypatch.setattr(tiny_backbone, "encode_images", lambda images: encoded.append(len(images)) or encode(images))
    resumed = build(tiny_backbone, image_set, cache_root)
    monkeypatch.undo()
    reference = build(tiny_backbone, image_set, tmp_path / "reference")

    assert process.returncode == -signal.SIGKILL
    assert 2 <= finished < NUM_IMAGES // SHARD_SIZE
    assert sum(encoded) == NUM_IMAGES - finished * SHARD_SIZE
    assert np.array_equal(resumed.tokens, reference.tokens)
    assert np.array_equal(resumed.embeddings, reference.embeddings)
    assert resumed.meta["shards"] == reference.meta["shards"]
    open_cache(resumed.root, verify=True)
    assert not list(cache_root.glob("*.partial"))


# ---------------------------------------------------------------------------
# Training killed with SIGKILL, and training that meets a damaged cache

TRAIN_EPOCHS = 4


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    labels = generate_demo_dataset(root / "data", seed=4, num_train=128, num_val=32, num_test=8)
    return {"labels": str(labels), "images": str(root / "data" / "coco"), "cache_dir": str(root / "cache")}


def small_settings(demo_data, out: Path, **overrides) -> dict:
    return {
        **demo_data,
        "out": str(out),
        "epochs": TRAIN_EPOCHS,
        "warmup_epochs": 1,
        "hidden": 32,
        "mlp": 64,
        "heads": 2,
        **overrides,
    }


@pytest.fixture(scope="module")
def straight_run(demo_data, tmp_path_factory) -> Path:
    """An uninterrupted run that the interrupted runs must reproduce exactly."""
    out = tmp_path_factory.mktemp("straight") / "run"
    train(resolve_config("demo", small_settings(demo_data, out)))
    return out


def cli_arguments(settings: dict) -> list[str]:
    arguments = ["--profile", "demo"]
    for key, value in settings.items():
        arguments += ["--" + key.replace("_", "-"), str(value)]
    return arguments


def metric_rows(run_dir: Path) -> pd.DataFrame:
    # Wall-clock seconds differ between runs; every other column must match exactly.
    return pd.read_csv(run_dir / "metrics.csv").drop(columns=["seconds"])


def epochs_done(run_dir: Path) -> int:
    try:
        return len(pd.read_csv(run_dir / "metrics.csv"))
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return 0


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """Metrics, val scores, summary and best weights of two runs are identical."""
    pd.testing.assert_frame_equal(metric_rows(run_dir), metric_rows(reference))
    assert np.array_equal(np.load(run_dir / "val_scores.npy"), np.load(reference / "val_scores.npy"))
    assert json.loads((run_dir / "summary.json").read_text()) == json.loads((reference / "summary.json").read_text())
    left = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=False)["model"]
    right = torch.load(reference / "best.pt", map_location="cpu", weights_only=False)["model"]
    assert sorted(left) == sorted(right)
    for name in left:
        assert torch.equal(left[name], right[name]), name


@pytest.mark.slow
def test_sigkilled_training_resumes_to_same_metrics(demo_data, straight_run, tmp_path):
    resumed = tmp_path / "resumed"
    command = [sys.executable, "-m", "matchclip", "train", *cli_arguments(small_settings(demo_data, resumed))]

    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: epochs_done(resumed) >= 2, process=process)
    kill(process)
    killed_after = epochs_done(resumed)
    finished = subprocess.run(command, capture_output=True, text=True, timeout=PROCESS_TIMEOUT)

    assert process.returncode == -signal.SIGKILL
    assert 2 <= killed_after < TRAIN_EPOCHS
    assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-2000:]
    assert "resuming" in finished.stderr
    assert_same_run(resumed, straight_run)


@pytest.mark.slow
def test_training_rebuilds_damaged_cache(demo_data, straight_run, tmp_path, caplog):
    cache_dir = tmp_path / "cache"
    shutil.copytree(demo_data["cache_dir"], cache_dir)
    tokens_path = next(cache_dir.glob("train-plain-*/tokens.npy"))
    data = bytearray(tokens_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tokens_path.write_bytes(bytes(data))
    settings = small_settings({**demo_data, "cache_dir": str(cache_dir)}, tmp_path / "run")

    with caplog.at_level(logging.WARNING, logger="matchclip.cache"):
        train(resolve_config("demo", settings))

    assert "damaged" in caplog.text
    assert_same_run(tmp_path / "run", straight_run)
    open_cache(tokens_path.parent, verify=True)


# ---------------------------------------------------------------------------
# Full disk


@pytest.mark.slow
def test_full_disk_keeps_previous_checkpoint(demo_data, straight_run, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    real_save = torch.save
    saves = {"last.pt": 0}

    def save_until_disk_full(obj, path, *args, **kwargs):
        # atomic_torch_save writes to a temporary ".last.pt.*" file beside the target.
        if Path(path).name.startswith(".last.pt."):
            saves["last.pt"] += 1
            if saves["last.pt"] == 2:
                no_space()
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_disk_full)
    with pytest.raises(WriteError) as failure:
        train(resolve_config("demo", small_settings(demo_data, run_dir)))
    monkeypatch.undo()
    checkpoint = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False)

    message = str(failure.value)
    assert "last.pt" in message
    assert "No space left on device" in message
    assert "previous version" in message
    assert checkpoint["epoch"] == 0
    assert not list(run_dir.glob(".last.pt.*"))
    assert not (run_dir / "summary.json").exists()

    train(resolve_config("demo", small_settings(demo_data, run_dir)))
    assert_same_run(run_dir, straight_run)


def test_full_disk_keeps_previous_report(tmp_path, monkeypatch):
    records = {"cache": _record("first")}
    write_report(tmp_path, records)
    before = {name: (tmp_path / name).read_bytes() for name in ("BENCHMARKS.md", "benchmarks.json")}

    monkeypatch.setattr(Path, "write_text", no_space)
    with pytest.raises(WriteError) as failure:
        write_report(tmp_path, {"cache": _record("second")})
    monkeypatch.undo()

    assert "No space left on device" in str(failure.value)
    assert "benchmarks.json" in str(failure.value)
    for name, content in before.items():
        assert (tmp_path / name).read_bytes() == content, name
    assert sorted(path.name for path in tmp_path.iterdir()) == ["BENCHMARKS.md", "benchmarks.json"]


def _record(date: str) -> dict:
    return {
        "name": "cache",
        "title": "Cache versus re-encoding",
        "figures": [{"name": "ratio", "value": 1.0, "unit": "x", "target": ">= 0.9", "passed": True}],
        "columns": [],
        "rows": [],
        "notes": [],
        "seconds": 1.0,
        "command": "python -m matchclip.benchmark",
        "machine": {
            "cpu": "test", "cores": 2, "usable_cores": 2, "memory_gb": 1.0, "python": "3", "torch": "2",
            "open_clip": "3", "numpy": "2", "torch_threads": 2, "cuda": False, "load_average": None,
        },
        "date": date,
    }
