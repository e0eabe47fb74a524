"""Class-balanced and shuffled batch samplers: guarantees, seeding, ranks, DataLoader use."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from matchclip.classes import NUM_CLASSES
from matchclip.errors import ConfigError
from matchclip.sampler import BalancedBatchSampler, ShuffledBatchSampler

RARE_SINGLE = (50, 51, 52)      # classes with exactly one example
RARE_PAIR = (53, 54, 55)        # classes with exactly two examples


def _long_tailed_targets(num_examples: int = 600, seed: int = 7) -> np.ndarray:
    """Multi-hot [N, 56]: classes 6..49 Zipf-distributed, 1-4 labels per example.

    Classes 50..52 get one example each and 53..55 two each; 0..5 get none.
    """
    rng = np.random.default_rng(seed)
    common = np.arange(6, 50)
    weights = 1.0 / np.arange(1, len(common) + 1)
    weights /= weights.sum()

    targets = np.zeros((num_examples, NUM_CLASSES), dtype=np.float32)
    for row in range(num_examples):
        count = int(rng.integers(1, 5))
        targets[row, rng.choice(common, size=count, replace=False, p=weights)] = 1.0

    targets[:, 50:] = 0.0
    rare_rows = rng.choice(num_examples, size=len(RARE_SINGLE) + 2 * len(RARE_PAIR), replace=False)
    for label, row in zip(RARE_SINGLE, rare_rows[:3]):
        targets[row, label] = 1.0
    for position, label in enumerate(RARE_PAIR):
        targets[rare_rows[3 + 2 * position : 5 + 2 * position], label] = 1.0
    return targets


def _classes_with_examples(targets: np.ndarray) -> np.ndarray:
    return np.flatnonzero(targets.sum(axis=0) > 0)


def _missing_classes(batch: list[int], targets: np.ndarray) -> list[int]:
    covered = targets[batch].sum(axis=0) > 0
    return [int(label) for label in _classes_with_examples(targets) if not covered[label]]


@pytest.fixture(scope="module")
def targets() -> np.ndarray:
    return _long_tailed_targets()


def test_synthetic_set_is_long_tailed(targets):
    counts = targets.sum(axis=0)
    assert len(_classes_with_examples(targets)) == 50
    assert counts[list(RARE_SINGLE)].tolist() == [1, 1, 1]
    assert counts[list(RARE_PAIR)].tolist() == [2, 2, 2]
    assert counts[6] > 100


def test_balanced_every_batch_covers_every_class(targets):
    sampler = BalancedBatchSampler(targets, 64, seed=3, num_batches=200)
    batches = list(sampler)
    assert len(batches) == 200
    for number, batch in enumerate(batches):
        assert _missing_classes(batch, targets) == [], f"batch {number}"


def test_balanced_batches_have_batch_size(targets):
    batches = list(BalancedBatchSampler(targets, 64, seed=3, num_batches=200))
    assert {len(batch) for batch in batches} == {64}


def test_balanced_batches_have_no_duplicates(targets):
    batches = list(BalancedBatchSampler(targets, 64, seed=3, num_batches=200))
    for number, batch in enumerate(batches):
        assert len(set(batch)) == len(batch), f"batch {number}"


def test_balanced_yields_python_ints(targets):
    batch = next(iter(BalancedBatchSampler(targets, 64)))
    assert all(type(index) is int for index in batch)


def test_balanced_rare_pair_examples_rotate(targets):
    batches = list(BalancedBatchSampler(targets, 64, seed=3, num_batches=200))
    for label in RARE_PAIR:
        first, second = np.flatnonzero(targets[:, label])
        uses_first = sum(first in batch for batch in batches)
        uses_second = sum(second in batch for batch in batches)
        # The class queue alternates between its two examples; fill draws add
        # a few more appearances, so each example is in roughly half the batches.
        assert uses_first >= 80, f"class {label}"
        assert uses_second >= 80, f"class {label}"


def test_balanced_exact_class_count_batch_size(targets):
    batches = list(BalancedBatchSampler(targets, 50, seed=1, num_batches=50))
    assert all(_missing_classes(batch, targets) == [] for batch in batches)


def test_balanced_batch_too_small_raises(targets):
    with pytest.raises(ConfigError) as error:
        BalancedBatchSampler(targets, 32)
    message = str(error.value)
    assert "batch size 32" in message
    assert "50 classes" in message
    assert "--batch-size to at least 50" in message
    assert "disable class-balanced sampling" in message


def test_balanced_default_num_batches(targets):
    sampler = BalancedBatchSampler(targets, 64)
    assert len(sampler) == math.ceil(600 / 64)
    assert len(list(sampler)) == len(sampler)


def test_balanced_same_seed_same_batches(targets):
    first = list(BalancedBatchSampler(targets, 64, seed=5))
    second = list(BalancedBatchSampler(targets, 64, seed=5))
    assert first == second


def test_balanced_iterating_twice_repeats_epoch(targets):
    sampler = BalancedBatchSampler(targets, 64, seed=5)
    assert list(sampler) == list(sampler)


def test_balanced_different_seed_differs(targets):
    first = list(BalancedBatchSampler(targets, 64, seed=5))
    second = list(BalancedBatchSampler(targets, 64, seed=6))
    assert first != second


def test_balanced_set_epoch_changes_batches(targets):
    sampler = BalancedBatchSampler(targets, 64, seed=5)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    sampler.set_epoch(0)
    assert epoch1 != epoch0
    assert list(sampler) == epoch0


def test_balanced_resume_reproduces_epoch(targets):
    running = BalancedBatchSampler(targets, 64, seed=5)
    for epoch in range(4):
        running.set_epoch(epoch)
        expected = list(running)

    resumed = BalancedBatchSampler(targets, 64, seed=5)
    resumed.set_epoch(3)
    assert list(resumed) == expected


def test_balanced_ranks_differ(targets):
    rank0 = list(BalancedBatchSampler(targets, 64, seed=2, rank=0, world_size=2))
    rank1 = list(BalancedBatchSampler(targets, 64, seed=2, rank=1, world_size=2))
    assert rank0 != rank1


def test_balanced_ranks_keep_guarantee(targets):
    for rank in range(3):
        sampler = BalancedBatchSampler(targets, 64, seed=2, rank=rank, world_size=3, num_batches=40)
        for number, batch in enumerate(sampler):
            assert _missing_classes(batch, targets) == [], f"rank {rank} batch {number}"
            assert len(set(batch)) == 64, f"rank {rank} batch {number}"


def test_balanced_ranks_equal_batch_counts(targets):
    counts = [len(list(BalancedBatchSampler(targets, 64, rank=rank, world_size=3))) for rank in range(3)]
    assert counts == [math.ceil(600 / (64 * 3))] * 3


def test_balanced_ranks_fill_from_disjoint_shares():
    # Two classes, so coverage takes at most two slots and the rest is fill.
    targets = np.zeros((400, NUM_CLASSES), dtype=np.float32)
    targets[np.arange(400), 6 + np.arange(400) % 2] = 1.0
    seen = [
        set(np.concatenate(list(BalancedBatchSampler(targets, 20, rank=rank, world_size=2))).tolist())
        for rank in range(2)
    ]
    overlap = len(seen[0] & seen[1])
    # Coverage picks (at most 2 per batch, 10 batches per rank) are the only
    # source of overlap between the ranks' fill shares.
    assert overlap <= 40


def test_balanced_fill_uniform_over_epochs():
    targets = np.zeros((200, NUM_CLASSES), dtype=np.float32)
    targets[np.arange(200), 6 + np.arange(200) % 2] = 1.0
    sampler = BalancedBatchSampler(targets, 10, seed=11)
    counts = np.zeros(200, dtype=int)
    for epoch in range(20):
        sampler.set_epoch(epoch)
        counts += np.bincount(np.concatenate(list(sampler)), minlength=200)

    # 20 epochs x 20 batches x 10 slots = 4000 draws, 20 per example on
    # average. Draws with replacement would give a standard deviation near
    # sqrt(20) = 4.5 and a range of about 10..32 for 200 examples; a shuffled
    # pass per epoch keeps counts closer to 20.
    assert counts.sum() == 4000
    assert counts.std() < 3.5
    assert counts.min() >= 12
    assert counts.max() <= 28


def test_balanced_fill_no_repeat_within_epoch():
    targets = np.zeros((200, NUM_CLASSES), dtype=np.float32)
    targets[np.arange(200), 6 + np.arange(200) % 2] = 1.0
    counts = np.bincount(np.concatenate(list(BalancedBatchSampler(targets, 10, seed=11))), minlength=200)
    # At most once from the fill pass plus once from its class queue.
    assert counts.max() <= 2


def test_balanced_rank_share_smaller_than_batch_avoids_duplicates():
    targets = np.zeros((12, NUM_CLASSES), dtype=np.float32)
    targets[np.arange(12), 6 + np.arange(12) % 3] = 1.0
    for rank in range(4):
        for batch in BalancedBatchSampler(targets, 8, rank=rank, world_size=4, num_batches=5):
            assert len(set(batch)) == 8, f"rank {rank}"


def test_balanced_dataset_smaller_than_batch_repeats():
    targets = np.zeros((3, NUM_CLASSES), dtype=np.float32)
    targets[[0, 1, 2], [6, 7, 7]] = 1.0
    batch = next(iter(BalancedBatchSampler(targets, 5)))
    assert len(batch) == 5
    assert set(batch) == {0, 1, 2}


def test_balanced_accepts_torch_targets(targets):
    from_numpy = list(BalancedBatchSampler(targets, 64, seed=4))
    from_torch = list(BalancedBatchSampler(torch.from_numpy(targets), 64, seed=4))
    assert from_numpy == from_torch


class _IndexDataset(torch.utils.data.Dataset):
    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> int:
        return index


def test_balanced_dataloader_with_workers(targets):
    sampler = BalancedBatchSampler(targets, 64, seed=9)
    sampler.set_epoch(2)
    loader = torch.utils.data.DataLoader(_IndexDataset(len(targets)), batch_sampler=sampler, num_workers=2)
    loaded = [batch.tolist() for batch in loader]
    assert loaded == list(sampler)
    assert all(_missing_classes(batch, targets) == [] for batch in loaded)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"batch_size": 0}, "batch size 0"),
        ({"batch_size": 64, "seed": -1}, "seed -1"),
        ({"batch_size": 64, "rank": 2, "world_size": 2}, "rank 2 is out of range 0..1"),
        ({"batch_size": 64, "world_size": 0}, "world size 0"),
        ({"batch_size": 64, "num_batches": 0}, "num_batches 0"),
    ],
)
def test_balanced_invalid_arguments(targets, options, match):
    with pytest.raises(ConfigError, match=match):
        BalancedBatchSampler(targets, **options)


def test_balanced_rejects_negative_epoch(targets):
    with pytest.raises(ConfigError, match="epoch -1"):
        BalancedBatchSampler(targets, 64).set_epoch(-1)


def test_balanced_rejects_3d_targets():
    with pytest.raises(ValueError, match="shape"):
        BalancedBatchSampler(np.zeros((4, 2, 2)), 4)


def test_shuffled_covers_each_index_once():
    batches = list(ShuffledBatchSampler(np.zeros((103, NUM_CLASSES)), 10, seed=1))
    assert len(batches) == 11
    assert [len(batch) for batch in batches][-2:] == [10, 3]
    assert sorted(np.concatenate(batches).tolist()) == list(range(103))


def test_shuffled_is_shuffled():
    indices = np.concatenate(list(ShuffledBatchSampler(np.zeros((103, NUM_CLASSES)), 10, seed=1)))
    assert indices.tolist() != list(range(103))


def test_shuffled_seed_and_epoch():
    sampler = ShuffledBatchSampler(np.zeros((50, NUM_CLASSES)), 8, seed=1)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch0 == list(ShuffledBatchSampler(np.zeros((50, NUM_CLASSES)), 8, seed=1))
    assert epoch0 != epoch1


def test_shuffled_ranks_disjoint_and_complete():
    targets = np.zeros((103, NUM_CLASSES))
    per_rank = [np.concatenate(list(ShuffledBatchSampler(targets, 8, rank=rank, world_size=3))) for rank in range(3)]
    # 103 examples padded by wrapping to 105 = 3 ranks x 35.
    assert [len(indices) for indices in per_rank] == [35, 35, 35]
    combined = np.concatenate(per_rank)
    assert set(combined.tolist()) == set(range(103))
    first_pass = np.sort(np.concatenate([indices[:34] for indices in per_rank]))
    assert len(np.unique(first_pass)) == len(first_pass)


def test_shuffled_ranks_equal_batch_counts():
    targets = np.zeros((103, NUM_CLASSES))
    counts = [len(list(ShuffledBatchSampler(targets, 8, rank=rank, world_size=3))) for rank in range(3)]
    assert counts == [math.ceil(103 / (8 * 3))] * 3
    assert counts == [len(ShuffledBatchSampler(targets, 8, rank=0, world_size=3))] * 3


def test_shuffled_explicit_num_batches_full():
    batches = list(ShuffledBatchSampler(np.zeros((30, NUM_CLASSES)), 8, num_batches=10))
    assert len(batches) == 10
    assert {len(batch) for batch in batches} == {8}


def test_shuffled_dataloader_with_workers():
    sampler = ShuffledBatchSampler(np.zeros((40, NUM_CLASSES)), 8, seed=2)
    loader = torch.utils.data.DataLoader(_IndexDataset(40), batch_sampler=sampler, num_workers=2)
    assert [batch.tolist() for batch in loader] == list(sampler)
