"""All-Age-Faces (AAF) adapter: the age is in the image name, gender in the label files.

Layout of the release::

    original images/00000A02.jpg ...   (full images)
    aligned faces/00000A02.jpg ...     (the same faces, aligned and cropped)
    image sets/train.txt               lines "00000A02 0" (AAF's README: "%05dA%02d %d")
    image sets/val.txt

Label lines may name the image with or without its extension
(``00000A02 0`` or ``00000A02.jpg 0``); images and labels are matched on the
name without extension.

Images are found anywhere under ``root``. A name ``NNNNNAkk.jpg`` gives the age
``kk`` (AAF covers 2..80; other values are skipped as "age outside AAF's range
2..80"); other image names are skipped ("malformed AAF file name").

When the same name occurs in several folders (both ``aligned faces`` and
``original images`` are present) one copy is kept: ``aligned faces`` first,
then ``original images``, then the first path in sorted order; the others
are skipped as "same image name in another folder".

Gender comes from the label files (AAF's convention: 0 = female, 1 = male);
``train.txt``/``val.txt`` are looked for anywhere under ``root``, preferring
those in a folder named ``image sets``. Lines with another label, or a name
listed twice with different labels, are counted and ignored.

Splits. With label files, AAF's own partition is kept (``has_splits`` True)
and the official ``val.txt`` list, AAF's only held-out set, becomes ``test``;
``val`` is carved from ``train.txt``'s images, 1/8 of them (about 70/10/20
overall), by the seeded hash of each image's id with a fixed seed (0), so the
test set is always AAF's own whatever ``--seed`` says. Images that are in no
list are kept with an empty gender (counted under "kept without gender: not
in the label files") and split 70/10/20 among themselves, also with seed 0.
Without any label file every image is kept without gender and the registry
assigns its seeded split (``has_splits`` False).
"""

from __future__ import annotations

import re
from pathlib import Path

from ...errors import FeatlabError
from ..manifest import PrepareResult, assign_splits, to_frame
from . import IMAGE_EXTS, iter_images, row

_NAME = re.compile(r"^(\d{5})A(\d{2})\.(jpe?g|png|bmp)$", re.IGNORECASE)
GENDER = {"0": "f", "1": "m"}
FOLDER_PREFERENCE = ("aligned faces", "original images")
VAL_OF_TRAIN = 1 / 8


def _folder_rank(p: Path) -> int:
    parts = [x.lower() for x in p.parent.parts]
    for i, name in enumerate(FOLDER_PREFERENCE):
        if name in parts:
            return i
    return len(FOLDER_PREFERENCE)


def find_label_file(root: Path, name: str) -> Path | None:
    found = [p for p in sorted(Path(root).rglob(name)) if p.is_file()]
    if not found:
        return None
    found.sort(key=lambda p: (p.parent.name.lower() != "image sets", len(p.parts), str(p)))
    return found[0]


def read_labels(path: Path, res: PrepareResult) -> dict[str, str]:
    """``{image name without extension: "f"/"m"}`` from an AAF label file; bad lines are counted."""
    labels: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise FeatlabError(f"cannot read AAF label file {path}: {e.strerror or e}") from None
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or parts[1] not in GENDER:
            res.skip(f"{path}:{n}", "malformed label line (expected '<image> 0|1')")
            continue
        name = Path(parts[0].replace("\\", "/")).name
        if Path(name).suffix.lower() in IMAGE_EXTS:
            name = Path(name).stem
        g = GENDER[parts[1]]
        if labels.get(name, g) != g:
            res.skip(f"{path}:{n}", "conflicting gender labels for one image")
            labels[name] = ""
            continue
        labels[name] = g
    return labels


def prepare(root: Path, **_options) -> PrepareResult:
    root = Path(root)
    res = PrepareResult()
    # 1. images: one per name, labels from the name
    by_name: dict[str, Path] = {}
    for p in sorted(iter_images(root), key=lambda p: (_folder_rank(p), str(p))):
        m = _NAME.match(p.name)
        if not m:
            res.skip(str(p), "malformed AAF file name (expected NNNNNAkk.jpg)")
            continue
        if p.stem in by_name:
            res.skip(str(p), "same image name in another folder")
            continue
        by_name[p.stem] = p

    # 2. label files
    train_f, val_f = find_label_file(root, "train.txt"), find_label_file(root, "val.txt")
    train = read_labels(train_f, res) if train_f else {}
    val = read_labels(val_f, res) if val_f else {}
    for name in sorted(set(train) & set(val)):
        res.skip(name, "listed in both train.txt and val.txt")
        train.pop(name), val.pop(name)
    for name in sorted((set(train) | set(val)) - set(by_name)):
        res.skip(name, "in the label files but image file not found")
    res.has_splits = bool(train_f or val_f)

    # 3. rows
    groups: dict[str, list[dict]] = {"train": [], "val": [], "none": []}
    for name, p in sorted(by_name.items()):
        age = int(_NAME.match(p.name).group(2))
        if not 2 <= age <= 80:
            res.skip(str(p), "age outside AAF's range 2..80")
            continue
        if name in val:
            which, gender = "val", val[name]
        elif name in train:
            which, gender = "train", train[name]
        else:
            which, gender = "none", ""
        if not gender:
            if which != "none":  # listed, but the label conflicted
                continue
            why = "not in the label files" if res.has_splits else "no label files found"
            res.counts[f"kept without gender: {why}"] = res.counts.get(f"kept without gender: {why}", 0) + 1
        groups[which].append(row("aaf", root, p, age=float(age), gender=gender))

    if res.has_splits:
        _split(groups["train"], (1 - VAL_OF_TRAIN, VAL_OF_TRAIN, 0.0))
        _split(groups["none"], (0.7, 0.1, 0.2))
        for r in groups["val"]:
            r["split"] = "test"
    res.rows = groups["train"] + groups["val"] + groups["none"]
    return res


def _split(rows: list[dict], fractions) -> None:
    """Set ``split`` in place: each row's side by the hash of its image id, seed 0 (:func:`assign_splits`)."""
    if not rows:
        return
    df = assign_splits(to_frame(rows), seed=0, fractions=fractions)
    for r, s in zip(rows, df["split"]):
        r["split"] = s
