"""Image preprocessing for the vision encoder (design doc section 3.2), without torchvision (there is
no CPU build of it): decode, RGB, resize to IMAGE_SIZE x IMAGE_SIZE, scale to [0, 1], normalise with
the ImageNet statistics. The result equals torchvision's Resize((256, 256)) + ToTensor + Normalize on a
PIL image, since Resize on a PIL image is this same antialiased PIL bilinear resize.

`preprocess` runs in DataLoader worker processes on untrusted bytes, so it returns numpy (no torch
tensors or threads in the workers) and turns every way an image can be unusable into an ImageError
that names the sample, never into a crash or a silently wrong image.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

IMAGE_SIZE = 256
PATCH_SIZE = 16
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# Only the formats data.sources.vision_text stores: Pillow would otherwise try every plugin it has on
# untrusted bytes, some of which hand the data to external programs (EPS to Ghostscript).
FORMATS = ("JPEG", "PNG", "WEBP")

# x / 255 then (x - mean) / std as one multiply-add, the constants computed in float64.
_SCALE = (1 / (255 * np.array(STD))).astype(np.float32)[:, None, None]
_OFFSET = (np.array(MEAN) / np.array(STD)).astype(np.float32)[:, None, None]
_WHITE = (255, 255, 255, 255)
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}


class ImageError(ValueError):
    """An image that cannot be used: not an image, truncated, too large, or empty."""


def preprocess(data: bytes, where: str, size: int = IMAGE_SIZE) -> np.ndarray:
    """float32 [3, size, size]: `data` decoded, made RGB, resized and normalised.

    `where` (e.g. "shard X member Y") starts every ImageError's message, so a bad sample can be found.
    """
    # A truncated image must be an error, not a grey-filled picture: PIL only pads with this set.
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set: truncated images would pass as images")
    image = _decode(data, where)
    if 0 in image.size:
        raise ImageError(f"{where}: the image is empty ({image.size[0]}x{image.size[1]})")
    pixels = np.asarray(_rgb(image).resize((size, size), Image.Resampling.BILINEAR))
    out = np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32)
    out *= _SCALE
    out -= _OFFSET
    return out


def _decode(data: bytes, where: str) -> Image.Image:
    try:
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; an error here keeps a
        # decompression bomb from being decoded at all.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
        image.load()  # decode everything now: open() only reads the header
        return image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(f"{where}: the image is too large to decode safely ({error})") from error
    except UnidentifiedImageError as error:
        raise ImageError(f"{where}: not an image in any of the formats {', '.join(FORMATS)}") from error
    except Exception as error:  # Pillow's decoders fail on bad data with many exception types
        raise ImageError(f"{where}: the image cannot be decoded ({type(error).__name__}: {error})") from error


def _rgb(image: Image.Image) -> Image.Image:
    if image.mode in _SIXTEEN_BIT:
        # Pillow's conversion clips 16-bit values at 255 (most of the image would be white); keep
        # the high byte instead.
        image = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8), "L")
    if image.has_transparency_data:
        # Over white, not black (what dropping alpha gives where transparent pixels store black):
        # screenshots and diagrams with transparent backgrounds are drawn to be seen on white.
        image = Image.alpha_composite(Image.new("RGBA", image.size, _WHITE), image.convert("RGBA"))
    return image.convert("RGB")


def patchify(images, patch: int = PATCH_SIZE):
    """[b, 3, h, w] -> [b, (h/p) * (w/p), 3 * p * p], torch in -> torch out, numpy in -> numpy out.

    Patches are in raster order (patch i covers rows (i // (w/p)) * p.., columns (i % (w/p)) * p..),
    the order of model.vit's positions. Each patch is flattened channel-major, (c, y, x): the layout of
    a [d, 3, p, p] convolution kernel flattened, so a linear layer on these patches is a stride-p
    patch-embedding convolution.
    """
    b, c, h, w = images.shape
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {patch}")
    grid = images.reshape(b, c, h // patch, patch, w // patch, patch)
    order = (0, 2, 4, 1, 3, 5)  # b, row, column, c, y, x
    grid = grid.permute(order) if isinstance(images, torch.Tensor) else grid.transpose(order)
    return grid.reshape(b, (h // patch) * (w // patch), c * patch * patch)
