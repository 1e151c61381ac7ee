"""Generic CSV adapter: any table with an image path and an age and/or a gender column.

``root`` is the CSV file, or a folder holding exactly one ``*.csv`` (or name
it with the ``csv`` option, relative to that folder or absolute). Relative
image paths are relative to the CSV's folder. The delimiter (``,``, ``;`` or
tab) is sniffed from the header line.

Columns (options; names matched exactly, else case-insensitively):

- ``path_col`` (default ``path``): required.
- ``age_col`` (``age``) and ``gender_col`` (``gender``): at least one must be
  present (a FeatlabError lists the columns found otherwise); a column named
  explicitly (not the default) must exist.
- ``race_col``, ``split_col``, ``group_col``: optional; when given they must
  exist. ``group_col`` names the identity column (a person, a subject, a
  photo session): the seeded split never puts one group on two sides; an
  empty cell is a group of its own.

Values:

- age: a number in 0..120 (:data:`featlab.data.manifest.MAX_AGE`); an empty cell, a value that is not a number
  and one outside 0..120 leave the row without an age, counted and named by row and value
  (``kept without age: empty`` / ``not a number`` / ``outside 0..120``; :attr:`PrepareResult.label_skips`):
  age and age-bin heads leave it out, gender heads keep it.
- gender: ``m``/``male``/``man`` and ``f``/``female``/``woman`` in any case;
  empty -> unknown; anything else (numbers included: 0/1 conventions differ
  between datasets, so none is guessed) -> unknown, counted ("kept without
  gender: unrecognised value").
- split: ``train``, ``val``/``valid``/``validation``, ``test`` (any case);
  with ``split_col`` the file's splits are used (``has_splits`` True) and rows
  with another value are skipped; without it the registry assigns a seeded split.

Rows kept with one label missing are counted under ``kept without age: ...``
/ ``kept without gender: ...`` and named in ``label_skips`` (not in the skipped list); a missing column is
counted only (``kept without gender: no gender column 'gender' in t.csv ...``), so that the
prepare summary names it. Messages name an option by its flag (``--path-col``) under ``featlab prepare``
and by its spec key (``[dataset] options.path_col``) under ``featlab run`` (:func:`option_hint`). Rows with neither
label, with a missing image file, or repeating an earlier row's image are
skipped with the reason.
"""

from __future__ import annotations

import csv
from pathlib import Path

from ...errors import FeatlabError
from ..manifest import AGE_RANGE, MAX_AGE, PrepareResult
from . import option_hint, row

GENDERS = {"m": "m", "male": "m", "man": "m", "f": "f", "female": "f", "woman": "f"}
SPLITS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def sniff_delimiter(header_line: str) -> str:
    """The most frequent of ``,``, ``;``, tab in the header line (``,`` when none occurs)."""
    counts = {d: header_line.count(d) for d in (",", ";", "\t")}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] else ","


