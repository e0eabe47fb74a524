"""Speed, memory and scaling benchmarks, recorded in reports/BENCHMARKS.md.

    python -m matchclip.benchmark [--quick] [--only NAME ...] [--report-dir DIR]

Benchmarks (NAME):

- cache: head training steps/s reading tokens from the feature cache against
  the same head and batch with the backbone encoding the images every step,
  beside the ratio that the FLOP counts of the two paths predict;
- head: training steps/s of the head with fused attention
  (F.scaled_dot_product_attention) against plain matmul-softmax, and the
  achieved FLOP/s of a head step as a share of the measured matmul FLOP/s;
- extraction: images/s of the whole extraction (decode, preprocess, encode,
  write) against the backbone's forward pass alone on the same batches;
- memory: peak resident memory of a training run that reads a cache of more
  than 4 GB;
- growth: time per epoch and extraction time against the data size, and the
  cost of a second extraction call that finds the cache.

Ratios are measured side by side: the arms of a comparison run alternately in
one process, several rounds, and the median of the per-round ratios is
reported, because absolute times on a shared machine drift. Every run rewrites
the report from reports/benchmarks.json, which keeps the latest result of each
benchmark, so `--only` updates some sections and keeps the others.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from . import paths
from .classes import FIRST_SCORED_CLASS, NUM_CLASSES, PREDICATE_CLASSES
from .fileio import atomic_write_json, atomic_write_text
from .grid import backbone_shape

logger = logging.getLogger(__name__)

REPORT_NAME = "BENCHMARKS.md"
RECORD_NAME = "benchmarks.json"
GPU_RECORD_KEY = "gpu_check"

# Backbones and heads measured on the CPU: the Base variant's backbone
# (ViT-B/16 at 224 px) and the demo's tiny backbone, both with random weights.
BASE_BACKBONE = "ViT-B-16"
BASE_PRESET = "base"
DEMO_PRESET = "demo"
# Token geometry of the cache in the memory benchmark: the backbone of the
# Large and Huge variants.
LARGE_PRESET = "large"


@dataclass
class Settings:
    """Sizes of one benchmark run; `quick()` is the smaller variant."""

    repeats: int = 3
    # Rounds of the cache and head comparisons. A round of the Base head is
    # one training step per arm: the machine's speed drifts within seconds,
    # so many short rounds give steadier ratios than a few long ones.
    cache_repeats: int = 9
    # Rounds of the cheap comparisons on the tiny backbone: more rounds steady
    # their medians against the noise of a shared machine.
    tiny_repeats: int = 5
    cache_batch: int = 8
    cache_steps: int = 1
    tiny_batch: int = 32
    tiny_steps: int = 10
    extraction_images: int = 16
    extraction_batch: int = 8
    tiny_extraction_images: int = 256
    tiny_extraction_batch: int = 64
    memory_cache_bytes: float = 4.5e9
    memory_steps: int = 40
    memory_batch: int = 16
    memory_small_fraction: float = 1 / 16
    memory_mapped_reader: bool = True
    growth_rows: int = 512
    growth_images: int = 64
    growth_factors: tuple[int, ...] = (1, 2, 4)
    image_size: tuple[int, int] = (640, 480)

    @classmethod
    def quick(cls) -> "Settings":
        return cls(
            repeats=2,
            cache_repeats=4,
            tiny_repeats=4,
            tiny_steps=5,
            extraction_images=8,
            tiny_extraction_images=128,
            memory_steps=20,
            memory_mapped_reader=False,
            growth_rows=256,
            growth_images=32,
        )


@dataclass
class Figure:
    """One measured value, with the target it is held to (if any)."""

    name: str
    value: float
    unit: str = ""
    target: str = ""
    passed: bool | None = None

    def formatted(self) -> str:
        return f"{format_value(self.value)} {self.unit}".strip()


@dataclass
class Section:
    """The result of one benchmark: headline figures, a detail table and notes."""

    name: str
    title: str
    figures: list[Figure] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, name: str, value: float, unit: str = "", *, target: str = "", passed: bool | None = None) -> Figure:
        figure = Figure(name, float(value), unit, target, passed)
        self.figures.append(figure)
        return figure


def format_value(value: float) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    magnitude = abs(value)
    if magnitude >= 1e12:
        return f"{value / 1e12:.2f} T"
    if magnitude >= 1e9:
        return f"{value / 1e9:.2f} G"
    if magnitude >= 1e6:
        return f"{value / 1e6:.2f} M"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 1:
        return f"{value:.3g}"
    return f"{value:.3g}"


# ---------------------------------------------------------------------------
# Timing


def interleaved(
    arms: dict[str, Callable[[], Any]],
    *,
    repeats: int,
    warmup: int = 1,
) -> dict[str, list[float]]:
    """Time each arm `repeats` times, alternating the arms within every round.

    Each round runs every arm once, and the order reverses from one round to
    the next, so a slow drift of the machine's speed hits all arms alike.
    Returns the seconds of each call, per arm, in round order.
    """
    for _ in range(warmup):
        for run in arms.values():
            run()

    names = list(arms)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            started = time.perf_counter()
            arms[name]()
            times[name].append(time.perf_counter() - started)
    return times


def median_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over rounds of numerator[i] / denominator[i]."""
    return float(np.median(np.asarray(numerator) / np.asarray(denominator)))


# ---------------------------------------------------------------------------
# Synthetic inputs


