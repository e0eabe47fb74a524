"""PSG classification label files: loading, validation and targets.

A label file (`psg_cls_basic.json`) is a JSON object with the keys

- `data`: a list of `{"image_id", "file_name", "relations"}` entries, where
  `file_name` is relative to the image root (e.g. "train2017/000000466766.jpg")
  and `relations` lists predicate class ids, empty for the test split;
- `predicate_classes`: the 56 predicate names;
- `train_image_ids`, `val_image_ids`, `test_image_ids`: the splits.

The official file annotates a few COCO images twice under two image ids
(train has 4,500 samples over 4,493 files). Both annotations are kept as
separate samples, so split sizes match the published ones.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterable, Sequence

import numpy as np

from .classes import NUM_CLASSES
from .errors import ImageError, LabelFileError
from .progress import progress_bar

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
REQUIRED_KEYS: tuple[str, ...] = ("data", "predicate_classes") + tuple(
    f"{split}_image_ids" for split in SPLITS
)
ENTRY_KEYS: tuple[str, ...] = ("image_id", "file_name", "relations")

# Number of missing image paths quoted in a check_dataset problem.
MISSING_EXAMPLES = 5


@dataclass(frozen=True)
class Sample:
    """One annotated image of a split."""

    image_id: str
    file_name: str
    relations: tuple[int, ...]


class LabelFile:
    """A validated PSG classification label file."""

    def __init__(
        self,
        path: Path,
        *,
        predicate_classes: list[str],
        samples: dict[str, Sample],
        split_ids: dict[str, list[str]],
    ):
        self.path = Path(path)
        self.predicate_classes = list(predicate_classes)
        self._samples = dict(samples)
        self._split_ids = {name: list(ids) for name, ids in split_ids.items()}

    def __repr__(self) -> str:
        sizes = ", ".join(f"{name}={len(self._split_ids[name])}" for name in SPLITS)
        return f"LabelFile({str(self.path)!r}, {sizes})"

    def split(self, name: str) -> list[Sample]:
        """Return the samples of a split in the order of `<name>_image_ids`."""
        return [self._samples[image_id] for image_id in self.image_ids(name)]

    def image_ids(self, name: str) -> list[str]:
        _check_split_name(name)
        return list(self._split_ids[name])

    def sample(self, image_id: str | int) -> Sample:
        """Return the sample with this image id; KeyError when there is none."""
        return self._samples[str(image_id)]

    def targets(self, name: str) -> np.ndarray:
        """Return multi-hot targets [N, 56] float32; all zeros for a split without labels."""
        samples = self.split(name)
        targets = np.zeros((len(samples), NUM_CLASSES), dtype=np.float32)
        for row, sample in enumerate(samples):
            targets[row, list(sample.relations)] = 1.0
        return targets

    def has_labels(self, name: str) -> bool:
        """Return True when at least one sample of the split has relations (False for test)."""
        return any(sample.relations for sample in self.split(name))

    def class_counts(self, name: str) -> np.ndarray:
        """Return the number of samples of the split that contain each class, [56] int64."""
        return self.targets(name).sum(axis=0).astype(np.int64)

    def file_names(self, splits: Iterable[str] = SPLITS) -> list[str]:
        """Return the distinct image files of the splits, in order of first use."""
        names: dict[str, None] = {}
        for name in splits:
            for sample in self.split(name):
                names.setdefault(sample.file_name, None)
        return list(names)


def load_labels(path: str | os.PathLike) -> LabelFile:
    """Load and validate a label file.

    Raises LabelFileError listing every problem found, not only the first.
    """
    parsed = _parse_label_file(Path(path))
    if parsed.problems:
        raise LabelFileError(path, parsed.problems)
    return parsed.to_label_file()


def check_dataset(
    labels_path: str | os.PathLike,
    image_root: str | os.PathLike,
    *,
    decode: bool = True,
    splits: Sequence[str] = SPLITS,
    workers: int | None = None,
    progress: bool = True,
) -> LabelFile:
    """Validate a label file and the images its splits use.

    Checks that every image file of `splits` exists under `image_root` and,
    with `decode`, that it decodes completely (in a thread pool of `workers`
    threads). Label and image problems are raised together in one
    LabelFileError; on success the loaded LabelFile is returned.
    """
    labels_path = Path(labels_path)
    image_root = Path(image_root)
    for name in splits:
        _check_split_name(name)

    parsed = _parse_label_file(labels_path)
    problems = list(parsed.problems)
    file_names = parsed.file_names(splits)
    problems += _image_problems(
        file_names,
        labels_path=labels_path,
        image_root=image_root,
        splits=splits,
        decode=decode,
        workers=workers,
        progress=progress,
    )
    if problems:
        raise LabelFileError(labels_path, problems)

    labels = parsed.to_label_file()
    logger.info(
        "%s: %s; %d image files under %s %s",
        labels_path,
        ", ".join(f"{name} {len(labels.split(name))} samples" for name in splits),
        len(file_names),
        image_root,
        "decode" if decode else "exist",
    )
    return labels


def download_hint(labels_path: str | os.PathLike, image_root: str | os.PathLike) -> str:
    """Return the command that downloads the images of a label file."""
    return f"python -m matchclip data download --labels {labels_path} --out {image_root}"


# --------------------------------------------------------------------------
# Parsing and validation


@dataclass
class _ParsedLabels:
    path: Path
    predicate_classes: list[str] = field(default_factory=list)
    samples: dict[str, Sample] = field(default_factory=dict)
    split_ids: dict[str, list[str]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    problems: list[str] = field(default_factory=list)

    def to_label_file(self) -> LabelFile:
        return LabelFile(
            self.path,
            predicate_classes=self.predicate_classes,
            samples=self.samples,
            split_ids=self.split_ids,
        )

    def file_names(self, splits: Iterable[str]) -> list[str]:
        """Distinct file names of the valid samples that the splits list."""
        names: dict[str, None] = {}
        for name in splits:
            for image_id in self.split_ids[name]:
                sample = self.samples.get(image_id)
                if sample is not None:
                    names.setdefault(sample.file_name, None)
        return list(names)


def _parse_label_file(path: Path) -> _ParsedLabels:
    parsed = _ParsedLabels(path)
    payload = _read_json(path, parsed.problems)
    if payload is None:
        return parsed

    name = path.name
    if not isinstance(payload, dict):
        parsed.problems.append(
            f"{name} contains a JSON {_json_type(payload)}, expected an object with the keys "
            f"{', '.join(REQUIRED_KEYS)}; check that this is the PSG classification label file"
        )
        return parsed

    for key in REQUIRED_KEYS:
        if key not in payload:
            parsed.problems.append(
                f"key '{key}' is missing from {name}; a PSG classification label file has the "
                f"keys {', '.join(REQUIRED_KEYS)}"
            )

    if "predicate_classes" in payload:
        parsed.predicate_classes = _parse_predicate_classes(
            payload["predicate_classes"], name, parsed.problems
        )
    known_ids: set[str] = set()
    if "data" in payload:
        parsed.samples, known_ids = _parse_data(payload["data"], name, parsed.problems)
    _parse_splits(payload, name, parsed, known_ids)
    return parsed


def _read_json(path: Path, problems: list[str]) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        problems.append(
            f"label file {path} not found; place psg_cls_basic.json at data/psg/psg_cls_basic.json "
            "(data/README.md says where to get it) or pass its path with --labels"
        )
        return None
    except IsADirectoryError:
        problems.append(f"{path} is a folder, expected the label file psg_cls_basic.json; pass the file path")
        return None
    except PermissionError as error:
        problems.append(f"label file {path} is not readable ({error.strerror}); fix its permissions")
        return None
    except UnicodeDecodeError as error:
        problems.append(
            f"{path.name} is not UTF-8 text (invalid byte at position {error.start}); "
            "the file is damaged or not a label file: download it again"
        )
        return None

    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        problems.append(
            f"{path.name} is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno} "
            f"(character {error.pos}); the file is damaged or incomplete: download it again"
        )
        return None


def _parse_predicate_classes(value: Any, name: str, problems: list[str]) -> list[str]:
    if not isinstance(value, list):
        problems.append(
            f"predicate_classes of {name} is a JSON {_json_type(value)}, expected a list of "
            f"{NUM_CLASSES} class names"
        )
        return []

    if len(value) != NUM_CLASSES:
        problems.append(
            f"{name} lists {len(value)} predicate classes, expected {NUM_CLASSES}; use the "
            "predicate_classes list of the PSG classification label file"
        )

    classes: list[str] = []
    first_position: dict[str, int] = {}
    for position, class_name in enumerate(value):
        if not isinstance(class_name, str) or not class_name.strip():
            problems.append(
                f"predicate class {position} of {name} is {class_name!r}, expected a non-empty string"
            )
            continue
        if class_name in first_position:
            problems.append(
                f"predicate class name '{class_name}' appears at positions "
                f"{first_position[class_name]} and {position} of predicate_classes in {name}; "
                "class names must be unique"
            )
        first_position.setdefault(class_name, position)
        classes.append(class_name)
    return classes


def _parse_data(
    value: Any, name: str, problems: list[str]
) -> tuple[dict[str, Sample], set[str]]:
    """Return the valid samples by image id and every image id that `data` names."""
    if not isinstance(value, list):
        problems.append(
            f"data of {name} is a JSON {_json_type(value)}, expected a list of "
            "{image_id, file_name, relations} entries"
        )
        return {}, set()

    samples: dict[str, Sample] = {}
    first_entry: dict[str, int] = {}
    for index, entry in enumerate(value):
        problems_before = len(problems)
        if not isinstance(entry, dict):
            problems.append(
                f"data entry {index} of {name} is a JSON {_json_type(entry)}, expected an object "
                "with image_id, file_name and relations"
            )
            continue

        for key in ENTRY_KEYS:
            if key not in entry:
                problems.append(f"data entry {index} of {name} has no '{key}'; add it")

        image_id = None
        if "image_id" in entry:
            image_id = _parse_image_id(
                entry["image_id"], f"image_id of data entry {index} of {name}", problems
            )
        where = f"image '{image_id}'" if image_id is not None else f"data entry {index}"

        if image_id is not None:
            if image_id in first_entry:
                problems.append(
                    f"image_id '{image_id}' appears in data entries {first_entry[image_id]} and "
                    f"{index} of {name}; each image_id must be unique: remove or renumber one of them"
                )
            else:
                first_entry[image_id] = index

        file_name = None
        if "file_name" in entry:
            file_name = _parse_file_name(entry["file_name"], f"{where} of {name}", problems)
        relations = None
        if "relations" in entry:
            relations = _parse_relations(entry["relations"], f"{where} of {name}", problems)

        valid = len(problems) == problems_before
        if valid and image_id not in samples:
            samples[image_id] = Sample(image_id, file_name, relations)
    return samples, set(first_entry)


def _parse_image_id(value: Any, where: str, problems: list[str]) -> str | None:
    """Return the id as a string; integer ids are accepted and converted."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        problems.append(
            f"{where} is {value!r} (a JSON {_json_type(value)}), expected a string or integer "
            "such as '107905'"
        )
        return None
    image_id = str(value)
    if not image_id.strip():
        problems.append(f"{where} is an empty string; give the image a unique id")
        return None
    return image_id


