"""Input images (img2img and inpainting): decoded and checked before anything else sees them.

Every failure is an ``InvalidRequest`` naming the field: not base64, not an image, a format other than PNG, JPEG or
WebP, an animated image, too many pixels (refused from the header, before the pixels are decoded), a truncated
file, 16-bit or floating-point samples. EXIF orientation is applied, as a viewer shows the picture. Images become
RGB (alpha dropped, as diffusers drops it; palette, grey and CMYK converted); masks become 8-bit grey.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging

from PIL import Image, ImageOps, UnidentifiedImageError

from predictor.errors import InvalidRequest

INPUT_FORMATS = ("PNG", "JPEG", "WEBP")
MAX_INPUT_SIDE = 16384
logger = logging.getLogger(__name__)
# 16-bit and float samples: converting them to 8 bits would clip (Pillow's conversion saturates), so refuse.
_WIDE_MODES = ("I", "F", "I;16", "I;16B", "I;16L", "I;16N")


def _bytes_of(data: str | bytes, param: str) -> bytes:
    if isinstance(data, bytes):
        return data
    text = data.strip()
    if text.startswith("data:") and "," in text:  # a data URL: data:image/png;base64,....
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"'{param}' is not valid base64", param=param) from None


def open_image(data: str | bytes, param: str, max_pixels: int) -> Image.Image:
    """A decoded, checked input image (any mode but the wide ones), oriented as its EXIF says."""
    raw = _bytes_of(data, param)
    if not raw:
        raise InvalidRequest(f"'{param}' is empty", param=param)
    try:
        image = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError:  # Pillow's own ceiling, past any --max_input_pixels that makes sense
        raise InvalidRequest(f"'{param}' has far too many pixels", param=param) from None
    except UnidentifiedImageError:
        raise InvalidRequest(f"'{param}' is not a PNG, JPEG or WebP image", param=param) from None
    except Exception:  # a malformed header or metadata chunk (an oversized text or colour-profile chunk)
        raise InvalidRequest(f"'{param}' is corrupt or has malformed metadata", param=param) from None
    if image.format == "MPO":  # a camera's JPEG with a second (stereo or preview) frame: the first is the photo
        image.seek(0)
    elif image.format not in INPUT_FORMATS:
        raise InvalidRequest(f"'{param}' is a {image.format} image; send PNG, JPEG or WebP", param=param)
    elif getattr(image, "n_frames", 1) > 1:
        raise InvalidRequest(f"'{param}' is animated; send a single frame", param=param)
    width, height = image.size
    if width * height > max_pixels:
        raise InvalidRequest(
            f"'{param}' has {width}x{height} pixels, more than --max_input_pixels {max_pixels}", param=param
        )
    if max(width, height) > MAX_INPUT_SIDE:  # a thin sliver would cost seconds to resize for few pixels
        raise InvalidRequest(f"'{param}' is {width}x{height}: a side is longer than {MAX_INPUT_SIDE}", param=param)
    if image.mode in _WIDE_MODES:
        raise InvalidRequest(f"'{param}' has 16-bit or floating-point samples; send 8 bits per channel", param=param)
    try:
        image.load()
    except Exception:
        raise InvalidRequest(f"'{param}' is truncated or corrupt", param=param) from None
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # malformed EXIF: the pixels are fine, the orientation unknown
        logger.info("'%s' has malformed EXIF data; its orientation is not applied", param)
        return image


def as_rgb(image: Image.Image) -> Image.Image:
    """RGB as diffusers' image processor makes it (``convert("RGB")``: alpha dropped)."""
    try:
        return image if image.mode == "RGB" else image.convert("RGB")
    except Exception:
        raise InvalidRequest("an input image could not be converted to RGB", param="image") from None


def fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """The input at the output size, resized as diffusers' image processor resizes (Lanczos): done while the
    request is parsed, so the generation worker never resizes, and only the resized picture is kept."""
    if image.size == (width, height):
        return image
    return image.resize((width, height), resample=Image.Resampling.LANCZOS)


def decode_image(data: str | bytes, param: str, max_pixels: int) -> Image.Image:
    return as_rgb(open_image(data, param, max_pixels))


def decode_mask(data: str | bytes, param: str, max_pixels: int, transparent_edits: bool = False) -> Image.Image:
    """An 8-bit grey mask, white = repaint. ``transparent_edits``: OpenAI's convention, where the mask's fully
    transparent pixels mark what to edit (it must then have an alpha channel)."""
    image = open_image(data, param, max_pixels)
    if not transparent_edits:
        return image.convert("L")
    if "A" not in image.getbands() and "transparency" not in image.info:
        raise InvalidRequest(
            f"'{param}' has no alpha channel: its fully transparent pixels mark the area to edit", param=param
        )
    alpha = image.convert("RGBA").getchannel("A")
    return alpha.point(lambda value: 255 if value == 0 else 0)


def check_mask_size(image: Image.Image, mask: Image.Image, param: str) -> None:
    if image.size != mask.size:
        raise InvalidRequest(
            f"'{param}' is {mask.width}x{mask.height} but the image is {image.width}x{image.height}; they must match",
            param=param,
        )


def encode_png(image: Image.Image) -> str:
    """An image as base64 PNG (lossless: a mask converted from OpenAI's convention keeps its exact values)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
