"""Frozen open_clip backbones: all image tokens, pooled image embeddings and prompt embeddings.

`load_backbone` builds any open_clip model by name with weights from one of
four sources: random initialisation from a seed, an open_clip pretrained tag,
a checkpoint file, or a folder written by `save_backbone` ("local-dir:").
Shapes (token count, widths, patch grid) are read from the model, never
assumed. Importing this module registers the model configs in
matchclip/model_configs/ with open_clip, among them the tiny random
`matchclip-tiny-vit32` that the CPU demo uses.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import open_clip
import torch
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transform import PreprocessCfg, image_transform_v2
from open_clip.transformer import VisionTransformer
from PIL import Image
from torch import Tensor

from .classes import DEFAULT_PROMPT_TEMPLATE
from .errors import MatchclipError
from .fileio import atomic_path, atomic_write_json

logger = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
TINY_MODEL = "matchclip-tiny-vit32"
LOCAL_DIR_PREFIX = "local-dir:"
CONFIG_FILE_NAME = "open_clip_config.json"

# open_clip's order of preference when a local-dir folder holds several weight files.
LOCAL_DIR_WEIGHT_NAMES = (
    HF_SAFE_WEIGHTS_NAME,
    "open_clip_pytorch_model.safetensors",
    HF_WEIGHTS_NAME,
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.pth",
    "model.pth",
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth")

# Prompts per text-encoder batch.
PROMPT_BATCH_SIZE = 256


_registered_config_folders: set[Path] = set()


def register_model_configs(folder: str | os.PathLike = MODEL_CONFIG_DIR) -> None:
    """Register every *.json model config in `folder` with open_clip; a second call for a folder does nothing."""
    folder = Path(folder).resolve()
    if folder in _registered_config_folders:
        return
    open_clip.add_model_config(folder)
    _registered_config_folders.add(folder)


register_model_configs()


# Token definition of each tower kind. It is part of the fingerprint, so caches
# built with another definition are not reused.
TOKEN_DEFINITIONS = {
    "vit": "vit: transformer output, all tokens, ln_post, before projection",
    "resnet": "resnet: layer4 spatial mean + h*w positions, no normalisation",
}


@dataclass
class WeightsSource:
    """Weights source of a backbone, resolved to local files."""

    kind: str  # "random", "tag", "checkpoint" or "local-dir"
    model_name: str  # name passed to open_clip.create_model
    weights_id: str
    checkpoint: Path | None = None
    quick_gelu: bool = False
    preprocess_overrides: dict = field(default_factory=dict)


class Backbone(torch.nn.Module):
    """A frozen open_clip model that returns every image token and the pooled embedding.

    The model stays in eval mode with requires_grad False on every parameter;
    `train()` leaves it in eval mode. On CUDA, encoding runs under float16
    autocast and the outputs are converted to float32. A dry run at
    construction sets num_tokens (T), token_width (W), embed_dim (E),
    grid_size (patch rows, patch columns) and num_prefix_tokens
    (T - rows * columns, the class token of a ViT).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        name: str,
        pretrained: str | None,
        weights_id: str,
        model_config: dict,
        tokenizer_name: str,
    ):
        super().__init__()
        self.model = model
        self.name = name
        self.pretrained = pretrained
        self.weights_id = weights_id
        self.model_config = model_config
        self.tower = _vision_tower_kind(model.visual, name)

        self.preprocess_config = _preprocess_config(model)
        preprocess_cfg = dict(self.preprocess_config, size=tuple(self.preprocess_config["size"]))
        self.preprocess: Callable[[Image.Image], Tensor] = image_transform_v2(
            PreprocessCfg(**preprocess_cfg), is_train=False
        )
        self.tokenizer_name = tokenizer_name

        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.eval()

        self._measure_shapes()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> "Backbone":
        """Keep eval mode: the backbone is frozen, so dropout and batch-norm updates stay off."""
        return super().train(False)

    def encode_images(self, images: Tensor | Sequence[Image.Image]) -> tuple[Tensor, Tensor]:
        """Encode images in one forward pass of the vision tower.

        `images` is a preprocessed batch [B, 3, H, W] or a list of PIL images,
        which are preprocessed here. Returns, on the backbone's device:

        - tokens [B, T, W] float32. For a ViT these are the class token and
          all patch tokens of the last transformer block, after the final
          LayerNorm (ln_post) and before the projection to the embedding
          space. For a ModifiedResNet they are the spatial mean of the last
          feature map followed by its h*w positions, without normalisation.
        - embedding [B, E] float32, the model's pooled and projected image
          embedding (not L2-normalised).
        """
        if not isinstance(images, Tensor):
            images = torch.stack([self.preprocess(image) for image in images])
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected an image batch [B, 3, H, W], got shape {tuple(images.shape)}")
        images = images.to(self.device, non_blocking=True)

        captured: dict[str, Tensor] = {}
        caller = threading.get_ident()

        def capture(module: torch.nn.Module, inputs: Any, output: Tensor) -> None:
            # The hook sits on a shared module, so a forward pass in another thread must not overwrite it.
            if threading.get_ident() == caller:
                captured["features"] = output

        source = self.model.visual.transformer if self.tower == "vit" else self.model.visual.layer4
        handle = source.register_forward_hook(capture)
        try:
            with torch.no_grad(), self._autocast():
                embeddings = self.model.encode_image(images)
                tokens = self._tokens_from_features(captured["features"], batch_size=images.shape[0])
        finally:
            handle.remove()
        return tokens.float(), embeddings.float()

    def encode_prompts(self, class_names: Sequence[str], template: str = DEFAULT_PROMPT_TEMPLATE) -> Tensor:
        """Encode `template.format(name)` for each class name: [C, E] float32, not L2-normalised."""
        if "{}" not in template:
            raise ValueError(f"prompt template {template!r} has no '{{}}' placeholder for the class name")
        prompts = [template.format(name) for name in class_names]

        tokenizer = _tokenizer(self.tokenizer_name)
        embeddings = []
        for start in range(0, len(prompts), PROMPT_BATCH_SIZE):
            text = tokenizer(prompts[start : start + PROMPT_BATCH_SIZE]).to(self.device)
            with torch.no_grad(), self._autocast():
                embeddings.append(self.model.encode_text(text).float())
        return torch.cat(embeddings)

    def fingerprint(self) -> dict:
        """Identity of everything that determines the encoder outputs, as JSON-ready values."""
        return {
            "model": self._fingerprint_name(),
            "architecture": _sha256_json(self.model_config),
            "weights": self.weights_id,
            "preprocess": self.preprocess_config,
            "tokens": TOKEN_DEFINITIONS[self.tower],
        }

    def _fingerprint_name(self) -> str:
        # A local-dir folder is identified by its config and weights, not by where it sits on disk.
        if self.name.startswith(LOCAL_DIR_PREFIX):
            return "local-dir"
        return self.name

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def _tokens_from_features(self, features: Tensor, *, batch_size: int) -> Tensor:
        if self.tower == "resnet":
            patches = features.flatten(2).transpose(1, 2)  # [B, C, h, w] -> [B, h*w, C]
            return torch.cat([patches.mean(dim=1, keepdim=True), patches], dim=1)

        # open_clip's Transformer.forward returns [B, T, W] for batch_first True and False alike.
        if features.shape[0] != batch_size:
            raise MatchclipError(
                f"the vision transformer of '{self.name}' returned features of shape {tuple(features.shape)} "
                f"for a batch of {batch_size}, expected [B, T, W]; this open_clip version is not supported "
                "(matchclip is tested with open_clip_torch 3.3.0)"
            )
        return self.model.visual.ln_post(features)

    def _measure_shapes(self) -> None:
        """Set num_tokens, token_width, embed_dim and grid_size from one dry run."""
        height, width = self.preprocess_config["size"]
        probe = torch.zeros(1, 3, height, width)
        tokens, embeddings = self.encode_images(probe)

        self.num_tokens = int(tokens.shape[1])
        self.token_width = int(tokens.shape[2])
        self.embed_dim = int(embeddings.shape[1])
        if self.tower == "vit":
            self.grid_size = tuple(int(size) for size in self.model.visual.grid_size)
        else:
            self.grid_size = _resnet_grid(self.model.visual, probe.to(self.device))
        self.num_prefix_tokens = self.num_tokens - self.grid_size[0] * self.grid_size[1]
        if self.num_prefix_tokens < 0:
            raise MatchclipError(
                f"backbone '{self.name}' returned {self.num_tokens} image tokens, fewer than its "
                f"{self.grid_size[0]}x{self.grid_size[1]} patch grid; this vision tower is not supported"
            )
        logger.info(
            "backbone %s (%s): %d image tokens (%d prefix + %dx%d patches) of width %d, embedding width %d",
            self.name,
            self.weights_id,
            self.num_tokens,
            self.num_prefix_tokens,
            self.grid_size[0],
            self.grid_size[1],
            self.token_width,
            self.embed_dim,
        )


