"""On-disk feature caches: every image of a split encoded once by the frozen backbone.

A cache folder `<cache_root>/<split>-<view>-<digest>/` contains

- tokens.npy      [N, T, W] float16, the image tokens of `Backbone.encode_images`;
- embeddings.npy  [N, E] float16, the pooled image embeddings;
- meta.json       the full fingerprint, shapes, image ids and per-shard sha256 checksums.

Row i belongs to `labels.split(split)[i]`. The digest is the sha256 of the
fingerprint: the backbone fingerprint (model, architecture, weights,
preprocessing), the sha256 of the label file, the split and the view
("plain", or "flip" for horizontally mirrored images). Any change of these
inputs selects another folder, and a folder whose meta.json disagrees with the
inputs is rebuilt.

Extraction runs in fixed shards of consecutive rows into `<key>.partial/`.
Each finished shard gets a marker file with its checksums, so a rerun after an
interruption skips finished shards. When all shards are done, meta.json is
written and the folder is renamed to `<key>/` in one step. A file lock
`<key>.lock` serialises concurrent builders of the same cache.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import mmap
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from filelock import FileLock, Timeout
from torch.utils.data import DataLoader

from .backbone import Backbone, sha256_file
from .classes import DEFAULT_PROMPT_TEMPLATE
from .errors import CacheError, WriteError
from .fileio import atomic_path, atomic_write_json
from .images import ImageDataset
from .labels import LabelFile, Sample
from .progress import progress_bar

logger = logging.getLogger(__name__)

# Version of the folder layout; a change makes older caches rebuild.
CACHE_FORMAT = 1
VIEWS = ("plain", "flip")
DEFAULT_SHARD_SIZE = 256
TOKENS_FILE = "tokens.npy"
EMBEDDINGS_FILE = "embeddings.npy"
META_FILE = "meta.json"
LAYOUT_FILE = "layout.json"
MARKER_DIR = "shards"
CACHE_DTYPE = np.float16
# Bytes hashed per read when checksumming rows, and the most one pread call requests.
HASH_CHUNK_BYTES = 16 << 20
PREAD_MAX_BYTES = 1 << 30


@dataclass
class FeatureCache:
    """A published feature cache, memory-mapped read-only."""

    root: Path
    image_ids: list[str]
    tokens: np.ndarray  # [N, T, W] float16 memmap
    embeddings: np.ndarray  # [N, E] float16 memmap
    meta: dict

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.meta["grid_size"])

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.meta["num_prefix_tokens"])


@dataclass(frozen=True)
class Shard:
    """Rows [start, stop) of a cache, extracted and checksummed as one unit."""

    index: int
    start: int
    stop: int


def plan_shards(num_samples: int, shard_size: int) -> list[Shard]:
    """Split rows 0..num_samples-1 into consecutive shards of `shard_size` (the last may be shorter)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    return [
        Shard(index, start, min(start + shard_size, num_samples))
        for index, start in enumerate(range(0, num_samples, shard_size))
    ]


def cache_fingerprint(
    backbone: Backbone, labels: LabelFile, *, split: str, view: str, image_root: str | os.PathLike
) -> dict:
    """Collect every input that determines the content of a feature cache, as JSON-ready values."""
    return {
        "format": CACHE_FORMAT,
        "backbone": backbone.fingerprint(),
        "labels_sha256": sha256_file(labels.path),
        "images": image_signature(labels, split, image_root),
        "split": split,
        "view": view,
    }


def image_signature(labels: LabelFile, split: str, image_root: str | os.PathLike) -> str:
    """sha256 over the file name, size and modification time of every image of a split.

    Replaced images (a regenerated demo data set, a fresh download) change the
    signature, so their cache is rebuilt, without reading every file's bytes.
    A missing file is left to the extraction, which names it.
    """
    digest = hashlib.sha256()
    root = Path(image_root)
    for sample in labels.split(split):
        try:
            status = (root / sample.file_name).stat()
            entry = f"{sample.file_name}\t{status.st_size}\t{status.st_mtime_ns}\n"
        except OSError:
            entry = f"{sample.file_name}\tmissing\n"
        digest.update(entry.encode())
    return digest.hexdigest()


