"""The manifest: one table schema for every dataset, and the split that goes with it.

Columns (CSV, one row per image):

- ``image_id``: stable across runs: a hash of the source name and the image's
  path relative to the dataset root.
- ``path``: absolute, or relative to the manifest file's folder.
- ``age``: float years in 0..150, empty when unknown (anything else is refused
  by :func:`read_manifest`, naming the row).
- ``gender``: ``f``, ``m`` or empty.
- ``race``: dataset's own label, may be empty.
- ``split``: ``train``/``val``/``test``, or empty when the dataset uses folds.
- ``fold``: integer fold (Adience's 0..4), empty otherwise.
- ``source``: dataset adapter name.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import FeatlabError

COLUMNS = ["image_id", "path", "age", "gender", "race", "split", "fold", "source"]
SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)
MAX_AGE = 150.0  # a manifest age above this (or below 0) is an error, not data


def make_image_id(source: str, relpath: str) -> str:
    """A stable 16-hex id for an image: sha1 of ``source:relpath`` (forward slashes)."""
    key = f"{source}:{Path(relpath).as_posix()}"
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[:16]


@dataclass
class PrepareResult:
    """What an adapter produced: rows (dicts over COLUMNS), and what it skipped and why."""

    rows: list[dict] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path or record, reason)
    counts: dict[str, int] = field(default_factory=dict)  # filter name -> rows removed
    has_splits: bool = False

    def skip(self, what: str, reason: str) -> None:
        self.skipped.append((what, reason))
        self.counts[reason] = self.counts.get(reason, 0) + 1


def to_frame(rows: list[dict]):
    import pandas as pd

    df = pd.DataFrame(rows, columns=COLUMNS)
    df["age"] = pd.to_numeric(df["age"], errors="coerce").astype("float64")
    for c in ("gender", "race", "split", "source", "path", "image_id"):
        df[c] = df[c].fillna("").astype(str)
    df["fold"] = pd.to_numeric(df["fold"], errors="coerce").astype("Int64")
    return df


def assign_splits(df, seed: int = 0, fractions=DEFAULT_FRACTIONS):
    """Seeded train/val/test split stratified by (age decade, gender); returns a new frame."""
    df = df.copy()
    rng = np.random.default_rng(seed)
    age = df["age"].to_numpy()
    decade = np.where(np.isnan(age), -1, np.minimum(np.nan_to_num(age, nan=0) // 10, 8)).astype(int)
    strata = [f"{d}|{g}" for d, g in zip(decade, df["gender"])]
    split = np.empty(len(df), dtype=object)
    order = np.argsort(df["image_id"].to_numpy(), kind="stable")  # independent of input order
    by_stratum: dict[str, list[int]] = {}
    for i in order:
        by_stratum.setdefault(strata[i], []).append(i)
    cum = np.cumsum(fractions) / np.sum(fractions)
    for key in sorted(by_stratum):
        idx = np.asarray(by_stratum[key])
        idx = idx[rng.permutation(len(idx))]
        n = len(idx)
        cuts = np.round(cum * n).astype(int)
        split[idx[: cuts[0]]] = "train"
        split[idx[cuts[0] : cuts[1]]] = "val"
        split[idx[cuts[1] :]] = "test"
    df["split"] = split
    return df


def write_manifest(df, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False, columns=COLUMNS)
    return out


def read_manifest(path: Path | str):
    """Read a manifest CSV; ``path`` column is resolved to absolute paths."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FeatlabError(f"manifest not found: {path} (make one with `featlab prepare`)")
    df = pd.read_csv(path, dtype={"image_id": str, "path": str, "gender": str, "race": str, "split": str, "source": str},
                     keep_default_na=False, na_values={"age": [""], "fold": [""]})
    missing = [c for c in ("path",) if c not in df.columns]
    if missing:
        raise FeatlabError(f"{path} is not a featlab manifest: no column {', '.join(missing)}")
    for c in COLUMNS:
        if c not in df.columns:
            df[c] = "" if c not in ("age", "fold") else np.nan
    df["age"] = _checked_ages(df, path)
    df["fold"] = pd.to_numeric(df["fold"], errors="coerce").astype("Int64")
    base = path.resolve().parent
    df["path"] = [p if Path(p).is_absolute() else str((base / p)) for p in df["path"]]
    if (df["image_id"] == "").any():
        src = df["source"].where(df["source"] != "", "csv")
        df.loc[df["image_id"] == "", "image_id"] = [make_image_id(s, p) for s, p in zip(src, df["path"])]
    return df[COLUMNS]


def _checked_ages(df, path: Path):
    """The age column as float years; a cell that is not empty and not a number in 0..MAX_AGE is an error naming
    its row (adapters already skip such records, so one here means a hand-edited or foreign manifest)."""
    import pandas as pd

    raw = df["age"]
    age = pd.to_numeric(raw, errors="coerce").astype("float64")
    ok = age.between(0.0, MAX_AGE) | (age.isna() & raw.isna())
    if not ok.all():
        bad = np.flatnonzero(~ok.to_numpy())
        i = int(bad[0])
        who = df["image_id"].iloc[i] or df["path"].iloc[i]
        more = f" (and {len(bad) - 1:,} more row{'s' if len(bad) > 2 else ''})" if len(bad) > 1 else ""
        raise FeatlabError(f"{path}, line {i + 2} ({who}): age {raw.iloc[i]} is not a number in 0..{MAX_AGE:g} "
                           f"(leave the cell empty when the age is unknown){more}")
    return age


def file_sha256(path: Path | str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def dataset_name(manifest_path: Path | str) -> str:
    """The dataset name used in artifact paths: the manifest file's stem (``m/utkface.csv`` -> ``utkface``)."""
    return Path(manifest_path).stem
