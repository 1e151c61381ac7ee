"""The manifest: one table schema for every dataset, and the split that goes with it.

Columns (CSV, one row per image):

- ``image_id``: stable across runs: a hash of the source name and the image's
  path relative to the dataset root.
- ``path``: absolute, or relative to the manifest file's folder.
- ``age``: float years in 0..120 (:data:`MAX_AGE`, the one age range of every adapter, message and doc),
  empty when unknown (anything else is refused by :func:`read_manifest`, naming the row).
- ``gender``: ``f``, ``m`` or empty.
- ``race``: dataset's own label, may be empty.
- ``split``: ``train``/``val``/``test``, or empty when the dataset uses folds.
- ``fold``: integer fold (Adience's 0..4), empty otherwise.
- ``source``: dataset adapter name.
- ``group``: the identity a split must never divide (IMDB ``celeb_id``,
  Wikipedia ``name``, Adience ``user_id``, a CSV's ``--group-col``, or a
  ``face:...`` cluster from ``featlab prepare --group-by-face``). Empty means
  unknown: the row is a group of its own.
- ``age_low``, ``age_high``: the age label as a range of years, both ends
  included. For an exact age both equal ``age``; for a range label (Adience's
  ``(25, 32)``) they are its bounds and ``age`` is the midpoint. Empty when the
  age is unknown.

Manifests written before ``group``/``age_low``/``age_high`` existed are read
with ``group`` empty and ``age_low = age_high = age``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import FeatlabError

COLUMNS = ["image_id", "path", "age", "gender", "race", "split", "fold", "source", "group", "age_low", "age_high"]
TEXT_COLUMNS = ("image_id", "path", "gender", "race", "split", "source", "group")
SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)
MAX_AGE = 120.0  # the one age range, 0..MAX_AGE years: adapters keep a label outside it as no age (named), the
#                 manifest reader refuses one (docs/spec.md and the README give the same range)
AGE_RANGE = f"0..{MAX_AGE:g}"


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
    # rows kept without one label, by name: (image_id, row and value, reason), the reason a ``counts`` key
    # (``kept without age: outside 0..120``); the heads of that label leave them out
    label_skips: list[tuple[str, str, str]] = field(default_factory=list)
    has_splits: bool = False
    face_groups: object = None  # featlab.facegroups.FaceGroupReport after --group-by-face

    def skip(self, what: str, reason: str) -> None:
        self.skipped.append((what, reason))
        self.counts[reason] = self.counts.get(reason, 0) + 1

    def skip_label(self, image_id: str, what: str, reason: str) -> None:
        """A row kept without one label (``reason``: ``kept without age: ...``), named and counted."""
        self.label_skips.append((image_id, what, reason))
        self.counts[reason] = self.counts.get(reason, 0) + 1


def to_frame(rows: list[dict]):
    import pandas as pd

    df = pd.DataFrame(rows, columns=COLUMNS)
    for c in TEXT_COLUMNS:
        col = df[c].astype(object)
        df[c] = col.where(col.notna(), "").astype(str)
    df["fold"] = pd.to_numeric(df["fold"], errors="coerce").astype("Int64")
    return _age_columns(df)


def _age_columns(df, where: str = "manifest rows"):
    """``age``, ``age_low``, ``age_high`` as float64; missing bounds of a known age become the age; checked."""
    import pandas as pd

    for c in ("age", "age_low", "age_high"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("float64")
    for c in ("age_low", "age_high"):
        df[c] = df[c].where(df[c].notna(), df["age"])
    age, lo, hi = (df[c].to_numpy() for c in ("age", "age_low", "age_high"))
    known = ~np.isnan(age)
    bad = known & ~((lo <= age) & (age <= hi))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise FeatlabError(f"{where}: age {age[i]:g} outside its range [{lo[i]:g}, {hi[i]:g}] "
                           f"({int(bad.sum())} rows like this, first: {df['path'].iloc[i]})")
    if np.isinf(age).any():
        raise FeatlabError(f"{where}: infinite age in {int(np.isinf(age).sum())} rows")
    df.loc[~known, ["age_low", "age_high"]] = np.nan
    return df


def strata(df) -> np.ndarray:
    """Stratum per row: age decade (0-9, 80+ together, -1 unknown) x gender, as an integer code."""
    age = df["age"].to_numpy(dtype=np.float64)
    decade = np.where(np.isnan(age), -1, np.minimum(np.nan_to_num(age, nan=0) // 10, 8)).astype(int)
    gender = df["gender"].map({"f": 0, "m": 1}).fillna(2).astype(int).to_numpy()
    return (decade + 1) * 3 + gender


def group_keys(groups) -> np.ndarray:
    """Group key per row: the ``group`` value, or a key of its own where it is empty (a singleton group)."""
    g = np.asarray(["" if x is None or x != x else str(x) for x in groups], dtype=object)  # None/NaN: unknown
    empty = g == ""
    g[empty] = [f"\x00row{i}" for i in np.flatnonzero(empty)]  # cannot collide with a real group string
    return g


def _folds_for(fractions) -> tuple[int, list[int]]:
    """The fewest equal folds (at most 20) that give ``fractions``, and how many folds each split takes."""
    f = np.asarray(fractions, dtype=np.float64)
    if f.ndim != 1 or len(f) != len(SPLITS) or (f < 0).any() or f.sum() <= 0:
        raise FeatlabError(f"split fractions must be {len(SPLITS)} non-negative numbers, got {fractions}")
    f = f / f.sum()
    for k in range(1, 21):
        if np.allclose(f * k, np.round(f * k), atol=1e-6):
            return k, [int(x) for x in np.round(f * k)]
    counts = np.floor(f * 20).astype(int)
    counts[np.argmax(f * 20 - counts)] += 20 - counts.sum()
    return 20, [int(x) for x in counts]


def assign_splits(df, seed: int = 0, fractions=DEFAULT_FRACTIONS):
    """Seeded train/val/test split, stratified by (age decade, gender), that never divides a ``group``.

    scikit-learn's ``StratifiedGroupKFold`` (shuffled with ``seed``) cuts the
    rows into k equal folds (k = 10 for 70/10/20) keeping every group in one
    fold and each fold's mix of strata close to the whole; the first folds are
    train, then val, then test. Rows with an empty group are groups of their
    own. Beyond ``MAX_SPLIT_UNITS`` groups, whole groups of one stratum are
    packed into units first (:func:`split_units`: the scikit-learn splitter
    costs ~1 ms per group). The result does not depend on the order of the
    input rows. Datasets
    with fewer groups than folds get a seeded, unstratified split of whole
    groups by row share. Returns a new frame.
    """
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold


    df = df.copy()
    n = len(df)
    split = np.empty(n, dtype=object)
    if n == 0:
        df["split"] = split
        return df
    k, per_split = _folds_for(fractions)
    order = np.argsort(df["image_id"].to_numpy().astype(str), kind="stable")  # independent of input order
    raw = df["group"].to_numpy() if "group" in df else np.full(n, "")
    groups = group_keys(raw[order])  # singleton keys by sorted position: order-independent
    y = strata(df)[order]
    units = split_units(groups, y, seed)
    fold = np.full(n, -1)
    if units.max() + 1 >= k:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "least populated class has only N members": expected
            cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
            try:
                for f, (_, test) in enumerate(cv.split(np.zeros((n, 1)), y, units)):
                    fold[test] = f
            except ValueError:  # every stratum smaller than k: too few rows to stratify
                fold[:] = -1
    if (fold < 0).any():
        fold = _small_folds(groups, k, seed)
    names = np.repeat(np.asarray(SPLITS, dtype=object), per_split)
    split[order] = names[fold]
    df["split"] = split
    return df


MAX_SPLIT_UNITS = 600


def split_units(groups: np.ndarray, y: np.ndarray, seed: int, max_units: int = MAX_SPLIT_UNITS) -> np.ndarray:
    """Unit per row for the split: the groups, packed into at most ~``max_units`` units when there are more.

    ``StratifiedGroupKFold`` costs about a millisecond per group on this
    project's machines, so beyond ``max_units`` groups, groups of the same
    (majority) stratum are packed, in seeded random order, into units of about
    ``len(rows) / max_units`` rows. Packing joins whole groups only, so a unit
    never divides a group, and units stay stratum-pure for single-row groups.
    """
    _, inv, counts = np.unique(groups, return_inverse=True, return_counts=True)
    n_groups = len(counts)
    if n_groups <= max_units:
        return inv
    # majority stratum per group: the most frequent (group, stratum) pair of each group
    pair_keys, pair_counts = np.unique(inv.astype(np.int64) * (int(y.max()) + 1) + y, return_counts=True)
    pg, py = pair_keys // (int(y.max()) + 1), pair_keys % (int(y.max()) + 1)
    best = np.lexsort((-pair_counts, pg))  # by group, most frequent stratum first
    first = np.ones(len(best), dtype=bool)
    first[1:] = pg[best][1:] != pg[best][:-1]
    g_stratum = np.empty(n_groups, dtype=np.int64)
    g_stratum[pg[best][first]] = py[best][first]
    target = max(1, int(np.ceil(len(groups) / max_units)))
    rand = np.random.default_rng(seed).permutation(n_groups)
    order = np.lexsort((rand, g_stratum))
    sizes = counts[order]
    strat = g_stratum[order]
    start = np.cumsum(sizes) - sizes
    new_stratum = np.ones(n_groups, dtype=bool)
    new_stratum[1:] = strat[1:] != strat[:-1]
    stratum_start = np.maximum.accumulate(np.where(new_stratum, start, 0))
    local = (start - stratum_start) // target
    _, unit_sorted = np.unique(np.stack([strat, local], axis=1), axis=0, return_inverse=True)
    unit_of_group = np.empty(n_groups, dtype=np.int64)
    unit_of_group[order] = unit_sorted.ravel()
    return unit_of_group[inv]


def _small_folds(groups: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold per row for tiny datasets: whole groups in seeded order, cut by cumulative row share."""
    keys, inv, counts = np.unique(groups, return_inverse=True, return_counts=True)
    perm = np.random.default_rng(seed).permutation(len(keys))
    start = np.cumsum(counts[perm]) - counts[perm]  # rows before each group, in permuted order
    fold_of_group = np.empty(len(keys), dtype=int)
    fold_of_group[perm] = np.minimum((start * k) // len(groups), k - 1)
    return fold_of_group[inv]


def hold_out_groups(rows_or_groups, share: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pick a seeded ``share`` of whole groups as validation: ``(train_idx, val_idx)``, row positions.

    ``rows_or_groups``: a manifest frame (its ``group`` column) or a sequence of
    group strings, one per row; an empty group is a group of its own. ``share``
    is a share of groups (scikit-learn's ``GroupShuffleSplit``), so the share
    of rows is close to it when groups are many. A group is never on both sides.
    """
    from sklearn.model_selection import GroupShuffleSplit

    groups = rows_or_groups["group"] if hasattr(rows_or_groups, "columns") else rows_or_groups
    keys = group_keys(list(groups))
    n = len(keys)
    share = float(share)
    if not 0.0 < share < 1.0:
        raise FeatlabError(f"validation share must be between 0 and 1 (exclusive), got {share:g}")
    n_groups = len(set(keys))
    if n_groups < 2:
        raise FeatlabError(f"cannot hold out validation groups: {n} rows form {n_groups} group(s), need at least 2")
    cv = GroupShuffleSplit(n_splits=1, test_size=share, random_state=seed)
    train, val = next(cv.split(np.zeros((n, 1)), groups=keys))
    return np.sort(train), np.sort(val)


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
    df = pd.read_csv(path, dtype={c: str for c in TEXT_COLUMNS}, keep_default_na=False,
                     na_values={"age": [""], "fold": [""], "age_low": [""], "age_high": [""]})
    missing = [c for c in ("path",) if c not in df.columns]
    if missing:
        raise FeatlabError(f"{path} is not a featlab manifest: no column {', '.join(missing)}")
    for c in COLUMNS:
        if c not in df.columns:
            df[c] = "" if c in TEXT_COLUMNS else np.nan
    df["age"] = _checked_ages(df, path)
    df = _age_columns(df, str(path))
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
        raise FeatlabError(f"{path}, line {i + 2} ({who}): age {raw.iloc[i]} is not a number in {AGE_RANGE} "
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
