"""Adience adapter: the five ``fold_N_data.txt`` files (N = 0..4), folds kept as they are.

Each fold file is tab-separated with a header (``user_id, original_image,
face_id, age, gender, x, y, dx, dy, tilt_ang, fiducial_yaw_angle,
fiducial_score``). The fold files are looked for in ``root``, else anywhere
below it. A record's image is, relative to ``root`` (or to the fold file's
folder), the first that exists of

- ``faces/{user_id}/coarse_tilt_aligned_face.{face_id}.{original_image}``
- ``aligned/{user_id}/landmark_aligned_face.{face_id}.{original_image}``

and the record is skipped ("image file not found") when neither does.

Ages. Adience labels are mostly the 8 group ranges 0-2, 4-6, 8-13, 15-20,
25-32, 38-43, 48-53, 60-100, with some stray ranges and single numbers:

- a range that is one of the groups or lies inside one (``(25, 32)``,
  ``(27, 32)``, ``(8, 12)``) keeps its bounds in ``age_low``/``age_high`` and
  its midpoint in ``age`` (``28.5``, ``29.5``, ``10``);
- a single number (``35``, ``(35, 35)``) is an exact age and is kept as is,
  even between groups (the bin schemes place such ages);
- a range that straddles groups (``(8, 23)``, ``(38, 48)``) has no single
  group and no meaningful midpoint: "unusable age range";
- ``None``/empty: "no age label"; anything else: "unparsable age label".

Gender: ``f``/``m`` (any case) kept; ``u``, empty or anything else is
"gender unknown".

A record with a usable gender but no usable age (or the reverse) is kept
with the missing field empty, and counted under ``kept without age: <why>``
/ ``kept without gender: <why>`` in ``PrepareResult.counts`` (these rows are
*not* in the skipped list). A record with neither is skipped with reason
``no usable age or gender (<age why>; <gender why>)``. A record naming the
same image as an earlier one is skipped ("duplicate record").

``fold`` is N, ``split`` is empty, ``has_splits`` is True. ``group`` is the
record's ``user_id`` (the Flickr album, i.e. the subject or photo session):
validation rows carved from training folds must be whole ``user_id`` groups
(:func:`featlab.data.manifest.hold_out_groups`).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from ..bins import _ADIENCE_GROUPS, parse_range
from ...errors import FeatlabError
from ..manifest import PrepareResult
from . import row

REQUIRED = ("user_id", "original_image", "face_id", "age", "gender")
_FOLD = re.compile(r"^fold_([0-4])_data\.txt$")

GROUPS = tuple((float(lo), float("inf") if hi is None else float(hi)) for lo, hi in _ADIENCE_GROUPS)


def adience_age(text: str) -> tuple[float | None, str]:
    """(age, "") for a usable Adience age label (a range's midpoint), else (None, reason)."""
    r, why = adience_range(text)
    return (None, why) if r is None else ((r[0] + r[1]) / 2.0, "")


def adience_range(text: str) -> tuple[tuple[float, float] | None, str]:
    """((low, high), "") for a usable Adience age label (low == high for a single number), else (None, reason)."""
    t = str(text).strip()
    if not t or t.lower() in {"none", "nan"}:
        return None, "no age label"
    r = parse_range(t)
    if r is None:
        return None, "unparsable age label"
    lo, hi = float(r[0]), float(r[1])
    if lo == hi or any(g_lo <= lo and hi <= g_hi for g_lo, g_hi in GROUPS):
        return (lo, hi), ""
    return None, "unusable age range (straddles Adience groups)"


def find_fold_files(root: Path) -> dict[int, Path]:
    root = Path(root)
    found: dict[int, list[Path]] = {}
    for candidates in (root.glob("fold_*_data.txt"), root.rglob("fold_*_data.txt")):
        for p in sorted(candidates):
            m = _FOLD.match(p.name)
            if m and p.is_file():
                found.setdefault(int(m.group(1)), []).append(p)
        if found:
            break
    if not found:
        raise FeatlabError(f"no Adience fold files (fold_0_data.txt .. fold_4_data.txt) under {root}")
    for n, ps in found.items():
        if len(ps) > 1:
            raise FeatlabError(f"fold_{n}_data.txt found in {len(ps)} places under {root} "
                               f"({', '.join(str(p.parent) for p in ps[:3])}); pass the folder that holds the fold files")
    return {n: ps[0] for n, ps in sorted(found.items())}


def _image_path(bases: list[Path], user_id: str, face_id: str, original: str) -> Path | None:
    for base in bases:
        for p in (base / "faces" / user_id / f"coarse_tilt_aligned_face.{face_id}.{original}",
                  base / "aligned" / user_id / f"landmark_aligned_face.{face_id}.{original}"):
            if p.is_file():
                return p
    return None


def note(res: PrepareResult, what: str) -> None:
    """Count a kept row's missing label (not a skip: the row stays)."""
    res.counts[what] = res.counts.get(what, 0) + 1


def prepare(root: Path, **_options) -> PrepareResult:
    root = Path(root)
    res = PrepareResult(has_splits=True)
    seen: set[str] = set()
    for fold, fpath in find_fold_files(root).items():
        bases = [root] if fpath.parent.resolve() == root.resolve() else [root, fpath.parent]
        with open(fpath, newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.DictReader(f, delimiter="\t")
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in REQUIRED if c not in header]
            if missing:
                raise FeatlabError(f"{fpath} is not an Adience fold file: no column(s) {', '.join(missing)} "
                                   f"(found: {', '.join(header) or 'nothing'})")
            reader.fieldnames = header
            for rec in reader:
                where = f"{fpath}:{reader.line_num}"
                vals = {c: (rec.get(c) or "").strip() for c in REQUIRED}
                if not (vals["user_id"] and vals["original_image"] and vals["face_id"]):
                    res.skip(where, "malformed record (no user_id, original_image or face_id)")
                    continue
                p = _image_path(bases, vals["user_id"], vals["face_id"], vals["original_image"])
                if p is None:
                    res.skip(f"{where} faces/{vals['user_id']}/*.{vals['face_id']}.{vals['original_image']}",
                             "image file not found")
                    continue
                key = str(p.resolve())
                if key in seen:
                    res.skip(f"{where} {p}", "duplicate record")
                    continue
                rng, age_why = adience_range(vals["age"])
                age = None if rng is None else (rng[0] + rng[1]) / 2.0
                g = vals["gender"].lower()
                gender, gender_why = (g, "") if g in ("f", "m") else ("", "gender unknown")
                if age is None and not gender:
                    res.skip(f"{where} {p}", f"no usable age or gender ({age_why}; {gender_why})")
                    continue
                lo, hi = rng if rng is not None else (None, None)
                r = row("adience", root, p, age=age, gender=gender, fold=fold, group=vals["user_id"],
                        age_low=lo, age_high=hi)
                if age is None:  # named by row and value: the heads of that label leave the row out
                    res.skip_label(r["image_id"], f"{where} {p} (age {vals['age']!r})", f"kept without age: {age_why}")
                if not gender:
                    res.skip_label(r["image_id"], f"{where} {p} (gender {vals['gender']!r})",
                                   f"kept without gender: {gender_why}")
                seen.add(key)
                res.rows.append(r)
    return res