def cache_key(fingerprint: dict) -> str:
    """Folder name of a cache: split, view and the first 20 hex digits of the fingerprint's sha256."""
    return f"{fingerprint['split']}-{fingerprint['view']}-{_sha256_json(fingerprint)[:20]}"


def build_cache(
    backbone: Backbone,
    labels: LabelFile,
    *,
    split: str,
    image_root: str | os.PathLike,
    cache_root: str | os.PathLike,
    view: str = "plain",
    batch_size: int = 64,
    workers: int = 0,
    verify: bool = True,
    shard_size: int = DEFAULT_SHARD_SIZE,
    rebuild: bool = False,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
) -> FeatureCache:
    """Return the feature cache of a split, extracting it first when needed.

    An existing cache is returned when its meta.json matches the fingerprint
    and, with `verify`, every shard checksum matches. Otherwise, or with
    `rebuild`, the split is extracted and published atomically. Extraction
    resumes the finished shards of an interrupted run. A damaged cache is
    logged as a warning and rebuilt. With `world_size` > 1, rank r extracts shards r,
    r + world_size, ... into the same files, and rank 0 publishes; `barrier`
    must then synchronise all ranks (for example torch.distributed.barrier).
    Every rank must call this function, and an error on one rank leaves the
    others waiting at the next barrier.
    """
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    samples = labels.split(split)
    cache_root = Path(cache_root).expanduser().resolve()
    cache_root.mkdir(parents=True, exist_ok=True)
    fingerprint = cache_fingerprint(backbone, labels, split=split, view=view, image_root=image_root)
    key = cache_key(fingerprint)
    final = cache_root / key
    image_ids = [sample.image_id for sample in samples]

    # With several ranks, rank 0 alone decides whether to build, so all ranks take the same branch.
    if world_size == 1 and not rebuild:
        cache = _open_if_valid(final, fingerprint, image_ids, verify=verify)
        if cache is not None:
            return cache

    builder = _Builder(
        backbone,
        samples,
        fingerprint=fingerprint,
        final=final,
        image_root=Path(image_root),
        shard_size=shard_size,
    )
    if world_size > 1:
        return _build_distributed(
            builder,
            rank=rank,
            world_size=world_size,
            barrier=barrier or (lambda: None),
            rebuild=rebuild,
            verify=verify,
            batch_size=batch_size,
            workers=workers,
            progress=progress,
        )

    with _locked(cache_root / f"{key}.lock", key) as waited:
        if waited and not rebuild:
            # Another process held the lock, most likely while building this cache.
            cache = _open_if_valid(final, fingerprint, image_ids, verify=verify)
            if cache is not None:
                return cache
        builder.prepare()
        builder.extract(builder.pending_shards(), batch_size=batch_size, workers=workers, progress=progress)
        builder.publish()
    return open_cache(final, fingerprint=fingerprint, verify=False)


def open_cache(root: str | os.PathLike, *, fingerprint: dict | None = None, verify: bool = True) -> FeatureCache:
    """Open a published cache folder read-only.

    Raises CacheError naming the file when meta.json is missing or unreadable,
    when it does not match `fingerprint` (if given), when an array's shape or
    dtype differs from meta.json, or (with `verify`) when a shard checksum
    does not match.
    """
    root = Path(root)
    meta_path = root / META_FILE
    if not meta_path.is_file():
        raise CacheError(f"{meta_path} not found: the cache at {root} is incomplete; rebuild it")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CacheError(f"could not read {meta_path}: {error}; rebuild the cache") from error

    if meta.get("format") != CACHE_FORMAT:
        raise CacheError(
            f"{meta_path} has cache format {meta.get('format')!r}, this version reads format {CACHE_FORMAT}; "
            "rebuild the cache"
        )
    if fingerprint is not None:
        expected = _json_roundtrip(fingerprint)
        if meta.get("fingerprint") != expected:
            differing = sorted(
                name
                for name in set(expected) | set(meta.get("fingerprint", {}))
                if expected.get(name) != meta.get("fingerprint", {}).get(name)
            )
            raise CacheError(
                f"{meta_path} was built from other inputs (differing: {', '.join(differing)}); rebuild the cache"
            )

    tokens = _load_array(root / TOKENS_FILE, meta["tokens_shape"])
    embeddings = _load_array(root / EMBEDDINGS_FILE, meta["embeddings_shape"])
    if verify:
        for shard in meta["shards"]:
            _verify_shard(root, tokens, embeddings, shard)

    return FeatureCache(
        root=root,
        image_ids=list(meta["image_ids"]),
        tokens=tokens,
        embeddings=embeddings,
        meta=meta,
    )


