"""facial-age adapter: one folder per age (``001/``, ``026/``, ``1/``), images inside.

The age is the name of an image's own folder, anywhere under ``root`` (so a
wrapper such as ``face_age/026/x.png`` works). Images whose folder name is not
a whole number are skipped ("folder name is not an age"), as are ages above
120 ("age outside 0..120"). The dataset has no gender, race or split:
``has_splits`` is False and the registry assigns a seeded split.
"""

from __future__ import annotations

from pathlib import Path

from ..manifest import AGE_RANGE, MAX_AGE, PrepareResult
from . import iter_images, row


def prepare(root: Path, **_options) -> PrepareResult:
    root = Path(root)
    res = PrepareResult()
    for p in iter_images(root):
        folder = p.parent.name.strip()
        if not (folder.isascii() and folder.isdigit()):
            res.skip(str(p), "folder name is not an age")
            continue
        age = int(folder)
        if age > MAX_AGE:
            res.skip(str(p), f"age outside {AGE_RANGE}")
            continue
        res.rows.append(row("facial-age", root, p, age=float(age)))
    return res
