"""Benchmark building blocks, the report writer, the memory measurement and the GPU check's projection."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from matchclip import benchmark, gpu_check
from matchclip.backbone import TINY_MODEL, load_backbone
from matchclip.benchmark import (
    Section,
    Settings,
    backbone_flops,
    interleaved,
    median_ratio,
    render_report,
    run_memory_child,
    section_record,
    write_report,
    write_synthetic_cache,
    write_synthetic_dataset,
)
from matchclip.cache import open_cache, read_rows
from matchclip.labels import check_dataset

MACHINE = {
    "cpu": "test cpu", "cores": 2, "usable_cores": 2, "memory_gb": 1.0, "python": "3.11", "torch": "2",
    "open_clip": "3", "numpy": "2", "torch_threads": 2, "cuda": False, "load_average": [1.0, 1.0, 1.0],
}


def test_interleaved_alternates_order():
    calls = []
    times = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)

    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert [len(times["a"]), len(times["b"])] == [3, 3]


def test_median_ratio_of_rounds():
    assert median_ratio([2.0, 4.0, 9.0], [1.0, 1.0, 3.0]) == 3.0


def test_synthetic_cache_passes_verification(tmp_path):
    cache = write_synthetic_cache(
        tmp_path / "cache", num_rows=40, num_tokens=5, token_width=8, embed_dim=6, dense_every=4, shard_size=16
    )
    reopened = open_cache(cache.root, verify=True)

    assert reopened.tokens.shape == (40, 5, 8)
    assert reopened.embeddings.shape == (40, 6)
    assert len(reopened.meta["shards"]) == 3
    assert reopened.grid_size == (2, 2)
    assert reopened.num_prefix_tokens == 1
    assert np.abs(reopened.tokens[::4]).sum(axis=(1, 2)).min() > 0
    assert not reopened.tokens[1].any()


def test_synthetic_cache_damage_detected(tmp_path):
    cache = write_synthetic_cache(tmp_path / "cache", num_rows=8, num_tokens=5, token_width=8, embed_dim=6)
    path = cache.root / "tokens.npy"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))

    with pytest.raises(Exception, match="damaged"):
        open_cache(cache.root, verify=True)


def test_synthetic_dataset_is_valid(tmp_path):
    labels_path, image_root = write_synthetic_dataset(
        tmp_path, num_train=5, num_val=2, num_test=1, image_size=(64, 48)
    )
    labels = check_dataset(labels_path, image_root, decode=True)

    assert [len(labels.split(split)) for split in ("train", "val", "test")] == [5, 2, 1]
    assert labels.targets("train").sum(axis=1).min() >= 1
    assert labels.targets("train")[:, :6].sum() == 0
    assert not labels.has_labels("test")


def test_read_rows_matches_indexing(tmp_path):
    array = np.lib.format.open_memmap(tmp_path / "a.npy", mode="w+", dtype=np.float16, shape=(30, 3, 4))
    array[:] = np.arange(30 * 12, dtype=np.float16).reshape(30, 3, 4)
    array.flush()
    mapped = np.load(tmp_path / "a.npy", mmap_mode="r")

    for rows in ([0], [3, 4, 5, 9, 20, 21, 29], list(range(30)), []):
        copied = read_rows(mapped, np.array(rows, dtype=np.int64))
        assert np.array_equal(copied, np.asarray(mapped[rows])), rows
        assert not isinstance(copied, np.memmap)
    assert np.array_equal(read_rows(np.asarray(mapped), np.array([2, 7])), np.asarray(mapped)[[2, 7]])


def test_report_keeps_other_sections(tmp_path):
    first = Section("cache", "Cache versus re-encoding", seconds=3.0)
    first.add("measured / predicted ratio", 0.97, target=">= 0.9", passed=True)
    second = Section("growth", "Growth with the data size", seconds=2.0)
    second.add("epoch time 2x / 1x", 2.04, target="~2")
    second.columns, second.rows = ["size", "epoch s"], [["1x", 1.5], ["2x", 3.06]]

    write_report(tmp_path, {"cache": section_record(first, command="c1", machine=MACHINE, date="d1")})
    records = json.loads((tmp_path / "benchmarks.json").read_text())
    records["growth"] = section_record(second, command="c2", machine=MACHINE, date="d2")
    write_report(tmp_path, records)
    text = (tmp_path / "BENCHMARKS.md").read_text()

    assert "## Cache versus re-encoding" in text
    assert "## Growth with the data size" in text
    assert "| cache | measured / predicted ratio | 0.97 | >= 0.9 | yes |" in text
    assert "`c1` on d1" in text
    assert "`c2` on d2" in text
    assert "| 2x | 3.06 |" in text
    assert "## GPU check" in text


def test_report_marks_missed_target():
    section = Section("memory", "Memory", seconds=1.0)
    section.add("peak RSS", 2.0, "GB", target="< 1.5 GB", passed=False)

    text = render_report({"memory": section_record(section, command="c", machine=MACHINE, date="d")})

    assert "| memory | peak RSS | 2 GB | < 1.5 GB | **no** |" in text
    assert "< 1.5 GB (NOT met)" in text


def test_backbone_flops_counts_every_matmul():
    backbone = load_backbone(TINY_MODEL, None)
    config = backbone.model_config["vision_cfg"]
    width, layers, patch = config["width"], config["layers"], config["patch_size"]
    tokens, embed = backbone.num_tokens, backbone.embed_dim
    images = torch.zeros(2, 3, *backbone.preprocess_config["size"])

    # A multiply-add counts as 2 FLOPs. The image passes the patch embedding,
    # then per layer the qkv, output and MLP (ratio 4) projections and the two
    # attention products, then the pooled token's final projection.
    per_image = 2 * (
        3 * patch * patch * width * (tokens - 1)
        + layers * (tokens * 12 * width * width + 2 * tokens * tokens * width)
        + width * embed
    )
    assert backbone_flops(backbone, images) == 2 * per_image


@pytest.mark.slow
def test_memory_stays_flat_with_pread(tmp_path):
    # Dense rows of 65 tokens of width 512: every page is real data, so no
    # file system can serve a hole from its shared zero page.
    def cache_of(rows):
        return write_synthetic_cache(
            tmp_path / f"cache-{rows}", num_rows=rows, num_tokens=65, token_width=512, embed_dim=64
        )

    small, large = cache_of(1024), cache_of(4096)
    grown = (large.root / "tokens.npy").stat().st_size - (small.root / "tokens.npy").stat().st_size

    pread_small = run_memory_child(small.root, steps=16, batch=64, reader="pread")
    pread_large = run_memory_child(large.root, steps=16, batch=64, reader="pread")
    mapped_large = run_memory_child(large.root, steps=16, batch=64, reader="memmap")

    assert pread_large["steps"] == 16
    # The checksum verification reads the whole file. With pread only one
    # 16 MB chunk is resident at a time, so a cache 4 times larger barely
    # moves the peak. Through the memory map the pages read stay resident,
    # which shows the measure can see them.
    assert pread_large["peak_rss"] - pread_small["peak_rss"] < 0.2 * grown
    assert mapped_large["peak_rss"] - pread_large["peak_rss"] > 0.3 * grown


@pytest.mark.slow
def test_benchmark_command_writes_report(tmp_path, capsys):
    settings = Settings(
        repeats=1, tiny_repeats=1, growth_rows=64, growth_images=4, growth_factors=(1, 2), image_size=(64, 48)
    )

    code = benchmark.main(["--only", "growth", "--report-dir", str(tmp_path)], settings=settings)
    output = capsys.readouterr().out
    text = (tmp_path / "BENCHMARKS.md").read_text()

    assert code == 0
    assert "epoch time 2x / 1x" in output
    assert "## Growth with the data size" in text
    assert "images encoded by the second call | 0" in text
    assert json.loads((tmp_path / "benchmarks.json").read_text())["growth"]["command"].endswith("--only growth --report-dir " + str(tmp_path))


def test_grid_has_twelve_unique_trainings():
    trainings = gpu_check.grid_trainings("paper")
    by_key = {training.key: training for training in trainings}

    assert len(trainings) == 12
    assert by_key["large-balanced"].tables == ["2", "3", "4"]
    assert by_key["large"].tables == ["2", "3"]
    assert by_key["huge-balanced-no-text"].config.relation_tokens is False
    assert by_key["huge-balanced"].config.backbone == "ViT-L-14-336"
    assert by_key["base"].config.backbone == "ViT-B-16"
    assert all(training.config.epochs == 64 for training in trainings)
    assert "zero_shot" not in by_key


def test_split_sizes_follow_psg_proportions():
    assert gpu_check.split_sizes(5500) == {"train": 4500, "val": 500, "test": 500}
    assert sum(gpu_check.split_sizes(1100).values()) == 1100
    assert min(gpu_check.split_sizes(22).values()) >= 1


def test_project_grid_arithmetic():
    trainings = [t for t in gpu_check.grid_trainings("paper") if t.key in ("base", "huge-balanced", "resnet")]
    steps = {t.key: {"step_seconds": 0.1, "eval_seconds": 0.5} for t in trainings}
    extraction = {"backbone": "ViT-L-14-336", "extraction_rate": 100.0, "forward_rate": 125.0, "decode_rate": 200.0}
    sizes = {"train": 4500, "val": 500, "test": 500}

    rows, total = gpu_check.project_grid(
        trainings, sizes=sizes, steps=steps, extraction=extraction,
        forward_rates={"ViT-L-14-336": 125.0, "ViT-B-16": 500.0},
    )
    seconds = {row[0]: row[3] for row in rows}

    assert seconds["extraction ViT-L-14-336 (5500 images)"] == pytest.approx(55.0)
    # 500 img/s forward at the measured 0.8 share would be 400 img/s; decoding caps it at 200.
    assert seconds["extraction ViT-B-16 (5500 images, estimated)"] == pytest.approx(5500 / 200)
    assert seconds["MatchCLIP-Base (base)"] == pytest.approx(64 * (math.ceil(4500 / 32) * 0.1 + 2 * 0.5))
    assert seconds["MatchCLIP-Huge† (huge-balanced)"] == pytest.approx(64 * (math.ceil(4500 / 64) * 0.1 + 2 * 0.5))
    # The ResNet trains from images: its 15.1 s of steps wait for 25 s of decoding per epoch.
    assert seconds["ResNet50 (resnet)"] == pytest.approx(64 * 5000 / 200)
    assert total == pytest.approx(sum(seconds.values()))


def test_gpu_check_without_cuda_fails_clearly(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")

    assert gpu_check.main(["--images", "11"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