def _parse_file_name(value: Any, where: str, problems: list[str]) -> str | None:
    if not isinstance(value, str) or not value.strip():
        problems.append(
            f"file_name of {where} is {value!r}, expected a path relative to the image root "
            "such as 'train2017/000000466766.jpg'"
        )
        return None

    posix = PurePosixPath(value)
    # Downloads write to image_root / file_name, so a file name must not
    # escape the image root.
    escapes_root = (
        posix.is_absolute()
        or PureWindowsPath(value).drive != ""
        or "\\" in value
        or ".." in posix.parts
    )
    if escapes_root:
        problems.append(
            f"file_name '{value}' of {where} is not a relative path inside the image root; "
            "use a path such as 'train2017/000000466766.jpg'"
        )
        return None
    return value


def _parse_relations(value: Any, where: str, problems: list[str]) -> tuple[int, ...] | None:
    if not isinstance(value, list):
        problems.append(
            f"relations of {where} is a JSON {_json_type(value)}, expected a list of predicate "
            f"class ids 0..{NUM_CLASSES - 1} (empty for test images)"
        )
        return None

    relations: list[int] = []
    valid = True
    for relation in value:
        if isinstance(relation, bool) or not isinstance(relation, int):
            problems.append(
                f"relation {relation!r} in {where} is a JSON {_json_type(relation)}, expected an "
                f"integer predicate class id 0..{NUM_CLASSES - 1}"
            )
            valid = False
        elif not 0 <= relation < NUM_CLASSES:
            problems.append(
                f"relation id {relation} in {where} is out of range 0..{NUM_CLASSES - 1}; "
                "use the index of a predicate class in predicate_classes"
            )
            valid = False
        else:
            relations.append(relation)
    return tuple(relations) if valid else None


