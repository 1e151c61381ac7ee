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

- age: a number in 0..120; empty -> unknown; anything else is unknown too
  and counted ("kept without age: not a number in 0..120").
- gender: ``m``/``male``/``man`` and ``f``/``female``/``woman`` in any case;
  empty -> unknown; anything else (numbers included: 0/1 conventions differ
  between datasets, so none is guessed) -> unknown, counted ("kept without
  gender: unrecognised value").
- split: ``train``, ``val``/``valid``/``validation``, ``test`` (any case);
  with ``split_col`` the file's splits are used (``has_splits`` True) and rows
  with another value are skipped; without it the registry assigns a seeded split.

Rows kept with one label missing are counted under ``kept without age: ...``
/ ``kept without gender: ...`` (not in the skipped list), a missing column too
(``kept without gender: no gender column 'gender' in t.csv ...``), so that the
prepare summary names it. Messages name the CLI's flags (``--path-col``). Rows with neither
label, with a missing image file, or repeating an earlier row's image are
skipped with the reason.
"""

from __future__ import annotations

import csv
from pathlib import Path

from ..errors import FeatlabError
from ..manifest import PrepareResult
from . import row

GENDERS = {"m": "m", "male": "m", "man": "m", "f": "f", "female": "f", "woman": "f"}
SPLITS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
MAX_AGE = 120.0


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
        raise FeatlabError(f"expected exactly one .csv file in {root}, found {what}; pass the CSV file itself as --root "
                           "(in a spec: root = the file, or options.csv)")
    return found[0]


def _note(res: PrepareResult, what: str) -> None:
    res.counts[what] = res.counts.get(what, 0) + 1


def parse_age(text: str) -> float | None:
    try:
        a = float(text)
    except ValueError:
        return None
    return a if 0.0 <= a <= MAX_AGE else None


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
        raise FeatlabError(f"{path}: no path column {path_col!r} (columns found: {found}); name it with --path-col "
                           "(options.path_col in a spec)")
    for key, name, default in (("age", age_col, "age"), ("gender", gender_col, "gender"),
                               ("race", race_col, None), ("split", split_col, None), ("group", group_col, None)):
        if name is not None and name != default and cols[key] is None:
            raise FeatlabError(f"{path}: no {key} column {name!r} (columns found: {found}); name it with --{key}-col "
                               f"(options.{key}_col in a spec)")
    if cols["age"] is None and cols["gender"] is None:
        raise FeatlabError(f"{path}: neither an age column {age_col!r} nor a gender column {gender_col!r} "
                           f"(columns found: {found}); name them with --age-col / --gender-col "
                           "(options.age_col / gender_col in a spec)")

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
        age = None
        if cols["age"] is not None:
            text = get("age")
            age = parse_age(text) if text else None
            if age is None:
                age_why = "not a number in 0..120" if text else "empty"
        else:  # named in the summary: a CSV without the column is a study without that label
            age_why = f"no age column {age_col!r} in {path.name} (name it with --age-col)"
        gender = ""
        if cols["gender"] is not None:
            text = get("gender")
            gender = GENDERS.get(text.lower(), "")
            if not gender:
                gender_why = "unrecognised value" if text else "empty"
        else:
            gender_why = f"no gender column {gender_col!r} in {path.name} (name it with --gender-col)"
        if age is None and not gender:
            res.skip(f"{where} {p}", "no usable age or gender")
            continue
        if age is None:
            _note(res, f"kept without age: {age_why}")
        if not gender:
            _note(res, f"kept without gender: {gender_why}")
        seen.add(key)
        res.rows.append(row("csv", base, p, age=age, gender=gender, race=get("race"), split=split,
                            group=get("group")))
    return res
