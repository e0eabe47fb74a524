"""Image decoding, mode conversion, orientation and the image dataset."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from matchclip.errors import ImageError
from matchclip.images import ImageDataset, decode_image_bytes, load_image, verify_image
from matchclip.labels import Sample

RED = (255, 0, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """[H, W, 3] uint8 PIL image -> [3, H, W] float tensor in 0..1."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)


def half_red_half_blue(width=40, height=20) -> Image.Image:
    """Left half red, right half blue."""
    image = Image.new("RGB", (width, height), BLUE)
    image.paste(RED, (0, 0, width // 2, height))
    return image


def noise_jpeg(path, size=(64, 48)) -> bytes:
    pixels = np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=95)
    return path.read_bytes()


def close(pixel, expected, tolerance=40) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected))


# ------------------------------------------------------------- conversions


@pytest.mark.parametrize(
    "mode, value, expected",
    [
        ("L", 128, (128, 128, 128)),
        ("1", 1, WHITE),
        ("CMYK", (0, 255, 255, 0), RED),
        ("RGB", (10, 200, 30), (10, 200, 30)),
    ],
)
def test_load_mode_to_rgb(tmp_path, mode, value, expected):
    path = tmp_path / "image.tiff"
    Image.new(mode, (8, 6), value).save(path)
    image = load_image(path)
    assert image.mode == "RGB"
    assert image.size == (8, 6)
    assert image.getpixel((3, 3)) == expected


def test_load_cmyk_jpeg(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)
    image = load_image(path)
    assert image.mode == "RGB"
    assert close(image.getpixel((8, 8)), RED)


def test_load_palette(tmp_path):
    path = tmp_path / "palette.png"
    half_red_half_blue().convert("P").save(path)
    image = load_image(path)
    assert image.mode == "RGB"
    assert image.getpixel((1, 1)) == RED


def test_load_palette_transparency(tmp_path):
    path = tmp_path / "palette.png"
    palette_image = half_red_half_blue().quantize(colors=2)
    red_index = palette_image.getpixel((1, 1))
    palette_image.save(path, transparency=red_index)
    image = load_image(path)
    assert image.getpixel((1, 1)) == WHITE
    assert image.getpixel((35, 1)) == BLUE


def test_load_rgba_on_white(tmp_path):
    path = tmp_path / "rgba.png"
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    rgba.putpixel((5, 5), (0, 0, 255, 255))
    rgba.putpixel((6, 6), (0, 0, 0, 128))
    rgba.save(path)
    image = load_image(path)
    assert image.getpixel((0, 0)) == WHITE
    assert image.getpixel((5, 5)) == BLUE
    assert close(image.getpixel((6, 6)), (127, 127, 127), tolerance=2)


def test_load_la_on_white(tmp_path):
    path = tmp_path / "la.png"
    la = Image.new("LA", (10, 10), (0, 0))
    la.putpixel((2, 2), (0, 255))
    la.save(path)
    image = load_image(path)
    assert image.getpixel((0, 0)) == WHITE
    assert image.getpixel((2, 2)) == (0, 0, 0)


def test_load_grey_transparency_key(tmp_path):
    path = tmp_path / "grey.png"
    grey = Image.new("L", (10, 10), 40)
    grey.putpixel((1, 1), 200)
    grey.save(path, transparency=40)
    image = load_image(path)
    assert image.getpixel((0, 0)) == WHITE
    assert image.getpixel((1, 1)) == (200, 200, 200)


def test_load_16bit_grey(tmp_path):
    path = tmp_path / "grey16.png"
    Image.new("I;16", (4, 4), 65535).save(path)
    image = load_image(path)
    assert image.getpixel((0, 0)) == WHITE


# ------------------------------------------------------------- orientation


@pytest.mark.parametrize(
    "orientation, size, red_at, blue_at",
    [
        (1, (40, 20), (2, 10), (38, 10)),  # as stored
        (2, (40, 20), (38, 10), (2, 10)),  # mirrored
        (3, (40, 20), (38, 10), (2, 10)),  # rotated 180 degrees
        (6, (20, 40), (10, 2), (10, 38)),  # display rotated 90 degrees clockwise
        (8, (20, 40), (10, 38), (10, 2)),  # display rotated 90 degrees counter-clockwise
    ],
)
def test_load_exif_orientation(tmp_path, orientation, size, red_at, blue_at):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    half_red_half_blue().save(path, exif=exif, quality=95)
    image = load_image(path)
    assert image.size == size
    assert close(image.getpixel(red_at), RED)
    assert close(image.getpixel(blue_at), BLUE)


