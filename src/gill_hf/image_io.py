"""Images from anywhere -> RGB PIL: files, http(s) URLs, base64 / data URIs, bytes, numpy arrays, torch tensors,
and chat parts ``{"type": "image", "url" | "path" | "image" | "base64": ...}``. Every failure is a ``ValueError``
(or ``TypeError`` for an unsupported kind of value) that names the source.

Every loaded image is checked: both sides >= 1 px and an aspect ratio of at most ``MAX_ASPECT_RATIO``:1 (CLIP's
resize of the shortest side to 224 px would turn a 1 x 4000 strip into a 224 x 896000 image). Files over
``PIL.Image.MAX_IMAGE_PIXELS`` (PIL's decompression-bomb limit, read at each call; None disables it) are refused
with the file named, at PIL's warning level already.
"""

import base64
import binascii
import io
import os
import re
import socket
import time
import urllib.error
import urllib.request
import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

DEFAULT_TIMEOUT = 10.0  # seconds for a whole URL download
IMAGE_PART_KEYS = ("image", "url", "path", "base64")
IMAGE_TYPES = (Image.Image, os.PathLike, bytes, np.ndarray, torch.Tensor)  # besides str and image dict parts
_BASE64 = re.compile(r"[A-Za-z0-9+/=_\-\s]+")
MAX_ASPECT_RATIO = 50  # long side / short side: a 224 x 11200 image at most after CLIP's shortest-side resize
CLIP_SHORTEST_SIDE = 224  # the resize the aspect-ratio message refers to
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: alpha is composited on white; 16-bit images (``I;16*`` modes, and ``I``, PIL's mode for
    16-bit PNG / PGM data, which must hold 0..65535) are scaled by their bit depth (v / 65535 * 255, never by their
    maximum); float ``F`` images are read on the 8-bit scale (as PIL's own ``convert("L")``) and clipped."""
    if image.mode == "RGB":
        return image
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "I":
        return _gray_to_rgb(_sixteen_bit_to_8(np.asarray(image), image.mode))
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if not np.isfinite(values).all():
            raise ValueError("float (mode 'F') image holds NaN or infinite values")
        return _gray_to_rgb(np.clip(values, 0, 255).round().astype(np.uint8))
    if image.mode == "P" or (image.mode in ("L", "RGB") and "transparency" in image.info):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _sixteen_bit_to_8(values: np.ndarray, mode: str) -> np.ndarray:
    """16-bit gray levels ``(H, W)`` -> uint8 by bit depth: round(v * 255 / 65535)."""
    values = values.astype(np.int64)
    low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
    if low < 0 or high > 65535:
        raise ValueError(f"mode {mode!r} image holds values in [{low}, {high}]; it is read as 16-bit data, which "
                         f"must lie in 0..65535 (convert 32-bit images to 8 or 16 bit first)")
    return ((values * 255 + 32767) // 65535).astype(np.uint8)  # exact integer rounding of v * 255 / 65535


def _gray_to_rgb(values: np.ndarray) -> Image.Image:
    return Image.fromarray(values, mode="L").convert("RGB")


def check_image_size(image: Image.Image, name: str) -> Image.Image:
    """``image`` unchanged; a side of 0 px or an aspect ratio over ``MAX_ASPECT_RATIO``:1 is a ``ValueError``
    naming ``name``."""
    width, height = image.size
    if width < 1 or height < 1:
        raise ValueError(f"image {name!r} is {width}x{height} pixels: both sides must be at least 1 pixel")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        scale = CLIP_SHORTEST_SIDE / min(width, height)
        raise ValueError(f"image {name!r} is {width}x{height} pixels, an aspect ratio of {ratio:.4g}:1; at most "
                         f"{MAX_ASPECT_RATIO}:1 is accepted (resizing its shortest side to {CLIP_SHORTEST_SIDE} px, "
                         f"as CLIP does, would make it {round(width * scale)}x{round(height * scale)} pixels)")
    return image


def is_image_part(part) -> bool:
    """A chat content part ``{"type": "image", ...}``."""
    return isinstance(part, dict) and part.get("type") == "image"


def load_image(source, timeout: float = DEFAULT_TIMEOUT) -> Image.Image:
    """Decode one image source (see the module docstring) into a PIL image (mode unchanged; see ``to_rgb``).

    A ``str`` is an http(s) URL, a ``data:`` URI, an existing file, or else raw base64. Arrays and tensors are
    ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)`` with C in 1/3/4, uint8 or float in [0, 1]. Sizes are checked
    (``check_image_size``); a lazily opened PIL image is decoded here, so its errors surface as ``ValueError``.
    """
    if isinstance(source, Image.Image):
        return _loaded(source)
    if isinstance(source, dict):
        return _load_part(source, timeout)
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return check_image_size(array_to_image(source), f"array of shape {tuple(source.shape)}")
    if isinstance(source, bytes):
        return _decode(io.BytesIO(source), f"<{len(source)} bytes>")
    if isinstance(source, os.PathLike):
        return _open_file(os.fspath(source))
    if isinstance(source, str):
        if source.startswith(("http://", "https://")):
            return _decode(io.BytesIO(fetch_url(source, timeout)), source)
        if source.startswith("data:"):
            return _decode(io.BytesIO(decode_base64(source)), _short(source))
        if not os.path.exists(source) and _looks_like_base64(source):  # a missing path can look like base64 too
            try:
                return _decode(io.BytesIO(decode_base64(source)), "base64 data")
            except ValueError:
                raise ValueError(f"could not decode image {_short(source, 400)!r}: no such file, and not base64 "
                                 f"image data either") from None
        return _open_file(source)
    raise TypeError(f"cannot read an image from a {type(source).__name__}; expected a PIL image, path, URL, "
                    f"base64 string, bytes, numpy array, torch tensor or {{'type': 'image', ...}} part")


def _load_part(part: dict, timeout: float) -> Image.Image:
    if part.get("type", "image") != "image":
        raise ValueError(f"part of type {part.get('type')!r} is not an image part")
    keys = [key for key in IMAGE_PART_KEYS if part.get(key) is not None]
    if len(keys) != 1:
        raise ValueError(f"an image part needs exactly one of {list(IMAGE_PART_KEYS)}, got keys {sorted(part)}")
    value = part[keys[0]]
    if keys[0] == "base64":
        if not isinstance(value, (str, bytes)):
            raise TypeError(f"'base64' holds a str or bytes, got {type(value).__name__}")
        return _decode(io.BytesIO(decode_base64(value)), "base64 data")
    if keys[0] == "path" and not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"'path' holds a str or os.PathLike, got {type(value).__name__}")
    if keys[0] == "path":
        return _open_file(os.fspath(value))
    if keys[0] == "url" and not (isinstance(value, str) and value.startswith(("http://", "https://", "data:"))):
        raise ValueError(f"'url' must be an http(s) or data: URL, got {_short(str(value))!r}")
    return load_image(value, timeout)


def fetch_url(url: str, timeout: float = DEFAULT_TIMEOUT) -> bytes:
    """GET ``url``; the whole download must finish within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "gill_hf"}),
                                    timeout=timeout) as response:
            chunks = []
            while chunk := response.read(1 << 16):
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    raise TimeoutError
            return b"".join(chunks)
    except urllib.error.HTTPError as err:
        raise ValueError(f"could not fetch image {url!r}: HTTP {err.code} {err.reason}") from err
    except (TimeoutError, socket.timeout) as err:
        raise ValueError(f"could not fetch image {url!r}: no complete answer within {timeout:g} s") from err
    except urllib.error.URLError as err:
        if isinstance(err.reason, (TimeoutError, socket.timeout)):
            raise ValueError(f"could not fetch image {url!r}: no complete answer within {timeout:g} s") from err
        raise ValueError(f"could not fetch image {url!r}: {err.reason}") from err
    except OSError as err:
        raise ValueError(f"could not fetch image {url!r}: {err}") from err


def decode_base64(data: str | bytes) -> bytes:
    """Raw base64 (standard or URL-safe alphabet) or a ``data:[mime];base64,...`` URI -> bytes."""
    text = data.decode("ascii", "replace") if isinstance(data, bytes) else data
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ValueError(f"data URI {_short(data)!r} is not base64-encoded (expected 'data:<mime>;base64,...')")
    text = "".join(text.split())
    try:
        return base64.b64decode(text.replace("-", "+").replace("_", "/") + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"invalid base64 image data {_short(data)!r}: {err}") from err


def array_to_image(array: np.ndarray | torch.Tensor) -> Image.Image:
    """``(H, W)``, ``(H, W, C)`` or ``(C, H, W)`` (C in 1, 3, 4), uint8 or float in [0, 1] -> PIL image.

    Tensors are read channels-first when their first dimension could be channels, arrays channels-last."""
    channels_first = isinstance(array, torch.Tensor)
    if channels_first:
        array = array.detach().cpu()
        array = (array.float() if array.is_floating_point() else array).numpy()
    shape = tuple(array.shape)
    if array.ndim == 3:
        first, last = shape[0] in (1, 3, 4), shape[-1] in (1, 3, 4)
        if not (first or last):
            raise ValueError(f"image array of shape {shape} has no channel dimension of size 1, 3 or 4 "
                             f"(expected (H, W, C) or (C, H, W))")
        if first and (channels_first or not last):
            array = np.moveaxis(array, 0, -1)
        if array.shape[-1] == 1:
            array = array[..., 0]
    elif array.ndim != 2:
        raise ValueError(f"image array of shape {shape} is not (H, W), (H, W, C) or (C, H, W); pass a batch as a "
                         f"list of images")
    if array.dtype == np.uint8:
        values = array
    elif np.issubdtype(array.dtype, np.floating):
        low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
        if not (np.isfinite(low) and np.isfinite(high) and low >= 0.0 and high <= 1.0):
            raise ValueError(f"float image values must lie in [0, 1], got the range [{low:g}, {high:g}]")
        values = (array * 255.0).round().astype(np.uint8)
    else:
        raise ValueError(f"image array dtype must be uint8 or float (values in [0, 1]), got {array.dtype}")
    return Image.fromarray(np.ascontiguousarray(values))


def _open_file(path: str) -> Image.Image:
    if not os.path.isfile(path):
        raise ValueError(f"could not decode image {path!r}: no such file (nor an http(s) URL or base64 data)")
    try:
        handle = open(path, "rb")
    except OSError as err:
        raise ValueError(f"could not read image {path!r}: {err}") from err
    with handle:
        return _decode(handle, path)


def _decode(stream, name: str) -> Image.Image:
    """Decode a file-like object; PIL's decompression-bomb warning is raised as an error here (not leaked)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(stream) as image:
                image.load()
                image = image.copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(f"could not decode image {name!r}: {err} (PIL.Image.MAX_IMAGE_PIXELS = "
                         f"{Image.MAX_IMAGE_PIXELS})") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
        raise ValueError(f"could not decode image {name!r}: {err}") from err
    return check_image_size(image, name)


def _loaded(image: Image.Image) -> Image.Image:
    """A PIL image given as such: decoded now if it was opened lazily, and size-checked."""
    name = getattr(image, "filename", "") or f"PIL image ({image.mode}, {image.width}x{image.height})"
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ValueError(f"could not decode image {name!r}: {err}") from err
    return check_image_size(image, name)


def _looks_like_base64(text: str) -> bool:
    return len(text) >= 16 and _BASE64.fullmatch(text) is not None


def _short(text, limit: int = 60) -> str:
    text = str(text)
    return text if len(text) <= limit else text[:limit] + "..."
