"""Training and extraction under torchrun: two CPU processes (gloo) against one process.

What the comparison can promise: dropout is off and batches are plain
shuffled ones (ShuffledBatchSampler). The two ranks of a global batch of 32
take the interleaved halves of the same shuffled pass that one process takes
whole, so both runs train on the same 32 samples at every step. DistributedDataParallel
averages the gradients of the two half-batch mean losses, which equals the
gradient of the whole-batch mean loss up to the order of float additions, so
the runs agree to rounding error, not bitwise. The extraction shards whole
cache shards across ranks, and the encoder gives the same bytes for the same
batch, so the caches must be identical to the byte.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from matchclip.config import resolve_config
from matchclip.demo import generate_demo_dataset
from matchclip.distributed import DistributedContext
from matchclip.errors import ConfigError
from matchclip.labels import load_labels
from matchclip.train import build_sampler

# 320 train images: two cache shards of the default 256 rows, so both ranks
# extract, and 10 global batches of 32 that split into equal halves.
NUM_TRAIN = 320
NUM_VAL = 64
EPOCHS = 3
RUN_TIMEOUT = 600


def train_command(data: dict, *, cache_dir: Path, out: Path) -> list[str]:
    return [
        "-m", "matchclip", "train",
        "--profile", "demo",
        "--labels", str(data["labels"]),
        "--images", str(data["images"]),
        "--cache-dir", str(cache_dir),
        "--out", str(out),
        "--epochs", str(EPOCHS),
        "--warmup-epochs", "1",
        "--batch-size", "32",
        "--hidden", "32",
        "--mlp", "64",
        "--heads", "2",
        "--dropout", "0",
    ]


def run(command: list[str]) -> subprocess.CompletedProcess:
    # One thread per process in both runs, as torchrun sets for its workers.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One single-process run and one two-process torchrun run of the same settings."""
    root = tmp_path_factory.mktemp("distributed")
    labels = generate_demo_dataset(root / "data", seed=1, num_train=NUM_TRAIN, num_val=NUM_VAL, num_test=8)
    data = {"labels": labels, "images": root / "data" / "coco"}

    run([sys.executable, *train_command(data, cache_dir=root / "cache-single", out=root / "single")])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run([*torchrun, *train_command(data, cache_dir=root / "cache-ddp", out=root / "ddp")])
    extracted = run(
        [
            *torchrun, "-m", "matchclip", "extract", "--profile", "demo", "--splits", "train", "val",
            "--labels", str(data["labels"]), "--images", str(data["images"]),
            "--cache-dir", str(root / "cache-extract"),
        ]
    )
    (root / "extract.out").write_text(extracted.stdout)
    return root


def cache_folders(cache_root: Path) -> dict[str, Path]:
    return {path.name: path for path in cache_root.iterdir() if path.is_dir()}


@pytest.mark.slow
def test_torchrun_cache_equals_single_process(runs):
    single = cache_folders(runs / "cache-single")
    ddp = cache_folders(runs / "cache-ddp")

    assert sorted(ddp) == sorted(single)
    for name, folder in single.items():
        for file_name in ("tokens.npy", "embeddings.npy"):
            assert (ddp[name] / file_name).read_bytes() == (folder / file_name).read_bytes(), f"{name}/{file_name}"
    assert not list((runs / "cache-ddp").glob("*.partial"))


@pytest.mark.slow
def test_torchrun_extract_command_equals_single_process(runs):
    single = cache_folders(runs / "cache-single")
    extracted = cache_folders(runs / "cache-extract")

    assert sorted(extracted) == sorted(single)
    # Only rank 0 reports; two lines per split would mean two unsharded single-process runs.
    report = (runs / "extract.out").read_text().splitlines()
    assert [line.split(":")[0] for line in report] == ["train/plain", "val/plain"]
    for name, folder in single.items():
        for file_name in ("tokens.npy", "embeddings.npy"):
            assert (extracted[name] / file_name).read_bytes() == (folder / file_name).read_bytes(), f"{name}/{file_name}"