def prompt_embeddings(
    backbone: Backbone,
    class_names: Sequence[str],
    *,
    template: str = DEFAULT_PROMPT_TEMPLATE,
    cache_root: str | os.PathLike,
) -> np.ndarray:
    """Return the [C, E] float32 prompt embeddings, computed once per backbone, template and class list.

    They are stored as `<cache_root>/prompts-<digest>.npy` beside a JSON file
    that records the inputs and the sha256 of the array file. A stored file
    that fails that check is recomputed.
    """
    fingerprint = {
        "format": CACHE_FORMAT,
        "backbone": backbone.fingerprint(),
        "template": template,
        "class_names": list(class_names),
    }
    cache_root = Path(cache_root).expanduser().resolve()
    key = f"prompts-{_sha256_json(fingerprint)[:20]}"
    array_path = cache_root / f"{key}.npy"
    meta_path = cache_root / f"{key}.json"

    stored = _read_prompt_embeddings(array_path, meta_path, fingerprint)
    if stored is not None:
        return stored

    embeddings = backbone.encode_prompts(list(class_names), template).cpu().numpy().astype(np.float32)
    cache_root.mkdir(parents=True, exist_ok=True)
    with atomic_path(array_path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, embeddings)
    atomic_write_json(meta_path, {"fingerprint": fingerprint, "sha256": sha256_file(array_path)})
    logger.info("stored %d prompt embeddings in %s", len(embeddings), array_path)
    return embeddings


