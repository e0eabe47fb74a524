"""MatchCLIP head: image tokens matched against relation prompt embeddings.

A frozen CLIP backbone provides every image token [B, T, W] and one text
embedding per predicate prompt [C, E]. The head

1. projects both to width D and adds a learnable token-type embedding,
2. runs `fusion_depth` transformer layers over the concatenated tokens,
3. runs `matching_blocks` matching blocks, where each image token attends to
   the relation tokens (single head) and the result is added back onto the
   image token,
4. prepends `cls_tokens` learnable tokens to the matched image tokens and runs
   `readout_depth` transformer layers over them,
5. maps the (mean) cls output through LayerNorm and an MLP to the logits.

Every width, depth and token count comes from constructor arguments or from
the input shapes, so one class serves every backbone. Model sizes live as JSON
presets in `matchclip/presets/`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .classes import NUM_CLASSES
from .errors import ConfigError

_logger = logging.getLogger(__name__)

PRESET_DIR = Path(__file__).resolve().parent / "presets"
PRESET_NAMES = ("base", "large", "huge", "demo")

# Constructor arguments of MatchCLIP that a preset's "head" section may set,
# with their defaults. The input widths are not among them because they come
# from the backbone that produced the features.
HEAD_DEFAULTS: dict[str, Any] = {
    "num_classes": NUM_CLASSES,
    "hidden": 512,
    "mlp": 1024,
    "heads": 8,
    "fusion_depth": 3,
    "readout_depth": 3,
    "matching_blocks": 1,
    "cls_tokens": 1,
    "dropout": 0.1,
    "attention_dropout": 0.0,
    "relation_tokens": True,
    "fused_attention": True,
}
PRESET_KEYS = ("backbone", "head", "description")
BACKBONE_KEYS = ("name", "pretrained", "image_size", "patch_size")

# Smallest allowed value of each integer setting. Zero fusion layers or zero
# matching blocks are valid ablations. The readout stack needs at least one
# layer, because otherwise the cls token never attends to the image tokens.
_MIN_INT_SETTING = {
    "image_width": 1,
    "text_width": 1,
    "num_classes": 1,
    "hidden": 1,
    "mlp": 1,
    "heads": 1,
    "fusion_depth": 0,
    "readout_depth": 1,
    "matching_blocks": 0,
    "cls_tokens": 1,
}
_BOOL_SETTINGS = ("relation_tokens", "fused_attention")


# A CPU dropout mask draws one 16-bit integer per element.
_MASK_LEVELS = 1 << 16


def dropout_mask(shape: torch.Size | tuple[int, ...], p: float, *, dtype: torch.dtype) -> Tensor:
    """Return a random CPU mask of `shape` for inverted dropout: 0 with probability ~p, else 1 / (1 - p).

    p is rounded to a multiple of 1/65536 and the scale uses the rounded
    value, so the mask's mean is exactly 1 in expectation. The draws are
    64-bit random words from torch's default generator, each cut into four
    16-bit draws. On a CPU, torch.nn.functional.dropout makes one Bernoulli
    draw per element, which costs about 2.5x more.
    """
    dropped = round(p * _MASK_LEVELS)
    numel = math.prod(shape)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64).random_(-(1 << 63), None)
    draws = words.view(torch.int16)[:numel].view(shape)  # uniform over [-32768, 32767]
    keep = draws >= dropped - _MASK_LEVELS // 2
    return keep.to(dtype).mul_(_MASK_LEVELS / (_MASK_LEVELS - dropped))


class Dropout(nn.Module):
    """Inverted dropout with probability `p` in [0, 1); the identity in eval mode or for p = 0.

    On a CPU it multiplies by `dropout_mask`, which makes a training step of
    the Base head about 5% faster than nn.Dropout. On other devices it calls
    torch.nn.functional.dropout, whose fused kernels are already fast.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        return x * dropout_mask(x.shape, self.p, dtype=x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class SelfAttention(nn.Module):
    """Multi-head self-attention over [B, N, D] tokens.

    With `fused=True` the product runs through
    `torch.nn.functional.scaled_dot_product_attention`; with `fused=False` it
    runs as an explicit matmul and softmax. Both paths use the same parameters
    and compute the same function, so a model can switch between them.
    `attention_dropout` drops attention weights; `dropout` acts on the output
    projection.
    """

    def __init__(self, *, dim: int, heads: int, dropout: float, attention_dropout: float, fused: bool) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.attention_dropout = attention_dropout
        self.fused = fused
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_dropout = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """Map [B, N, D] tokens to [B, N, D]."""
        batch, length, dim = x.shape

        # [B, N, 3D] -> [3, B, heads, N, D / heads]
        qkv = self.qkv(x).reshape(batch, length, 3, self.heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        dropout = self.attention_dropout if self.training else 0.0

        if self.fused:
            out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout)
        else:
            scores = query @ key.transpose(-2, -1) / math.sqrt(self.head_dim)  # [B, heads, N, N]
            weights = F.dropout(scores.softmax(dim=-1), p=dropout, training=self.training)
            out = weights @ value  # [B, heads, N, D / heads]

        # [B, heads, N, D / heads] -> [B, N, D]
        out = out.transpose(1, 2).reshape(batch, length, dim)
        return self.proj_dropout(self.proj(out))


class FeedForward(nn.Sequential):
    """Linear(D, mlp) -> GELU -> Dropout -> Linear(mlp, D) -> Dropout on [B, N, D]."""

    def __init__(self, *, dim: int, mlp: int, dropout: float) -> None:
        super().__init__(
            nn.Linear(dim, mlp),
            nn.GELU(),
            Dropout(dropout),
            nn.Linear(mlp, dim),
            Dropout(dropout),
        )


class TransformerLayer(nn.Module):
    """Pre-norm transformer layer: x + Attn(LN(x)), then x + MLP(LN(x)); [B, N, D] -> [B, N, D]."""

    def __init__(
        self, *, dim: int, mlp: int, heads: int, dropout: float, attention_dropout: float, fused: bool
    ) -> None:
        super().__init__()
        self.norm_attention = nn.LayerNorm(dim)
        self.attention = SelfAttention(
            dim=dim, heads=heads, dropout=dropout, attention_dropout=attention_dropout, fused=fused
        )
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim=dim, mlp=mlp, dropout=dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.norm_attention(x))
        return x + self.mlp(self.norm_mlp(x))


