"""Contact sheets: a quick visual check that a manifest's labels match its images.

:func:`draw_contact_sheet` picks ``n`` random rows (seeded), draws each image
scaled (up or down, aspect kept) to fit ``THUMB`` x ``THUMB`` pixels, centred on a dark
tile, with a white strip under it carrying the label in black:
``"{age} {gender} {split or fold}"`` (``?`` for an unknown age or gender,
``fold N`` when the split is empty), and the race, if any, on a second line.
An image that cannot be read becomes a grey tile saying "unreadable". Tiles
sit on a grid of ``ceil(sqrt(k))`` columns for ``k`` images, with an optional
title band on top; the sheet is saved as PNG. Only Pillow is used.

Sheet size, for ``k`` images in ``cols`` columns and ``rows`` rows::

    width  = PAD + cols * (THUMB + PAD)
    height = PAD + (TITLE_H if title else 0) + rows * (THUMB + LABEL_H + PAD)
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..errors import FeatlabError

THUMB = 128
LABEL_H = 30
PAD = 4
TITLE_H = 24
FONT_SIZE = 11
BACKGROUND = (235, 235, 235)
TILE_BG = (40, 40, 40)
UNREADABLE_BG = (150, 150, 150)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: bitmap font
        return ImageFont.load_default()


def grid_shape(k: int) -> tuple[int, int]:
    """(columns, rows) for ``k`` tiles."""
    cols = max(1, math.ceil(math.sqrt(k)))
    return cols, max(1, math.ceil(k / cols))


def sheet_size(k: int, title: bool = False) -> tuple[int, int]:
    """Pixel (width, height) of a sheet with ``k`` images."""
    cols, rows = grid_shape(k)
    return PAD + cols * (THUMB + PAD), PAD + (TITLE_H if title else 0) + rows * (THUMB + LABEL_H + PAD)


def _is_missing(v) -> bool:
    import pandas as pd

    try:
        return v is None or bool(pd.isna(v))
    except (TypeError, ValueError):  # array-like: not a missing scalar
        return False


def label_lines(rec) -> list[str]:
    """The label under a tile: ``["{age} {gender} {split or fold}", race?]``."""
    age = rec.get("age")
    try:
        age_s = "?" if _is_missing(age) or str(age).strip() == "" else f"{round(float(age), 1):g}"
    except (TypeError, ValueError):
        age_s = "?"
    gender = "" if _is_missing(rec.get("gender")) else str(rec.get("gender")).strip()
    split = "" if _is_missing(rec.get("split")) else str(rec.get("split")).strip()
    fold = rec.get("fold")
    if not split:
        split = "-" if _is_missing(fold) or str(fold).strip() == "" else f"fold {fold}"
    lines = [f"{age_s} {gender or '?'} {split}"]
    race = "" if _is_missing(rec.get("race")) else str(rec.get("race")).strip()
    if race:
        lines.append(race)
    return lines


def _thumbnail(path):
    """The image scaled to fit THUMB x THUMB, or None if it cannot be read."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im.draft("RGB", (THUMB, THUMB))  # fast JPEG downscale; no-op otherwise
            im = ImageOps.exif_transpose(im).convert("RGB")
            return ImageOps.contain(im, (THUMB, THUMB))  # down- or up-scaled to fit, aspect kept
    except Exception:  # missing, truncated, not an image: the tile says so
        return None


def draw_contact_sheet(df, out, n: int = 64, seed: int = 0, title: str | None = None) -> Path:
    """Draw ``n`` random rows of manifest ``df`` (seeded) into a PNG at ``out``; return its path."""
    from PIL import Image, ImageDraw

    if df is None or len(df) == 0:
        raise FeatlabError("nothing to draw: the manifest has no rows")
    if "path" not in df.columns:
        raise FeatlabError("not a manifest: no 'path' column")
    n = int(n)
    if n < 1:
        raise FeatlabError(f"number of images must be at least 1, got {n}")
    k = min(n, len(df))
    pick = np.sort(np.random.default_rng(seed).choice(len(df), size=k, replace=False))
    records = df.iloc[pick].to_dict("records")

    font, title_font = _font(FONT_SIZE), _font(FONT_SIZE + 4)
    cols, _rows = grid_shape(k)
    width, height = sheet_size(k, bool(title))
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    top = PAD
    if title:
        draw.text((PAD, PAD + 2), str(title), fill=(0, 0, 0), font=title_font)
        top += TITLE_H
    for i, rec in enumerate(records):
        x = PAD + (i % cols) * (THUMB + PAD)
        y = top + (i // cols) * (THUMB + LABEL_H + PAD)
        thumb = _thumbnail(rec["path"])
        if thumb is None:
            draw.rectangle([x, y, x + THUMB - 1, y + THUMB - 1], fill=UNREADABLE_BG)
            _centred(draw, "unreadable", x, y, THUMB, THUMB, font)
        else:
            draw.rectangle([x, y, x + THUMB - 1, y + THUMB - 1], fill=TILE_BG)
            sheet.paste(thumb, (x + (THUMB - thumb.width) // 2, y + (THUMB - thumb.height) // 2))
        ly = y + THUMB
        draw.rectangle([x, ly, x + THUMB - 1, ly + LABEL_H - 1], fill=(255, 255, 255))
        for j, line in enumerate(label_lines(rec)[:2]):
            draw.text((x + 3, ly + 2 + j * (FONT_SIZE + 3)), _fit(draw, line, font), fill=(0, 0, 0), font=font)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, format="PNG")
    return out


def _fit(draw, text: str, font) -> str:
    """``text``, shortened with "..." to fit a tile's width."""
    if draw.textlength(text, font=font) <= THUMB - 6:
        return text
    while text and draw.textlength(text + "...", font=font) > THUMB - 6:
        text = text[:-1]
    return text + "..."


def _centred(draw, text: str, x: int, y: int, w: int, h: int, font) -> None:
    l, t, r, b = draw.textbbox((0, 0), text, font=font)
    draw.text((x + (w - (r - l)) // 2, y + (h - (b - t)) // 2), text, fill=(0, 0, 0), font=font)
