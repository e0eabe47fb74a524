"""Multi-label classification losses, selected by name.

Every loss module maps logits [B, C] and multi-hot targets [B, C] to a scalar,
the mean over all B * C elements.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from .errors import ConfigError

LOSS_NAMES = ("bce", "focal", "label_smoothing", "asymmetric")


def _check_shapes(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Return targets in the dtype of `logits` after checking that the shapes match."""
    if logits.shape != targets.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must have the same "
            "shape [batch, num_classes]"
        )
    return targets.to(dtype=logits.dtype)


def _check_number(name: str, value, *, low: float, high: float = math.inf, high_open: bool = False) -> float:
    """Return `value` as a float, raising ConfigError outside [low, high].

    With `high_open` the upper bound itself is also rejected.
    """
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"loss option {name}={value!r} is not a number") from None
    upper_ok = number < high if high_open else number <= high
    if not (number >= low and upper_ok):
        bracket = ")" if high_open else "]"
        raise ConfigError(f"loss option {name}={value!r} is out of range [{low}, {high}{bracket}")
    return number


class BCELoss(torch.nn.Module):
    """Binary cross-entropy on logits, mean over elements.

    pos_weight: optional weight [C] of the positive term per class.
    """

    def __init__(self, *, pos_weight: Sequence[float] | torch.Tensor | None = None) -> None:
        super().__init__()
        weight = None if pos_weight is None else torch.as_tensor(pos_weight, dtype=torch.float32)
        self.register_buffer("pos_weight", weight)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = _check_shapes(logits, targets)
        return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=self.pos_weight)


class FocalLoss(torch.nn.Module):
    """Sigmoid focal loss (Lin et al., 2017), mean over elements.

    Each element's BCE is scaled by (1 - p_t) ** gamma and, when alpha >= 0,
    by alpha for positives and 1 - alpha for negatives. alpha=-1 turns the
    class weighting off, so gamma=0 with alpha=-1 equals BCE.
    """

    def __init__(self, *, gamma: float = 2.0, alpha: float = 0.25) -> None:
        super().__init__()
        self.gamma = _check_number("gamma", gamma, low=0.0)
        if alpha == -1:
            self.alpha = -1.0
        else:
            self.alpha = _check_number("alpha", alpha, low=0.0, high=1.0)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = _check_shapes(logits, targets)
        return sigmoid_focal_loss(logits, targets, alpha=self.alpha, gamma=self.gamma, reduction="mean")

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, alpha={self.alpha}"


class LabelSmoothingBCELoss(torch.nn.Module):
    """BCE against smoothed targets t * (1 - eps) + eps / 2, mean over elements."""

    def __init__(self, *, eps: float = 0.1) -> None:
        super().__init__()
        self.eps = _check_number("eps", eps, low=0.0, high=1.0, high_open=True)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = _check_shapes(logits, targets)
        smoothed = targets * (1.0 - self.eps) + self.eps / 2.0
        return F.binary_cross_entropy_with_logits(logits, smoothed)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


def _focusing_weight(base: torch.Tensor, exponent: float) -> torch.Tensor:
    """Return base ** exponent with a finite gradient where base is 0.

    For 0 < exponent < 1 the derivative of base ** exponent at 0 is infinite,
    and autograd would turn 0 * inf into NaN; those elements get weight 0 and
    gradient 0 instead.
    """
    positive = base > 0
    safe_base = torch.where(positive, base, torch.ones_like(base))
    return torch.where(positive, safe_base.pow(exponent), torch.zeros_like(base))


class AsymmetricLoss(torch.nn.Module):
    """Asymmetric loss for multi-label classification (Ben-Baruch et al., ICCV 2021).

    With p = sigmoid(logit) and the shifted probability p_m = max(p - clip, 0):

        positive: -(1 - p) ** gamma_pos * log(p)
        negative: -p_m ** gamma_neg * log(1 - p_m)

    The shift discards easy negatives with p < clip entirely. Mean over
    elements. log(p) is computed as logsigmoid(logit), so very negative
    logits keep a gradient. With gamma_neg = gamma_pos = clip = 0 it equals BCE.
    """

    def __init__(self, *, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05) -> None:
        super().__init__()
        self.gamma_neg = _check_number("gamma_neg", gamma_neg, low=0.0)
        self.gamma_pos = _check_number("gamma_pos", gamma_pos, low=0.0)
        self.clip = _check_number("clip", clip, low=0.0, high=1.0, high_open=True)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = _check_shapes(logits, targets)
        probability = torch.sigmoid(logits)

        log_p = F.logsigmoid(logits)
        positive = log_p
        if self.gamma_pos > 0:
            positive = positive * _focusing_weight(1.0 - probability, self.gamma_pos)

        if self.clip > 0:
            # 1 - p_m >= clip > 0, so the log is finite without clamping.
            shifted = (probability - self.clip).clamp(min=0.0)
            log_not_shifted = torch.log(1.0 - shifted)
        else:
            shifted = probability
            log_not_shifted = F.logsigmoid(-logits)
        negative = log_not_shifted
        if self.gamma_neg > 0:
            negative = negative * _focusing_weight(shifted, self.gamma_neg)

        loss = -(targets * positive + (1.0 - targets) * negative)
        return loss.mean()

    def extra_repr(self) -> str:
        return f"gamma_neg={self.gamma_neg}, gamma_pos={self.gamma_pos}, clip={self.clip}"


_LOSSES: dict[str, tuple[type[torch.nn.Module], tuple[str, ...]]] = {
    "bce": (BCELoss, ("pos_weight",)),
    "focal": (FocalLoss, ("gamma", "alpha")),
    "label_smoothing": (LabelSmoothingBCELoss, ("eps",)),
    "asymmetric": (AsymmetricLoss, ("gamma_neg", "gamma_pos", "clip")),
}


def build_loss(name: str, **options) -> torch.nn.Module:
    """Build the loss `name` (one of LOSS_NAMES) with keyword `options`.

    Options: bce: pos_weight; focal: gamma (2.0), alpha (0.25, -1 for none);
    label_smoothing: eps (0.1); asymmetric: gamma_neg (4.0), gamma_pos
    (0.0), clip (0.05). Raises ConfigError on an unknown name or
    option, or an option value out of range.
    """
    key = str(name).strip().lower().replace("-", "_")
    if key not in _LOSSES:
        raise ConfigError(f"unknown loss {name!r}; valid losses: {', '.join(LOSS_NAMES)}")

    loss_class, valid_options = _LOSSES[key]
    unknown = sorted(set(options) - set(valid_options))
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(unknown)} for loss {key!r}; "
            f"valid options: {', '.join(valid_options)}"
        )
    return loss_class(**options)