class _Builder:
    """Extraction of one cache into its `<key>.partial/` folder, shard by shard."""

    def __init__(
        self,
        backbone: Backbone,
        samples: Sequence[Sample],
        *,
        fingerprint: dict,
        final: Path,
        image_root: Path,
        shard_size: int,
    ):
        self.backbone = backbone
        self.samples = list(samples)
        self.fingerprint = fingerprint
        self.final = final
        self.partial = final.with_name(final.name + ".partial")
        self.image_root = image_root
        self.shards = plan_shards(len(self.samples), shard_size)
        count = len(self.samples)
        self.layout = _json_roundtrip(
            {
                "fingerprint": fingerprint,
                "image_ids": [sample.image_id for sample in self.samples],
                "shard_size": shard_size,
                "tokens_shape": [count, backbone.num_tokens, backbone.token_width],
                "embeddings_shape": [count, backbone.embed_dim],
            }
        )
        self._tokens: np.ndarray | None = None
        self._embeddings: np.ndarray | None = None

    @property
    def marker_dir(self) -> Path:
        return self.partial / MARKER_DIR

    def prepare(self) -> None:
        """Create `<key>.partial/` with preallocated arrays, or keep the one an interrupted run left."""
        for stale in self.final.parent.glob(f"{self.final.name}.old-*"):
            shutil.rmtree(stale, ignore_errors=True)

        if self.partial.is_dir() and (self.partial / META_FILE).is_file():
            # An earlier run wrote meta.json but stopped before the rename.
            try:
                open_cache(self.partial, fingerprint=self.fingerprint, verify=True)
                return
            except CacheError as error:
                logger.warning("discarding %s: %s", self.partial, error)
                shutil.rmtree(self.partial)
        elif self.partial.is_dir() and self._read_layout() != self.layout:
            logger.warning("discarding %s: it was started with other inputs or never finished allocating", self.partial)
            shutil.rmtree(self.partial)

        if not self.partial.is_dir():
            self.partial.mkdir(parents=True)
            self.marker_dir.mkdir()
            _allocate(self.partial / TOKENS_FILE, self.layout["tokens_shape"])
            _allocate(self.partial / EMBEDDINGS_FILE, self.layout["embeddings_shape"])
            # Written last: a partial folder without it never finished allocating.
            atomic_write_json(self.partial / LAYOUT_FILE, self.layout)

    def is_prepared(self) -> bool:
        return self.partial.is_dir()

    def is_complete(self) -> bool:
        return (self.partial / META_FILE).is_file()

    def pending_shards(self, *, rank: int = 0, world_size: int = 1) -> list[Shard]:
        """Shards of this rank (rank, rank + world_size, ...) without a verified marker."""
        if self.is_complete():
            return []
        self._open_arrays()
        pending = []
        for shard in self.shards[rank::world_size]:
            marker = self._read_marker(shard)
            if marker is None:
                pending.append(shard)
                continue
            try:
                _verify_shard(self.partial, self._tokens, self._embeddings, marker)
            except CacheError as error:
                logger.warning("re-extracting shard %d: %s", shard.index, error)
                pending.append(shard)
        return pending

    def extract(self, shards: Sequence[Shard], *, batch_size: int, workers: int, progress: bool) -> None:
        """Encode the images of `shards`, write their rows and mark each shard finished."""
        key = self.final.name
        if not shards:
            logger.info("cache %s: no shards left to extract in this process", key)
            return
        logger.info(
            "cache %s: extracting %d images in %d of its %d shards",
            key,
            sum(shard.stop - shard.start for shard in shards),
            len(shards),
            len(self.shards),
        )

        self._open_arrays()
        batches = [
            (shard, start, min(start + batch_size, shard.stop))
            for shard in shards
            for start in range(shard.start, shard.stop, batch_size)
        ]
        dataset = ImageDataset(
            self.samples, self.image_root, self.backbone.preprocess, flip=self.fingerprint["view"] == "flip"
        )
        loader = DataLoader(
            dataset,
            batch_sampler=[list(range(start, stop)) for _, start, stop in batches],
            num_workers=workers,
            pin_memory=self.backbone.device.type == "cuda",
        )

        started = time.perf_counter()
        total = sum(stop - start for _, start, stop in batches)
        with progress_bar(total=total, unit="img", desc=key, enabled=progress) as bar:
            for (shard, start, stop), (images, indices) in zip(batches, loader):
                first, last = int(indices[0]), int(indices[-1])
                if (first, last) != (start, stop - 1):
                    raise CacheError(f"data loader returned rows {first}..{last}, expected {start}..{stop - 1}")
                self._write_rows(start, stop, images)
                bar.update(stop - start)
                if stop == shard.stop:
                    self._finish_shard(shard)

        elapsed = time.perf_counter() - started
        logger.info("cache %s: extracted %d images in %.1f s (%.0f images/s)", key, total, elapsed, total / max(elapsed, 1e-9))

    def publish(self, *, verify: bool = False) -> None:
        """Write meta.json and rename `<key>.partial/` to `<key>/`, replacing an older folder there."""
        if not self.is_complete():
            self._write_meta(verify=verify)
        # meta.json now records the shard checksums, so the markers and the layout are redundant.
        shutil.rmtree(self.marker_dir, ignore_errors=True)
        (self.partial / LAYOUT_FILE).unlink(missing_ok=True)

        self._close_arrays()
        if self.final.exists():
            old = self.final.with_name(f"{self.final.name}.old-{os.getpid()}")
            os.replace(self.final, old)
            os.replace(self.partial, self.final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.partial, self.final)
        logger.info("published feature cache %s", self.final)

    def _write_meta(self, *, verify: bool) -> None:
        self._open_arrays()
        shard_records = []
        for shard in self.shards:
            marker = self._read_marker(shard)
            if marker is None:
                raise CacheError(
                    f"shard {shard.index} (rows {shard.start}..{shard.stop - 1}) of {self.partial} has no marker "
                    "file; a rank did not finish its shards. Rerun to resume the extraction"
                )
            if verify:
                _verify_shard(self.partial, self._tokens, self._embeddings, marker)
            shard_records.append(marker)

        backbone = self.backbone
        meta = {
            "format": CACHE_FORMAT,
            "fingerprint": self.layout["fingerprint"],
            "key": self.final.name,
            "split": self.fingerprint["split"],
            "view": self.fingerprint["view"],
            "image_ids": self.layout["image_ids"],
            "tokens_shape": self.layout["tokens_shape"],
            "embeddings_shape": self.layout["embeddings_shape"],
            "dtype": np.dtype(CACHE_DTYPE).name,
            "grid_size": list(backbone.grid_size),
            "num_prefix_tokens": backbone.num_prefix_tokens,
            "shard_size": self.layout["shard_size"],
            "shards": shard_records,
            "backbone_name": backbone.name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        atomic_write_json(self.partial / META_FILE, meta)

    def _write_rows(self, start: int, stop: int, images: torch.Tensor) -> None:
        tokens, embeddings = self.backbone.encode_images(images)
        tokens = tokens.cpu().numpy().astype(CACHE_DTYPE)
        embeddings = embeddings.cpu().numpy().astype(CACHE_DTYPE)
        if not (np.isfinite(tokens).all() and np.isfinite(embeddings).all()):
            ids = [self.samples[row].image_id for row in range(start, stop)]
            raise CacheError(
                f"image features of images {ids[:5]} are not finite in float16 (values beyond +-65504 or NaN); "
                f"backbone {self.backbone.name} cannot be cached in float16"
            )
        self._tokens[start:stop] = tokens
        self._embeddings[start:stop] = embeddings

    def _finish_shard(self, shard: Shard) -> None:
        # Flush before the marker, so a marker never points at rows that are not on disk.
        for path, array in ((TOKENS_FILE, self._tokens), (EMBEDDINGS_FILE, self._embeddings)):
            try:
                array.flush()
            except OSError as error:
                raise WriteError(
                    f"could not write {self.partial / path}: {error.strerror or error}; "
                    "free disk space and rerun to resume"
                ) from error
        marker = {
            "index": shard.index,
            "start": shard.start,
            "stop": shard.stop,
            "tokens_sha256": _rows_sha256(self._tokens, shard.start, shard.stop),
            "embeddings_sha256": _rows_sha256(self._embeddings, shard.start, shard.stop),
        }
        atomic_write_json(self._marker_path(shard), marker)

    def _marker_path(self, shard: Shard) -> Path:
        return self.marker_dir / f"{shard.index:06d}.json"

    def _read_marker(self, shard: Shard) -> dict | None:
        path = self._marker_path(shard)
        try:
            marker = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            logger.warning("ignoring unreadable shard marker %s: %s", path, error)
            return None
        if (marker.get("start"), marker.get("stop")) != (shard.start, shard.stop):
            logger.warning("ignoring shard marker %s with rows other than %d..%d", path, shard.start, shard.stop - 1)
            return None
        return marker

    def _read_layout(self) -> dict | None:
        try:
            return json.loads((self.partial / LAYOUT_FILE).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None

    def _open_arrays(self) -> None:
        if self._tokens is None:
            self._tokens = np.load(self.partial / TOKENS_FILE, mmap_mode="r+")
            self._embeddings = np.load(self.partial / EMBEDDINGS_FILE, mmap_mode="r+")

    def _close_arrays(self) -> None:
        self._tokens = None
        self._embeddings = None


def _build_distributed(
    builder: _Builder,
    *,
    rank: int,
    world_size: int,
    barrier: Callable[[], None],
    rebuild: bool,
    verify: bool,
    batch_size: int,
    workers: int,
    progress: bool,
) -> FeatureCache:
    """Extract with several ranks: rank 0 prepares and publishes, every rank extracts its shards.

    Rank 0 holds the file lock from preparation to publication. After the first
    barrier every rank finds the prepared partial folder exactly when rank 0
    decided to build, so all ranks take the same branch.
    """
    final = builder.final
    key = final.name
    image_ids = [sample.image_id for sample in builder.samples]

    with contextlib.ExitStack() as stack:
        if rank == 0:
            stack.enter_context(_locked(final.parent / f"{key}.lock", key))
            current = None if rebuild else _open_if_valid(final, builder.fingerprint, image_ids, verify=verify)
            if current is None:
                builder.prepare()
            elif builder.partial.exists():
                shutil.rmtree(builder.partial)
        barrier()

        if builder.is_prepared():
            shards = builder.pending_shards(rank=rank, world_size=world_size)
            builder.extract(shards, batch_size=batch_size, workers=workers, progress=progress and rank == 0)
            builder._close_arrays()
            barrier()
            if rank == 0:
                builder.publish(verify=True)
        barrier()

    # NOTE: ranks on other hosts see rank 0's files only through a shared file system.
    return open_cache(final, fingerprint=builder.fingerprint, verify=False)


def _open_if_valid(final: Path, fingerprint: dict, image_ids: list[str], *, verify: bool) -> FeatureCache | None:
    """Open the cache at `final`, or return None when it is absent, damaged or built from other inputs.

    A damaged or mismatched cache is logged as a warning.
    """
    if not final.exists():
        return None
    try:
        cache = open_cache(final, fingerprint=fingerprint, verify=verify)
    except CacheError as error:
        logger.warning("rebuilding feature cache %s: %s", final.name, error)
        return None
    if cache.image_ids != image_ids:
        logger.warning("rebuilding feature cache %s: its image ids differ from the split", final.name)
        return None
    logger.info("using feature cache %s (%d images)", final, len(cache))
    return cache


@contextlib.contextmanager
def _locked(path: Path, key: str) -> Iterator[bool]:
    """Hold the file lock at `path`; yield whether another process held it first."""
    lock = FileLock(str(path))
    waited = False
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("waiting for another process that builds feature cache %s (lock %s)", key, path)
        lock.acquire()
        waited = True
    try:
        yield waited
    finally:
        lock.release()


def _allocate(path: Path, shape: list[int]) -> None:
    """Create a float16 .npy file of `shape` and reserve its disk blocks."""
    nbytes = int(np.prod(shape)) * np.dtype(CACHE_DTYPE).itemsize
    free = shutil.disk_usage(path.parent).free
    if nbytes > free:
        raise WriteError(
            f"could not allocate {path}: it needs {nbytes / 1e9:.2f} GB and {free / 1e9:.2f} GB are free; "
            "free disk space or choose another cache folder, then rerun"
        )
    try:
        array = np.lib.format.open_memmap(path, mode="w+", dtype=CACHE_DTYPE, shape=tuple(shape))
        del array
        _reserve_blocks(path)
    except OSError as error:
        raise WriteError(
            f"could not allocate {path} ({nbytes / 1e9:.2f} GB): {error.strerror or error}; "
            "free disk space or choose another cache folder, then rerun"
        ) from error


def _reserve_blocks(path: Path) -> None:
    # open_memmap creates a sparse file. Without reserved blocks, a full disk
    # would surface as SIGBUS while rows are written through the memory map.
    with open(path, "r+b") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
        except OSError as error:
            if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            # NOTE: this file system cannot reserve blocks; a full disk shows as SIGBUS during extraction.
            logger.debug("cannot reserve disk blocks for %s: %s", path, error)


def _load_array(path: Path, shape: list[int]) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as error:
        raise CacheError(f"could not read {path}: {error}; rebuild the cache") from error
    if list(array.shape) != list(shape) or array.dtype != CACHE_DTYPE:
        raise CacheError(
            f"{path} contains {array.dtype} {list(array.shape)}, meta.json expects "
            f"{np.dtype(CACHE_DTYPE).name} {list(shape)}; rebuild the cache"
        )
    return array


def _verify_shard(root: Path, tokens: np.ndarray, embeddings: np.ndarray, shard: dict) -> None:
    start, stop = shard["start"], shard["stop"]
    for name, array, expected in (
        (TOKENS_FILE, tokens, shard["tokens_sha256"]),
        (EMBEDDINGS_FILE, embeddings, shard["embeddings_sha256"]),
    ):
        if _rows_sha256(array, start, stop) != expected:
            raise CacheError(
                f"{root / name} rows {start}..{stop - 1} do not match their sha256 checksum: the file is damaged"
            )


def _rows_sha256(array: np.ndarray, start: int, stop: int) -> str:
    digest = hashlib.sha256()
    row_bytes = max(1, int(np.prod(array.shape[1:])) * array.dtype.itemsize)
    step = max(1, HASH_CHUNK_BYTES // row_bytes)
    for first in range(start, stop, step):
        digest.update(read_rows(array, np.arange(first, min(first + step, stop))).data)
    return digest.hexdigest()


def read_rows(array: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Copy rows of a cache array into a new in-memory array [len(rows), ...].

    `rows` are sorted, unique row indices. For an array that np.load memory-maps
    from a .npy file the bytes are read with os.preadv, one call per run of
    consecutive rows, so the file's pages never stay mapped in this process
    and its resident memory stays at the rows read, whatever the cache size.
    Any other array is indexed directly.
    """
    rows = np.asarray(rows, dtype=np.int64)
    mapped = isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap) and array.filename
    if not (mapped and array.flags.c_contiguous and hasattr(os, "preadv")):
        return np.array(array[rows])

    out = np.empty((len(rows),) + array.shape[1:], dtype=array.dtype)
    if len(rows) == 0:
        return out
    row_bytes = out[0].nbytes
    buffer = memoryview(out.reshape(-1).view(np.uint8))
    # Runs of consecutive rows: [rows[b], rows[e - 1]] for each (b, e).
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    bounds = zip(np.concatenate([[0], breaks]), np.concatenate([breaks, [len(rows)]]))
    descriptor = os.open(array.filename, os.O_RDONLY)
    try:
        for begin, end in bounds:
            _pread_exact(
                descriptor,
                buffer[int(begin) * row_bytes : int(end) * row_bytes],
                array.offset + int(rows[begin]) * row_bytes,
                path=array.filename,
            )
    finally:
        os.close(descriptor)
    return out


def _pread_exact(descriptor: int, buffer: memoryview, offset: int, *, path: str) -> None:
    """Fill `buffer` from the file at `offset`; raise CacheError when the file ends first."""
    done = 0
    while done < len(buffer):
        count = os.preadv(descriptor, [buffer[done : done + PREAD_MAX_BYTES]], offset + done)
        if count == 0:
            raise CacheError(f"{path} ends before byte {offset + len(buffer)}: the file is truncated; rebuild the cache")
        done += count


def _read_prompt_embeddings(array_path: Path, meta_path: Path, fingerprint: dict) -> np.ndarray | None:
    if not (array_path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("fingerprint") != _json_roundtrip(fingerprint):
            raise CacheError(f"{meta_path} was written for other inputs")
        if meta.get("sha256") != sha256_file(array_path):
            raise CacheError(f"{array_path} does not match its sha256 checksum: the file is damaged")
        embeddings = np.load(array_path)
    except (CacheError, OSError, ValueError) as error:
        logger.warning("recomputing prompt embeddings: %s", error)
        return None
    return embeddings


def _json_roundtrip(value: dict) -> dict:
    return json.loads(json.dumps(value))


def _sha256_json(value: dict) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