class MatchingBlock(nn.Module):
    """Single-head cross-attention from image tokens to relation tokens, added back onto the image tokens.

    A = softmax(Q K^T / sqrt(D)) with Q from the image tokens and K, V from the
    relation tokens, each input LayerNorm-ed first. The output is
    Dropout(Linear(A V)) + image tokens. Dropout acts on that output and not on
    A, so the returned A is exactly the matrix that weighted V.
    """

    def __init__(self, *, dim: int, dropout: float) -> None:
        super().__init__()
        self.norm_image = nn.LayerNorm(dim)
        self.norm_relation = nn.LayerNorm(dim)
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_dropout = Dropout(dropout)

    def forward(self, image: Tensor, relation: Tensor) -> tuple[Tensor, Tensor]:
        """Match image tokens [B, T, D] to relation tokens [B, C, D].

        Returns the matched image tokens [B, T, D] and the attention weights
        A [B, T, C], whose rows sum to 1.
        """
        query = self.query(self.norm_image(image))  # [B, T, D]
        normed_relation = self.norm_relation(relation)
        key = self.key(normed_relation)  # [B, C, D]
        value = self.value(normed_relation)  # [B, C, D]

        scores = query @ key.transpose(-2, -1) / math.sqrt(query.shape[-1])  # [B, T, C]
        attention = scores.softmax(dim=-1)
        matched = attention @ value  # [B, T, D]

        return image + self.proj_dropout(self.proj(matched)), attention


