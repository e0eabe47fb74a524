"""Mean recall@k on hand-worked examples, both absent-class conventions."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from matchclip.classes import NUM_CLASSES, PREDICATE_CLASSES, SCORED_CLASSES
from matchclip.metrics import (
    class_counts_from_topk,
    evaluate_scores,
    evaluate_topk,
    mean_recall_at_k,
    per_class_recall,
    per_class_recall_from_topk,
    recall_from_topk,
    top_k,
)


def _example() -> tuple[np.ndarray, np.ndarray]:
    """Four images; every score not listed is 0.

    image  labels    nonzero scores
    0      {6, 7}    0: 9.0, 6: 5.0, 8: 4.0, 7: 3.0
    1      {6, 8}    8: 5.0, 12: 4.0, 13: 3.0, 6: 2.0
    2      {7}       7: 5.0, 2: 4.5, 14: 4.0, 15: 3.0
    3      {9, 10}   3: 6.0, 9: 5.0, 16: 4.0, 10: 3.5
    """
    scores = np.zeros((4, NUM_CLASSES), dtype=np.float32)
    for row, entries in enumerate(
        [
            {0: 9.0, 6: 5.0, 8: 4.0, 7: 3.0},
            {8: 5.0, 12: 4.0, 13: 3.0, 6: 2.0},
            {7: 5.0, 2: 4.5, 14: 4.0, 15: 3.0},
            {3: 6.0, 9: 5.0, 16: 4.0, 10: 3.5},
        ]
    ):
        for label, value in entries.items():
            scores[row, label] = value

    targets = np.zeros((4, NUM_CLASSES), dtype=np.float32)
    for row, labels in enumerate([(6, 7), (6, 8), (7,), (9, 10)]):
        targets[row, list(labels)] = 1.0
    return scores, targets


# Classes 0..5 masked, k=3:
#   top-3: image 0 -> 6 8 7, image 1 -> 8 12 13, image 2 -> 7 14 15, image 3 -> 9 16 10
#   recall: c6 1/2 (hit in image 0 only), c7 2/2, c8 1/1, c9 1/1, c10 1/1; sum = 4.5
#   official mean over 50 classes = 4.5 / 50 = 0.09; over the 5 present classes = 4.5 / 5 = 0.9
MASKED_OFFICIAL = 0.09
MASKED_PRESENT = 0.9

# Classes 0..5 not masked, k=3:
#   top-3: image 0 -> 0 6 8, image 1 -> 8 12 13, image 2 -> 7 2 14, image 3 -> 3 9 16
#   recall: c6 1/2, c7 1/2 (image 0 now misses 7), c8 1/1, c9 1/1, c10 0/1; sum = 3.0
#   official = 3.0 / 50 = 0.06; present = 3.0 / 5 = 0.6
UNMASKED_OFFICIAL = 0.06
UNMASKED_PRESENT = 0.6


def test_top_k_masks_unlabeled_classes():
    scores, _ = _example()
    expected = np.array([[6, 8, 7], [8, 12, 13], [7, 14, 15], [9, 16, 10]])
    np.testing.assert_array_equal(top_k(scores, 3), expected)


def test_top_k_unmasked_keeps_all_classes():
    scores, _ = _example()
    expected = np.array([[0, 6, 8], [8, 12, 13], [7, 2, 14], [3, 9, 16]])
    np.testing.assert_array_equal(top_k(scores, 3, mask_unlabeled=False), expected)


def test_top_k_returns_int64():
    scores, _ = _example()
    assert top_k(scores, 3).dtype == np.int64


def test_top_k_ties_prefer_lower_class_id():
    scores = np.zeros((2, NUM_CLASSES))
    scores[1, [20, 10]] = 1.0
    np.testing.assert_array_equal(top_k(scores, 3), [[6, 7, 8], [10, 20, 6]])


def test_top_k_ties_unmasked_start_at_class_0():
    scores = np.zeros((1, NUM_CLASSES))
    np.testing.assert_array_equal(top_k(scores, 3, mask_unlabeled=False), [[0, 1, 2]])


def test_top_k_masked_never_returns_unlabeled_with_negative_infinity():
    scores = np.full((1, NUM_CLASSES), -np.inf)
    scores[0, :6] = 100.0
    np.testing.assert_array_equal(top_k(scores, 3), [[6, 7, 8]])


def test_top_k_accepts_torch_tensor():
    scores, _ = _example()
    np.testing.assert_array_equal(top_k(torch.from_numpy(scores), 3), top_k(scores, 3))


def test_top_k_accepts_float16():
    scores, _ = _example()
    np.testing.assert_array_equal(top_k(scores.astype(np.float16), 3), top_k(scores, 3))


def test_top_k_k_limit_with_mask():
    scores = np.zeros((1, NUM_CLASSES))
    assert top_k(scores, 50).shape == (1, 50)
    with pytest.raises(ValueError, match="k=51 exceeds the 50 classes"):
        top_k(scores, 51)


def test_top_k_k_limit_without_mask():
    scores = np.zeros((1, NUM_CLASSES))
    assert top_k(scores, 56, mask_unlabeled=False).shape == (1, 56)
    with pytest.raises(ValueError, match="k=57"):
        top_k(scores, 57, mask_unlabeled=False)


@pytest.mark.parametrize("k", [0, -1, 2.5])
def test_top_k_invalid_k(k):
    with pytest.raises(ValueError, match="k="):
        top_k(np.zeros((1, NUM_CLASSES)), k)


def test_top_k_rejects_nan():
    scores = np.zeros((3, NUM_CLASSES))
    scores[2, 10] = np.nan
    with pytest.raises(ValueError, match="NaN .*row 2"):
        top_k(scores, 3)


def test_top_k_rejects_1d_scores():
    with pytest.raises(ValueError, match="shape"):
        top_k(np.zeros(NUM_CLASSES), 3)


def test_mean_recall_official_masked():
    scores, targets = _example()
    assert mean_recall_at_k(scores, targets) == pytest.approx(MASKED_OFFICIAL)


def test_mean_recall_present_masked():
    scores, targets = _example()
    assert mean_recall_at_k(scores, targets, absent="skip") == pytest.approx(MASKED_PRESENT)


def test_mean_recall_official_unmasked():
    scores, targets = _example()
    value = mean_recall_at_k(scores, targets, mask_unlabeled=False)
    assert value == pytest.approx(UNMASKED_OFFICIAL)


def test_mean_recall_present_unmasked():
    scores, targets = _example()
    value = mean_recall_at_k(scores, targets, mask_unlabeled=False, absent="skip")
    assert value == pytest.approx(UNMASKED_PRESENT)


def test_mean_recall_k1():
    # top-1: 6, 8, 7, 9 -> c6 1/2, c7 1/2, c8 1/1, c9 1/1, c10 0/1; sum = 3.0
    scores, targets = _example()
    assert mean_recall_at_k(scores, targets, k=1) == pytest.approx(3.0 / 50)
    assert mean_recall_at_k(scores, targets, k=1, absent="skip") == pytest.approx(3.0 / 5)


def test_mean_recall_k5():
    # Zero-score ties fill by lower id: image 0 -> 6 8 7 9 10, image 1 -> 8 12 13 6 7,
    # image 2 -> 7 14 15 6 8, image 3 -> 9 16 10 6 7; every present class is hit on
    # every image, so the sum is 5.0.
    scores, targets = _example()
    assert mean_recall_at_k(scores, targets, k=5) == pytest.approx(5.0 / 50)
    assert mean_recall_at_k(scores, targets, k=5, absent="skip") == pytest.approx(1.0)


def test_mean_recall_torch_inputs():
    scores, targets = _example()
    value = mean_recall_at_k(torch.from_numpy(scores), torch.from_numpy(targets))
    assert value == pytest.approx(MASKED_OFFICIAL)


def test_mean_recall_invalid_absent():
    scores, targets = _example()
    with pytest.raises(ValueError, match="absent='ignore'"):
        mean_recall_at_k(scores, targets, absent="ignore")


def test_mean_recall_perfect_on_all_classes():
    targets = np.zeros((50, NUM_CLASSES))
    targets[np.arange(50), np.arange(6, 56)] = 1
    assert mean_recall_at_k(targets * 10.0, targets) == pytest.approx(1.0)


def test_mean_recall_ignores_labels_in_unlabeled_classes():
    scores, targets = _example()
    targets[:, 0] = 1.0
    assert mean_recall_at_k(scores, targets) == pytest.approx(MASKED_OFFICIAL)


def test_mean_recall_no_present_class():
    scores = np.zeros((2, NUM_CLASSES))
    targets = np.zeros((2, NUM_CLASSES))
    assert mean_recall_at_k(scores, targets) == 0.0
    assert math.isnan(mean_recall_at_k(scores, targets, absent="skip"))


def test_mean_recall_rejects_row_mismatch():
    scores, targets = _example()
    with pytest.raises(ValueError, match="4 images but targets cover 3"):
        mean_recall_at_k(scores, targets[:3])


def test_mean_recall_rejects_narrow_scores():
    _, targets = _example()
    with pytest.raises(ValueError, match="one column per class"):
        mean_recall_at_k(np.zeros((4, 10)), targets)


def test_mean_recall_rejects_non_binary_targets():
    scores, targets = _example()
    targets[0, 6] = 0.5
    with pytest.raises(ValueError, match="only 0 and 1"):
        mean_recall_at_k(scores, targets)


def test_mean_recall_rejects_wrong_target_width():
    scores, _ = _example()
    with pytest.raises(ValueError, match="targets must be multi-hot"):
        mean_recall_at_k(scores, np.zeros((4, 50)))


def test_evaluate_scores_names_both_conventions():
    scores, targets = _example()
    result = evaluate_scores(scores, targets)
    assert result["mean_recall@3"] == pytest.approx(MASKED_OFFICIAL)
    assert result["mean_recall@3_present"] == pytest.approx(MASKED_PRESENT)
    assert result["num_present_classes"] == 5
    assert result["num_images"] == 4


def test_evaluate_scores_keys_follow_k():
    scores, targets = _example()
    result = evaluate_scores(scores, targets, k=5)
    assert set(result) == {"mean_recall@5", "mean_recall@5_present", "num_present_classes", "num_images"}


def test_recall_from_topk_matches_scores():
    scores, targets = _example()
    topk = [[6, 8, 7], [8, 12, 13], [7, 14, 15], [9, 16, 10]]
    assert recall_from_topk(topk, targets) == pytest.approx(MASKED_OFFICIAL)
    assert recall_from_topk(topk, targets, absent="skip") == pytest.approx(MASKED_PRESENT)


def test_recall_from_topk_order_within_row_irrelevant():
    _, targets = _example()
    reordered = [[7, 6, 8], [13, 12, 8], [15, 14, 7], [10, 16, 9]]
    assert recall_from_topk(reordered, targets) == pytest.approx(MASKED_OFFICIAL)


def test_evaluate_topk_counts_predicted_unlabeled_ids_as_misses():
    _, targets = _example()
    topk = [[0, 6, 8], [8, 12, 13], [7, 2, 14], [3, 9, 16]]
    result = evaluate_topk(topk, targets)
    assert result["mean_recall@3"] == pytest.approx(UNMASKED_OFFICIAL)


def test_class_counts_from_topk_values():
    _, targets = _example()
    occurrences, hits = class_counts_from_topk([[6, 8, 7], [8, 12, 13], [7, 14, 15], [9, 16, 10]], targets)
    assert occurrences[[6, 7, 8, 9, 10, 11]].tolist() == [2, 2, 1, 1, 1, 0]
    assert hits[[6, 7, 8, 9, 10, 11]].tolist() == [1, 2, 1, 1, 1, 0]


def test_recall_from_topk_rejects_duplicate_ids():
    _, targets = _example()
    with pytest.raises(ValueError, match="row 1 .*repeats"):
        recall_from_topk([[6, 8, 7], [8, 8, 13], [7, 14, 15], [9, 16, 10]], targets)


def test_recall_from_topk_rejects_out_of_range_id():
    _, targets = _example()
    with pytest.raises(ValueError, match="56 in row 2 is out of range 0..55"):
        recall_from_topk([[6, 8, 7], [8, 12, 13], [7, 14, 56], [9, 16, 10]], targets)


def test_recall_from_topk_rejects_fractional_ids():
    _, targets = _example()
    with pytest.raises(ValueError, match="integer class ids"):
        recall_from_topk(np.full((4, 3), 6.5), targets)


def test_per_class_recall_table_shape():
    scores, targets = _example()
    table = per_class_recall(scores, targets)
    assert isinstance(table, pd.DataFrame)
    assert list(table.columns) == ["class_id", "predicate", "occurrences", "hits", "recall"]
    assert table["class_id"].tolist() == list(SCORED_CLASSES)


def test_per_class_recall_table_values():
    scores, targets = _example()
    table = per_class_recall(scores, targets).set_index("class_id")
    assert table.loc[6, "predicate"] == PREDICATE_CLASSES[6]
    assert table.loc[6, "occurrences"] == 2
    assert table.loc[6, "hits"] == 1
    assert table.loc[6, "recall"] == pytest.approx(0.5)
    assert table.loc[7, "recall"] == pytest.approx(1.0)
    assert table.loc[10, "recall"] == pytest.approx(1.0)


def test_per_class_recall_absent_class_is_nan():
    scores, targets = _example()
    table = per_class_recall(scores, targets).set_index("class_id")
    assert table.loc[12, "occurrences"] == 0
    assert table.loc[12, "hits"] == 0
    assert np.isnan(table.loc[12, "recall"])
    assert int(table["recall"].notna().sum()) == 5


def test_per_class_recall_unmasked_values():
    scores, targets = _example()
    table = per_class_recall(scores, targets, mask_unlabeled=False).set_index("class_id")
    assert table.loc[7, "recall"] == pytest.approx(0.5)
    assert table.loc[10, "recall"] == pytest.approx(0.0)


def test_per_class_recall_mean_matches_present_convention():
    scores, targets = _example()
    table = per_class_recall(scores, targets)
    assert table["recall"].mean() == pytest.approx(MASKED_PRESENT)
    assert table["recall"].fillna(0.0).mean() == pytest.approx(MASKED_OFFICIAL)


def test_per_class_recall_from_topk_custom_names():
    _, targets = _example()
    names = [f"class {index}" for index in range(NUM_CLASSES)]
    table = per_class_recall_from_topk([[6, 8, 7], [8, 12, 13], [7, 14, 15], [9, 16, 10]], targets, class_names=names)
    assert table.loc[0, "predicate"] == "class 6"


def test_per_class_recall_rejects_short_class_names():
    scores, targets = _example()
    with pytest.raises(ValueError, match="class_names has 3 names"):
        per_class_recall(scores, targets, class_names=["a", "b", "c"])
