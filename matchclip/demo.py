"""Synthetic demo data set in the PSG classification format.

The demo lets every notebook and test run on a CPU without the COCO images.
It writes a label file `psg_cls_basic.json` with the 56 PSG predicate names
and JPEG images under `coco/train2017` (train) and `coco/val2017` (val and
test), so the loaders for the real data read it unchanged.

Each scored class 6..55 is drawn as its own arrangement of two coloured
objects: one of the 10 unordered pairs of 5 colours, in one of 5 spatial
arrangements ("red left of green", "blue inside yellow", ...). Classes 0..5
never occur, as in PSG.

An image is 224 px. A 3x3 grid of 64 px cells starts one 32 px patch from
the top-left corner, so every cell is exactly 2x2 patches of a patch-32 ViT
at 224 px. Each labelled relation takes its own cell and is drawn inside one
random patch of it: two small objects side by side or stacked, or one object
nested in a larger one. Cells without a relation stay background. Class
frequencies follow a Zipf-like long tail: in train the commonest class is in
55% of the images and the rarest in about 1.1%.

NOTE: the demo backbone has random weights, so its patch embedding is a
random linear map of each 32 px patch, and every nuisance inside a patch
(position jitter, size changes, colour jitter, stray objects) changes the
patch token in ways the head must learn to ignore. The drawing is therefore
nearly canonical inside its patch, and the image, the cell and the patch inside
the cell carry the variation. Val mean recall@3 over classes 6..55, with
1,000 train and 200 val images (train frequency prior: 0.06):

- the demo profile (12 epochs, lr 2e-3, no dropout, output biases at the
  class prior): 0.30 to 0.38 over three revisions of the training code;
- the same without the prior biases (20 epochs): 0.06;
- dropout 0.1, no prior biases, lr 3e-3, 30 epochs: 0.27; adding a lone
  distractor object to half of the empty cells: 0.07; drawing with 3 px
  position jitter, 10 to 12 px objects and colour jitter 20: 0.14.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from . import paths
from .classes import FIRST_SCORED_CLASS, NUM_CLASSES, PREDICATE_CLASSES
from .errors import ConfigError
from .progress import progress_bar

if TYPE_CHECKING:
    import pandas

_logger = logging.getLogger(__name__)

# Bump whenever a change alters the generated labels or pixels, so that
# ensure_demo_dataset regenerates older copies.
GENERATOR_VERSION = 2

LABELS_FILENAME = "psg_cls_basic.json"
STAMP_FILENAME = "demo_stamp.json"
IMAGE_ROOT_NAME = "coco"
SPLIT_FOLDERS = {"train": "train2017", "val": "val2017", "test": "val2017"}

IMAGE_SIZE = 224
PATCH_SIZE = 32
CELL_SIZE = 2 * PATCH_SIZE
GRID_CELLS = 3
# One patch of margin on the top and left, none on the bottom and right:
# 32 + 3 * 64 = 224. A centred 16 px margin would put patch borders through
# the drawings.
GRID_ORIGIN = PATCH_SIZE

COLOURS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (220, 40, 40)),
    ("green", (40, 170, 60)),
    ("blue", (40, 80, 220)),
    ("yellow", (235, 215, 50)),
    ("white", (245, 245, 245)),
)
_COLOUR_VALUES = dict(COLOURS)
ARRANGEMENTS: tuple[str, ...] = ("left of", "right of", "above", "below", "inside")

# Long tail: the class of frequency rank r (1-based) is in HEAD_FRACTION * r**-ZIPF_EXPONENT
# of the images of each split, so 55% for the commonest and 1.1% for the 50th.
HEAD_FRACTION = 0.55
ZIPF_EXPONENT = 1.0
# The frequency rank of each class comes from this fixed seed, not from the
# generation seed, so the head and tail classes are the same for every seed.
CLASS_ORDER_SEED = 20240611

MIN_LABELS = 2
MAX_LABELS = 6
# Spread of the labels-per-image counts: a smaller gamma shape puts more
# images at 4..6 labels while the mean stays fixed by the class quotas.
LABEL_COUNT_SHAPE = 0.5

# Object sizes in px. Each object of a side-by-side pair fits into half a
# patch, and a nested pair fills the patch.
PAIR_OBJECT_SIZE = (13, 13)
OUTER_OBJECT_SIZE = (30, 30)
INNER_OBJECT_SIZE = (14, 14)

# Nuisance: grey background with a tint and pixel noise, colour jitter per
# object and position jitter of each object inside its patch.
BACKGROUND_GREY = (110.0, 130.0)
BACKGROUND_TINT = 6.0
PIXEL_NOISE_STD = 6.0
COLOUR_JITTER = 6.0
POSITION_JITTER = 0
INNER_JITTER = 0
JPEG_QUALITY = 90

_SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}
_LABEL_STREAM = 0
_IMAGE_STREAM = 1
_ASSIGNMENT_ATTEMPTS = 20


@dataclass(frozen=True)
class DemoClass:
    """Drawing of one scored class: `subject_colour` `arrangement` `object_colour`."""

    class_id: int
    subject_colour: str
    object_colour: str
    arrangement: str
    frequency_rank: int  # 1 = commonest class

    @property
    def predicate(self) -> str:
        return PREDICATE_CLASSES[self.class_id]

    @property
    def image_fraction(self) -> float:
        """Expected fraction of the images of a split that carry this class."""
        return HEAD_FRACTION * self.frequency_rank**-ZIPF_EXPONENT


@functools.lru_cache(maxsize=1)
def demo_classes() -> tuple[DemoClass, ...]:
    """Return the drawing of each scored class, ordered by class id (6..55).

    Class 6 + 5 * p + a draws colour pair p (in `itertools.combinations` order
    of COLOURS, the first colour as subject) in arrangement a of ARRANGEMENTS.
    The reversed pair never occurs, so "green left of red" is only ever drawn
    as "red right of green".
    """
    pairs = list(itertools.combinations(range(len(COLOURS)), 2))
    num_scored = NUM_CLASSES - FIRST_SCORED_CLASS
    if len(pairs) * len(ARRANGEMENTS) != num_scored:
        raise ConfigError(
            f"{len(COLOURS)} colours and {len(ARRANGEMENTS)} arrangements make "
            f"{len(pairs) * len(ARRANGEMENTS)} demo classes, but there are {num_scored} "
            "scored classes; change COLOURS or ARRANGEMENTS so that the counts match"
        )

    ranks = np.random.default_rng(CLASS_ORDER_SEED).permutation(num_scored) + 1
    table = []
    for index, ((subject, obj), arrangement) in enumerate(itertools.product(pairs, ARRANGEMENTS)):
        table.append(
            DemoClass(
                class_id=FIRST_SCORED_CLASS + index,
                subject_colour=COLOURS[subject][0],
                object_colour=COLOURS[obj][0],
                arrangement=arrangement,
                frequency_rank=int(ranks[index]),
            )
        )
    return tuple(table)


def describe_demo_classes() -> pandas.DataFrame:
    """Return a pandas DataFrame with one row per scored class and how it is drawn.

    Columns: class_id, predicate, colour_pair, subject_colour, object_colour,
    arrangement, drawing (e.g. "red left of green"), frequency_rank and
    image_fraction (expected fraction of images per split with this class).
    """
    import pandas as pd

    rows = [
        {
            "class_id": item.class_id,
            "predicate": item.predicate,
            "colour_pair": f"{item.subject_colour}/{item.object_colour}",
            "subject_colour": item.subject_colour,
            "object_colour": item.object_colour,
            "arrangement": item.arrangement,
            "drawing": f"{item.subject_colour} {item.arrangement} {item.object_colour}",
            "frequency_rank": item.frequency_rank,
            "image_fraction": item.image_fraction,
        }
        for item in demo_classes()
    ]
    return pd.DataFrame(rows)


def frequency_prior_scores(train_targets: np.ndarray, num_images: int) -> np.ndarray:
    """Score every image by the train frequency of each class.

    train_targets: [N, C] multi-hot train labels. Returns [num_images, C]
    float32, every row the fraction of train images that carry each class. Its
    top-3 is the same three commonest classes for every image, the baseline a
    trained model has to beat.
    """
    targets = np.asarray(train_targets, dtype=np.float32)
    if targets.ndim != 2 or targets.shape[0] == 0:
        raise ValueError(
            f"train_targets has shape {targets.shape}; pass a non-empty [N, C] multi-hot array"
        )
    if num_images < 0:
        raise ValueError(f"num_images is {num_images}; pass a count >= 0")

    frequency = targets.mean(axis=0)
    return np.tile(frequency, (num_images, 1))


def generate_demo_dataset(
    out_dir,
    *,
    seed: int = 0,
    num_train: int = 1000,
    num_val: int = 200,
    num_test: int = 500,
    progress: bool = False,
) -> Path:
    """Generate the demo data set into `out_dir` and return its label file path.

    Writes out_dir/psg_cls_basic.json, out_dir/coco/{train2017,val2017}/*.jpg
    and out_dir/demo_stamp.json. The files are first written to the sibling
    folder `<out_dir>.partial` and then renamed into place, so an interrupted
    run leaves no half data set. An existing `out_dir` is replaced only when it
    is empty or is itself a demo data set (it has a stamp file). The file lock
    `<out_dir>.lock` serialises concurrent generators.

    The same seed and sizes give a byte-identical label file. The images are
    byte-identical too for the same numpy and Pillow (libjpeg) builds.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    sizes = _validate_sizes(num_train=num_train, num_val=num_val, num_test=num_test)
    with _lock(out_dir):
        _generate(out_dir, seed=seed, sizes=sizes, progress=progress)
    return out_dir / LABELS_FILENAME


def ensure_demo_dataset(
    out_dir=None,
    *,
    seed: int = 0,
    num_train: int = 1000,
    num_val: int = 200,
    num_test: int = 500,
    progress: bool = False,
) -> tuple[Path, Path]:
    """Return (labels_path, image_root) of the demo data set, generating it when needed.

    `out_dir` defaults to paths.demo_dir(). The data set is regenerated when
    the label file or stamp is missing, when the stamp records another
    generator version, seed or size, or when an image folder contains a
    different number of files. Leftover temporary folders of an interrupted
    run are removed.
    """
    out_dir = paths.resolve(out_dir, paths.demo_dir())
    sizes = _validate_sizes(num_train=num_train, num_val=num_val, num_test=num_test)

    with _lock(out_dir):
        reason = _regeneration_reason(out_dir, _stamp(seed=seed, sizes=sizes))
        if reason is None:
            _logger.debug("demo data set at %s is up to date", out_dir)
            for leftover in (_partial_dir(out_dir), _stale_dir(out_dir)):
                if leftover.exists():
                    _logger.info("removing leftover folder %s of an interrupted run", leftover)
                    _remove_tree(leftover)
        else:
            _logger.info("generating demo data set at %s: %s", out_dir, reason)
            _generate(out_dir, seed=seed, sizes=sizes, progress=progress)
    return out_dir / LABELS_FILENAME, out_dir / IMAGE_ROOT_NAME


# ---------------------------------------------------------------------------
# Labels


def class_quotas(num_images: int) -> np.ndarray:
    """Return [C] int64: how many images of a split of `num_images` carry each class.

    Class of rank r gets HEAD_FRACTION * r**-ZIPF_EXPONENT * num_images images,
    rounded by largest remainder so that the total is the rounded sum. Classes
    0..5 get 0.
    """
    table = demo_classes()
    fractions = np.array([item.image_fraction for item in table])
    raw = fractions * num_images
    scored = np.floor(raw).astype(np.int64)
    shortfall = int(round(raw.sum())) - int(scored.sum())
    by_remainder = np.argsort(-(raw - scored), kind="stable")
    scored[by_remainder[:shortfall]] += 1

    quotas = np.zeros(NUM_CLASSES, dtype=np.int64)
    quotas[[item.class_id for item in table]] = scored
    return quotas


def _sample_label_counts(rng: np.random.Generator, num_images: int, total: int) -> np.ndarray:
    """Return [N] labels per image in MIN_LABELS..MAX_LABELS that sum to `total`."""
    extra_slots = MAX_LABELS - MIN_LABELS
    extra = total - MIN_LABELS * num_images
    weights = np.repeat(rng.gamma(LABEL_COUNT_SHAPE, size=num_images), extra_slots)
    weights = weights + 1e-9
    chosen = rng.choice(num_images * extra_slots, size=extra, replace=False, p=weights / weights.sum())
    return MIN_LABELS + np.bincount(chosen // extra_slots, minlength=num_images)


def _assign_classes(
    rng: np.random.Generator, quotas: np.ndarray, capacity: np.ndarray
) -> list[list[int]] | None:
    """Give class c to quotas[c] distinct images without exceeding `capacity`.

    Classes are placed from the commonest down, and each picks images with a
    probability proportional to their free label slots. Returns None when a
    class finds too few images with a free slot.
    """
    free = capacity.copy()
    labels: list[list[int]] = [[] for _ in range(len(capacity))]
    for class_id in np.argsort(-quotas, kind="stable"):
        count = int(quotas[class_id])
        if count == 0:
            break
        open_images = np.flatnonzero(free > 0)
        if len(open_images) < count:
            return None
        weights = free[open_images].astype(np.float64)
        picked = rng.choice(open_images, size=count, replace=False, p=weights / weights.sum())
        free[picked] -= 1
        for image in picked:
            labels[image].append(int(class_id))
    return labels


def _assign_classes_greedy(
    rng: np.random.Generator, quotas: np.ndarray, capacity: np.ndarray
) -> list[list[int]]:
    """Like _assign_classes, but each class takes the images with the most free slots.

    Filling each class from the images with the most free slots is the
    constructive step of the Gale-Ryser theorem, so it finds an assignment
    whenever one exists. Ties are broken at random.
    """
    free = capacity.copy()
    labels: list[list[int]] = [[] for _ in range(len(capacity))]
    for class_id in np.argsort(-quotas, kind="stable"):
        count = int(quotas[class_id])
        if count == 0:
            break
        order = np.lexsort((rng.random(len(free)), -free))
        picked = order[:count]
        if free[picked].min() <= 0:
            raise RuntimeError(f"no assignment of {count} images to class {class_id} exists")
        free[picked] -= 1
        for image in picked:
            labels[image].append(int(class_id))
    return labels


def sample_split_labels(rng: np.random.Generator, num_images: int) -> list[list[int]]:
    """Sample the relation lists of one split: class_quotas(num_images) spread over images.

    Every image gets MIN_LABELS..MAX_LABELS distinct scored classes in random
    order, and class c is in exactly class_quotas(num_images)[c] images.
    """
    if num_images == 0:
        return []

    quotas = class_quotas(num_images)
    total = int(quotas.sum())
    if not MIN_LABELS * num_images <= total <= MAX_LABELS * num_images or quotas.max() > num_images:
        raise ConfigError(
            f"class quotas {quotas.tolist()} cannot be spread over {num_images} images with "
            f"{MIN_LABELS}..{MAX_LABELS} labels each; change HEAD_FRACTION or ZIPF_EXPONENT"
        )

    capacity = _sample_label_counts(rng, num_images, total)
    labels = None
    for _ in range(_ASSIGNMENT_ATTEMPTS):
        labels = _assign_classes(rng, quotas, capacity)
        if labels is not None:
            break
    if labels is None:
        labels = _assign_classes_greedy(rng, quotas, capacity)

    for image_labels in labels:
        rng.shuffle(image_labels)
    return labels


# ---------------------------------------------------------------------------
# Images


@functools.lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    """[2 * IMAGE_SIZE, 2 * IMAGE_SIZE, 3] float32 Gaussian pixel noise; each image crops it.

    Cropping one fixed bank at a random offset costs a fraction of drawing
    fresh noise per image. The bank does not depend on the generation seed.
    """
    rng = np.random.default_rng(CLASS_ORDER_SEED)
    shape = (2 * IMAGE_SIZE, 2 * IMAGE_SIZE, 3)
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(PIXEL_NOISE_STD)


@functools.lru_cache(maxsize=None)
def _disc_mask(size: int) -> np.ndarray:
    centre = (size - 1) / 2
    y, x = np.mgrid[:size, :size]
    return (y - centre) ** 2 + (x - centre) ** 2 <= (size / 2) ** 2


def _draw_object(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    top: int,
    left: int,
    size: int,
    colour: tuple[int, int, int],
) -> None:
    """Paint a square or disc of `size` px with its top-left corner at (top, left)."""
    jittered = np.asarray(colour, dtype=np.float32) + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, 3)
    region = image[top : top + size, left : left + size]
    if rng.random() < 0.5:
        region[...] = jittered
    else:
        region[_disc_mask(size)] = jittered


def patch_origin(cell: int, slot: tuple[int, int]) -> tuple[int, int]:
    """Return the top-left pixel of patch `slot` (row, column in 0..1) of grid cell `cell` (0..8)."""
    cell_row, cell_col = divmod(cell, GRID_CELLS)
    top = GRID_ORIGIN + cell_row * CELL_SIZE + slot[0] * PATCH_SIZE
    left = GRID_ORIGIN + cell_col * CELL_SIZE + slot[1] * PATCH_SIZE
    return top, left


def _random_patch(rng: np.random.Generator, cell: int) -> tuple[int, int]:
    return patch_origin(cell, (int(rng.integers(2)), int(rng.integers(2))))


def _draw_nested(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    top: int,
    left: int,
    inner_colour: tuple[int, int, int],
    outer_colour: tuple[int, int, int],
) -> None:
    """Draw an object of `inner_colour` inside one of `outer_colour`, both in the patch at (top, left)."""
    outer = int(rng.integers(OUTER_OBJECT_SIZE[0], OUTER_OBJECT_SIZE[1] + 1))
    offset = (PATCH_SIZE - outer) // 2
    _draw_object(image, rng, top=top + offset, left=left + offset, size=outer, colour=outer_colour)

    inner = int(rng.integers(INNER_OBJECT_SIZE[0], INNER_OBJECT_SIZE[1] + 1))
    centred = offset + (outer - inner) // 2
    dy, dx = centred + rng.integers(-INNER_JITTER, INNER_JITTER + 1, 2)
    _draw_object(image, rng, top=top + int(dy), left=left + int(dx), size=inner, colour=inner_colour)


def _draw_side_by_side(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    top: int,
    left: int,
    first_colour: tuple[int, int, int],
    second_colour: tuple[int, int, int],
    vertical: bool,
) -> None:
    """Draw two objects in the two halves of the patch at (top, left).

    The first object goes into the left half, or the top half when `vertical`.
    Each object keeps at least 1 px from the middle line and the patch border.
    """
    half = PATCH_SIZE // 2
    for index, colour in enumerate((first_colour, second_colour)):
        size = int(rng.integers(PAIR_OBJECT_SIZE[0], PAIR_OBJECT_SIZE[1] + 1))
        along = index * half + int(rng.integers(1, half - size))
        across = (PATCH_SIZE - size) // 2 + int(rng.integers(-POSITION_JITTER, POSITION_JITTER + 1))
        y, x = (along, across) if vertical else (across, along)
        _draw_object(image, rng, top=top + y, left=left + x, size=size, colour=colour)


def _draw_relation(image: np.ndarray, rng: np.random.Generator, *, cell: int, item: DemoClass) -> None:
    """Draw the two objects of class `item` into one random patch of grid cell `cell`."""
    subject = _COLOUR_VALUES[item.subject_colour]
    obj = _COLOUR_VALUES[item.object_colour]
    top, left = _random_patch(rng, cell)

    if item.arrangement == "inside":
        _draw_nested(image, rng, top=top, left=left, inner_colour=subject, outer_colour=obj)
    elif item.arrangement in ("left of", "above"):
        vertical = item.arrangement == "above"
        _draw_side_by_side(image, rng, top=top, left=left, first_colour=subject, second_colour=obj, vertical=vertical)
    else:
        vertical = item.arrangement == "below"
        _draw_side_by_side(image, rng, top=top, left=left, first_colour=obj, second_colour=subject, vertical=vertical)


def render_image(rng: np.random.Generator, relations: list[int]) -> np.ndarray:
    """Draw one image with each relation in its own random grid cell.

    Cells without a relation stay background. Returns [IMAGE_SIZE,
    IMAGE_SIZE, 3] uint8 RGB.
    """
    num_cells = GRID_CELLS * GRID_CELLS
    if len(relations) > num_cells:
        raise ValueError(f"{len(relations)} relations do not fit into {num_cells} grid cells")
    by_id = {item.class_id: item for item in demo_classes()}

    grey = rng.uniform(*BACKGROUND_GREY)
    background = (grey + rng.uniform(-BACKGROUND_TINT, BACKGROUND_TINT, 3)).astype(np.float32)
    noise = _noise_bank()
    top, left = rng.integers(noise.shape[0] - IMAGE_SIZE + 1, size=2)
    image = noise[top : top + IMAGE_SIZE, left : left + IMAGE_SIZE] + background

    cells = rng.permutation(num_cells)
    for cell, class_id in zip(cells, relations):
        _draw_relation(image, rng, cell=int(cell), item=by_id[class_id])

    image += 0.5
    np.clip(image, 0, 255, out=image)
    return image.astype(np.uint8)


def encode_jpeg(pixels: np.ndarray) -> bytes:
    """Encode [H, W, 3] uint8 RGB as a baseline JPEG with fixed settings."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(
        buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=False
    )
    return buffer.getvalue()


# ---------------------------------------------------------------------------
# Writing and publishing


def _validate_sizes(*, num_train: int, num_val: int, num_test: int) -> dict[str, int]:
    sizes = {"train": num_train, "val": num_val, "test": num_test}
    for split, size in sizes.items():
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 0:
            raise ConfigError(f"demo num_{split} is {size!r}; pass an integer >= 0")
    if sizes["train"] == 0:
        raise ConfigError("demo num_train is 0; pass at least 1 train image")
    return {split: int(size) for split, size in sizes.items()}


def _stamp(*, seed: int, sizes: dict[str, int]) -> dict:
    return {
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "num_train": sizes["train"],
        "num_val": sizes["val"],
        "num_test": sizes["test"],
    }


def _file_numbers(seed: int, count: int) -> np.ndarray:
    """Distinct COCO-like 12-digit file numbers, unrelated to the image ids."""
    rng = np.random.default_rng([seed, len(_SPLIT_STREAMS), _LABEL_STREAM])
    return rng.choice(999_999, size=count, replace=False) + 1


def _write_dataset(folder: Path, *, seed: int, sizes: dict[str, int], progress: bool) -> None:
    """Write labels, images and stamp of a demo data set into `folder`."""
    total = sum(sizes.values())
    file_numbers = _file_numbers(seed, total)
    for split_folder in set(SPLIT_FOLDERS.values()):
        (folder / IMAGE_ROOT_NAME / split_folder).mkdir(parents=True, exist_ok=True)

    data = []
    split_ids: dict[str, list[str]] = {}
    index = 0
    bar = progress_bar(total=total, desc="demo images", unit="img", enabled=progress)
    for split, size in sizes.items():
        stream = _SPLIT_STREAMS[split]
        relations = sample_split_labels(np.random.default_rng([seed, stream, _LABEL_STREAM]), size)
        split_ids[split] = []
        for position, image_relations in enumerate(relations):
            image_id = str(100_000 + index)
            file_name = f"{SPLIT_FOLDERS[split]}/{file_numbers[index]:012d}.jpg"
            rng = np.random.default_rng([seed, stream, _IMAGE_STREAM, position])
            pixels = render_image(rng, image_relations)
            (folder / IMAGE_ROOT_NAME / file_name).write_bytes(encode_jpeg(pixels))

            # Test labels stay hidden, as in the PSG file.
            listed = [] if split == "test" else image_relations
            data.append({"image_id": image_id, "file_name": file_name, "relations": listed})
            split_ids[split].append(image_id)
            index += 1
            bar.update()
    bar.close()

    payload = {
        "data": data,
        "predicate_classes": list(PREDICATE_CLASSES),
        "train_image_ids": split_ids["train"],
        "val_image_ids": split_ids["val"],
        "test_image_ids": split_ids["test"],
    }
    (folder / LABELS_FILENAME).write_text(json.dumps(payload, sort_keys=True), encoding="utf-8")
    # The stamp is written last: a folder with a stamp is a complete data set.
    (folder / STAMP_FILENAME).write_text(
        json.dumps(_stamp(seed=seed, sizes=sizes), indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )


def _lock(out_dir: Path):
    from filelock import FileLock

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(out_dir.with_name(out_dir.name + ".lock")))


def _generate(out_dir: Path, *, seed: int, sizes: dict[str, int], progress: bool) -> None:
    """Write the data set to `<out_dir>.partial`, then move it to `out_dir`."""
    _check_replaceable(out_dir)

    started = time.perf_counter()
    partial = _partial_dir(out_dir)
    _remove_tree(partial)
    partial.mkdir(parents=True)

    _write_dataset(partial, seed=seed, sizes=sizes, progress=progress)
    _publish(partial, out_dir)

    _logger.info(
        "wrote demo data set (seed %d; %d train, %d val, %d test images) to %s in %.1f s",
        seed,
        sizes["train"],
        sizes["val"],
        sizes["test"],
        out_dir,
        time.perf_counter() - started,
    )


def _partial_dir(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + ".partial")


def _stale_dir(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + ".stale.partial")


def _remove_tree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _check_replaceable(out_dir: Path) -> None:
    """Raise unless `out_dir` is absent, empty or a previous demo data set."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ConfigError(f"demo output {out_dir} is a file; pass a folder path")
    if (out_dir / STAMP_FILENAME).is_file() or not any(out_dir.iterdir()):
        return
    raise ConfigError(
        f"demo output folder {out_dir} is not empty and has no {STAMP_FILENAME}, so it is "
        "not a demo data set and would be overwritten; pass an empty or new folder"
    )


def _publish(partial: Path, out_dir: Path) -> None:
    """Move the finished `partial` folder to `out_dir`, replacing an older copy.

    A directory cannot be renamed over a non-empty one, so an older copy is
    first renamed aside and deleted after the new one is in place. Readers
    therefore see the old data set, no data set, or the new one, never a mix.
    """
    stale = _stale_dir(out_dir)
    _remove_tree(stale)
    if out_dir.exists():
        out_dir.rename(stale)
    partial.rename(out_dir)
    _remove_tree(stale)


def _regeneration_reason(out_dir: Path, expected: dict) -> str | None:
    """Return why the demo data set at `out_dir` must be (re)generated, or None."""
    stamp_path = out_dir / STAMP_FILENAME
    if not (out_dir / LABELS_FILENAME).is_file() or not stamp_path.is_file():
        return "no complete data set found"
    try:
        found = json.loads(stamp_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return f"unreadable {STAMP_FILENAME} ({error})"
    if found != expected:
        return f"{STAMP_FILENAME} records {found}, expected {expected}"

    folder_sizes = {
        "train2017": expected["num_train"],
        "val2017": expected["num_val"] + expected["num_test"],
    }
    for split_folder, count in folder_sizes.items():
        folder = out_dir / IMAGE_ROOT_NAME / split_folder
        found_count = sum(1 for _ in folder.glob("*.jpg")) if folder.is_dir() else 0
        if found_count != count:
            return f"{folder} has {found_count} images, expected {count}"
    return None
