"""Decoding: one image file -> one RGB picture, and the resized square the image cache stores.

Image decoding rules (`load_image`), so that every image becomes the same kind of RGB picture:
EXIF orientation is applied; grey, 1-bit, CMYK and palette images are converted to RGB; anything
with transparency (RGBA, LA, palette or grey with a transparent colour) is composited on white,
because transparent pixels often hide arbitrary colours and white is what a viewer shows;
16-bit images are scaled to 8 bit (divided by 257). An image that cannot be fully decoded, or
whose header claims more than `MAX_IMAGE_PIXELS` pixels, raises `BadImageError`.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from search.config import TLSearchError

# Decompression-bomb guard: images whose header claims more pixels are skipped before decoding,
# so memory stays bounded (64 MP RGB is ~190 MB while decoding).
MAX_IMAGE_PIXELS = 64_000_000
# Short side of the crop is image_size / CROP_RATIO before the final image_size crop (as ImageNet).
CROP_RATIO = 0.875


# Image modes that carry an alpha channel.
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class BadImageError(TLSearchError):
    """One image file that cannot be fully decoded; the message is the reason."""


def _workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(16, n))


def load_image(path: str | os.PathLike[str], *, draft: int | None = None) -> Image.Image:
    """Fully decodes one image file into an RGB picture (see the module docstring for the rules).

    Args:
        path: the image file; its content decides the format, not its name (a PNG named .jpg is
            fine).
        draft: for JPEGs, let the decoder shrink the picture by up to 8x while both sides stay
            >= draft pixels (much faster for big photos; all the data is still read and checked).
            None decodes at full size.

    Returns:
        A loaded PIL image in mode RGB.
    """
    return _load_with_header(path, draft=draft)[0]


def _load_with_header(
    path: str | os.PathLike[str], *, draft: int | None = None
) -> tuple[Image.Image, tuple[int, int, str, bool]]:
    """`load_image`, and the file's (width, height, mode, has transparency) as stored, read from
    the same open (the scan counts grey, alpha and CMYK files without opening them twice)."""
    # A truncated file must fail here, not come back half grey: Pillow only guarantees that
    # while LOAD_TRUNCATED_IMAGES is False, which is its default and which this module never sets.
    try:
        with Image.open(path) as im:
            w, h = im.size
            header = (w, h, im.mode, im.mode in _ALPHA_MODES or "transparency" in im.info)
            if w * h > MAX_IMAGE_PIXELS:
                raise BadImageError(
                    f"decompression bomb guard: {w}x{h} = {w * h} pixels is more than "
                    f"{MAX_IMAGE_PIXELS}"
                )
            if draft is not None and im.format == "JPEG":
                im.draft("RGB", (draft, draft))
            im.load()
            rgb = _to_rgb(im)
            rgb = _apply_orientation(im, rgb)
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError(f"decompression bomb guard: {e}") from None
    except FileNotFoundError:
        raise BadImageError("file not found") from None
    except Image.UnidentifiedImageError:
        size = _file_size(path)
        raise BadImageError("empty file" if size == 0 else "not an image file") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError, TypeError) as e:
        # OSError covers "image file is truncated" and decoder errors; the others are what
        # plugins raise on malformed headers.
        raise BadImageError(f"cannot decode: {e}".rstrip(": ")) from None
    return rgb, header


def _file_size(path: str | os.PathLike[str]) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


def _to_rgb(im: Image.Image) -> Image.Image:
    """Converts a loaded image of any mode to RGB (16 bit scaled, alpha composited on white)."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grey: 0..65535 -> 0..255; a plain convert("L") would clip and turn it white.
        a = np.asarray(im).astype(np.uint32)
        return Image.fromarray(np.clip((a + 128) // 257, 0, 255).astype(np.uint8)).convert("RGB")
    if mode == "F":
        a = np.nan_to_num(np.asarray(im, dtype=np.float32))
        return Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8)).convert("RGB")
    has_alpha = mode in _ALPHA_MODES or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return im.convert("RGB")


# EXIF orientation tag value -> the transpose that shows the picture upright (as ImageOps does).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _apply_orientation(original: Image.Image, rgb: Image.Image) -> Image.Image:
    """Rotates/flips as the EXIF orientation tag says; a broken EXIF block is ignored."""
    try:
        orientation = original.getexif().get(0x0112, 1)
    except Exception:  # malformed EXIF must not reject an otherwise good picture
        return rgb
    method = _ORIENTATION.get(orientation) if isinstance(orientation, int) else None
    return rgb.transpose(method) if method is not None else rgb


def stored_size(image_size: int) -> int:
    """The side images are cached at: image_size / 0.875, so a crop of image_size is left.

    Args:
        image_size: the side of the square fed to the backbone.

    Returns:
        round(image_size / 0.875), e.g. 256 for 224.
    """
    return int(round(image_size / CROP_RATIO))


def decode_resized(path: str | os.PathLike[str], size: int) -> np.ndarray:
    """Decodes an image, resizes its short side to `size` (bicubic) and center-crops a square.

    Args:
        path: the image file.
        size: side of the square output.

    Returns:
        A uint8 array of shape (size, size, 3).
    """
    im = load_image(path, draft=size)
    w, h = im.size
    short = min(w, h)
    # Crop the centred square in source coordinates and resize only it: the same picture as
    # resize-then-crop, without resizing pixels that are thrown away.
    left, top = (w - short) / 2, (h - short) / 2
    box = (left, top, left + short, top + short)
    if (w, h) != (size, size):
        im = im.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
    return np.asarray(im, dtype=np.uint8)
