"""Time extraction and head training on one GPU and project the time of the paper's grid.

The paper is the MatchCLIP report (J. Shen, "MatchCLIP: Viewing
Object-Relation Classification As A Matching Problem"); its grid is the set of
trainings behind its Tables 2 to 4.

    python -m matchclip.gpu_check [--images 5500] [--record]

Steps, all on synthetic data (random-weight backbones, generated JPEGs), so
the script needs no download:

1. write `--images` photo-like JPEGs (the PSG split sizes scaled: 9/11 train,
   1/11 val, 1/11 test) and a label file;
2. extract the three splits with the backbone of MatchCLIP-Huge (ViT-L-14-336)
   through matchclip.cache.build_cache and time it (images/s), beside the
   backbone's forward pass alone and the decoding pipeline alone;
3. train MatchCLIP-Huge with class-balanced batches (the report's best model,
   as matchclip.grid defines it) for one epoch from that cache with
   matchclip.train, validation included, and time it (steps/s);
4. time training steps and evaluation batches of every unique training of the
   report's Tables 2 to 4 (matchclip.grid rows of the profile, zero-shot
   left out), and the forward pass of the other backbones (ViT-B-16);
5. print the projected time of that grid at the real data size and the
   profile's epochs (64 in the paper profile), plus each backbone's extraction.

`--dry-run` runs every step at toy size on the CPU (demo profile) to check
the script.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .benchmark import (
    GPU_RECORD_KEY,
    RECORD_NAME,
    format_value,
    load_records,
    machine_info,
    random_targets,
    write_report,
    write_synthetic_dataset,
)

logger = logging.getLogger(__name__)

# PSG classification: 4,500 train, 500 val and 500 test images.
REAL_SPLIT_SIZES = {"train": 4500, "val": 500, "test": 500}
# Row of the grid whose epoch is timed through matchclip.train: MatchCLIP-Huge
# with class-balanced batches, the report's best model.
TIMED_ROW = "huge-balanced"


@dataclass
class GridTraining:
    """One unique training of the report's Tables 2 to 4: its row key, label, tables and settings."""

    key: str
    label: str
    tables: list[str]
    config: object  # RunConfig


def grid_trainings(profile: str) -> list[GridTraining]:
    """Return the unique trainings of Tables 2 to 4 in `profile`, in order of first appearance.

    Rows come from matchclip.grid. A configuration that several tables share
    (MatchCLIP-Large with balancing is in Tables 2, 3 and 4) counts once, and
    zero-shot CLIP is left out because it trains nothing.
    """
    from .experiment import run_identity
    from .grid import (
        ablation_rows,
        baseline_rows,
        main_rows,
        relation_token_rows,
        resolve_row,
    )

    tables = [("2", baseline_rows(profile) + main_rows(profile)), ("3", ablation_rows(profile)), ("4", relation_token_rows(profile))]
    trainings: dict[str, GridTraining] = {}
    for table, rows in tables:
        for row in rows:
            config = resolve_row(row, profile=profile)
            if config.model == "zero_shot":
                continue
            identity = run_identity(config, labels_sha256="")
            if identity not in trainings:
                trainings[identity] = GridTraining(row.key, row.label, [], config)
            if table not in trainings[identity].tables:
                trainings[identity].tables.append(table)
    return list(trainings.values())


def split_sizes(total: int) -> dict[str, int]:
    """Split `total` images in the proportions of the PSG splits (train gets the remainder)."""
    whole = sum(REAL_SPLIT_SIZES.values())
    val = max(1, round(total * REAL_SPLIT_SIZES["val"] / whole))
    test = max(1, round(total * REAL_SPLIT_SIZES["test"] / whole))
    return {"train": total - val - test, "val": val, "test": test}


