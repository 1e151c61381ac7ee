"""UTKFace adapter: labels from file names ``[age]_[gender]_[race]_[datetime].jpg(.chip.jpg)``.

gender 0 = male, 1 = female; race 0 White, 1 Black, 2 Asian, 3 Indian, 4 Others.
Names that do not parse are skipped and reported, never guessed.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..manifest import PrepareResult
from . import iter_images, row

RACES = {"0": "white", "1": "black", "2": "asian", "3": "indian", "4": "others"}
_NAME = re.compile(r"^(\d{1,3})_([01])_([0-4])_(\d{6,18})\.jpg(\.chip\.jpg)?$")


def prepare(root: Path, **_options) -> PrepareResult:
    res = PrepareResult()
    for p in iter_images(root):
        m = _NAME.match(p.name)
        if not m:
            res.skip(str(p), "malformed UTKFace file name (expected [age]_[gender]_[race]_[datetime].jpg)")
            continue
        age = int(m.group(1))
        if age > 116:
            res.skip(str(p), "age out of UTKFace's range 0..116")
            continue
        res.rows.append(row("utkface", root, p, age=float(age), gender="m" if m.group(2) == "0" else "f", race=RACES[m.group(3)]))
    return res