def _parse_splits(
    payload: dict, name: str, parsed: _ParsedLabels, known_ids: set[str]
) -> None:
    problems = parsed.problems
    split_of: dict[str, str] = {}
    for split in SPLITS:
        key = f"{split}_image_ids"
        if key not in payload:
            continue
        value = payload[key]
        if not isinstance(value, list):
            problems.append(
                f"{key} of {name} is a JSON {_json_type(value)}, expected a list of image ids"
            )
            continue

        ids: list[str] = []
        for position, raw_id in enumerate(value):
            image_id = _parse_image_id(raw_id, f"entry {position} of {key} in {name}", problems)
            if image_id is None:
                continue

            if image_id in split_of:
                other = split_of[image_id]
                if other == split:
                    problems.append(
                        f"image_id '{image_id}' is listed twice in {key} of {name}; remove the repeat"
                    )
                else:
                    problems.append(
                        f"image_id '{image_id}' is listed in both {other}_image_ids and {key} of "
                        f"{name}; an image belongs to one split only: remove it from one of them"
                    )
                continue
            split_of[image_id] = split

            if image_id not in known_ids:
                problems.append(
                    f"image_id '{image_id}' in {key} of {name} has no entry in data; add its entry "
                    f"to data or remove it from {key}"
                )
                continue
            if image_id in parsed.samples:
                ids.append(image_id)
        parsed.split_ids[split] = ids

    unused = len(known_ids) - len(split_of.keys() & known_ids)
    if unused:
        logger.debug("%d data entries of %s belong to no split and are ignored", unused, name)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _check_split_name(name: str) -> None:
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; use one of {', '.join(SPLITS)}")


