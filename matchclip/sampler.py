"""Seeded batch samplers for multi-label training, rank-aware for distributed runs.

`BalancedBatchSampler` oversamples rare classes: every batch contains at least
one positive example of every class that has training examples. The rest of
each batch is filled from a seeded shuffled pass over all examples.
`ShuffledBatchSampler` yields plain seeded shuffled batches.

Both are meant to be passed as `DataLoader(batch_sampler=...)`. The sampler is
iterated in the main process, so DataLoader workers never touch its state.
Every random draw comes from a `numpy.random.Generator` derived from
(seed, epoch, rank) and never from a global RNG. The batches of an epoch are
therefore a pure function of those values, and a run resumed at an epoch
boundary replays them exactly.
"""

from __future__ import annotations

import collections
import logging
import math
from typing import Iterator

import numpy as np
import torch

from .errors import ConfigError

_logger = logging.getLogger(__name__)

# Independent random streams derived from one seed; the ids only have to differ.
_SHARED_FILL_STREAM = 1
_RANK_STREAM = 2
_SHUFFLE_STREAM = 3


def _generator(seed: int, *key: int) -> np.random.Generator:
    """Return a Generator for `seed` and the stream `key` (stream id, epoch, ...)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _as_targets(targets) -> np.ndarray:
    """Return `targets` as a bool positive mask [N, C]; 1-D input becomes [N, 1]."""
    if isinstance(targets, torch.Tensor):
        targets = targets.detach().cpu().numpy()
    array = np.asarray(targets)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2:
        raise ValueError(
            f"targets must be a multi-hot array [num_examples, num_classes]; "
            f"got shape {array.shape}"
        )
    if array.shape[0] == 0:
        raise ValueError("targets has no examples; a batch sampler needs at least one example")
    return array > 0


class _SeededBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Argument checks, epoch handling and length shared by both samplers."""

    def __init__(
        self,
        targets,
        batch_size: int,
        *,
        seed: int = 0,
        num_batches: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.positives = _as_targets(targets)
        self.num_examples = int(self.positives.shape[0])

        if int(batch_size) != batch_size or batch_size < 1:
            raise ConfigError(f"batch size {batch_size!r} is invalid; use a positive integer")
        if int(seed) != seed or seed < 0:
            raise ConfigError(f"sampler seed {seed!r} is invalid; use an integer >= 0")
        if int(world_size) != world_size or world_size < 1:
            raise ConfigError(f"world size {world_size!r} is invalid; use an integer >= 1")
        if int(rank) != rank or not 0 <= rank < world_size:
            raise ConfigError(
                f"rank {rank!r} is out of range 0..{world_size - 1} for world size {world_size}"
            )
        if num_batches is not None and (int(num_batches) != num_batches or num_batches < 1):
            raise ConfigError(
                f"num_batches {num_batches!r} is invalid; use a positive integer or None "
                "for one pass over the data per epoch"
            )

        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.default_length = num_batches is None
        self.num_batches = (
            int(num_batches)
            if num_batches is not None
            else math.ceil(self.num_examples / (self.batch_size * self.world_size))
        )
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the batches of `epoch`; call before iterating each epoch."""
        if int(epoch) != epoch or epoch < 0:
            raise ConfigError(f"epoch {epoch!r} is invalid; use an integer >= 0")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches


class ShuffledBatchSampler(_SeededBatchSampler):
    """Plain seeded shuffled batches, without any class guarantee.

    All ranks share one permutation of the examples per pass and take
    interleaved slices of it, so ranks see disjoint examples within a pass.
    With the default `num_batches`, each rank gets ceil(N / world_size)
    indices: one pass, padded by wrapping into the next shuffled pass so that
    every rank yields the same number of batches. The last batch can be
    smaller than `batch_size`. With an explicit `num_batches`, every batch is
    full and passes repeat as often as needed.
    """

    def __iter__(self) -> Iterator[list[int]]:
        if self.default_length:
            per_rank = math.ceil(self.num_examples / self.world_size)
        else:
            per_rank = self.num_batches * self.batch_size

        total = per_rank * self.world_size
        passes = math.ceil(total / self.num_examples)
        permutations = [
            _generator(self.seed, _SHUFFLE_STREAM, self.epoch, index).permutation(self.num_examples)
            for index in range(passes)
        ]
        indices = np.concatenate(permutations)[:total][self.rank :: self.world_size]

        for start in range(0, per_rank, self.batch_size):
            yield indices[start : start + self.batch_size].tolist()


class _ClassQueue:
    """Cycle through the positive examples of one class in reshuffled rounds.

    Rare-class examples rotate: each is used once before any repeats.
    """

    def __init__(self, members: np.ndarray, rng: np.random.Generator) -> None:
        self.members = members
        self.rng = rng
        self.order = rng.permutation(members)
        self.position = 0

    def next(self) -> int:
        if self.position == len(self.order):
            self.order = self.rng.permutation(self.members)
            self.position = 0
        index = int(self.order[self.position])
        self.position += 1
        return index


class _FillStream:
    """This rank's share of the shuffled passes over all examples.

    Pass p is one permutation shared by all ranks (seeded by seed, epoch and
    p), and rank r takes its elements r, r + world_size, ... Examples that are
    already in the batch being built are deferred to the next batch rather than
    dropped, so each example still appears about once per pass.
    """

    def __init__(self, *, seed: int, epoch: int, num_examples: int, rank: int, world_size: int):
        self.seed = seed
        self.epoch = epoch
        self.num_examples = num_examples
        self.rank = rank
        self.world_size = world_size
        self.pass_index = 0
        self.current: collections.deque[int] = collections.deque()
        self.deferred: collections.deque[int] = collections.deque()

    def _next_from_passes(self) -> int:
        while not self.current:
            permutation = _generator(
                self.seed, _SHARED_FILL_STREAM, self.epoch, self.pass_index
            ).permutation(self.num_examples)
            self.current.extend(permutation[self.rank :: self.world_size].tolist())
            self.pass_index += 1
        return self.current.popleft()

    def take(self, exclude: set[int], skipped: list[int]) -> int | None:
        """Return the next index not in `exclude`, or None if none is reachable.

        Skipped indices go to `skipped`; the caller defers them with `defer`.
        """
        share = math.ceil(self.num_examples / self.world_size)
        for _ in range(len(self.deferred) + share + 1):
            if self.deferred:
                candidate = self.deferred.popleft()
            else:
                candidate = self._next_from_passes()
            if candidate not in exclude:
                return candidate
            skipped.append(candidate)
        return None

    def defer(self, skipped: list[int]) -> None:
        pending = set(self.deferred)
        for index in skipped:
            if index not in pending:
                self.deferred.append(index)
                pending.add(index)


class BalancedBatchSampler(_SeededBatchSampler):
    """Multi-label batches that contain every class with training examples.

    Each batch is built in two parts:

    1. Coverage: classes are visited in a random order. A class already
       covered by an example picked earlier in the batch is skipped (an example
       covers all of its labels). Otherwise the next example from that class's
       shuffled queue is added. Queues cycle, so the 1-2 examples of a rare
       class take turns.
    2. Fill: the remaining slots come from this rank's share of a seeded
       shuffled pass over all examples, drawn without replacement, so no
       example repeats in the fill part of an epoch before the rank's whole
       share has been drawn.

    NOTE: with the default `num_batches` the coverage part takes some slots of
    every batch, so the fill part of one epoch reaches only part of the pass
    (about fill slots / N). Each epoch shuffles a new pass, so over epochs
    every example is drawn equally often in expectation.

    A batch repeats an index only when the dataset has fewer examples than
    `batch_size`. The example order inside each batch is shuffled. Each rank
    draws coverage picks from its own random stream and fill examples from its
    own slice of the shared pass. Every rank yields `num_batches` batches of
    exactly `batch_size` indices. The default `num_batches` is
    ceil(N / (batch_size * world_size)).

    Raises ConfigError when `batch_size` is smaller than the number of classes
    with at least one positive example, since such a batch cannot hold one
    example per class.
    """

    def __init__(
        self,
        targets,
        batch_size: int,
        *,
        seed: int = 0,
        num_batches: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(
            targets, batch_size, seed=seed, num_batches=num_batches, rank=rank, world_size=world_size
        )

        counts = self.positives.sum(axis=0)
        self.balanced_classes = np.flatnonzero(counts > 0)
        self.class_members = {
            int(label): np.flatnonzero(self.positives[:, label]) for label in self.balanced_classes
        }
        if self.batch_size < len(self.balanced_classes):
            raise ConfigError(
                f"batch size {self.batch_size} is smaller than the {len(self.balanced_classes)} "
                "classes that have training examples, so a class-balanced batch cannot hold "
                f"one example of each class; raise --batch-size to at least "
                f"{len(self.balanced_classes)} or disable class-balanced sampling"
            )
        if len(self.balanced_classes) == 0:
            _logger.warning(
                "no class has a positive training example, so class-balanced batches "
                "are plain shuffled batches"
            )

    def __iter__(self) -> Iterator[list[int]]:
        rng = _generator(self.seed, _RANK_STREAM, self.epoch, self.rank)
        queues = {label: _ClassQueue(members, rng) for label, members in self.class_members.items()}
        fill = _FillStream(
            seed=self.seed,
            epoch=self.epoch,
            num_examples=self.num_examples,
            rank=self.rank,
            world_size=self.world_size,
        )

        for _ in range(self.num_batches):
            batch = self._cover_classes(queues, rng)
            self._fill_batch(batch, fill, rng)
            yield rng.permutation(batch).tolist()

    def _cover_classes(self, queues: dict[int, _ClassQueue], rng: np.random.Generator) -> list[int]:
        """Pick examples until every class with training examples is covered."""
        covered = np.zeros(self.positives.shape[1], dtype=bool)
        batch: list[int] = []
        for label in rng.permutation(self.balanced_classes).tolist():
            if covered[label]:
                continue

            # No index repeats here: any example with this label in the batch
            # would already have covered it.
            index = queues[label].next()
            batch.append(index)
            covered |= self.positives[index]
        return batch

    def _fill_batch(self, batch: list[int], fill: _FillStream, rng: np.random.Generator) -> None:
        """Append fill examples to `batch` until it contains `batch_size` indices."""
        in_batch = set(batch)
        skipped: list[int] = []
        share_exhausted = False
        while len(batch) < self.batch_size:
            index = None if share_exhausted else fill.take(in_batch, skipped)
            if index is None:
                share_exhausted = True
                index = self._fallback_index(in_batch, rng)
            batch.append(index)
            in_batch.add(index)
        fill.defer(skipped)

    def _fallback_index(self, in_batch: set[int], rng: np.random.Generator) -> int:
        """Draw an index outside this rank's fill share when the share is exhausted.

        Happens only when the rank's share of examples is smaller than a batch;
        duplicates follow only when the whole dataset is smaller than a batch.
        """
        unused = np.setdiff1d(np.arange(self.num_examples), np.fromiter(in_batch, dtype=np.int64))
        if len(unused) > 0:
            return int(rng.choice(unused))
        return int(rng.integers(self.num_examples))
