"""Baselines: a linear probe on CLIP embeddings, zero-shot CLIP scores and a ResNet classifier."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import Tensor, nn

from .classes import NUM_CLASSES
from .errors import MatchclipError

_logger = logging.getLogger(__name__)

RESNET_ARCHS = ("resnet18", "resnet34", "resnet50")


class LinearProbe(nn.Module):
    """A single linear layer on the frozen pooled CLIP image embedding: [B, E] -> [B, C] logits."""

    def __init__(self, embed_dim: int, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.linear = nn.Linear(embed_dim, num_classes)

    def forward(self, embeddings: Tensor) -> Tensor:
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embed_dim:
            raise ValueError(
                f"embeddings have shape {tuple(embeddings.shape)} but the linear probe expects "
                f"[B, {self.embed_dim}]; build it with embed_dim equal to the backbone's embedding width"
            )
        return self.linear(embeddings.to(self.linear.weight.dtype))


def zero_shot_scores(image_embeddings: np.ndarray | Tensor, prompt_embeddings: np.ndarray | Tensor) -> np.ndarray | Tensor:
    """Return cosine similarities [N, C] between image embeddings [N, E] and prompt embeddings [C, E].

    Both inputs are L2-normalised first; an all-zero vector scores 0 against
    everything. The result is a numpy array when `image_embeddings` is one and
    a tensor otherwise (on the image embeddings' device). Half-precision
    inputs are computed and returned in float32.
    """
    _check_embedding_shapes(image_embeddings, prompt_embeddings)

    if isinstance(image_embeddings, Tensor):
        images = image_embeddings
        prompts = torch.as_tensor(prompt_embeddings, device=images.device)
        dtype = torch.promote_types(torch.promote_types(images.dtype, prompts.dtype), torch.float32)
        images = nn.functional.normalize(images.to(dtype), dim=-1)
        prompts = nn.functional.normalize(prompts.to(dtype), dim=-1)
        return images @ prompts.T

    if isinstance(prompt_embeddings, Tensor):
        prompt_embeddings = prompt_embeddings.detach().cpu().numpy()
    images = np.asarray(image_embeddings)
    prompts = np.asarray(prompt_embeddings)
    dtype = np.result_type(images.dtype, prompts.dtype, np.float32)
    return _normalize_rows(images.astype(dtype)) @ _normalize_rows(prompts.astype(dtype)).T


def _check_embedding_shapes(image_embeddings: Any, prompt_embeddings: Any) -> None:
    image_shape = tuple(image_embeddings.shape)
    prompt_shape = tuple(prompt_embeddings.shape)
    if len(image_shape) != 2 or len(prompt_shape) != 2 or image_shape[1] != prompt_shape[1]:
        raise ValueError(
            f"image embeddings {image_shape} and prompt embeddings {prompt_shape} must be [N, E] and [C, E] "
            "with the same E; encode images and prompts with the same backbone"
        )


def _normalize_rows(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.maximum(norms, np.finfo(matrix.dtype).tiny)


def build_resnet(
    arch: str = "resnet50",
    *,
    weights: str | os.PathLike | None = "imagenet",
    num_classes: int = NUM_CLASSES,
) -> nn.Module:
    """Build a torchvision ResNet whose final fc is replaced by Linear(in_features, num_classes).

    weights:
        "imagenet": torchvision's default ImageNet weights for `arch`, read
            from the torch hub cache (torch.hub.get_dir()/checkpoints). They
            are never downloaded; a missing file raises MatchclipError that
            names the file and the folder to put it in.
        a file path: a state dict saved with torch.save, either of the
            1000-class ImageNet model or of a model from this function with
            the same num_classes (for example a fine-tuned checkpoint).
        None: random initialisation.
    """
    if arch not in RESNET_ARCHS:
        raise MatchclipError(f"unknown ResNet architecture {arch!r}; valid architectures: {', '.join(RESNET_ARCHS)}")

    model = getattr(torchvision.models, arch)(weights=None)
    in_features = model.fc.in_features

    if weights is None:
        model.fc = nn.Linear(in_features, num_classes)
        return model

    if isinstance(weights, str) and weights == "imagenet":
        path = imagenet_weights_path(arch)
        if not path.is_file():
            url = torchvision.models.get_model_weights(arch).DEFAULT.url
            raise MatchclipError(
                f"ImageNet weights for {arch} not found at {path}; downloads are disabled, so copy "
                f"{path.name} (from {url}) into {path.parent}, or set TORCH_HOME to a folder whose "
                "hub/checkpoints holds it, or pass weights=None for random initialisation"
            )
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise MatchclipError(
                f"ResNet weights file {path} not found; pass an existing state-dict file, "
                "'imagenet' or None for random initialisation"
            )

    state_dict = _read_state_dict(path)
    classes_in_file = state_dict.get("fc.weight", torch.empty(0)).shape[0]
    if classes_in_file == num_classes:
        model.fc = nn.Linear(in_features, num_classes)
        _load_state_dict(model, state_dict, path=path, arch=arch)
    else:
        _load_state_dict(model, state_dict, path=path, arch=arch)
        model.fc = nn.Linear(in_features, num_classes)

    _logger.info("loaded %s weights from %s", arch, path)
    return model


def imagenet_weights_path(arch: str) -> Path:
    """Return where the torch hub cache keeps torchvision's default ImageNet weights for `arch`."""
    url = torchvision.models.get_model_weights(arch).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types for a damaged or foreign file
        raise MatchclipError(
            f"could not read ResNet weights from {path} ({error}); pass a state dict saved with torch.save"
        ) from error

    # Training checkpoints often nest the weights under one key.
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise MatchclipError(f"{path} contains a {type(state).__name__}, not a state dict; save model.state_dict()")

    # Models wrapped in DataParallel or DistributedDataParallel prefix every key with "module.".
    if state and all(key.startswith("module.") for key in state):
        state = {key.removeprefix("module."): value for key, value in state.items()}
    return state


def _load_state_dict(model: nn.Module, state_dict: dict[str, Tensor], *, path: Path, arch: str) -> None:
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        raise MatchclipError(
            f"weights in {path} do not fit torchvision {arch}: {error}; "
            f"pass a state dict of {arch} or choose the architecture the file was saved from"
        ) from error