class MatchCLIP(nn.Module):
    """MatchCLIP head over frozen CLIP image tokens and relation prompt embeddings.

    With `relation_tokens=False` (the "no text encoder" ablation) the fusion
    stack runs over the image tokens alone and there is no matching block.
    The readout stack and the classifier are unchanged.

    `dropout` acts on the output of every attention projection, MLP and
    matching block and inside the classifier. `attention_dropout` drops
    attention weights and is 0 by default, because any attention dropout
    sends training on a CPU to PyTorch's unfused math kernel, which also
    draws a random mask of [B, heads, N, N].
    """

    def __init__(
        self,
        *,
        image_width: int,
        text_width: int,
        num_classes: int = NUM_CLASSES,
        hidden: int = 512,
        mlp: int = 1024,
        heads: int = 8,
        fusion_depth: int = 3,
        readout_depth: int = 3,
        matching_blocks: int = 1,
        cls_tokens: int = 1,
        dropout: float = 0.1,
        attention_dropout: float = 0.0,
        relation_tokens: bool = True,
        fused_attention: bool = True,
    ) -> None:
        super().__init__()
        settings = {
            "image_width": image_width,
            "text_width": text_width,
            "num_classes": num_classes,
            "hidden": hidden,
            "mlp": mlp,
            "heads": heads,
            "fusion_depth": fusion_depth,
            "readout_depth": readout_depth,
            "matching_blocks": matching_blocks,
            "cls_tokens": cls_tokens,
            "dropout": dropout,
            "attention_dropout": attention_dropout,
            "relation_tokens": relation_tokens,
            "fused_attention": fused_attention,
        }
        validate_head_settings(settings, source="MatchCLIP arguments")
        self.config = settings
        self.image_width = image_width
        self.text_width = text_width
        self.num_classes = num_classes
        self.relation_tokens = relation_tokens

        layer_options = {
            "dim": hidden,
            "mlp": mlp,
            "heads": heads,
            "dropout": dropout,
            "attention_dropout": attention_dropout,
            "fused": fused_attention,
        }

        self.image_projection = nn.Linear(image_width, hidden)
        self.image_type_embedding = nn.Parameter(torch.zeros(1, 1, hidden))
        if relation_tokens:
            self.relation_projection = nn.Linear(text_width, hidden)
            self.relation_type_embedding = nn.Parameter(torch.zeros(1, 1, hidden))
            self.matching = nn.ModuleList(MatchingBlock(dim=hidden, dropout=dropout) for _ in range(matching_blocks))
        else:
            self.relation_projection = None
            self.relation_type_embedding = None
            self.matching = nn.ModuleList()

        self.fusion = nn.ModuleList(TransformerLayer(**layer_options) for _ in range(fusion_depth))
        self.cls_token = nn.Parameter(torch.zeros(1, cls_tokens, hidden))
        self.readout = nn.ModuleList(TransformerLayer(**layer_options) for _ in range(readout_depth))
        self.norm = nn.LayerNorm(hidden)
        self.classifier = nn.Sequential(
            nn.Linear(hidden, hidden),
            nn.GELU(),
            Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

        self._init_weights()

    def _init_weights(self) -> None:
        # Linear layers keep PyTorch's default (Kaiming-uniform) init. The
        # ViT-style trunc_normal(std=0.02) init left the head predicting the
        # class prior for 20+ epochs on the demo data, because the attention
        # paths start with almost no signal; the default init left that
        # plateau after about 10 epochs.
        for parameter in (self.image_type_embedding, self.relation_type_embedding, self.cls_token):
            if parameter is not None:
                nn.init.trunc_normal_(parameter, std=0.02)

    def forward(
        self,
        image_tokens: Tensor,
        relation_embeddings: Tensor | None,
        *,
        return_attention: bool = False,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Score every class for each image.

        Args:
            image_tokens: [B, T, W] backbone tokens (class token and patches).
            relation_embeddings: [C, E] prompt embeddings shared by the batch,
                or [B, C, E] per sample. Ignored, and may be None, when the
                model was built with `relation_tokens=False`.
            return_attention: also return the matching attention.

        Returns:
            Logits [B, num_classes]; with `return_attention` a tuple of the
            logits and a list with one attention tensor [B, T, C] per matching
            block (an empty list without relation tokens).
        """
        image = self._project_images(image_tokens)  # [B, T, D]
        num_image_tokens = image.shape[1]

        if self.relation_tokens:
            relation = self._project_relations(relation_embeddings, batch=image.shape[0])  # [B, C, D]
            tokens = torch.cat([image, relation], dim=1)  # [B, T + C, D]
        else:
            tokens = image

        for layer in self.fusion:
            tokens = layer(tokens)

        image = tokens[:, :num_image_tokens]  # [B, T, D]
        relation = tokens[:, num_image_tokens:]  # [B, C, D]; empty without relation tokens
        attentions = []
        for block in self.matching:
            image, attention = block(image, relation)
            attentions.append(attention)

        # [1, K, D] cls tokens before the [B, T, D] matched image tokens -> [B, K + T, D]
        cls = self.cls_token.expand(image.shape[0], -1, -1)
        tokens = torch.cat([cls, image], dim=1)
        for layer in self.readout:
            tokens = layer(tokens)

        pooled = self.norm(tokens[:, : cls.shape[1]].mean(dim=1))  # [B, D]
        logits = self.classifier(pooled)  # [B, num_classes]

        if return_attention:
            return logits, attentions
        return logits

    def _project_images(self, image_tokens: Tensor) -> Tensor:
        """Project [B, T, W] image tokens to [B, T, D] and add the image type embedding."""
        if image_tokens.dim() != 3 or image_tokens.shape[-1] != self.image_width:
            raise ValueError(
                f"image_tokens have shape {tuple(image_tokens.shape)} but the model expects "
                f"[B, T, {self.image_width}]; build the model with image_width equal to the "
                "token width of the backbone that produced the features"
            )
        image_tokens = image_tokens.to(self.image_projection.weight.dtype)
        return self.image_projection(image_tokens) + self.image_type_embedding

    def _project_relations(self, relation_embeddings: Tensor | None, *, batch: int) -> Tensor:
        """Project [C, E] or [B, C, E] prompt embeddings to [B, C, D] relation tokens."""
        if relation_embeddings is None:
            raise ValueError(
                "relation_embeddings is None but the model was built with relation_tokens=True; "
                "pass the [C, E] prompt embeddings or build the model with relation_tokens=False"
            )

        shape = tuple(relation_embeddings.shape)
        per_sample = relation_embeddings.dim() == 3
        valid = relation_embeddings.dim() in (2, 3) and shape[-1] == self.text_width
        if per_sample:
            valid = valid and shape[0] == batch
        if not valid:
            raise ValueError(
                f"relation_embeddings have shape {shape} but the model expects [C, {self.text_width}] "
                f"or [{batch}, C, {self.text_width}] for a batch of {batch} images; build the model "
                "with text_width equal to the embedding width of the backbone that encoded the prompts"
            )

        relation_embeddings = relation_embeddings.to(self.relation_projection.weight.dtype)
        relation = self.relation_projection(relation_embeddings)  # [C, D] or [B, C, D]
        if not per_sample:
            relation = relation.unsqueeze(0).expand(batch, -1, -1)  # [B, C, D]
        return relation + self.relation_type_embedding


def validate_head_settings(settings: dict[str, Any], *, source: str) -> None:
    """Raise ConfigError naming the first invalid MatchCLIP setting in `settings`.

    Checks types and ranges of the keys present and that `hidden` is a
    multiple of `heads`, but not for unknown keys. `source` names where the
    values came from and starts the message.
    """
    for name, minimum in _MIN_INT_SETTING.items():
        if name not in settings:
            continue
        value = settings[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(
                f"{source}: {name}={value!r} is invalid; set {name} to an integer >= {minimum}"
            )

    for name in _BOOL_SETTINGS:
        if name in settings and not isinstance(settings[name], bool):
            raise ConfigError(f"{source}: {name}={settings[name]!r} is invalid; set {name} to true or false")

    for name in ("dropout", "attention_dropout"):
        if name not in settings:
            continue
        value = settings[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ConfigError(f"{source}: {name}={value!r} is invalid; set {name} to a number in [0, 1)")

    hidden = settings.get("hidden", HEAD_DEFAULTS["hidden"])
    heads = settings.get("heads", HEAD_DEFAULTS["heads"])
    if hidden % heads != 0:
        lower = hidden - hidden % heads
        suggestion = f"{lower} or {lower + heads}" if lower > 0 else f"{heads}"
        raise ConfigError(
            f"{source}: hidden={hidden} is not divisible by heads={heads}; "
            f"set hidden to a multiple of heads (for example {suggestion}) or change heads"
        )


def load_preset(name: str | Path) -> dict[str, Any]:
    """Load a model preset by name (one of PRESET_NAMES) or from a JSON file path.

    Returns {"backbone": {"name", "pretrained", "image_size", "patch_size"},
    "head": {MatchCLIP keyword arguments}, "description": str}. Raises
    ConfigError for an unknown name, a missing file or invalid content.
    """
    path = _preset_path(name)
    try:
        preset = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ConfigError(f"preset file {path} is not valid JSON ({error}); fix the file") from error

    _validate_preset(preset, path=path)
    return copy.deepcopy(preset)


def _preset_path(name: str | Path) -> Path:
    if str(name) in PRESET_NAMES:
        return PRESET_DIR / f"{name}.json"

    path = Path(name).expanduser()
    if path.suffix == ".json" and path.is_file():
        return path
    if path.suffix == ".json":
        raise ConfigError(f"preset file {path} not found; pass an existing JSON file or one of {', '.join(PRESET_NAMES)}")
    raise ConfigError(f"unknown preset {str(name)!r}; valid presets: {', '.join(PRESET_NAMES)} (or a path to a .json file)")


def _validate_preset(preset: Any, *, path: Path) -> None:
    source = f"preset file {path}"
    if not isinstance(preset, dict):
        raise ConfigError(f"{source} must contain a JSON object with keys {', '.join(PRESET_KEYS)}")
    _check_keys(preset, expected=PRESET_KEYS, required=PRESET_KEYS, where=source)

    backbone = preset["backbone"]
    if not isinstance(backbone, dict):
        raise ConfigError(f"{source}: 'backbone' must be an object with keys {', '.join(BACKBONE_KEYS)}")
    _check_keys(backbone, expected=BACKBONE_KEYS, required=BACKBONE_KEYS, where=f"{source}, section 'backbone'")
    if not isinstance(backbone["name"], str) or not backbone["name"]:
        raise ConfigError(f"{source}: backbone name={backbone['name']!r} is invalid; set it to an open_clip model name")
    if backbone["pretrained"] is not None and not isinstance(backbone["pretrained"], str):
        raise ConfigError(
            f"{source}: backbone pretrained={backbone['pretrained']!r} is invalid; "
            "set it to an open_clip tag, a checkpoint path or null for random weights"
        )
    for key in ("image_size", "patch_size"):
        value = backbone[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{source}: backbone {key}={value!r} is invalid; set it to a positive integer")

    head = preset["head"]
    if not isinstance(head, dict):
        raise ConfigError(f"{source}: 'head' must be an object of MatchCLIP settings")
    _check_keys(head, expected=tuple(HEAD_DEFAULTS), required=(), where=f"{source}, section 'head'")
    validate_head_settings(head, source=source)

    if not isinstance(preset["description"], str):
        raise ConfigError(f"{source}: 'description' must be a string")


def _check_keys(mapping: dict, *, expected: tuple[str, ...], required: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(mapping) - set(expected))
    missing = [key for key in required if key not in mapping]
    if unknown or missing:
        problems = []
        if unknown:
            problems.append(f"unknown key(s) {', '.join(unknown)}")
        if missing:
            problems.append(f"missing key(s) {', '.join(missing)}")
        raise ConfigError(f"{where}: {' and '.join(problems)}; valid keys: {', '.join(expected)}")


def build_model(head: dict[str, Any], *, image_width: int, text_width: int, **overrides: Any) -> MatchCLIP:
    """Build a MatchCLIP head from a preset's "head" section plus keyword overrides.

    `image_width` is the backbone's token width W and `text_width` its
    embedding width E. Raises ConfigError naming the value and the fix for an
    unknown key or an invalid value.
    """
    settings = {**head, **overrides}
    _check_keys(settings, expected=tuple(HEAD_DEFAULTS), required=(), where="model settings")
    settings["image_width"] = image_width
    settings["text_width"] = text_width
    validate_head_settings(settings, source="model settings")

    model = MatchCLIP(**settings)
    _logger.info(
        "built MatchCLIP (hidden=%d, image_width=%d, text_width=%d) with %d trainable parameters",
        model.config["hidden"],
        image_width,
        text_width,
        count_parameters(model),
    )
    return model


def count_parameters(module: nn.Module, *, trainable_only: bool = True) -> int:
    """Count the parameters of `module`, by default only those with requires_grad."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