# ---------------------------------------------------------------- bad files


def test_load_truncated_jpeg(tmp_path):
    path = tmp_path / "truncated.jpg"
    data = noise_jpeg(path)
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated.jpg"):
        load_image(path)


def test_load_truncated_with_pil_flag_on(tmp_path, monkeypatch):
    path = tmp_path / "truncated.jpg"
    data = noise_jpeg(path)
    path.write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ImageError, match="truncated"):
        load_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_load_truncated_png(tmp_path):
    path = tmp_path / "truncated.png"
    pixels = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated.png"):
        load_image(path)


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
def test_verify_truncated_jpeg(tmp_path, keep):
    path = tmp_path / "truncated.jpg"
    data = noise_jpeg(path, size=(256, 192))
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ImageError, match="truncated.jpg"):
        verify_image(path)


def test_verify_complete_jpeg(tmp_path):
    path = tmp_path / "complete.jpg"
    noise_jpeg(path, size=(256, 192))
    assert verify_image(path) is None


def test_load_not_an_image(tmp_path):
    path = tmp_path / "page.jpg"
    path.write_bytes(b"<html><body>404</body></html>")
    with pytest.raises(ImageError, match="page.jpg"):
        load_image(path)


def test_load_missing_file(tmp_path):
    with pytest.raises(ImageError, match="absent.jpg not found"):
        load_image(tmp_path / "absent.jpg")


def test_decode_bytes_names_source(tmp_path):
    data = noise_jpeg(tmp_path / "image.jpg")
    with pytest.raises(ImageError, match="http://host/x.jpg"):
        decode_image_bytes(data[:-200], name="http://host/x.jpg")


def test_decode_bytes_full_image(tmp_path):
    data = noise_jpeg(tmp_path / "image.jpg")
    assert decode_image_bytes(data, name="image.jpg").size == (64, 48)


# ---------------------------------------------------------------- dataset


@pytest.fixture
def dataset_root(tmp_path):
    for name in ("a", "b"):
        path = tmp_path / "train2017" / f"{name}.png"
        path.parent.mkdir(exist_ok=True)
        half_red_half_blue().save(path)
    return tmp_path


SAMPLES = [
    Sample("1", "train2017/a.png", (14,)),
    Sample("2", "train2017/b.png", (20, 21)),
]


def test_dataset_item(dataset_root):
    dataset = ImageDataset(SAMPLES, dataset_root, to_tensor)
    tensor, index = dataset[1]
    assert len(dataset) == 2
    assert tensor.shape == (3, 20, 40)
    assert index == 1
    assert tensor[:, 0, 0].tolist() == [1.0, 0.0, 0.0]


def test_dataset_flip_mirrors(dataset_root):
    plain = ImageDataset(SAMPLES, dataset_root, to_tensor)[0][0]
    flipped = ImageDataset(SAMPLES, dataset_root, to_tensor, flip=True)[0][0]
    assert flipped[:, 0, 0].tolist() == [0.0, 0.0, 1.0]
    assert torch.equal(flipped, plain.flip(-1))


def test_dataset_pickles(dataset_root):
    dataset = ImageDataset(SAMPLES, dataset_root, to_tensor, flip=True)
    restored = pickle.loads(pickle.dumps(dataset))
    assert torch.equal(restored[0][0], dataset[0][0])


def test_dataset_dataloader_workers(dataset_root):
    dataset = ImageDataset(SAMPLES * 2, dataset_root, to_tensor)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2)
    batches = list(loader)
    assert batches[0][0].shape == (2, 3, 20, 40)
    assert torch.cat([indices for _, indices in batches]).tolist() == [0, 1, 2, 3]


def test_dataset_missing_image_raises(dataset_root):
    dataset = ImageDataset([Sample("3", "train2017/absent.png", ())], dataset_root, to_tensor)
    with pytest.raises(ImageError, match="absent.png"):
        dataset[0]
