"""Multi-label losses against NumPy formulas, their limits and their gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from matchclip.errors import ConfigError
from matchclip.losses import LOSS_NAMES, build_loss

LOGITS = np.array([[2.0, -1.0, 0.5, -3.0], [-0.5, 4.0, 0.0, 1.5]], dtype=np.float64)
TARGETS = np.array([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]], dtype=np.float64)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _bce(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    p = _sigmoid(logits)
    return -(targets * np.log(p) + (1.0 - targets) * np.log(1.0 - p))


def _loss(name: str, logits=LOGITS, targets=TARGETS, **options) -> float:
    module = build_loss(name, **options)
    return float(module(torch.tensor(logits), torch.tensor(targets)))


def test_bce_single_element_by_hand():
    # logit 0, target 1: -log(sigmoid(0)) = log(2)
    assert _loss("bce", [[0.0]], [[1.0]]) == pytest.approx(np.log(2.0))


def test_bce_matches_numpy():
    assert _loss("bce") == pytest.approx(_bce(LOGITS, TARGETS).mean())


def test_bce_pos_weight():
    weight = np.array([2.0, 1.0, 3.0, 1.0])
    p = _sigmoid(LOGITS)
    expected = -(weight * TARGETS * np.log(p) + (1.0 - TARGETS) * np.log(1.0 - p)).mean()
    assert _loss("bce", pos_weight=weight.tolist()) == pytest.approx(expected)


def test_focal_matches_numpy():
    p = _sigmoid(LOGITS)
    p_t = p * TARGETS + (1.0 - p) * (1.0 - TARGETS)
    alpha_t = 0.25 * TARGETS + 0.75 * (1.0 - TARGETS)
    expected = (alpha_t * (1.0 - p_t) ** 2 * _bce(LOGITS, TARGETS)).mean()
    assert _loss("focal") == pytest.approx(expected)


def test_focal_gamma0_alpha_off_equals_bce():
    assert _loss("focal", gamma=0.0, alpha=-1) == pytest.approx(_loss("bce"))


def test_focal_down_weights_easy_examples():
    # A confident correct prediction (logit 4, target 1) loses far more
    # weight than a wrong one (logit -4, target 1).
    easy = _loss("focal", [[4.0]], [[1.0]], alpha=-1) / _loss("bce", [[4.0]], [[1.0]])
    hard = _loss("focal", [[-4.0]], [[1.0]], alpha=-1) / _loss("bce", [[-4.0]], [[1.0]])
    assert easy < 1e-3
    assert hard > 0.9


def test_label_smoothing_matches_numpy():
    smoothed = TARGETS * 0.9 + 0.05
    assert _loss("label_smoothing") == pytest.approx(_bce(LOGITS, smoothed).mean())


def test_label_smoothing_single_element_by_hand():
    # eps 0.2 turns target 1 into 0.9; logit 0 gives -(0.9 + 0.1) * log(0.5) = log(2)
    assert _loss("label_smoothing", [[0.0]], [[1.0]], eps=0.2) == pytest.approx(np.log(2.0))


def test_label_smoothing_eps0_equals_bce():
    assert _loss("label_smoothing", eps=0.0) == pytest.approx(_loss("bce"))


def test_label_smoothing_minimum_not_at_saturation():
    # With smoothing the optimum for a positive is sigmoid(x) = 0.95, not x -> inf.
    at_target = _loss("label_smoothing", [[np.log(0.95 / 0.05)]], [[1.0]])
    saturated = _loss("label_smoothing", [[12.0]], [[1.0]])
    assert at_target < saturated


def test_asymmetric_matches_numpy():
    p = _sigmoid(LOGITS)
    p_m = np.maximum(p - 0.05, 0.0)
    positive = TARGETS * np.log(p)
    negative = (1.0 - TARGETS) * p_m**4 * np.log(1.0 - p_m)
    expected = -(positive + negative).mean()
    assert _loss("asymmetric") == pytest.approx(expected)


def test_asymmetric_gamma_pos_matches_numpy():
    p = _sigmoid(LOGITS)
    p_m = np.maximum(p - 0.1, 0.0)
    positive = TARGETS * (1.0 - p) ** 1.0 * np.log(p)
    negative = (1.0 - TARGETS) * p_m**2 * np.log(1.0 - p_m)
    expected = -(positive + negative).mean()
    assert _loss("asymmetric", gamma_pos=1.0, gamma_neg=2.0, clip=0.1) == pytest.approx(expected)


def test_asymmetric_no_focusing_no_clip_equals_bce():
    assert _loss("asymmetric", gamma_neg=0.0, gamma_pos=0.0, clip=0.0) == pytest.approx(_loss("bce"))


def test_asymmetric_easy_negative_is_discarded():
    # sigmoid(-4) = 0.018 < clip 0.05, so the shifted probability is 0.
    assert _loss("asymmetric", [[-4.0]], [[0.0]]) == 0.0


def test_asymmetric_positive_term_is_bce_by_default():
    assert _loss("asymmetric", [[0.7]], [[1.0]]) == pytest.approx(_loss("bce", [[0.7]], [[1.0]]))


@pytest.mark.parametrize(
    "name, options",
    [
        ("bce", {}),
        ("focal", {}),
        ("label_smoothing", {}),
        ("asymmetric", {}),
        ("asymmetric", {"gamma_neg": 0.5, "gamma_pos": 0.5}),
    ],
)
def test_gradients_finite_for_extreme_logits(name, options):
    logits = torch.tensor([[-40.0, -4.0, 0.0, 4.0, 40.0]] * 2, requires_grad=True)
    targets = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0], [0.0, 1.0, 0.0, 1.0, 0.0]])
    loss = build_loss(name, **options)(logits, targets)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_loss_is_scalar_and_decreases_toward_targets(name):
    targets = torch.tensor(TARGETS)
    module = build_loss(name)
    wrong = module(torch.tensor(-4.0 * (2 * TARGETS - 1)), targets)
    right = module(torch.tensor(4.0 * (2 * TARGETS - 1)), targets)
    assert wrong.ndim == 0
    assert right < wrong


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_loss_accepts_float32_logits_with_int_targets(name):
    logits = torch.tensor(LOGITS, dtype=torch.float32)
    value = build_loss(name)(logits, torch.tensor(TARGETS, dtype=torch.int64))
    assert value.dtype == torch.float32


def test_build_loss_normalizes_name():
    assert type(build_loss("Label-Smoothing")) is type(build_loss("label_smoothing"))


def test_unknown_loss_lists_valid_names():
    with pytest.raises(ConfigError, match="unknown loss 'hinge'; valid losses: bce, focal, label_smoothing, asymmetric"):
        build_loss("hinge")


def test_unknown_option_lists_valid_options():
    with pytest.raises(ConfigError, match="unknown option.* gama .*valid options: gamma, alpha"):
        build_loss("focal", gama=2.0)


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("focal", {"gamma": -1.0}, "gamma=-1.0"),
        ("focal", {"alpha": 1.5}, "alpha=1.5"),
        ("label_smoothing", {"eps": 1.0}, "eps=1.0"),
        ("asymmetric", {"clip": -0.1}, "clip=-0.1"),
        ("asymmetric", {"gamma_neg": "four"}, "not a number"),
    ],
)
def test_invalid_option_values(name, options, match):
    with pytest.raises(ConfigError, match=match):
        build_loss(name, **options)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same shape"):
        build_loss("bce")(torch.zeros(2, 56), torch.zeros(2, 55))
