"""ChaLearn LAP apparent-age adapter (2015 and 2016 releases).

Ground truth is one CSV per split, anywhere under ``root``: 2016's
``train_gt.csv``/``valid_gt.csv``/``test_gt.csv`` (``image,mean,stdev``),
2015's ``Train.csv``/``Validation.csv`` (often ``image;age;stdev``). The
delimiter is sniffed; the image column is ``image`` and the age column
``mean`` (or ``age``), any case; a file without a header row is read as
``image, age, stdev``. The age is the mean apparent age, a real number. There
is no gender or race.

The split comes from the CSV's name: ``train`` -> train, ``valid``/``val`` ->
val, ``test`` -> test (checked in that order on the lower-cased name). CSVs
whose name says none of these, or that lack the columns, are ignored and
counted ("csv ignored: ..."). The official splits are kept (``has_splits``
True) only when all three are present; otherwise (2015 without test labels,
say) the registry assigns a seeded split to all rows.

Images are found by name anywhere under ``root``. If one name occurs in
several places, the copy under a folder whose name gives the CSV's split
(``train/``, ``valid/``, ``Validation/``...) or the CSV's own base name
(``train_gt/``) is used; if that does not single one out the row is skipped
("image name found in several folders"). Also skipped: "image file not
found", "invalid age (not a number in 0..120)", "duplicate record".
"""

from __future__ import annotations

import re
from pathlib import Path

from ...errors import FeatlabError
from ..manifest import AGE_RANGE, MAX_AGE, SPLITS, PrepareResult
from . import IMAGE_EXTS, iter_images, row
from .csvfile import find_column, read_table

AGE_COLUMNS = ("mean", "age", "apparent_age", "real_age")


def split_of(name: str) -> str:
    """The split a file or folder name stands for, or ''."""
    n = name.lower()
    if "train" in n:
        return "train"
    if "valid" in n or re.search(r"(^|[^a-z])val([^a-z]|$)", n):
        return "val"
    if "test" in n:
        return "test"
    return ""


def _note(res: PrepareResult, what: str) -> None:
    res.counts[what] = res.counts.get(what, 0) + 1


def _pick(cands: list[Path], root: Path, split: str, stem: str) -> Path | None:
    if len(cands) == 1:
        return cands[0]

    def folders(p: Path) -> list[str]:
        try:
            return [x.lower() for x in p.parent.relative_to(root).parts]
        except ValueError:
            return [x.lower() for x in p.parent.parts]

    hits = [p for p in cands if stem.lower() in folders(p)]
    if len(hits) != 1:
        hits = [p for p in cands if any(split_of(f) == split for f in folders(p))]
    return hits[0] if len(hits) == 1 else None


def prepare(root: Path, **_options) -> PrepareResult:
    root = Path(root)
    res = PrepareResult()
    csvs = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() == ".csv") if root.is_dir() else [root]
    base = root if root.is_dir() else root.parent
    index: dict[str, list[Path]] = {}
    for p in iter_images(base):
        index.setdefault(p.name, []).append(p)
    used, seen = [], set()
    splits_found = set()
    for cpath in csvs:
        split = split_of(cpath.stem)
        if not split:
            _note(res, "csv ignored: name says neither train, valid nor test")
            continue
        header, records = read_table(cpath)
        i_img, i_age = find_column(header, "image"), None
        for name in AGE_COLUMNS:
            i_age = find_column(header, name)
            if i_age is not None:
                break
        if i_img is None and header and Path(header[0]).suffix.lower() in IMAGE_EXTS:
            records, i_img, i_age = [header] + records, 0, 1  # no header row: image, age, stdev
        if i_img is None or i_age is None:
            _note(res, "csv ignored: no image and mean/age columns")
            continue
        used.append(cpath)
        splits_found.add(split)
        for n, rec in enumerate(records, 2):
            where = f"{cpath}:{n}"
            img = rec[i_img].strip() if i_img < len(rec) else ""
            if not img:
                res.skip(where, "empty image name")
                continue
            try:
                age = float(rec[i_age]) if i_age < len(rec) else float("nan")
            except ValueError:
                age = float("nan")
            if not 0.0 <= age <= MAX_AGE:
                shown = rec[i_age].strip() if i_age < len(rec) else ""
                res.skip(f"{where} {img} (age {shown!r})", f"invalid age (not a number in {AGE_RANGE})")
                continue
            img = img.replace("\\", "/")
            if "/" in img:  # a relative path: next to the CSV, or under root
                direct = [q for q in (cpath.parent / img, base / img) if q.is_file()]
            else:
                direct = []
            cands = direct[:1] or index.get(Path(img).name, [])
            if not cands:
                res.skip(f"{where} {img}", "image file not found")
                continue
            p = _pick(cands, base, split, cpath.stem)
            if p is None:
                res.skip(f"{where} {img}", "image name found in several folders")
                continue
            key = str(p.resolve())
            if key in seen:
                res.skip(f"{where} {img}", "duplicate record")
                continue
            seen.add(key)
            res.rows.append(row("chalearn", base, p, age=age, split=split))
    if not used:
        names = ", ".join(p.name for p in csvs[:5]) or "none"
        raise FeatlabError(f"no ChaLearn ground-truth CSV (train*/valid*/test*.csv with columns image and mean) "
                           f"under {root}; CSV files found: {names}")
    res.has_splits = splits_found == set(SPLITS)
    return res