@pytest.mark.slow
def test_torchrun_cache_has_two_shards(runs):
    train_folder = next(folder for name, folder in cache_folders(runs / "cache-ddp").items() if name.startswith("train-"))
    meta = pd.read_json(train_folder / "meta.json", typ="series")

    assert len(meta["shards"]) == 2


@pytest.mark.slow
def test_torchrun_losses_match_single_process(runs):
    single = pd.read_csv(runs / "single" / "metrics.csv")
    ddp = pd.read_csv(runs / "ddp" / "metrics.csv")

    assert len(ddp) == EPOCHS
    # Measured agreement is about 1e-7 relative: float rounding of the
    # gradient average, amplified little over 30 AdamW steps.
    np.testing.assert_allclose(ddp["train_loss"], single["train_loss"], rtol=1e-5)
    np.testing.assert_array_equal(ddp["lr"], single["lr"])


@pytest.mark.slow
def test_torchrun_val_metrics_match_single_process(runs):
    single = pd.read_csv(runs / "single" / "metrics.csv")
    ddp = pd.read_csv(runs / "ddp" / "metrics.csv")
    metric_columns = [column for column in single.columns if column.startswith("val_")]

    # Validation is sharded over the ranks and gathered back in sample order,
    # so every sample is scored once; the scores agree to rounding error.
    np.testing.assert_allclose(np.load(runs / "ddp" / "val_scores.npy"), np.load(runs / "single" / "val_scores.npy"), atol=1e-4)
    pd.testing.assert_frame_equal(ddp[metric_columns], single[metric_columns])


@pytest.mark.slow
def test_torchrun_weights_match_single_process(runs):
    single = torch.load(runs / "single" / "best.pt", map_location="cpu", weights_only=False)["model"]
    ddp = torch.load(runs / "ddp" / "best.pt", map_location="cpu", weights_only=False)["model"]

    assert sorted(ddp) == sorted(single)
    for name, value in single.items():
        torch.testing.assert_close(ddp[name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture
def balanced_config(tmp_path):
    labels = generate_demo_dataset(tmp_path / "data", seed=2, num_train=200, num_val=8, num_test=8)
    config = resolve_config("demo", {"labels": str(labels), "balanced": True, "batch_size": 128})
    return config, load_labels(labels).targets("train")


def test_balanced_sampler_covers_classes_per_rank(balanced_config):
    config, targets = balanced_config
    present = np.flatnonzero(targets.sum(axis=0) > 0)

    for rank in range(2):
        sampler = build_sampler(config, targets, DistributedContext(rank=rank, world_size=2))
        for number, batch in enumerate(sampler):
            covered = np.flatnonzero(targets[batch].sum(axis=0) > 0)
            assert len(batch) == config.batch_size // 2, f"rank {rank} batch {number}"
            assert set(present) <= set(covered), f"rank {rank} batch {number}"


def test_batch_not_divisible_by_processes_rejected(balanced_config):
    config, targets = balanced_config
    config.batch_size = 127

    with pytest.raises(ConfigError, match="divisible"):
        build_sampler(config, targets, DistributedContext(rank=0, world_size=2))


def test_rank_device_picks_local_gpu():
    context = DistributedContext(rank=3, local_rank=1, world_size=4)

    assert context.rank_device(torch.device("cuda")) == torch.device("cuda", 1)
    assert context.rank_device(torch.device("cuda", 0)) == torch.device("cuda", 0)
    assert context.rank_device(torch.device("cpu")) == torch.device("cpu")
    assert DistributedContext().rank_device(torch.device("cuda")) == torch.device("cuda")


def test_single_process_collectives_are_identity():
    context = DistributedContext()
    rows = np.arange(6).reshape(3, 2)

    assert context.mean_over_ranks(2.5) == 2.5
    assert context.all_gather_rows(rows) is rows
    assert context.broadcast_object({"a": 1}) == {"a": 1}