def read_table(path: Path) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a delimited text file (delimiter sniffed)."""
    try:
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
            text = f.read()
    except OSError as e:
        raise FeatlabError(f"cannot read {path}: {e.strerror or e}") from None
    lines = text.splitlines()
    if not lines:
        raise FeatlabError(f"{path} is empty")
    rows = list(csv.reader(lines, delimiter=sniff_delimiter(lines[0])))
    header = [h.strip() for h in rows[0]]
    return header, [r for r in rows[1:] if any(c.strip() for c in r)]


def find_column(header: list[str], name: str | None) -> int | None:
    if name is None:
        return None
    if name in header:
        return header.index(name)
    low = [h.lower() for h in header]
    return low.index(name.lower()) if low.count(name.lower()) == 1 else None


def find_csv(root: Path, csv_name: str | None) -> Path:
    root = Path(root)
    if root.is_file():
        return root
    if csv_name:
        p = Path(csv_name)
        p = p if p.is_absolute() else root / p
        if not p.is_file():
            raise FeatlabError(f"CSV file not found: {p}")
        return p
    found = sorted(p for p in root.glob("*") if p.is_file() and p.suffix.lower() == ".csv")
    if len(found) != 1:
        what = f"{len(found)} ({', '.join(p.name for p in found[:5])})" if found else "none"
        where = ("pass the CSV file itself as --root" if option_hint("csv").startswith("--")
                 else "set [dataset] root to the CSV file, or [dataset] options.csv")
        raise FeatlabError(f"expected exactly one .csv file in {root}, found {what}; {where}")
    return found[0]


def _note(res: PrepareResult, what: str) -> None:
    res.counts[what] = res.counts.get(what, 0) + 1


def parse_age(text: str) -> float | None:
    return age_or_why(text)[0]


def age_or_why(text: str) -> tuple[float | None, str]:
    """``(age, "")`` for a number in 0..MAX_AGE, else ``(None, why)``: ``empty``, ``not a number``,
    ``outside 0..120``."""
    text = text.strip()
    if not text:
        return None, "empty"
    try:
        a = float(text)
    except ValueError:
        return None, "not a number"
    if a != a:
        return None, "not a number"
    return (a, "") if 0.0 <= a <= MAX_AGE else (None, f"outside {AGE_RANGE}")


def prepare(root: Path, csv: str | None = None, path_col: str = "path", age_col: str = "age",
            gender_col: str = "gender", race_col: str | None = None, split_col: str | None = None,
            group_col: str | None = None, **_options) -> PrepareResult:
    path = find_csv(root, csv)
    base = path.parent
    header, records = read_table(path)
    found = ", ".join(header) or "none"
    cols = {k: find_column(header, n) for k, n in
            (("path", path_col), ("age", age_col), ("gender", gender_col), ("race", race_col), ("split", split_col),
             ("group", group_col))}
    if cols["path"] is None:
        raise FeatlabError(f"{path}: no path column {path_col!r} (columns found: {found}); name it with "
                           f"{option_hint('path_col')}")
    for key, name, default in (("age", age_col, "age"), ("gender", gender_col, "gender"),
                               ("race", race_col, None), ("split", split_col, None), ("group", group_col, None)):
        if name is not None and name != default and cols[key] is None:
            raise FeatlabError(f"{path}: no {key} column {name!r} (columns found: {found}); name it with "
                               f"{option_hint(key + '_col')}")
    if cols["age"] is None and cols["gender"] is None:
        raise FeatlabError(f"{path}: neither an age column {age_col!r} nor a gender column {gender_col!r} "
                           f"(columns found: {found}); name them with {option_hint('age_col')} / "
                           f"{option_hint('gender_col')}")

    res = PrepareResult(has_splits=cols["split"] is not None)
    seen: set[str] = set()
    for n, rec in enumerate(records, 2):
        def get(key: str) -> str:
            i = cols[key]
            return rec[i].strip() if i is not None and i < len(rec) else ""

        where = f"{path}:{n}"
        rel = get("path")
        if not rel:
            res.skip(where, "empty path")
            continue
        p = Path(rel)
        p = p if p.is_absolute() else base / p
        if not p.is_file():
            res.skip(f"{where} {p}", "image file not found")
            continue
        key = str(p.resolve())
        if key in seen:
            res.skip(f"{where} {p}", "duplicate image path")
            continue
        split = ""
        if cols["split"] is not None:
            split = SPLITS.get(get("split").lower(), "")
            if not split:
                res.skip(f"{where} {p}", "unknown split value (expected train/val/test)")
                continue
        age, age_text = None, ""
        if cols["age"] is not None:
            age_text = get("age")
            age, age_why = age_or_why(age_text)
        else:  # counted in the summary: a CSV without the column is a study without that label
            age_why = f"no age column {age_col!r} in {path.name} (name it with {option_hint('age_col')})"
        gender, gender_text = "", ""
        if cols["gender"] is not None:
            gender_text = get("gender")
            gender = GENDERS.get(gender_text.lower(), "")
            if not gender:
                gender_why = "unrecognised value" if gender_text else "empty"
        else:
            gender_why = f"no gender column {gender_col!r} in {path.name} (name it with {option_hint('gender_col')})"
        if age is None and not gender:
            values = ", ".join(f"{k} {v!r}" for k, v in (("age", age_text), ("gender", gender_text)) if v)
            res.skip(f"{where} {p}" + (f" ({values})" if values else ""), "no usable age or gender")
            continue
        r = row("csv", base, p, age=age, gender=gender, race=get("race"), split=split, group=get("group"))
        for missing, col, text, why in (("age", cols["age"], age_text, None if age is not None else age_why),
                                         ("gender", cols["gender"], gender_text, None if gender else gender_why)):
            if why is None:
                continue
            if col is None:
                _note(res, f"kept without {missing}: {why}")
            else:  # a cell of this row: named with its value
                res.skip_label(r["image_id"], f"{where} {p} ({missing} {text!r})", f"kept without {missing}: {why}")
        seen.add(key)
        res.rows.append(r)
    return res
