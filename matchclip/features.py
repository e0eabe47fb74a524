"""Datasets that feed the trained head: cached tokens, or images encoded on the fly.

Both return whole batches. The cached path reads rows of a memory-mapped
feature cache, so memory stays at one batch whatever the cache size; the
image path decodes and augments images and is used for augmentations that a
cache cannot express (AutoAugment, RandAugment) and for the ResNet baseline.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .cache import read_rows
from .images import ImageDataset
from .labels import Sample
from .seeding import epoch_generator

# Stream ids for epoch_generator, so flip choices never reuse the sampler's draws.
FLIP_STREAM = 7


class CachedFeatureDataset(Dataset):
    """Rows of a feature cache as batches.

    `__getitems__` receives a whole batch of indices (torch's DataLoader calls
    it when a dataset defines it) and returns a dict with
    `image_tokens` [B, T, W] float32, `image_embeddings` [B, E] float32,
    `targets` [B, C] float32 and `index` [B] int64.

    With a flipped cache given and `flip_probability` > 0, each sample is read
    from the flipped view with that probability; the choice depends only on
    (seed, epoch, index), so a resumed run reads the same views.
    """

    def __init__(
        self,
        plain,
        targets: np.ndarray,
        *,
        flipped=None,
        flip_probability: float = 0.0,
        seed: int = 0,
    ):
        if flip_probability > 0 and flipped is None:
            raise ValueError("flip_probability > 0 needs the flipped feature cache")
        self.plain = plain
        self.flipped = flipped
        self.targets = np.asarray(targets, dtype=np.float32)
        self.flip_probability = flip_probability
        self.seed = seed
        self.flip_mask = np.zeros(len(self.targets), dtype=bool)

    def __len__(self) -> int:
        return len(self.targets)

    def set_epoch(self, epoch: int) -> None:
        if self.flip_probability > 0:
            rng = epoch_generator(self.seed, epoch, FLIP_STREAM)
            self.flip_mask = rng.random(len(self.targets)) < self.flip_probability

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        batch = self.__getitems__([index])
        return {key: value[0] for key, value in batch.items()}

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        indices = np.asarray(indices, dtype=np.int64)
        tokens = self._read(indices, "tokens")
        embeddings = self._read(indices, "embeddings")
        return {
            "image_tokens": torch.from_numpy(tokens),
            "image_embeddings": torch.from_numpy(embeddings),
            "targets": torch.from_numpy(self.targets[indices]),
            "index": torch.from_numpy(indices),
        }

    def _read(self, indices: np.ndarray, field: str) -> np.ndarray:
        # Sorted, unique row reads are sequential on disk; the result is put
        # back into batch order afterwards. read_rows copies the rows with
        # pread, so memory stays at one batch however large the cache.
        unique, inverse = np.unique(indices, return_inverse=True)
        rows = read_rows(getattr(self.plain, field), unique).astype(np.float32)
        flip = self.flip_mask[unique]
        if flip.any():
            rows[flip] = read_rows(getattr(self.flipped, field), unique[flip]).astype(np.float32)
        return rows[inverse]


class ImageBatchDataset(Dataset):
    """Decoded, transformed images with their targets, returned as batches.

    Each item is a dict with `images` [3, H, W], `targets` [C] and `index`;
    torch's default collate stacks them into a batch.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        image_root,
        transform: Callable,
        targets: np.ndarray,
    ):
        self.images = ImageDataset(samples, image_root, transform)
        self.targets = np.asarray(targets, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        """Present for symmetry with CachedFeatureDataset; augmentation draws from torch's RNG."""

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image, _ = self.images[index]
        return {
            "images": image,
            "targets": torch.from_numpy(self.targets[index]),
            "index": torch.tensor(index, dtype=torch.int64),
        }


def collate_batch(batch):
    """Collate for DataLoader: pass through dicts built by __getitems__, stack the rest."""
    if isinstance(batch, dict):
        return batch
    return torch.utils.data.default_collate(batch)
