"""Image loading: full decode, EXIF orientation and conversion to RGB.

A truncated or corrupt file raises ImageError naming it. When another library
turns on PIL's global `ImageFile.LOAD_TRUNCATED_IMAGES`, PIL fills the missing
part of a truncated image with grey and raises nothing. `load_image`
therefore turns the switch off while it decodes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import struct
import threading
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Sequence

import torch
from PIL import Image, ImageFile, ImageOps

from .errors import ImageError
from .labels import Sample

logger = logging.getLogger(__name__)

# Colour that transparent pixels are composited onto.
BACKGROUND = (255, 255, 255)

# Exceptions PIL raises on corrupt or truncated data, depending on the format.
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    struct.error,
    Image.DecompressionBombError,
)


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image file completely and return it as an RGB image.

    EXIF orientation is applied; L, 1, I;16, CMYK, P, RGBA, LA and other modes
    are converted to RGB, with transparent pixels composited onto white.
    Raises ImageError naming the file when it is missing, truncated or not a
    decodable image.
    """
    return _load_file(Path(path), _decode)


def verify_image(path: str | os.PathLike) -> None:
    """Check that an image file decodes completely; raise ImageError like `load_image`.

    JPEG files are decoded at 1/8 scale (PIL `draft`). That still reads all of
    the compressed data, so it finds truncation as a full decode does, and it
    took about a third of the time on 640x480 COCO images.
    """
    _load_file(Path(path), _decode_reduced)


def _load_file(path: Path, decode: Callable[[BinaryIO], Image.Image]) -> Image.Image:
    try:
        with open(path, "rb") as handle:
            return decode(handle)
    except FileNotFoundError as error:
        raise ImageError(
            f"image file {path} not found; check the image folder, or download the images with "
            "`python -m matchclip data download --labels FILE --out DIR`"
        ) from error
    except IsADirectoryError as error:
        raise ImageError(f"{path} is a folder, expected an image file") from error
    except PermissionError as error:
        raise ImageError(f"image file {path} is not readable ({error.strerror}); fix its permissions") from error
    except _DECODE_ERRORS as error:
        raise ImageError(
            f"image file {path} is truncated or not a valid image ({error}); "
            "delete it and download it again"
        ) from error


def decode_image_bytes(data: bytes, *, name: str) -> Image.Image:
    """Decode an encoded image held in memory like `load_image`; `name` labels errors."""
    try:
        return _decode(io.BytesIO(data))
    except _DECODE_ERRORS as error:
        raise ImageError(
            f"image {name} ({len(data)} bytes) is truncated or not a valid image ({error})"
        ) from error


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB, compositing transparency onto white."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image

    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        # Rescale 16-bit and 32-bit grey to 0..255; a plain convert clips at 255.
        image = _grey_to_8bit(image)

    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if not has_alpha:
        return image.convert("RGB")

    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


class ImageDataset(torch.utils.data.Dataset):
    """Images of a split as transformed tensors, for a DataLoader.

    Item i is `(transform(image), i)` where the tensor is [3, H, W]; with
    `flip` the image is mirrored horizontally before the transform. The
    dataset holds only paths and the transform, so it pickles into DataLoader
    worker processes when the transform does.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        image_root: str | os.PathLike,
        transform: Callable[[Image.Image], torch.Tensor],
        *,
        flip: bool = False,
    ):
        self.samples = list(samples)
        self.image_root = Path(image_root)
        self.transform = transform
        self.flip = flip

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        image = load_image(self.image_root / sample.file_name)
        if self.flip:
            image = ImageOps.mirror(image)
        return self.transform(image), int(index)


def _decode(source: BinaryIO) -> Image.Image:
    with _strict_truncation(), Image.open(source) as image:
        # load() decodes every pixel now, so truncation raises here and not
        # later inside a transform.
        image.load()
        oriented = ImageOps.exif_transpose(image)
        return to_rgb(oriented)


def _decode_reduced(source: BinaryIO) -> Image.Image:
    with _strict_truncation(), Image.open(source) as image:
        width, height = image.size
        image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
        image.load()
        return image


def _grey_to_8bit(image: Image.Image) -> Image.Image:
    if image.mode == "F":
        return image.convert("L")
    scale = 1 / 257 if image.mode.startswith("I;16") or image.getextrema()[1] > 255 else 1
    return image.convert("I").point(lambda value: value * scale).convert("L")


# Nesting depth of _strict_truncation across threads and the flag value to
# restore when the last one exits.
_strict_lock = threading.Lock()
_strict_depth = 0
_saved_truncation_flag = False


@contextlib.contextmanager
def _strict_truncation() -> Iterator[None]:
    """Make PIL raise on truncated data while any thread decodes through here."""
    global _strict_depth, _saved_truncation_flag
    with _strict_lock:
        if _strict_depth == 0:
            _saved_truncation_flag = ImageFile.LOAD_TRUNCATED_IMAGES
            if _saved_truncation_flag:
                logger.debug("PIL LOAD_TRUNCATED_IMAGES is on; matchclip turns it off while it decodes")
            ImageFile.LOAD_TRUNCATED_IMAGES = False
        _strict_depth += 1
    try:
        yield
    finally:
        with _strict_lock:
            _strict_depth -= 1
            if _strict_depth == 0:
                ImageFile.LOAD_TRUNCATED_IMAGES = _saved_truncation_flag