# --------------------------------------------------------------------------
# Image checks


def _image_problems(
    file_names: list[str],
    *,
    labels_path: Path,
    image_root: Path,
    splits: Sequence[str],
    decode: bool,
    workers: int | None,
    progress: bool,
) -> list[str]:
    hint = download_hint(labels_path, image_root)
    if not image_root.is_dir():
        return [
            f"image folder {image_root} does not exist; run `{hint}` to download the images, "
            "or pass the folder that contains train2017/ and val2017/"
        ]

    missing = [name for name in file_names if not (image_root / name).is_file()]
    problems: list[str] = []
    if missing:
        examples = ", ".join(missing[:MISSING_EXAMPLES])
        problems.append(
            f"{len(missing)} of {len(file_names)} image files of the {', '.join(splits)} "
            f"split(s) of {labels_path.name} are missing under {image_root}, first "
            f"{min(len(missing), MISSING_EXAMPLES)}: {examples}; run `{hint}` to download them"
        )

    if decode:
        missing_set = set(missing)
        present = [name for name in file_names if name not in missing_set]
        problems += _decode_problems(
            present, image_root=image_root, hint=hint, workers=workers, progress=progress
        )
    return problems


def _decode_problems(
    file_names: list[str], *, image_root: Path, hint: str, workers: int | None, progress: bool
) -> list[str]:
    """Decode every image fully in a thread pool; return one problem per bad file."""
    # Imported here because images imports Sample from this module.
    from .images import verify_image

    def check(name: str) -> str | None:
        try:
            verify_image(image_root / name)
        except ImageError as error:
            return f"{error} (run `{hint}` to replace it)"
        return None

    # PIL releases the GIL while it decodes, so the threads decode in parallel.
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(
            progress_bar(
                pool.map(check, file_names),
                total=len(file_names),
                desc="decode images",
                unit="image",
                enabled=progress,
            )
        )
    return [problem for problem in results if problem is not None]