def write_synthetic_dataset(
    root: str | os.PathLike,
    *,
    num_train: int,
    num_val: int = 0,
    num_test: int = 0,
    image_size: tuple[int, int] = (640, 480),
    seed: int = 0,
    processes: int = 1,
) -> tuple[Path, Path]:
    """Write random photo-like JPEGs and a PSG label file; return (label file, image root).

    Images are `image_size` (width, height) pixels of smooth random colour
    fields plus noise, so they compress and decode like photos (COCO images are
    about 640x480). Train and val samples get 1 to 3 relations from the scored
    classes; test samples get none, as in the PSG file. `processes` > 1
    encodes the JPEGs in a process pool.
    """
    root = Path(root)
    image_root = root / "coco"
    sizes = {"train": num_train, "val": num_val, "test": num_test}
    folders = {"train": "train2017", "val": "val2017", "test": "val2017"}
    rng = np.random.default_rng(seed)

    data, split_ids, jobs = [], {}, []
    index = 0
    for split, count in sizes.items():
        split_ids[split] = []
        for _ in range(count):
            image_id = str(100_000 + index)
            file_name = f"{folders[split]}/{index:012d}.jpg"
            relations = []
            if split != "test":
                count_relations = int(rng.integers(1, 4))
                relations = sorted(rng.choice(np.arange(FIRST_SCORED_CLASS, NUM_CLASSES), count_relations, replace=False).tolist())
            data.append({"image_id": image_id, "file_name": file_name, "relations": relations})
            split_ids[split].append(image_id)
            jobs.append((str(image_root / file_name), image_size, seed * 1_000_003 + index))
            index += 1

    for folder in set(folders.values()):
        (image_root / folder).mkdir(parents=True, exist_ok=True)
    if processes > 1 and len(jobs) > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            pool.map(_write_photo, jobs, chunksize=max(1, len(jobs) // (4 * processes)))
    else:
        for job in jobs:
            _write_photo(job)

    payload = {
        "data": data,
        "predicate_classes": list(PREDICATE_CLASSES),
        **{f"{split}_image_ids": ids for split, ids in split_ids.items()},
    }
    labels_path = root / "psg_cls_basic.json"
    labels_path.write_text(json.dumps(payload), encoding="utf-8")
    return labels_path, image_root


def _write_photo(job: tuple[str, tuple[int, int], int]) -> None:
    from PIL import Image

    path, (width, height), seed = job
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, size=(max(1, height // 32), max(1, width // 32), 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.BILINEAR), dtype=np.int16)
    pixels = np.clip(smooth + rng.normal(0, 12, size=smooth.shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def write_synthetic_cache(
    root: str | os.PathLike,
    *,
    num_rows: int,
    num_tokens: int,
    token_width: int,
    embed_dim: int,
    grid_size: tuple[int, int] | None = None,
    seed: int = 0,
    dense_every: int = 1,
    shard_size: int | None = None,
):
    """Write a valid feature cache folder of random float16 features and open it.

    Every `dense_every`-th row gets random tokens; the rows between stay holes
    of the sparse tokens.npy (zeros when read), so a multi-gigabyte cache is
    written in seconds. meta.json records shard checksums exactly as
    matchclip.cache does, so `open_cache(root, verify=True)` accepts the folder.
    Returns the FeatureCache.
    """
    from .cache import (
        CACHE_DTYPE,
        CACHE_FORMAT,
        DEFAULT_SHARD_SIZE,
        EMBEDDINGS_FILE,
        META_FILE,
        TOKENS_FILE,
        _rows_sha256,
        open_cache,
        plan_shards,
    )

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    shard_size = shard_size or DEFAULT_SHARD_SIZE
    rng = np.random.default_rng(seed)
    if grid_size is None:
        side = int(math.isqrt(num_tokens - 1))
        grid_size = (side, side) if side * side == num_tokens - 1 else (1, num_tokens)
    num_prefix_tokens = num_tokens - grid_size[0] * grid_size[1]

    tokens = np.lib.format.open_memmap(
        root / TOKENS_FILE, mode="w+", dtype=CACHE_DTYPE, shape=(num_rows, num_tokens, token_width)
    )
    for row in range(0, num_rows, dense_every):
        tokens[row] = rng.standard_normal((num_tokens, token_width), dtype=np.float32).astype(CACHE_DTYPE)
    tokens.flush()
    embeddings = np.lib.format.open_memmap(
        root / EMBEDDINGS_FILE, mode="w+", dtype=CACHE_DTYPE, shape=(num_rows, embed_dim)
    )
    embeddings[:] = rng.standard_normal((num_rows, embed_dim), dtype=np.float32).astype(CACHE_DTYPE)
    embeddings.flush()
    del tokens, embeddings

    tokens = np.load(root / TOKENS_FILE, mmap_mode="r")
    embeddings = np.load(root / EMBEDDINGS_FILE, mmap_mode="r")
    shards = [
        {
            "index": shard.index,
            "start": shard.start,
            "stop": shard.stop,
            "tokens_sha256": _rows_sha256(tokens, shard.start, shard.stop),
            "embeddings_sha256": _rows_sha256(embeddings, shard.start, shard.stop),
        }
        for shard in plan_shards(num_rows, shard_size)
    ]
    del tokens, embeddings

    fingerprint = {
        "format": CACHE_FORMAT,
        "backbone": {"model": "synthetic", "weights": f"random:seed={seed}"},
        "labels_sha256": "synthetic",
        "split": "train",
        "view": "plain",
    }
    meta = {
        "format": CACHE_FORMAT,
        "fingerprint": fingerprint,
        "key": root.name,
        "split": "train",
        "view": "plain",
        "image_ids": [str(row) for row in range(num_rows)],
        "tokens_shape": [num_rows, num_tokens, token_width],
        "embeddings_shape": [num_rows, embed_dim],
        "dtype": np.dtype(CACHE_DTYPE).name,
        "grid_size": list(grid_size),
        "num_prefix_tokens": num_prefix_tokens,
        "shard_size": shard_size,
        "shards": shards,
        "backbone_name": "synthetic",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(root / META_FILE, meta)
    return open_cache(root, verify=False)


def random_targets(num_rows: int, *, seed: int = 0) -> np.ndarray:
    """Return multi-hot targets [num_rows, C] with 1 to 3 scored classes per row."""
    rng = np.random.default_rng(seed)
    targets = np.zeros((num_rows, NUM_CLASSES), dtype=np.float32)
    for row in range(num_rows):
        targets[row, rng.choice(np.arange(FIRST_SCORED_CLASS, NUM_CLASSES), int(rng.integers(1, 4)), replace=False)] = 1
    return targets


# ---------------------------------------------------------------------------
# Head training steps


class HeadTrainer:
    """A MatchCLIP head with the run's optimizer and loss: one call of `step` is one training step."""

    def __init__(self, head: dict, *, image_width: int, text_width: int, fused_attention: bool = True, seed: int = 0):
        import torch

        from .config import RunConfig
        from .losses import build_loss
        from .model import MatchCLIP
        from .train import build_optimizer

        torch.manual_seed(seed)
        settings = dict(head, fused_attention=fused_attention)
        self.model = MatchCLIP(image_width=image_width, text_width=text_width, num_classes=NUM_CLASSES, **settings)
        self.model.train()
        # The default run's optimizer: the report's AdamW (AMSGrad, weight decay 5e-4).
        self.optimizer = build_optimizer(RunConfig(), self.model.parameters())
        self.loss = build_loss("bce")
        self.relations = torch.randn(NUM_CLASSES, text_width, generator=torch.Generator().manual_seed(seed))

    def step(self, tokens, targets) -> float:
        loss = self.loss(self.model(tokens, self.relations), targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


def count_flops(run: Callable[[], Any]) -> int:
    """Count the FLOPs of the matrix products in `run()` with torch's FlopCounterMode.

    Attention runs through the math kernel while counting, because the fused
    CPU kernels are not among the operations FlopCounterMode counts.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        run()
    return int(counter.get_total_flops())


def backbone_flops(backbone, images) -> int:
    """Count the FLOPs of one forward pass of the backbone's image tower on `images` [B, 3, H, W].

    The input requires grad while counting: without grad, nn.MultiheadAttention
    takes its inference fast path, whose projections FlopCounterMode does not
    see, and the count would miss a third of the FLOPs.
    """
    import torch

    probe = images.detach().clone().requires_grad_(True)

    def forward() -> None:
        with torch.enable_grad():
            backbone.model.encode_image(probe)

    return count_flops(forward)


def head_preset(name: str) -> dict:
    from .model import load_preset

    return load_preset(name)["head"]


# ---------------------------------------------------------------------------
# Workspace shared by the benchmarks of one run


class Workspace:
    """Temporary folder plus backbones and data sets that several benchmarks share."""

    def __init__(self, root: Path, settings: Settings):
        self.root = root
        self.settings = settings
        self._backbones: dict[str, Any] = {}
        self._counter = 0

    def backbone(self, name: str):
        if name not in self._backbones:
            from .backbone import load_backbone

            self._backbones[name] = load_backbone(name, None, device="cpu", seed=0)
        return self._backbones[name]

    def folder(self, prefix: str) -> Path:
        self._counter += 1
        path = self.root / f"{prefix}-{self._counter}"
        path.mkdir(parents=True)
        return path

    def dataset(self, num_images: int, *, seed: int = 0) -> tuple[Any, Path]:
        """Write a synthetic train split of `num_images` photos; return (LabelFile, image root)."""
        from .labels import load_labels

        labels_path, image_root = write_synthetic_dataset(
            self.folder("images"), num_train=num_images, image_size=self.settings.image_size, seed=seed
        )
        return load_labels(labels_path), image_root

    def preprocessed(self, backbone, labels, image_root):
        """Decode and preprocess the train split's images for `backbone`; return them stacked [N, 3, H, W]."""
        import torch

        from .images import ImageDataset

        dataset = ImageDataset(labels.split("train"), image_root, backbone.preprocess)
        return torch.stack([dataset[index][0] for index in range(len(dataset))])


# ---------------------------------------------------------------------------
# Benchmarks


def bench_cache(workspace: Workspace) -> Section:
    """Compare head training from the feature cache with re-encoding the images every step."""
    from .backbone import TINY_MODEL

    settings = workspace.settings
    section = Section("cache", "Cache versus re-encoding")
    section.columns = [
        "backbone + head", "batch", "cache steps/s", "re-encoding steps/s", "in-memory steps/s",
        "cache read ms/batch", "backbone GFLOP/batch", "head step GFLOP/batch", "backbone GFLOP/s",
        "head step GFLOP/s", "measured ratio", "FLOP ratio", "time ratio",
    ]
    # The Base head on both backbones, then the demo's own pairing of the
    # tiny backbone with the demo head at the demo's batch size.
    configurations = [
        (BASE_BACKBONE, BASE_PRESET, settings.cache_batch, settings.cache_steps),
        (TINY_MODEL, BASE_PRESET, settings.cache_batch, settings.cache_steps),
        (TINY_MODEL, DEMO_PRESET, settings.tiny_batch, settings.tiny_steps),
    ]
    for backbone_name, preset, batch, steps in configurations:
        result = _cache_versus_encoding(
            workspace, backbone_name, preset, batch=batch, steps=steps, repeats=settings.cache_repeats
        )
        label = f"{backbone_name} + {preset}"
        section.rows.append(
            [
                label, batch, result["cache_steps_per_s"], result["encode_steps_per_s"],
                result["memory_steps_per_s"], result["read_ms"], result["backbone_flops"] / 1e9,
                result["head_flops"] / 1e9, result["backbone_rate"] / 1e9, result["head_rate"] / 1e9,
                result["measured"], result["flop_predicted"], result["time_predicted"],
            ]
        )
        flop_share = result["measured"] / result["flop_predicted"]
        time_share = result["measured"] / result["time_predicted"]
        section.add(f"{label}: cache / re-encoding speed", result["measured"], "x")
        section.add(f"{label}: ratio predicted by FLOPs", result["flop_predicted"], "x")
        section.add(f"{label}: measured / FLOP-predicted ratio", flop_share, target=">= 0.9", passed=flop_share >= 0.9)
        section.add(f"{label}: measured / time-predicted ratio", time_share, target=">= 0.9", passed=time_share >= 0.9)
        section.add(f"{label}: share of a cache step spent reading the batch", result["read_share"])
    section.notes = [
        "Cache path: a FeatureCache built by build_cache from synthetic JPEGs, read through "
        "CachedFeatureDataset and a DataLoader with a batch sampler, as in training. Each step reads "
        "one batch of tokens and takes one fused AdamW (AMSGrad) step of the head on the BCE loss.",
        "Re-encoding path: the same head, batch and step, with the backbone encoding the batch's "
        "images every step. The images are already decoded and preprocessed in memory, so this path "
        "is charged for the encoder alone and the comparison isolates encoding against cache reading.",
        "In-memory path: the same head step on the same tokens already in memory as a float32 "
        "tensor, the floor for any way of feeding the head.",
        "FLOP ratio = (backbone forward + head step) / head step, both counted with "
        "torch.utils.flop_counter.FlopCounterMode (matrix products only, the head step with its backward "
        "pass). It assumes both parts run at the same FLOP/s. Time ratio = re-encoding step / in-memory "
        "step, which uses the FLOP/s each part reaches. Measured / time-predicted at 1 means reading "
        "from the cache costs nothing beside the head step. Measured / FLOP-predicted also drops when the "
        "head step reaches fewer FLOP/s than the backbone's forward pass (compare the two GFLOP/s "
        "columns): a training step adds the backward pass, the optimizer and memory-bound operations "
        "(dropout, layer norm, softmax), while the frozen backbone runs PyTorch's inference fast path.",
        "Backbone GFLOP/s = backbone FLOPs / (re-encoding step - in-memory step). When the backbone is a "
        "small part of the step, as for the tiny backbone under the Base head, that difference is within "
        "the timing noise and the figure means little.",
        "Rows: the Base head on the ViT-B/16-sized backbone and on the tiny backbone, then the demo's "
        "own pairing of the tiny backbone with the 64-wide demo head at the demo's batch size. Two thirds "
        "of the tiny backbone's FLOPs are its patch embedding, one product over 3,072 input values per "
        "patch, which a CPU runs near its peak. The demo head's products are 64 wide, so its training "
        "step reaches fewer FLOP/s and that row's measured ratio stays below the FLOP prediction, while "
        "its time-predicted share shows that reading the cache still costs next to nothing.",
        "All arms alternate in every round, and a round of the Base head is one step per arm (median of "
        "per-round ratios).",
        "Both backbones have random weights (pretrained=None), and speed does not depend on the weights.",
    ]
    return section


def _cache_versus_encoding(
    workspace: Workspace, backbone_name: str, preset: str, *, batch: int, steps: int, repeats: int
) -> dict:
    import torch

    from .cache import build_cache
    from .features import CachedFeatureDataset
    from .sampler import ShuffledBatchSampler
    from .train import make_loader

    backbone = workspace.backbone(backbone_name)
    labels, image_root = workspace.dataset(batch, seed=1)
    cache = build_cache(
        backbone, labels, split="train", image_root=image_root, cache_root=workspace.folder("cache"),
        batch_size=batch, progress=False,
    )
    images = workspace.preprocessed(backbone, labels, image_root)
    targets = torch.from_numpy(labels.targets("train"))
    tokens_in_memory = torch.from_numpy(np.asarray(cache.tokens, dtype=np.float32))

    trainer = HeadTrainer(head_preset(preset), image_width=backbone.token_width, text_width=backbone.embed_dim)
    dataset = CachedFeatureDataset(cache, labels.targets("train"))
    # Enough batches for the warm-up round and every timed round.
    sampler = ShuffledBatchSampler(labels.targets("train"), batch, num_batches=(repeats + 1) * steps)
    batches = iter(make_loader(dataset, batch_sampler=sampler, workers=0, seed=0, epoch=0))
    read_seconds: list[float] = []

    def cache_steps() -> None:
        for _ in range(steps):
            started = time.perf_counter()
            batch_data = next(batches)
            read_seconds.append(time.perf_counter() - started)
            trainer.step(batch_data["image_tokens"], batch_data["targets"])

    def memory_steps() -> None:
        for _ in range(steps):
            trainer.step(tokens_in_memory, targets)

    def encoding_steps() -> None:
        for _ in range(steps):
            tokens, _ = backbone.encode_images(images)
            trainer.step(tokens, targets)

    times = interleaved({"cache": cache_steps, "memory": memory_steps, "encode": encoding_steps}, repeats=repeats)
    head_flops = count_flops(lambda: trainer.step(tokens_in_memory, targets))
    encoder_flops = backbone_flops(backbone, images)

    cache_seconds = float(np.median(times["cache"])) / steps
    memory_seconds = float(np.median(times["memory"])) / steps
    encode_seconds = float(np.median(times["encode"])) / steps
    read = float(np.median(read_seconds))
    return {
        "cache_steps_per_s": 1 / cache_seconds,
        "encode_steps_per_s": 1 / encode_seconds,
        "memory_steps_per_s": 1 / memory_seconds,
        "read_ms": 1e3 * read,
        "read_share": read / cache_seconds,
        "backbone_flops": encoder_flops,
        "head_flops": head_flops,
        "backbone_rate": encoder_flops / max(encode_seconds - memory_seconds, 1e-9),
        "head_rate": head_flops / memory_seconds,
        "measured": median_ratio(times["encode"], times["cache"]),
        "flop_predicted": (encoder_flops + head_flops) / head_flops,
        "time_predicted": median_ratio(times["encode"], times["memory"]),
    }


def bench_head(workspace: Workspace) -> Section:
    """Compare fused with plain attention in the head, and the head's FLOP/s with the machine's matmul FLOP/s."""
    import torch

    settings = workspace.settings
    section = Section("head", "Head speed")
    geometry = backbone_shape(BASE_BACKBONE)
    batch = settings.cache_batch
    tokens = torch.randn(batch, geometry.num_tokens, geometry.image_width)
    targets = torch.from_numpy(random_targets(batch))
    trainers = {
        fused: HeadTrainer(
            head_preset(BASE_PRESET),
            image_width=geometry.image_width,
            text_width=geometry.text_width,
            fused_attention=fused,
        )
        for fused in (True, False)
    }
    size = 2048
    left, right = torch.randn(size, size), torch.randn(size, size)
    steps = max(1, settings.cache_steps)

    def run_steps(fused: bool) -> Callable[[], None]:
        def run() -> None:
            for _ in range(steps):
                trainers[fused].step(tokens, targets)

        return run

    def matmul() -> None:
        torch.matmul(left, right)

    times = interleaved(
        {"fused": run_steps(True), "plain": run_steps(False), "matmul": matmul},
        repeats=settings.cache_repeats,
    )
    step_flops = count_flops(lambda: trainers[True].step(tokens, targets))
    fused_seconds = float(np.median(times["fused"])) / steps
    plain_seconds = float(np.median(times["plain"])) / steps
    matmul_rate = 2 * size**3 / float(np.min(times["matmul"]))
    head_rate = step_flops / fused_seconds

    section.add("fused attention steps/s", 1 / fused_seconds, "steps/s")
    section.add("plain attention steps/s", 1 / plain_seconds, "steps/s")
    section.add("fused / plain speed", median_ratio(times["plain"], times["fused"]), "x")
    section.add("head step FLOP/s (fused)", head_rate, "FLOP/s")
    section.add("matmul FLOP/s (float32, 2048x2048)", matmul_rate, "FLOP/s")
    section.add("head step / matmul FLOP/s", head_rate / matmul_rate)
    section.columns = ["attention", "steps/s", "GFLOP/step", "GFLOP/s", "share of matmul FLOP/s"]
    for name, seconds in (("fused (scaled_dot_product_attention)", fused_seconds), ("plain (matmul + softmax)", plain_seconds)):
        rate = step_flops / seconds
        section.rows.append([name, 1 / seconds, step_flops / 1e9, rate / 1e9, rate / matmul_rate])
    section.notes = [
        f"Base head (preset {BASE_PRESET}) on {BASE_BACKBONE} token shapes: batch {batch} of "
        f"{geometry.num_tokens} tokens of width {geometry.image_width}, 56 relation embeddings of width "
        f"{geometry.text_width}; one training step = forward, BCE, backward and a fused AdamW (AMSGrad) step, "
        "dropout 0.1 (model.Dropout) active on the attention, MLP and matching outputs, none on the "
        "attention weights.",
        "matmul FLOP/s is the best of the timed torch.matmul calls of two 2048x2048 float32 matrices, "
        "interleaved with the head steps; it is the practical limit of this machine for float32 "
        "matrix products.",
        "Both attention variants compute the same function with the same parameters (tested in "
        "tests/test_model.py). Without dropout on the attention weights, scaled_dot_product_attention "
        "may use its fused CPU kernel. At these shapes the attention products are a small part of a "
        "step, so the two paths cost about the same on a CPU.",
    ]
    return section


def bench_extraction(workspace: Workspace) -> Section:
    """Compare the whole extraction (build_cache) with the backbone's forward pass alone."""
    from .backbone import TINY_MODEL

    settings = workspace.settings
    section = Section("extraction", "Extraction throughput")
    section.columns = [
        "backbone", "images", "batch", "DataLoader workers", "extraction images/s", "forward-only images/s",
        "extraction / forward",
    ]
    base = _extraction_versus_forward(
        workspace, BASE_BACKBONE, images=settings.extraction_images, batch=settings.extraction_batch, workers=0,
        repeats=settings.repeats,
    )
    section.rows.append([BASE_BACKBONE, settings.extraction_images, settings.extraction_batch, 0, *base["row"]])
    section.add(
        f"{BASE_BACKBONE}: extraction / forward-only speed",
        base["share"],
        target=">= 0.8",
        passed=base["share"] >= 0.8,
    )

    tiny_results = {}
    for workers in (0, 2):
        tiny = _extraction_versus_forward(
            workspace, TINY_MODEL, images=settings.tiny_extraction_images, batch=settings.tiny_extraction_batch,
            workers=workers, repeats=settings.tiny_repeats,
        )
        tiny_results[workers] = tiny
        section.rows.append(
            [TINY_MODEL, settings.tiny_extraction_images, settings.tiny_extraction_batch, workers, *tiny["row"]]
        )
    best = max(tiny_results.values(), key=lambda item: item["share"])
    section.add(f"{TINY_MODEL}: extraction / forward-only speed (best of 0 and 2 workers)", best["share"])

    profile = _extraction_profile(workspace, TINY_MODEL, images=settings.tiny_extraction_images)
    section.notes = [
        "Extraction = matchclip.cache.build_cache into a fresh cache folder: reading and decoding the "
        f"JPEGs ({settings.image_size[0]}x{settings.image_size[1]} synthetic photos), preprocessing, "
        "encoding, float16 conversion, writing through the memory map, shard checksums and publishing. "
        "Forward-only = Backbone.encode_images on the same batches, already preprocessed in memory.",
        f"{BASE_BACKBONE}: encoding dominates, so decoding and writing cost little beside it.",
        f"{TINY_MODEL} (per image, one process): decode + preprocess {profile['decode_ms']:.2f} ms, "
        f"encode {profile['encode_ms']:.2f} ms, float16 conversion + write + checksum "
        f"{profile['write_ms']:.2f} ms. The tiny backbone encodes an image faster than Pillow decodes and "
        "resizes it, so on 2 CPU cores, where DataLoader workers share the cores with the encoder, "
        "extraction is bound by decoding and cannot reach its forward-only speed. On a GPU the "
        "encoder runs on the device and the decoding workers use the host's cores: run "
        "`python -m matchclip.gpu_check` for that figure.",
    ]
    return section


def _extraction_versus_forward(
    workspace: Workspace, backbone_name: str, *, images: int, batch: int, workers: int, repeats: int
) -> dict:
    from .cache import build_cache

    backbone = workspace.backbone(backbone_name)
    labels, image_root = workspace.dataset(images, seed=2)
    preprocessed = workspace.preprocessed(backbone, labels, image_root)

    def extract() -> None:
        cache_root = workspace.folder("extract")
        build_cache(
            backbone, labels, split="train", image_root=image_root, cache_root=cache_root,
            batch_size=batch, workers=workers, progress=False,
        )
        shutil.rmtree(cache_root)

    def forward() -> None:
        for start in range(0, images, batch):
            backbone.encode_images(preprocessed[start : start + batch])

    warmup = 1 if backbone_name != BASE_BACKBONE else 0
    times = interleaved({"extract": extract, "forward": forward}, repeats=repeats, warmup=warmup)
    share = median_ratio(times["forward"], times["extract"])
    return {
        "share": share,
        "row": [images / float(np.median(times["extract"])), images / float(np.median(times["forward"])), share],
    }


def _extraction_profile(workspace: Workspace, backbone_name: str, *, images: int) -> dict:
    """Time the extraction's stages one after the other in this process; return milliseconds per image."""
    import torch

    from .cache import CACHE_DTYPE, _rows_sha256
    from .images import ImageDataset

    backbone = workspace.backbone(backbone_name)
    labels, image_root = workspace.dataset(images, seed=3)
    dataset = ImageDataset(labels.split("train"), image_root, backbone.preprocess)

    started = time.perf_counter()
    batch = torch.stack([dataset[index][0] for index in range(len(dataset))])
    decode = time.perf_counter() - started

    started = time.perf_counter()
    tokens, embeddings = backbone.encode_images(batch)
    encode = time.perf_counter() - started

    folder = workspace.folder("profile")
    started = time.perf_counter()
    target = np.lib.format.open_memmap(folder / "tokens.npy", mode="w+", dtype=CACHE_DTYPE, shape=tuple(tokens.shape))
    target[:] = tokens.numpy().astype(CACHE_DTYPE)
    np.isfinite(target).all()
    target.flush()
    _rows_sha256(target, 0, len(target))
    write = time.perf_counter() - started
    del target
    shutil.rmtree(folder)
    return {"decode_ms": 1e3 * decode / images, "encode_ms": 1e3 * encode / images, "write_ms": 1e3 * write / images}


def bench_memory(workspace: Workspace) -> Section:
    """Measure the peak resident memory of training from a cache larger than 4 GB."""
    settings = workspace.settings
    section = Section("memory", "Memory while training from a large cache")
    backbone_name = _preset_backbone(LARGE_PRESET)
    geometry = backbone_shape(backbone_name)
    row_bytes = geometry.num_tokens * geometry.image_width * 2
    big_rows = math.ceil(settings.memory_cache_bytes / row_bytes)
    small_rows = max(settings.memory_batch * 4, math.ceil(big_rows * settings.memory_small_fraction))

    section.columns = ["cache rows", "tokens.npy size", "reader", "steps", "batch", "peak RSS", "seconds"]
    results = {}
    runs = [("big", big_rows, "pread"), ("small", small_rows, "pread")]
    if settings.memory_mapped_reader:
        runs.append(("big", big_rows, "memmap"))
    caches = {}
    try:
        for size_name, rows, reader in runs:
            if size_name not in caches:
                caches[size_name] = write_synthetic_cache(
                    workspace.folder(f"memory-{size_name}"),
                    num_rows=rows,
                    num_tokens=geometry.num_tokens,
                    token_width=geometry.image_width,
                    embed_dim=geometry.text_width,
                    dense_every=16,
                ).root
            result = run_memory_child(
                caches[size_name], steps=settings.memory_steps, batch=settings.memory_batch, reader=reader
            )
            results[(size_name, reader)] = result
            size = (caches[size_name] / "tokens.npy").stat().st_size
            section.rows.append(
                [rows, f"{size / 1e9:.2f} GB", reader, settings.memory_steps, settings.memory_batch,
                 f"{result['peak_rss'] / 1e9:.3f} GB", result["seconds"]]
            )
    finally:
        for folder in caches.values():
            shutil.rmtree(folder, ignore_errors=True)

    big = results[("big", "pread")]
    small = results[("small", "pread")]
    size = big_rows * row_bytes
    section.add("cache size (tokens.npy)", size / 1e9, "GB", target="> 4 GB", passed=size > 4e9)
    section.add(
        "peak RSS while training from it", big["peak_rss"] / 1e9, "GB", target="< 1.5 GB",
        passed=big["peak_rss"] < 1.5e9,
    )
    section.add("peak RSS with a 1/16 size cache", small["peak_rss"] / 1e9, "GB")
    if ("big", "memmap") in results:
        section.add("peak RSS reading rows through the memory map instead", results[("big", "memmap")]["peak_rss"] / 1e9, "GB")
    section.notes = [
        f"The cache has the token geometry of {backbone_name} (the Large and Huge variants' backbone): "
        f"{geometry.num_tokens} tokens of width {geometry.image_width} in float16, "
        f"{row_bytes / 1e6:.2f} MB per image. It is written as a sparse file with random tokens in every "
        "16th row, with valid shard checksums.",
        "Each training run is a separate process: open_cache with checksum verification, "
        "CachedFeatureDataset, a shuffled batch sampler and DataLoader (train.make_loader), the demo head "
        "with the cache's input widths, AdamW (AMSGrad) and BCE. Peak RSS is the child's VmHWM "
        "(/proc/self/status), which counts file pages mapped into the process as well as its own memory.",
        "reader pread: CachedFeatureDataset and the checksum verification copy rows with os.preadv "
        "(matchclip.cache.read_rows), so the page cache holds the file and the process holds one batch. "
        "reader memmap: rows indexed through the np.memmap, the way the cache was read before; every "
        "page touched stays mapped and counts towards the process's resident memory.",
    ]
    return section


def _preset_backbone(preset: str) -> str:
    from .model import load_preset

    return load_preset(preset)["backbone"]["name"]


def run_memory_child(cache_root: Path, *, steps: int, batch: int, reader: str = "pread", timeout: float = 900) -> dict:
    """Train the demo head for `steps` steps from the cache in a child process; return its peak RSS.

    Returns {"peak_rss": bytes, "seconds": wall time, "steps": steps run}.
    The peak is the child's own VmHWM from /proc/self/status. The child's
    ru_maxrss would not do: Linux carries the high-water mark of the address
    space that exec replaces into ru_maxrss, so it starts at the RSS of this
    larger parent process.
    """
    arguments = json.dumps({"cache_root": str(cache_root), "steps": steps, "batch": batch, "reader": reader})
    command = [sys.executable, "-c", f"from matchclip.benchmark import memory_child; memory_child({arguments!r})"]
    started = time.perf_counter()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        raise TimeoutError(f"memory benchmark child did not finish within {timeout:.0f} s") from error
    if result.returncode != 0:
        raise RuntimeError(f"memory benchmark child failed with exit code {result.returncode}:\n{result.stderr[-3000:]}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return {"peak_rss": report["peak_rss"], "seconds": time.perf_counter() - started, "steps": report["steps"]}


def peak_rss_of_this_process() -> int:
    """Peak resident set size of this process's address space in bytes (VmHWM; Linux only)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line; the memory benchmark needs Linux")


def memory_child(arguments: str) -> None:
    """Body of the memory benchmark's child process (see run_memory_child)."""
    from . import cache as cache_module
    from . import features
    from .cache import open_cache
    from .features import CachedFeatureDataset
    from .sampler import ShuffledBatchSampler
    from .train import make_loader

    options = json.loads(arguments)
    if options["reader"] == "memmap":
        # Index through the memory map, for rows and checksums alike.
        def mapped_rows(array, rows):
            return np.array(array[rows])

        features.read_rows = mapped_rows
        cache_module.read_rows = mapped_rows

    cache = open_cache(options["cache_root"], verify=True)
    targets = random_targets(len(cache))
    dataset = CachedFeatureDataset(cache, targets)
    sampler = ShuffledBatchSampler(targets, options["batch"], num_batches=options["steps"])
    loader = make_loader(dataset, batch_sampler=sampler, workers=0, seed=0, epoch=0)
    trainer = HeadTrainer(
        head_preset(DEMO_PRESET), image_width=int(cache.tokens.shape[-1]), text_width=int(cache.embeddings.shape[-1])
    )
    steps = 0
    for batch in loader:
        trainer.step(batch["image_tokens"], batch["targets"])
        steps += 1
    print(json.dumps({"steps": steps, "peak_rss": peak_rss_of_this_process()}))


def bench_growth(workspace: Workspace) -> Section:
    """Measure epoch and extraction time against the data size, and a second extraction call that finds the cache."""
    from .backbone import TINY_MODEL

    settings = workspace.settings
    section = Section("growth", "Growth with the data size")
    factors = settings.growth_factors
    epoch_times = _epoch_times(workspace, TINY_MODEL, rows=settings.growth_rows, factors=factors)
    extraction = _extraction_times(workspace, TINY_MODEL, images=settings.growth_images, factors=factors)

    section.columns = ["size", "train rows", "epoch s", "epoch ratio to 1x", "images", "extraction s", "extraction ratio to 1x"]
    for factor in factors:
        section.rows.append(
            [
                f"{factor}x",
                settings.growth_rows * factor,
                epoch_times["seconds"][factor],
                epoch_times["ratios"][factor],
                settings.growth_images * factor,
                extraction["seconds"][factor],
                extraction["ratios"][factor],
            ]
        )
    for factor in factors[1:]:
        section.add(f"epoch time {factor}x / 1x", epoch_times["ratios"][factor], target=f"~{factor}")
        section.add(f"extraction time {factor}x / 1x", extraction["ratios"][factor], target=f"~{factor}")
    section.add("second extraction call (cache hit), seconds", extraction["hit_seconds"], "s")
    section.add("images encoded by the second call", extraction["hit_encoded"], target="0", passed=extraction["hit_encoded"] == 0)
    section.notes = [
        f"Epoch: one pass over a synthetic cache with {TINY_MODEL} token shapes through CachedFeatureDataset, "
        "a shuffled batch sampler (batch 32), the demo head and AdamW (AMSGrad). Sizes are interleaved in "
        "every round; times are medians and ratios medians of per-round ratios.",
        f"Extraction: build_cache with {TINY_MODEL} on synthetic JPEGs into a fresh cache folder. "
        "Extraction carries a fixed cost per call (fingerprint, allocation, publishing), so its ratios "
        "stay a little under the size ratios.",
        "Second call: build_cache again on the largest set with the same cache folder. It finds the "
        "published cache, verifies the shard checksums and returns it without encoding any image.",
    ]
    return section


def _epoch_times(workspace: Workspace, backbone_name: str, *, rows: int, factors: Sequence[int]) -> dict:
    from .features import CachedFeatureDataset
    from .sampler import ShuffledBatchSampler
    from .train import make_loader

    settings = workspace.settings
    geometry = backbone_shape(backbone_name)
    trainer = HeadTrainer(head_preset(DEMO_PRESET), image_width=geometry.image_width, text_width=geometry.text_width)
    arms = {}
    for factor in factors:
        count = rows * factor
        cache = write_synthetic_cache(
            workspace.folder("growth-cache"),
            num_rows=count,
            num_tokens=geometry.num_tokens,
            token_width=geometry.image_width,
            embed_dim=geometry.text_width,
        )
        targets = random_targets(count)
        dataset = CachedFeatureDataset(cache, targets)
        sampler = ShuffledBatchSampler(targets, 32)

        def epoch(dataset=dataset, sampler=sampler) -> None:
            for batch in make_loader(dataset, batch_sampler=sampler, workers=0, seed=0, epoch=0):
                trainer.step(batch["image_tokens"], batch["targets"])

        arms[factor] = epoch

    times = interleaved(arms, repeats=settings.tiny_repeats)
    first = factors[0]
    return {
        "seconds": {factor: float(np.median(times[factor])) for factor in factors},
        "ratios": {factor: median_ratio(times[factor], times[first]) for factor in factors},
    }


def _extraction_times(workspace: Workspace, backbone_name: str, *, images: int, factors: Sequence[int]) -> dict:
    from .cache import build_cache

    settings = workspace.settings
    backbone = workspace.backbone(backbone_name)
    sets = {factor: workspace.dataset(images * factor, seed=4 + factor) for factor in factors}

    def extract(factor: int) -> Callable[[], None]:
        def run() -> None:
            labels, image_root = sets[factor]
            cache_root = workspace.folder("growth-extract")
            build_cache(backbone, labels, split="train", image_root=image_root, cache_root=cache_root, progress=False)
            shutil.rmtree(cache_root)

        return run

    times = interleaved({factor: extract(factor) for factor in factors}, repeats=settings.tiny_repeats)
    first = factors[0]

    largest = factors[-1]
    labels, image_root = sets[largest]
    cache_root = workspace.folder("growth-hit")
    build_cache(backbone, labels, split="train", image_root=image_root, cache_root=cache_root, progress=False)
    encoded = _EncodeCounter(backbone)
    with encoded.installed():
        started = time.perf_counter()
        build_cache(backbone, labels, split="train", image_root=image_root, cache_root=cache_root, progress=False)
        hit_seconds = time.perf_counter() - started
    shutil.rmtree(cache_root)
    return {
        "seconds": {factor: float(np.median(times[factor])) for factor in factors},
        "ratios": {factor: median_ratio(times[factor], times[first]) for factor in factors},
        "hit_seconds": hit_seconds,
        "hit_encoded": encoded.images,
    }


class _EncodeCounter:
    """Count the images a backbone encodes while installed."""

    def __init__(self, backbone):
        self.backbone = backbone
        self.images = 0

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        original = self.backbone.encode_images

        def counting(images):
            self.images += len(images)
            return original(images)

        self.backbone.encode_images = counting
        try:
            yield
        finally:
            del self.backbone.encode_images


BENCHMARKS: dict[str, Callable[[Workspace], Section]] = {
    "cache": bench_cache,
    "head": bench_head,
    "extraction": bench_extraction,
    "memory": bench_memory,
    "growth": bench_growth,
}


# ---------------------------------------------------------------------------
# Machine description and report


def machine_info() -> dict:
    """Describe this machine: CPU model, core counts, memory, library versions and thread settings."""
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = float("nan")
    with contextlib.suppress(OSError, ValueError, AttributeError):
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    import open_clip

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_gb": round(memory, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "load_average": [round(value, 2) for value in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


def section_record(section: Section, *, command: str, machine: dict, date: str) -> dict:
    record = dataclasses.asdict(section)
    record.update(command=command, machine=machine, date=date)
    return record


def load_records(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        logger.warning("ignoring unreadable benchmark record %s: %s", path, error)
        return {}


def write_report(report_dir: Path, records: dict) -> Path:
    """Write benchmarks.json and BENCHMARKS.md atomically from `records`; return the report path."""
    report_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(report_dir / RECORD_NAME, records)
    path = report_dir / REPORT_NAME
    atomic_write_text(path, render_report(records))
    return path


def render_report(records: dict) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Written by `python -m matchclip.benchmark` from `benchmarks.json`; do not edit by hand.",
        "Each section names the command, date and machine that produced it. Ratios are measured side",
        "by side in one process (arms alternate, several rounds, median of per-round ratios), because",
        "absolute times on a shared machine drift; absolute times are medians and only indicative.",
        "",
    ]
    summary = [
        (name, figure)
        for name in BENCHMARKS
        if name in records
        for figure in records[name]["figures"]
        if figure["target"]
    ]
    if summary:
        lines += ["## Targets", "", "| benchmark | figure | value | target | met |", "|---|---|---|---|---|"]
        for name, figure in summary:
            met = {True: "yes", False: "**no**", None: "-"}[figure["passed"]]
            value = f"{format_value(figure['value'])} {figure['unit']}".strip()
            lines.append(f"| {name} | {figure['name']} | {value} | {figure['target']} | {met} |")
        lines.append("")

    for name in BENCHMARKS:
        if name in records:
            lines += _render_section(records[name])
    lines += _render_gpu_check(records.get(GPU_RECORD_KEY))
    return "\n".join(lines) + "\n"


def _render_section(record: dict) -> list[str]:
    machine = record["machine"]
    lines = [
        f"## {record['title']}",
        "",
        f"`{record['command']}` on {record['date']}, {record['seconds']:.0f} s. Machine: {_machine_text(machine)}.",
        "",
        "| figure | value | target |",
        "|---|---|---|",
    ]
    for figure in record["figures"]:
        value = f"{format_value(figure['value'])} {figure['unit']}".strip()
        target = figure["target"]
        if figure["passed"] is not None:
            target = f"{target} ({'met' if figure['passed'] else 'NOT met'})"
        lines.append(f"| {figure['name']} | {value} | {target} |")
    lines.append("")
    if record["rows"]:
        lines.append("| " + " | ".join(record["columns"]) + " |")
        lines.append("|" + "---|" * len(record["columns"]))
        for row in record["rows"]:
            cells = [format_value(cell) if isinstance(cell, float) else str(cell) for cell in row]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"- {note}" for note in record["notes"]]
    lines.append("")
    return lines


def _machine_text(machine: dict) -> str:
    load = machine.get("load_average")
    load_text = f", load average {load[0]:.1f} at the start" if load else ""
    return (
        f"{machine['cpu']}, {machine['usable_cores']} of {machine['cores']} cores usable, "
        f"{machine['memory_gb']} GB memory, Python {machine['python']}, torch {machine['torch']} "
        f"({machine['torch_threads']} threads), open_clip {machine['open_clip']}, numpy {machine['numpy']}"
        f"{', CUDA available' if machine.get('cuda') else ''}{load_text}"
    )


def _render_gpu_check(record: dict | None) -> list[str]:
    lines = [
        "## GPU check",
        "",
        "`python -m matchclip.gpu_check` times, on one GPU, the extraction of the real number of images",
        "(5,500: train, val and test of PSG) with ViT-L-14-336 and random weights, one epoch of the Huge",
        "head from that cache, and training steps of the Base and Large heads, then projects the time of",
        "the paper's grid of trainings (Tables 2 to 4 at 64 epochs). It writes synthetic JPEGs, so it",
        "needs no data and no network. Run it from the project folder:",
        "",
        "```",
        "python -m matchclip.gpu_check                 # full size, a few minutes on one large GPU",
        "python -m matchclip.gpu_check --images 1100   # a fifth of the images, for a first look",
        "python -m matchclip.gpu_check --record        # also store the result in this report",
        "```",
        "",
        "Options: `--workers` (DataLoader decoding processes, default: the CPU count up to 16),",
        "`--batch-size` (extraction batch, default 128), `--work-dir` (where the images and the",
        "cache go; needs about 7.5 GB of disk at full size, removed afterwards unless `--keep`).",
        "",
    ]
    if not record:
        lines += ["No GPU result is recorded yet.", ""]
        return lines
    lines += [
        f"Recorded: `{record['command']}` on {record['date']}, device {record['device']}.",
        "",
        "| figure | value |",
        "|---|---|",
    ]
    for figure in record["figures"]:
        lines.append(f"| {figure['name']} | {format_value(figure['value'])} {figure['unit']} |")
    lines.append("")
    if record.get("rows"):
        lines.append("| " + " | ".join(record["columns"]) + " |")
        lines.append("|" + "---|" * len(record["columns"]))
        for row in record["rows"]:
            lines.append("| " + " | ".join(format_value(c) if isinstance(c, float) else str(c) for c in row) + " |")
        lines.append("")
    lines += [f"- {note}" for note in record.get("notes", [])]
    lines.append("")
    return lines


# ---------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m matchclip.benchmark",
        description="Measure speed, memory and scaling of matchclip on this machine and rewrite reports/BENCHMARKS.md.",
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds and smaller sizes (about half the time)")
    parser.add_argument(
        "--only", nargs="+", choices=sorted(BENCHMARKS), metavar="NAME",
        help=f"run only these benchmarks ({', '.join(BENCHMARKS)}); the report keeps the others' last results",
    )
    parser.add_argument(
        "--report-dir", type=Path, default=None,
        help="folder of BENCHMARKS.md and benchmarks.json (default: reports/ in the project folder)",
    )
    parser.add_argument("--work-dir", type=Path, default=None, help="folder for temporary files (default: the system's)")
    parser.add_argument("--no-report", action="store_true", help="print the figures without writing the report")
    return parser


def run_benchmarks(
    names: Sequence[str],
    settings: Settings,
    *,
    work_dir: Path | None = None,
    on_section: Callable[[Section], None] | None = None,
) -> list[Section]:
    """Run the named benchmarks in a temporary workspace; return their sections."""
    sections = []
    with tempfile.TemporaryDirectory(prefix="matchclip-benchmark-", dir=work_dir) as folder:
        workspace = Workspace(Path(folder), settings)
        for name in names:
            logger.info("benchmark %s", name)
            started = time.perf_counter()
            section = BENCHMARKS[name](workspace)
            section.seconds = time.perf_counter() - started
            sections.append(section)
            if on_section is not None:
                on_section(section)
    return sections


def print_section(section: Section) -> None:
    print(f"\n== {section.title} ({section.seconds:.0f} s)")
    for figure in section.figures:
        status = ""
        if figure.passed is not None:
            status = f"  [target {figure.target}: {'met' if figure.passed else 'NOT met'}]"
        elif figure.target:
            status = f"  [expected {figure.target}]"
        print(f"  {figure.name}: {figure.formatted()}{status}")
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None, *, settings: Settings | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if settings is None:
        settings = Settings.quick() if args.quick else Settings()
    names = list(args.only) if args.only else list(BENCHMARKS)
    command = "python -m matchclip.benchmark" + "".join(f" {arg}" for arg in (argv if argv is not None else sys.argv[1:]))
    machine = machine_info()
    date = time.strftime("%Y-%m-%d %H:%M %Z")

    started = time.perf_counter()
    sections = run_benchmarks(names, settings, work_dir=args.work_dir, on_section=print_section)
    total = time.perf_counter() - started
    print(f"\ntotal benchmark time: {total:.0f} s")

    if not args.no_report:
        report_dir = args.report_dir or paths.reports_dir()
        records = load_records(report_dir / RECORD_NAME)
        for section in sections:
            records[section.name] = section_record(section, command=command, machine=machine, date=date)
        path = write_report(report_dir, records)
        print(f"report written: {path}")
    failed = [figure.name for section in sections for figure in section.figures if figure.passed is False]
    if failed:
        print("targets not met: " + "; ".join(failed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
