"""data.images: preprocessing equals an independent PIL + numpy reference, every image mode becomes the
RGB it should, bad bytes are ImageErrors naming the sample, and patchify's layout."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from cromwell.data.images import IMAGE_SIZE, ImageError, patchify, preprocess

WHERE = "shard s-00001.tar member 42.png"


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def noise(size, mode="RGB", seed=0) -> Image.Image:
    channels = len(mode)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


def reference(rgb_pixels: np.ndarray) -> np.ndarray:
    """torchvision's ToTensor + Normalize written out in float64, on [h, w, 3] uint8."""
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    return ((rgb_pixels / 255.0 - mean) / std).transpose(2, 0, 1)


def reference_preprocess(data: bytes, size: int = IMAGE_SIZE) -> np.ndarray:
    image = Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.BILINEAR)
    return reference(np.asarray(image))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
@pytest.mark.parametrize("size", [(300, 200), (64, 500), (256, 256)])
def test_matches_reference(fmt, size):
    data = encode(noise(size), fmt)
    out = preprocess(data, WHERE)
    assert out.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_allclose(out, reference_preprocess(data), rtol=0, atol=1e-6)


def test_other_size():
    data = encode(noise((100, 80)))
    out = preprocess(data, WHERE, size=32)
    assert out.shape == (3, 32, 32) and out.dtype == np.float32
    np.testing.assert_allclose(out, reference_preprocess(data, 32), rtol=0, atol=1e-6)


def test_grayscale_is_gray_in_every_channel():
    gray = noise((IMAGE_SIZE, IMAGE_SIZE), "L")  # the target size: the resize leaves the pixels alone
    expected = reference(np.repeat(np.asarray(gray)[..., None], 3, axis=2))
    np.testing.assert_allclose(preprocess(encode(gray), WHERE), expected, rtol=0, atol=1e-6)


def test_sixteen_bit_grayscale_keeps_its_high_byte():
    # Pillow's own conversion would clip 40000 to 255: a white image.
    image = Image.new("I;16", (IMAGE_SIZE, IMAGE_SIZE), 40000)
    expected = reference(np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 40000 >> 8, dtype=np.uint8))
    np.testing.assert_allclose(preprocess(encode(image), WHERE), expected, rtol=0, atol=1e-6)


def test_rgba_is_composited_over_white():
    pixels = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 4), dtype=np.uint8)  # transparent black
    pixels[:100] = (200, 30, 60, 255)  # opaque colour
    out = preprocess(encode(Image.fromarray(pixels, "RGBA")), WHERE)
    expected = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 255, dtype=np.uint8)
    expected[:100] = (200, 30, 60)
    np.testing.assert_allclose(out, reference(expected), rtol=0, atol=1e-6)


def test_palette():
    image = noise((IMAGE_SIZE, IMAGE_SIZE)).quantize(16)
    assert image.mode == "P"
    expected = reference(np.asarray(image.convert("RGB")))
    np.testing.assert_allclose(preprocess(encode(image), WHERE), expected, rtol=0, atol=1e-6)


def test_palette_transparency_is_white():
    image = Image.new("P", (IMAGE_SIZE, IMAGE_SIZE), 0)
    image.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    image.paste(1, (0, 0, IMAGE_SIZE, 50))
    data = encode(image, transparency=0)  # index 0 (black) is transparent
    expected = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 255, dtype=np.uint8)
    expected[:50] = (10, 20, 30)
    np.testing.assert_allclose(preprocess(data, WHERE), reference(expected), rtol=0, atol=1e-6)


def test_cmyk_jpeg():
    data = encode(noise((IMAGE_SIZE, IMAGE_SIZE), "CMYK"), "JPEG")
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    np.testing.assert_allclose(preprocess(data, WHERE), reference_preprocess(data), rtol=0, atol=1e-6)


def png_with_size(width: int, height: int) -> bytes:
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
            + chunk(b"IEND", b""))


def truncated(fmt: str) -> bytes:
    data = encode(noise((300, 200)), fmt)
    return data[:len(data) // 2]


@pytest.mark.parametrize("data, why", [
    (b"", "not an image"),
    (b"this is a caption, not an image", "not an image"),
    (encode(noise((8, 8)), "GIF"), "not an image"),  # a format the sources never store
    (png_with_size(0, 0), "not an image"),  # Pillow refuses zero sizes when identifying
    (png_with_size(0, 16), "not an image"),
    (truncated("PNG"), "truncated"),
    (truncated("JPEG"), "truncated"),
    (truncated("WEBP"), "cannot be decoded"),
])
def test_bad_bytes(data, why):
    with pytest.raises(ImageError, match=why) as raised:
        preprocess(data, WHERE)
    assert str(raised.value).startswith(WHERE)


@pytest.mark.parametrize("pixels", [150, 400])  # Pillow warns above the limit, refuses above twice it
def test_decompression_bomb(monkeypatch, pixels):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageError, match="too large") as raised:
        preprocess(encode(Image.new("RGB", (10, pixels // 10))), WHERE)
    assert str(raised.value).startswith(WHERE)


def test_truncated_images_stay_errors(monkeypatch):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some other library might
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        preprocess(encode(noise((8, 8))), WHERE)


def unpatchify(patches: np.ndarray, height: int, width: int, p: int) -> np.ndarray:
    """patchify's documented inverse, patch by patch: raster order, each patch (c, y, x)."""
    b, n, _ = patches.shape
    columns = width // p
    images = np.zeros((b, 3, height, width), dtype=patches.dtype)
    for i in range(n):
        row, column = divmod(i, columns)
        images[:, :, row * p:(row + 1) * p, column * p:(column + 1) * p] = patches[:, i].reshape(b, 3, p, p)
    return images


@pytest.mark.parametrize("height, width, p", [(256, 256, 16), (32, 48, 16), (12, 8, 4)])
def test_patchify_round_trip(height, width, p):
    images = np.random.default_rng(0).standard_normal((2, 3, height, width)).astype(np.float32)
    patches = patchify(images, p)
    assert patches.shape == (2, (height // p) * (width // p), 3 * p * p)
    np.testing.assert_array_equal(unpatchify(patches, height, width, p), images)

    tensor_patches = patchify(torch.from_numpy(images), p)
    assert isinstance(tensor_patches, torch.Tensor)
    np.testing.assert_array_equal(tensor_patches.numpy(), patches)


def test_patch_covers_its_pixels():
    images = np.random.default_rng(1).standard_normal((1, 3, 256, 256)).astype(np.float32)
    patches = patchify(images)
    for i in [0, 1, 15, 16, 17, 100, 255]:
        rows, columns = slice((i // 16) * 16, (i // 16) * 16 + 16), slice((i % 16) * 16, (i % 16) * 16 + 16)
        np.testing.assert_array_equal(patches[0, i], images[0, :, rows, columns].reshape(-1))


def test_patchify_is_a_stride_p_convolution():
    # The reason for the (c, y, x) order: a linear layer on the patches is the conv patch embedding.
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    kernel = torch.randn(5, 3, 16, 16, dtype=torch.float64)
    conv = torch.nn.functional.conv2d(images, kernel, stride=16).flatten(2).transpose(1, 2)
    torch.testing.assert_close(patchify(images) @ kernel.reshape(5, -1).T, conv)


def test_patchify_rejects_partial_patches():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        patchify(np.zeros((1, 3, 20, 16)))
