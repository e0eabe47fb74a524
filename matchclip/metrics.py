"""Mean recall@k over the scored predicate classes 6..55.

For class c, recall_c = (images with c as a ground-truth label and c among
the image's top-k predictions) / (images with c as a ground-truth label).
Two conventions average recall_c over the classes:

- "mean_recall@k" (official challenge evaluator): a class without any
  ground-truth image in the split scores 0, and the mean is over all 50
  scored classes.
- "mean_recall@k_present": the mean over classes that occur in the split.

Scores and targets may be NumPy arrays or torch tensors. Top-k selection
breaks ties by the lower class id, so results do not depend on the sort
implementation.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import pandas as pd

from .classes import FIRST_SCORED_CLASS, NUM_CLASSES, PREDICATE_CLASSES, SCORED_CLASSES

_logger = logging.getLogger(__name__)

ABSENT_CONVENTIONS = ("zero", "skip")


def _to_numpy(values, name: str) -> np.ndarray:
    """Convert a tensor, array or nested list to a NumPy array."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.dtype == object:
        raise ValueError(f"{name} must be a numeric array; got ragged or non-numeric values")
    return array


def _check_scores(scores) -> np.ndarray:
    """Return scores as float64 [N, C] after checking the layout."""
    array = _to_numpy(scores, "scores")
    if array.ndim != 2:
        raise ValueError(f"scores must have shape [num_images, num_classes]; got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise ValueError(f"scores must be numeric; got dtype {array.dtype}")
    array = array.astype(np.float64)
    if np.isnan(array).any():
        row = int(np.argwhere(np.isnan(array))[0, 0])
        raise ValueError(
            f"scores contain NaN (first in row {row}); NaN has no rank, so fix the model "
            "output (for example a diverged training run) before computing recall"
        )
    return array


def _check_targets(targets, num_images: int | None = None) -> np.ndarray:
    """Return targets as a bool multi-hot array [N, 56]."""
    array = _to_numpy(targets, "targets")
    if array.ndim != 2 or array.shape[1] != NUM_CLASSES:
        raise ValueError(
            f"targets must be multi-hot with shape [num_images, {NUM_CLASSES}]; got shape {array.shape}"
        )
    if num_images is not None and array.shape[0] != num_images:
        raise ValueError(
            f"predictions cover {num_images} images but targets cover {array.shape[0]}; "
            "pass both for the same images in the same order"
        )
    if not np.isin(array, (0, 1)).all():
        raise ValueError("targets must contain only 0 and 1 (multi-hot labels)")
    return array.astype(bool)


def _check_k(k: int) -> int:
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"k={k!r} is invalid; use a positive integer")
    return int(k)


def top_k(scores, k: int = 3, *, mask_unlabeled: bool = True) -> np.ndarray:
    """Return the ids of the k highest-scoring classes per image, best first.

    scores: [N, C] logits or probabilities. With `mask_unlabeled`, classes
    0..5 are never predicted, because they never occur as labels. Ties go to
    the lower class id. Returns int64 [N, k].
    """
    values = _check_scores(scores)
    k = _check_k(k)

    num_classes = values.shape[1]
    first_allowed = FIRST_SCORED_CLASS if mask_unlabeled else 0
    allowed = np.arange(first_allowed, num_classes)
    if k > len(allowed):
        masked = f" after masking classes 0..{FIRST_SCORED_CLASS - 1}" if mask_unlabeled else ""
        raise ValueError(f"k={k} exceeds the {len(allowed)} classes available{masked}")

    # A stable sort of the negated scores keeps equal scores in ascending
    # class-id order; `allowed` is ascending, so ids map back unchanged.
    order = np.argsort(-values[:, allowed], axis=1, kind="stable")
    return allowed[order[:, :k]].astype(np.int64)


def _top_k_of_all_classes(scores, k: int, mask_unlabeled: bool) -> np.ndarray:
    """Run `top_k` on scores that must cover all 56 classes, as the metric needs."""
    values = _check_scores(scores)
    if values.shape[1] != NUM_CLASSES:
        raise ValueError(
            f"scores must have one column per class, shape [num_images, {NUM_CLASSES}]; "
            f"got shape {values.shape}"
        )
    return top_k(values, k, mask_unlabeled=mask_unlabeled)


