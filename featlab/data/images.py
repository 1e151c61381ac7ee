"""Image decoding: any file a dataset may hold -> an H x W x 3 uint8 RGB array, or a reason.

Handles EXIF rotation, CMYK, palette and greyscale, alpha (composited on
white), 16-bit and float images (scaled to 8 bits), and huge images
(decoded at reduced size when the format allows, refused past a hard cap).
Failures raise :class:`BadImage` with a short reason that the extractor
records in the features file's /skipped table.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
MAX_PIXELS = 80_000_000  # refuse decompression bombs beyond this
WORK_PIXELS = 4096 * 4096  # decode larger JPEGs at reduced size (draft mode)


class BadImage(Exception):
    """An image that cannot be used; ``str(e)`` is the reason."""


def load_rgb(path: str | Path) -> np.ndarray:
    from PIL import Image, ImageOps

    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError:
        raise BadImage("file not found") from None
    if size == 0:
        raise BadImage("empty file (0 bytes)")
    Image.MAX_IMAGE_PIXELS = None  # we check the size ourselves, before decoding
    try:
        with Image.open(p) as im:
            if im.width * im.height > MAX_PIXELS:
                raise BadImage(f"image too large ({im.width}x{im.height}, over {MAX_PIXELS // 1_000_000} megapixels)")
            if im.width * im.height > WORK_PIXELS and im.format == "JPEG":
                im.draft("RGB", (im.width // 4, im.height // 4))
            im = ImageOps.exif_transpose(im)
            return _to_rgb(im)
    except Image.DecompressionBombError:
        raise BadImage(f"image too large (over {MAX_PIXELS // 1_000_000} megapixels)") from None
    except BadImage:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure is a skip, with its reason
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        msg = msg.replace(f" {str(p)!r}", "").replace(str(p), "the file")[:160]  # one reason counts many files
        raise BadImage(f"cannot decode: {msg}") from None


def _to_rgb(im) -> np.ndarray:
    from PIL import Image

    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        hi = a.max() if a.size else 1.0
        a = (a / (65535.0 if mode.startswith("I;16") or hi > 255 else max(hi, 1.0)) * 255.0) if hi > 0 else a
        a = np.clip(a, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(a[..., None], 3, axis=2))
    if mode == "P":
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    if im.mode != "RGB":
        im = im.convert("RGB")
    a = np.asarray(im, dtype=np.uint8)
    if a.ndim != 3 or a.shape[2] != 3 or a.shape[0] < 8 or a.shape[1] < 8:
        raise BadImage(f"unusable image shape {a.shape}")
    return np.ascontiguousarray(a)