class Timer:
    """Wall-clock timing that waits for the device's queued work first."""

    def __init__(self, device):
        self.device = device

    def synchronize(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def seconds(self, run: Callable[[], object], *, repeats: int = 1, warmup: int = 1) -> float:
        """Median seconds of `run()` over `repeats` calls after `warmup` calls."""
        for _ in range(warmup):
            run()
        times = []
        for _ in range(repeats):
            self.synchronize()
            started = time.perf_counter()
            run()
            self.synchronize()
            times.append(time.perf_counter() - started)
        return float(np.median(times))


# ---------------------------------------------------------------------------
# Measurements


def measure_extraction(options, *, labels, image_root: Path, cache_root: Path, backbone, timer: Timer) -> dict:
    """Extract every split with build_cache; time it, the forward pass alone and decoding alone."""
    from torch.utils.data import DataLoader

    from .cache import build_cache
    from .images import ImageDataset

    splits = ("train", "val", "test")
    timer.synchronize()
    started = time.perf_counter()
    for split in splits:
        build_cache(
            backbone, labels, split=split, image_root=image_root, cache_root=cache_root,
            batch_size=options.batch_size, workers=options.workers, progress=True,
        )
    timer.synchronize()
    extraction_seconds = time.perf_counter() - started
    images = sum(len(labels.split(split)) for split in splits)

    samples = labels.split("train")
    count = min(len(samples), options.decode_images)
    loader = DataLoader(
        ImageDataset(samples[:count], image_root, backbone.preprocess),
        batch_size=options.batch_size,
        num_workers=options.workers,
        pin_memory=backbone.device.type == "cuda",
    )
    started = time.perf_counter()
    for _ in loader:
        pass
    decode_rate = count / (time.perf_counter() - started)
    return {
        "images": images,
        "extraction_seconds": extraction_seconds,
        "extraction_rate": images / extraction_seconds,
        "forward_rate": forward_rate(backbone, options, timer),
        "decode_rate": decode_rate,
    }


def forward_rate(backbone, options, timer: Timer) -> float:
    """Images/s of Backbone.encode_images on random batches already on the device."""
    import torch

    height, width = backbone.preprocess_config["size"]
    batch = torch.randn(options.batch_size, 3, height, width, device=backbone.device)

    def forward() -> None:
        for _ in range(options.forward_batches):
            backbone.encode_images(batch)

    return options.forward_batches * options.batch_size / timer.seconds(forward, repeats=1, warmup=1)


def train_one_epoch(options, training: GridTraining, *, labels_path: Path, image_root: Path, cache_root: Path,
                    out: Path, device) -> dict:
    """One epoch of `training` on the synthetic data through matchclip.train; return its timing."""
    import pandas as pd
    import torch

    from .config import RunConfig
    from .labels import load_labels
    from .train import train

    settings = training.config.to_dict()
    settings.update(
        pretrained=None,
        labels=str(labels_path),
        images=str(image_root),
        cache_dir=str(cache_root),
        out=str(out),
        epochs=1,
        warmup_epochs=0,
        device=str(device),
        workers=options.workers,
    )
    config = RunConfig.from_dict(settings)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train(config)
    epoch_seconds = float(pd.read_csv(out / "metrics.csv")["seconds"].iloc[0])
    steps = math.ceil(len(load_labels(labels_path).split("train")) / config.batch_size)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else float("nan")
    return {"epoch_seconds": epoch_seconds, "steps": steps, "batch_size": config.batch_size, "peak_memory": peak}


def measure_training_steps(training: GridTraining, options, *, device, timer: Timer) -> dict:
    """Seconds per training step and per evaluation batch of one grid training, on random inputs.

    The ResNet's step takes images of its input size; the other models take
    the cached tokens or embeddings of their backbone.
    """
    import torch

    from .classes import NUM_CLASSES
    from .experiment import build_trained_module
    from .grid import backbone_shape
    from .losses import build_loss
    from .train import build_optimizer

    config = training.config
    batch = config.batch_size
    targets = torch.from_numpy(random_targets(batch)).to(device)
    torch.manual_seed(0)

    if config.model == "resnet":
        model = build_trained_module(config, image_width=None, text_width=None, load_weights=False).to(device)
        size = config.resnet_image_size
        inputs = (torch.randn(batch, 3, size, size, device=device),)
        eval_inputs = (torch.randn(config.eval_batch_size, 3, size, size, device=device),)
    elif config.model == "linear_probe":
        width = backbone_shape(config.backbone).text_width
        model = build_trained_module(config, image_width=None, text_width=width).to(device)
        inputs = (torch.randn(batch, width, device=device),)
        eval_inputs = (torch.randn(config.eval_batch_size, width, device=device),)
    else:
        geometry = backbone_shape(config.backbone)
        model = build_trained_module(
            config, image_width=geometry.image_width, text_width=geometry.text_width
        ).to(device)
        relations = torch.randn(NUM_CLASSES, geometry.text_width, device=device)
        shape = (geometry.num_tokens, geometry.image_width)
        inputs = (torch.randn(batch, *shape, device=device), relations)
        eval_inputs = (torch.randn(config.eval_batch_size, *shape, device=device), relations)

    optimizer = build_optimizer(config, [parameter for parameter in model.parameters() if parameter.requires_grad])
    loss_fn = build_loss(config.loss, **config.loss_options)

    def step() -> None:
        model.train()
        loss = loss_fn(model(*inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def evaluate() -> None:
        model.eval()
        with torch.no_grad():
            model(*eval_inputs)

    result = {
        "step_seconds": timer.seconds(step, repeats=options.head_steps, warmup=3),
        "eval_seconds": timer.seconds(evaluate, repeats=2, warmup=1),
    }
    del model, optimizer, inputs, eval_inputs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# ---------------------------------------------------------------------------
# Projection


def project_grid(
    trainings: Sequence[GridTraining],
    *,
    sizes: dict[str, int],
    steps: dict[str, dict],
    extraction: dict,
    forward_rates: dict[str, float],
) -> tuple[list[list], float]:
    """Projected seconds of each unique training at the real data size, and of the whole grid.

    A training's epoch is ceil(train / batch) steps plus ceil(val /
    eval batch) evaluation batches at the measured times, times its epochs
    (64 in the paper profile). A model that trains from images (the ResNet)
    goes no faster than the measured decoding pipeline. Each backbone's cache
    is extracted once: the measured backbone at its measured speed, the others
    at their measured forward speed times the measured extraction/forward
    share, capped by the decoding speed.
    """
    total_images = sum(sizes.values())
    share = extraction["extraction_rate"] / extraction["forward_rate"]
    rows = []
    for backbone, rate in forward_rates.items():
        if backbone == extraction["backbone"]:
            seconds = total_images / extraction["extraction_rate"]
            rows.append([f"extraction {backbone} ({total_images} images)", "-", "-", seconds])
        else:
            seconds = total_images / min(rate * share, extraction["decode_rate"])
            rows.append([f"extraction {backbone} ({total_images} images, estimated)", "-", "-", seconds])

    for training in trainings:
        config = training.config
        timing = steps[training.key]
        train_steps = math.ceil(sizes["train"] / config.batch_size)
        eval_batches = math.ceil(sizes["val"] / config.eval_batch_size)
        epoch = train_steps * timing["step_seconds"] + eval_batches * timing["eval_seconds"]
        if config.model == "resnet":
            epoch = max(epoch, (sizes["train"] + sizes["val"]) / extraction["decode_rate"])
        rows.append([f"{training.label} ({training.key})", ", ".join(training.tables), epoch, config.epochs * epoch])
    total = sum(row[3] for row in rows)
    return rows, total


# ---------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m matchclip.gpu_check",
        description="Time extraction (ViT-L-14-336) and one Huge-head epoch on one GPU; project the paper's grid.",
    )
    parser.add_argument("--images", type=int, default=sum(REAL_SPLIT_SIZES.values()),
                        help="synthetic images over train, val and test (default: 5500, the PSG total)")
    parser.add_argument("--batch-size", type=int, default=128, help="extraction batch size in images (default: 128)")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1),
                        help="DataLoader processes that decode images (default: CPU count, at most 16)")
    parser.add_argument("--device", default="cuda", help="torch device (default: cuda)")
    parser.add_argument("--profile", default="paper",
                        help="profile whose grid of Tables 2 to 4 is timed and projected (default: paper)")
    parser.add_argument("--head-steps", type=int, default=10, help="timed training steps per grid training (default: 10)")
    parser.add_argument("--forward-batches", type=int, default=10, help="timed forward-only batches (default: 10)")
    parser.add_argument("--decode-images", type=int, default=2000, help="images timed through decoding alone (default: 2000)")
    parser.add_argument("--work-dir", type=Path, default=None, help="folder for images, caches and the run (default: system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--record", action="store_true", help="store the figures in reports/benchmarks.json and BENCHMARKS.md")
    parser.add_argument("--report-dir", type=Path, default=None, help="report folder for --record (default: reports/)")
    parser.add_argument("--dry-run", action="store_true",
                        help="toy sizes on the CPU (demo profile, 22 images) to check the script; figures are meaningless")
    return parser