def _check_topk(topk, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Return top-k predictions as int64 [N, k] after checking ids and duplicates."""
    array = _to_numpy(topk, "top-k predictions")
    if array.ndim != 2 or array.shape[1] < 1:
        raise ValueError(
            f"top-k predictions must have shape [num_images, k] with k >= 1; got shape {array.shape}"
        )
    if array.size and not np.issubdtype(array.dtype, np.integer):
        if not np.issubdtype(array.dtype, np.floating) or not np.all(array == np.round(array)):
            raise ValueError(f"top-k predictions must be integer class ids; got dtype {array.dtype}")
    array = array.astype(np.int64)

    out_of_range = (array < 0) | (array >= num_classes)
    if out_of_range.any():
        row, column = np.argwhere(out_of_range)[0]
        raise ValueError(
            f"top-k prediction {array[row, column]} in row {row} is out of range 0..{num_classes - 1}"
        )
    sorted_rows = np.sort(array, axis=1)
    duplicated = (sorted_rows[:, 1:] == sorted_rows[:, :-1]).any(axis=1)
    if duplicated.any():
        row = int(np.flatnonzero(duplicated)[0])
        raise ValueError(
            f"row {row} of the top-k predictions repeats a class id ({array[row].tolist()}); "
            "each row needs k distinct class ids"
        )
    return array


def class_counts_from_topk(topk, targets) -> tuple[np.ndarray, np.ndarray]:
    """Count per class the ground-truth images and the hits among them.

    topk: [N, k] predicted class ids; targets: [N, 56] multi-hot. Returns
    (occurrences, hits), both int64 [56] over all classes.
    """
    predictions = _check_topk(topk)
    labels = _check_targets(targets, num_images=predictions.shape[0])

    predicted = np.zeros_like(labels)
    rows = np.arange(predictions.shape[0])[:, None]
    predicted[rows, predictions] = True

    occurrences = labels.sum(axis=0).astype(np.int64)
    hits = (labels & predicted).sum(axis=0).astype(np.int64)
    return occurrences, hits


def _mean_recall(occurrences: np.ndarray, hits: np.ndarray, absent: str) -> float:
    """Average recall over the scored classes under the `absent` convention."""
    if absent not in ABSENT_CONVENTIONS:
        raise ValueError(f"absent={absent!r} is invalid; use one of {', '.join(ABSENT_CONVENTIONS)}")

    scored = list(SCORED_CLASSES)
    occurrences = occurrences[scored]
    hits = hits[scored]
    present = occurrences > 0
    recall = np.zeros(len(scored), dtype=np.float64)
    recall[present] = hits[present] / occurrences[present]

    if absent == "zero":
        return float(recall.mean())
    if not present.any():
        _logger.warning("no scored class occurs in the targets; mean recall over present classes is NaN")
        return float("nan")
    return float(recall[present].mean())


def recall_from_topk(topk, targets, *, absent: str = "zero") -> float:
    """Return mean recall@k of precomputed top-k ids [N, k], e.g. read from a result file.

    absent: "zero" (official: absent classes score 0, mean over all 50
    scored classes) or "skip" (mean over classes present in `targets`).
    """
    occurrences, hits = class_counts_from_topk(topk, targets)
    return _mean_recall(occurrences, hits, absent)


def mean_recall_at_k(scores, targets, *, k: int = 3, mask_unlabeled: bool = True, absent: str = "zero") -> float:
    """Return mean recall@k of scores [N, 56] against multi-hot targets [N, 56].

    absent: "zero" (official) or "skip"; see `recall_from_topk`.
    """
    if absent not in ABSENT_CONVENTIONS:
        raise ValueError(f"absent={absent!r} is invalid; use one of {', '.join(ABSENT_CONVENTIONS)}")
    return recall_from_topk(_top_k_of_all_classes(scores, k, mask_unlabeled), targets, absent=absent)


def evaluate_topk(topk, targets) -> dict:
    """Compute both mean-recall conventions from top-k ids [N, k].

    Returns {"mean_recall@k", "mean_recall@k_present", "num_present_classes",
    "num_images"}, where k is the width of `topk`.
    """
    predictions = _check_topk(topk)
    k = predictions.shape[1]
    occurrences, hits = class_counts_from_topk(predictions, targets)
    return {
        f"mean_recall@{k}": _mean_recall(occurrences, hits, "zero"),
        f"mean_recall@{k}_present": _mean_recall(occurrences, hits, "skip"),
        "num_present_classes": int((occurrences[list(SCORED_CLASSES)] > 0).sum()),
        "num_images": int(predictions.shape[0]),
    }


def evaluate_scores(scores, targets, *, k: int = 3, mask_unlabeled: bool = True) -> dict:
    """Compute both mean-recall conventions from scores [N, 56]; see `evaluate_topk`."""
    return evaluate_topk(_top_k_of_all_classes(scores, k, mask_unlabeled), targets)


def per_class_recall_from_topk(
    topk, targets, *, class_names: Sequence[str] = PREDICATE_CLASSES
) -> pd.DataFrame:
    """Tabulate recall of each scored class 6..55 from top-k ids [N, k].

    Columns: class_id, predicate, occurrences, hits, recall (NaN where the
    class has no ground-truth image).
    """
    if len(class_names) != NUM_CLASSES:
        raise ValueError(f"class_names has {len(class_names)} names; expected {NUM_CLASSES}")

    occurrences, hits = class_counts_from_topk(topk, targets)
    scored = list(SCORED_CLASSES)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(occurrences[scored] > 0, hits[scored] / occurrences[scored], np.nan)
    return pd.DataFrame(
        {
            "class_id": scored,
            "predicate": [class_names[label] for label in scored],
            "occurrences": occurrences[scored],
            "hits": hits[scored],
            "recall": recall.astype(np.float64),
        }
    )


def per_class_recall(
    scores,
    targets,
    *,
    k: int = 3,
    mask_unlabeled: bool = True,
    class_names: Sequence[str] = PREDICATE_CLASSES,
) -> pd.DataFrame:
    """Tabulate recall@k of each scored class 6..55 from scores [N, 56]."""
    return per_class_recall_from_topk(
        _top_k_of_all_classes(scores, k, mask_unlabeled), targets, class_names=class_names
    )