def load_backbone(
    name: str,
    pretrained: str | None = None,
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
    quick_gelu: bool | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Backbone:
    """Build a frozen open_clip backbone.

    `pretrained` is None (random initialisation from `seed`), an open_clip tag
    such as "openai" or "laion2b_s34b_b88k", a checkpoint file, or
    "local-dir:/folder" written by `save_backbone` (`name` may also be
    "local-dir:/folder"). Weights of the "openai" tags were trained with
    QuickGELU, so those tags build the model with QuickGELU activations;
    `quick_gelu` forces the choice for other sources. `cache_dir` is where
    tag downloads are looked up and stored (open_clip's default when None).
    """
    source = _resolve_source(name, pretrained, seed=seed, quick_gelu=quick_gelu, cache_dir=cache_dir)
    model = _create_model(name, pretrained, source, seed=seed)
    model = model.to(torch.device(device))

    if source.kind == "local-dir":
        model_config = _read_local_dir_config(Path(source.model_name[len(LOCAL_DIR_PREFIX) :]))["model_cfg"]
    else:
        # create_model looks names up with "/" replaced by "-" (open_clip 3.3.0).
        model_config = open_clip.get_model_config(source.model_name.replace("/", "-"))
        if source.quick_gelu:
            model_config["quick_gelu"] = True

    return Backbone(
        model,
        name=source.model_name if source.kind == "local-dir" else name,
        pretrained=pretrained,
        weights_id=source.weights_id,
        model_config=model_config,
        tokenizer_name=source.model_name,
    )


def save_backbone(backbone: Backbone, folder: str | os.PathLike) -> Path:
    """Write `folder`/open_clip_config.json and the weights so "local-dir:folder" loads the backbone back.

    Weights go to open_clip_model.safetensors, the file open_clip prefers
    when a folder contains several; without the safetensors package they go to
    open_clip_pytorch_model.bin.
    """
    folder = Path(folder).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().contiguous() for key, value in backbone.model.state_dict().items()}

    try:
        from safetensors.torch import save_file
    except ImportError:
        weights_path = folder / HF_WEIGHTS_NAME
        with atomic_path(weights_path) as tmp:
            torch.save(state, tmp)
    else:
        weights_path = folder / HF_SAFE_WEIGHTS_NAME
        with atomic_path(weights_path) as tmp:
            save_file(state, str(tmp))

    config = {
        "model_cfg": backbone.model_config,
        "preprocess_cfg": backbone.preprocess_config,
        "matchclip": {"source_model": backbone.name, "source_weights": backbone.weights_id},
    }
    atomic_write_json(folder / CONFIG_FILE_NAME, config)
    logger.info("saved backbone %s (%s) to %s", backbone.name, backbone.weights_id, folder)
    return folder


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, memoised per (path, size, mtime)."""
    stat = os.stat(path)
    return _sha256_file_cached(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256_file_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=8)
def _tokenizer(name: str) -> Callable[[list[str]], Tensor]:
    # Building the BPE tokenizer takes a noticeable fraction of a second, so it is built on first use and shared.
    return open_clip.get_tokenizer(name)


def _sha256_json(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=list)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _resolve_source(
    name: str,
    pretrained: str | None,
    *,
    seed: int,
    quick_gelu: bool | None,
    cache_dir: str | os.PathLike | None,
) -> WeightsSource:
    if name.startswith(LOCAL_DIR_PREFIX) or (pretrained or "").startswith(LOCAL_DIR_PREFIX):
        return _resolve_local_dir(name, pretrained)

    if open_clip.get_model_config(name.replace("/", "-")) is None:
        raise MatchclipError(
            f"unknown open_clip model '{name}'; choose one of open_clip.list_models() "
            f"(for example ViT-B-32, ViT-B-16, ViT-L-14) or '{TINY_MODEL}', "
            "or pass a folder written by save_backbone as 'local-dir:/path/to/folder'"
        )

    if pretrained is None:
        return WeightsSource(
            kind="random", model_name=name, weights_id=f"random:seed={seed}", quick_gelu=bool(quick_gelu)
        )

    tag_config = open_clip.get_pretrained_cfg(name, pretrained)
    if tag_config:
        return _resolve_tag(name, pretrained, tag_config, quick_gelu=quick_gelu, cache_dir=cache_dir)

    checkpoint = Path(pretrained).expanduser()
    if checkpoint.is_file():
        return WeightsSource(
            kind="checkpoint",
            model_name=name,
            weights_id=f"sha256:{sha256_file(checkpoint)}",
            checkpoint=checkpoint.resolve(),
            quick_gelu=bool(quick_gelu),
        )

    tags = open_clip.list_pretrained_tags_by_model(name)
    raise MatchclipError(
        f"pretrained '{pretrained}' for model '{name}' is neither an existing checkpoint file nor a known "
        f"open_clip tag (tags of {name}: {', '.join(tags) or 'none'}); pass an existing file path, "
        "one of those tags, 'local-dir:/path/to/folder', or None for random weights"
    )


def _resolve_local_dir(name: str, pretrained: str | None) -> WeightsSource:
    spec = name if name.startswith(LOCAL_DIR_PREFIX) else pretrained
    folder = Path(spec[len(LOCAL_DIR_PREFIX) :]).expanduser().resolve()
    config = _read_local_dir_config(folder)

    recorded = config.get("matchclip", {}).get("source_model")
    if not name.startswith(LOCAL_DIR_PREFIX) and recorded and recorded != name:
        logger.warning(
            "model name '%s' differs from '%s' recorded in %s; the folder's config is used",
            name,
            recorded,
            folder / CONFIG_FILE_NAME,
        )

    weights = _local_dir_weights(folder)
    return WeightsSource(
        kind="local-dir",
        model_name=f"{LOCAL_DIR_PREFIX}{folder}",
        weights_id=f"sha256:{sha256_file(weights)}",
        checkpoint=weights,
    )


def _read_local_dir_config(folder: Path) -> dict:
    config_path = folder / CONFIG_FILE_NAME
    if not config_path.is_file():
        raise MatchclipError(
            f"{config_path} not found; a local-dir backbone folder needs {CONFIG_FILE_NAME} "
            "and a weights file, as written by matchclip.backbone.save_backbone"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MatchclipError(f"could not read {config_path}: {error}; write it again with save_backbone") from error
    if not isinstance(config, dict) or "model_cfg" not in config:
        raise MatchclipError(
            f"{config_path} has no 'model_cfg' entry; write the folder with save_backbone or copy an "
            "open_clip_config.json from a Hugging Face open_clip model"
        )
    return config


def _local_dir_weights(folder: Path) -> Path:
    """Return the weights file that open_clip loads from a local-dir folder."""
    candidates = sorted(path for path in folder.iterdir() if path.suffix in WEIGHT_SUFFIXES)
    if not candidates:
        raise MatchclipError(
            f"no weights file (*.safetensors, *.bin, *.pth) in {folder}; save the backbone there "
            "with save_backbone or copy the open_clip weights file next to its open_clip_config.json"
        )
    for preferred in LOCAL_DIR_WEIGHT_NAMES:
        if folder / preferred in candidates:
            return folder / preferred
    candidates.sort(key=lambda path: path.suffix != ".safetensors")
    return candidates[0]


def _resolve_tag(
    name: str,
    tag: str,
    tag_config: dict,
    *,
    quick_gelu: bool | None,
    cache_dir: str | os.PathLike | None,
) -> WeightsSource:
    checkpoint = _cached_tag_file(tag_config, cache_dir)
    if checkpoint is None:
        if _downloads_disabled():
            raise MatchclipError(
                f"weights for model '{name}' with tag '{tag}' are not in the local cache and downloads are "
                "disabled (HF_HUB_OFFLINE is set). Download the weights on a machine with internet access "
                f"(open_clip.create_model('{name}', pretrained='{tag}') stores them in the Hugging Face cache), "
                "then pass the weights file as pretrained='/path/to/open_clip_model.safetensors', or a folder "
                "written by save_backbone as pretrained='local-dir:/path/to/folder'"
            )
        logger.info("downloading weights for %s tag %s", name, tag)
        try:
            downloaded = open_clip.download_pretrained(tag_config, cache_dir=None if cache_dir is None else str(cache_dir))
        except Exception as error:  # network and hub errors come in many types
            raise MatchclipError(
                f"could not download weights for model '{name}' with tag '{tag}': {error}. Download them "
                "elsewhere and pass the weights file as pretrained='/path/to/file', or a folder written by "
                "save_backbone as pretrained='local-dir:/path/to/folder'"
            ) from error
        checkpoint = Path(downloaded)

    uses_quick_gelu = bool(tag_config.get("quick_gelu", False)) if quick_gelu is None else quick_gelu
    if uses_quick_gelu and not name.endswith("-quickgelu"):
        logger.info("building %s with QuickGELU activations, as the '%s' weights were trained with them", name, tag)

    overrides = {key: tag_config[key] for key in asdict(PreprocessCfg()) if key in tag_config}
    return WeightsSource(
        kind="tag",
        model_name=name,
        weights_id=tag,
        checkpoint=checkpoint,
        quick_gelu=uses_quick_gelu,
        preprocess_overrides=overrides,
    )


def _downloads_disabled() -> bool:
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(variable, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return True
    return False


def _cached_tag_file(tag_config: dict, cache_dir: str | os.PathLike | None) -> Path | None:
    """Find the local weights file of an open_clip tag without network access; None when it is absent."""
    if tag_config.get("file") and Path(tag_config["file"]).is_file():
        return Path(tag_config["file"])

    hub_entry = tag_config.get("hf_hub", "")
    if hub_entry:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            repo_id, filename = os.path.split(hub_entry)
            filenames = [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
            if filename:
                filenames = [filename]
                if filename.endswith((".bin", ".pth")):
                    filenames.insert(0, filename[:-4] + ".safetensors")
            for candidate in filenames:
                found = try_to_load_from_cache(
                    repo_id, candidate, cache_dir=None if cache_dir is None else str(cache_dir)
                )
                if isinstance(found, str) and Path(found).is_file():
                    return Path(found)

    url = tag_config.get("url", "")
    if url:
        folder = Path(cache_dir) if cache_dir is not None else Path("~/.cache/clip").expanduser()
        path = folder / os.path.basename(url)
        if path.is_file():
            return path
    return None


def _create_model(name: str, pretrained: str | None, source: WeightsSource, *, seed: int) -> torch.nn.Module:
    """Build the open_clip model on the CPU; random weights come from a forked, seeded RNG."""
    if source.kind == "local-dir":
        arguments = {"model_name": source.model_name}
    else:
        arguments = {
            "model_name": source.model_name,
            "pretrained": None if source.checkpoint is None else str(source.checkpoint),
            "force_quick_gelu": source.quick_gelu,
            "force_preprocess_cfg": source.preprocess_overrides or None,
        }

    # open_clip warns on the root logger whenever it builds a model without
    # weights; random weights are what pretrained=None asks for, so that
    # warning is dropped here and only here.
    random_weights = source.kind != "local-dir" and source.checkpoint is None
    quiet = _DropRecords("No pretrained weights loaded") if random_weights else None
    root_logger = logging.getLogger()
    if quiet is not None:
        root_logger.addFilter(quiet)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return open_clip.create_model(device="cpu", **arguments)
    except (RuntimeError, ValueError, KeyError, OSError) as error:
        raise MatchclipError(
            f"could not build open_clip model '{name}' with pretrained={pretrained!r}: {error}. "
            "Check that the weights were trained for this architecture (same model name, image size "
            "and QuickGELU setting)"
        ) from error
    finally:
        if quiet is not None:
            root_logger.removeFilter(quiet)


class _DropRecords(logging.Filter):
    """Logging filter that drops records whose message starts with a prefix."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def _vision_tower_kind(visual: torch.nn.Module, name: str) -> str:
    if isinstance(visual, VisionTransformer) and visual.attn_pool is None:
        return "vit"
    if isinstance(visual, ModifiedResNet):
        return "resnet"
    raise MatchclipError(
        f"the vision tower of '{name}' is a {type(visual).__name__}"
        f"{' with attentional pooling' if isinstance(visual, VisionTransformer) else ''}; image tokens "
        "are supported for open_clip VisionTransformer towers without attentional pooling (ViT-*) and "
        "ModifiedResNet towers (RN50, RN101, RN50x4, ...). Choose one of those models"
    )


def _preprocess_config(model: torch.nn.Module) -> dict:
    """Return the model's preprocessing settings as JSON-ready values, with size as [H, W]."""
    config = dict(asdict(PreprocessCfg()))
    config.update(getattr(model.visual, "preprocess_cfg", {}) or {})
    size = config["size"]
    config["size"] = [int(size), int(size)] if isinstance(size, int) else [int(value) for value in size]
    for key in ("mean", "std"):
        value = config[key]
        config[key] = [float(item) for item in value] if isinstance(value, (list, tuple)) else [float(value)] * 3
    return config


def _resnet_grid(visual: ModifiedResNet, probe: Tensor) -> tuple[int, int]:
    captured: dict[str, Tensor] = {}
    handle = visual.layer4.register_forward_hook(lambda module, inputs, output: captured.update(features=output))
    try:
        with torch.no_grad():
            visual(probe)
    finally:
        handle.remove()
    height, width = captured["features"].shape[-2:]
    return int(height), int(width)