def apply_dry_run(options) -> None:
    options.device = "cpu"
    options.profile = "demo"
    options.images = min(options.images, 22)
    options.batch_size = min(options.batch_size, 8)
    options.workers = 0
    options.head_steps = 1
    options.forward_batches = 1
    options.decode_images = 8


def main(argv: Sequence[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if options.dry_run:
        apply_dry_run(options)

    import torch

    device = torch.device(options.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: CUDA is not available on this machine; run on a GPU machine or pass --dry-run", file=sys.stderr)
        return 2
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="matchclip-gpu-check-", dir=options.work_dir))
    try:
        results = run_check(options, device=device, timer=Timer(device), work=work)
    finally:
        if not options.keep:
            shutil.rmtree(work, ignore_errors=True)
    results["seconds"] = time.perf_counter() - started
    print_results(results)
    if options.record:
        record_results(options, results, argv)
    return 0


def run_check(options, *, device, timer: Timer, work: Path) -> dict:
    from .backbone import load_backbone
    from .labels import load_labels

    trainings = grid_trainings(options.profile)
    timed = next(training for training in trainings if training.key == TIMED_ROW)
    backbone_name = timed.config.backbone

    sizes = split_sizes(options.images)
    print(f"writing {options.images} synthetic images ({sizes}) to {work}", flush=True)
    labels_path, image_root = write_synthetic_dataset(
        work / "data", num_train=sizes["train"], num_val=sizes["val"], num_test=sizes["test"],
        processes=max(1, options.workers), seed=0,
    )
    labels = load_labels(labels_path)
    cache_root = work / "cache"

    print(f"extracting with {backbone_name} (random weights) on {device}", flush=True)
    backbone = load_backbone(backbone_name, None, device=device, seed=timed.config.seed)
    extraction = measure_extraction(options, labels=labels, image_root=image_root, cache_root=cache_root,
                                    backbone=backbone, timer=timer)
    extraction["backbone"] = backbone_name
    forward_rates = {backbone_name: extraction["forward_rate"]}
    del backbone

    print(f"training {timed.label} ({timed.key}) for one epoch", flush=True)
    epoch = train_one_epoch(options, timed, labels_path=labels_path, image_root=image_root, cache_root=cache_root,
                            out=work / "run", device=device)

    print(f"timing the training steps of the {len(trainings)} unique trainings of Tables 2 to 4", flush=True)
    steps = {training.key: measure_training_steps(training, options, device=device, timer=timer) for training in trainings}
    for name in sorted({t.config.backbone for t in trainings if t.config.model != "resnet"} - {backbone_name}):
        other = load_backbone(name, None, device=device)
        forward_rates[name] = forward_rate(other, options, timer)
        del other

    rows, total = project_grid(trainings, sizes=REAL_SPLIT_SIZES, steps=steps, extraction=extraction,
                               forward_rates=forward_rates)
    return {
        "device": _device_name(device),
        "profile": options.profile,
        "sizes": sizes,
        "extraction": extraction,
        "timed": f"{timed.label} ({timed.key})",
        "epoch": epoch,
        "forward_rates": forward_rates,
        "trainings": len(trainings),
        "grid_rows": rows,
        "grid_seconds": total,
    }


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def figures(results: dict) -> list[dict]:
    extraction, epoch = results["extraction"], results["epoch"]
    rows = [
        {"name": f"extraction {extraction['backbone']}, images/s", "value": extraction["extraction_rate"], "unit": "img/s"},
        {"name": f"{extraction['backbone']} forward pass alone, images/s", "value": extraction["forward_rate"], "unit": "img/s"},
        {"name": "extraction / forward pass", "value": extraction["extraction_rate"] / extraction["forward_rate"], "unit": ""},
        {"name": "decoding pipeline alone, images/s", "value": extraction["decode_rate"], "unit": "img/s"},
        {"name": f"{results['timed']}: one epoch (train + val), seconds", "value": epoch["epoch_seconds"], "unit": "s"},
        {"name": f"{results['timed']}: training steps/s (batch {epoch['batch_size']}, val included)",
         "value": epoch["steps"] / epoch["epoch_seconds"], "unit": "steps/s"},
        {"name": "peak GPU memory of that epoch", "value": epoch["peak_memory"] / 1e9, "unit": "GB"},
    ]
    for name, rate in results["forward_rates"].items():
        if name != extraction["backbone"]:
            rows.append({"name": f"{name} forward pass, images/s", "value": rate, "unit": "img/s"})
    rows += [
        {"name": f"projected grid ({results['trainings']} unique trainings + extraction), hours",
         "value": results["grid_seconds"] / 3600, "unit": "h"},
        {"name": "this check's own run time, seconds", "value": results["seconds"], "unit": "s"},
    ]
    return rows


def print_results(results: dict) -> None:
    print(f"\n== GPU check on {results['device']} ({results['sizes']})")
    for figure in figures(results):
        print(f"  {figure['name']}: {format_value(figure['value'])} {figure['unit']}".rstrip())
    print(f"\nprojected time of the {results['profile']} profile's grid at {sum(REAL_SPLIT_SIZES.values())} images:")
    for name, tables, epoch, total in results["grid_rows"]:
        epoch_text = epoch if isinstance(epoch, str) else f"{epoch:.1f} s/epoch"
        print(f"  {name:60s} tables {tables:8s} {epoch_text:>16s}  {total / 60:8.1f} min")
    print(f"  {'total':60s} {'':15s} {'':>16s}  {results['grid_seconds'] / 3600:8.2f} h")
    sys.stdout.flush()


def record_results(options, results: dict, argv) -> None:
    from . import paths

    report_dir = options.report_dir or paths.reports_dir()
    records = load_records(report_dir / RECORD_NAME)
    arguments = list(argv) if argv is not None else sys.argv[1:]
    records[GPU_RECORD_KEY] = {
        "command": "python -m matchclip.gpu_check" + "".join(f" {arg}" for arg in arguments),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "device": results["device"],
        "machine": machine_info(),
        "figures": figures(results),
        "columns": ["training or extraction", "tables", "s/epoch", "projected seconds"],
        "rows": results["grid_rows"],
        "notes": [
            "Projection: for each unique training of Tables 2 to 4, ceil(4500 / batch) training steps and "
            "ceil(500 / eval batch) evaluation batches per epoch at the measured times of its model "
            "(float32, as matchclip.train runs), times its epochs; each backbone's cache is extracted once.",
            "Backbones other than the measured one are estimated from their measured forward speed times "
            "the measured extraction/forward share, capped by the decoding speed.",
        ],
    }
    path = write_report(report_dir, records)
    print(f"recorded in {path}")


if __name__ == "__main__":
    sys.exit(main())
