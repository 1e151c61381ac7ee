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
  unknown: the row is a group of its own, keyed by its ``image_id``.
- ``age_low``, ``age_high``: the age label as a range of years, both ends
  included. For an exact age both equal ``age``; for a range label (Adience's
  ``(25, 32)``) they are its bounds and ``age`` is the midpoint. Empty when the
  age is unknown.

The split (:func:`assign_splits`) is a function of each row's group key and
the seed alone, so it does not move when other rows are added, removed or
corrected; :func:`split_balance` reports its age and gender balance.

Manifests written before ``group``/``age_low``/``age_high`` existed are read
with ``group`` empty and ``age_low = age_high = age``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import FeatlabError

COLUMNS = ["image_id", "path", "age", "gender", "race", "split", "fold", "source", "group", "age_low", "age_high"]
TEXT_COLUMNS = ("image_id", "path", "gender", "race", "split", "source", "group")
SPLITS = ("train", "val", "test")
#: How :func:`assign_splits` and :func:`hold_out_groups` place faces; a spec's prepare step records it, so a featlab
#: that splits differently re-prepares a study (and so re-trains its heads) instead of keeping the old split.
SPLIT_SCHEME = "blake2b-group-key-v1"
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
    face_groups: object = None  # featlab.features.facegroups.FaceGroupReport after --group-by-face

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


def group_keys(groups, image_ids=None) -> np.ndarray:
    """Group key per row: the ``group`` value, or the row's ``image_id`` where the group is empty.

    The key of an ungrouped row is its own image id (prefixed so that it cannot
    collide with a real group string), never its position in the table: a
    key, and so a split, does not move when other rows come or go. Empty
    groups therefore need ``image_ids`` (a FeatlabError otherwise).
    """
    g = np.asarray(["" if x is None or x != x else str(x) for x in groups], dtype=object)  # None/NaN: unknown
    empty = g == ""
    if empty.any():
        if image_ids is None:
            raise FeatlabError(f"{int(empty.sum()):,} rows have no group and no image id to key them by")
        ids = np.asarray([str(x) for x in image_ids], dtype=object)
        if len(ids) != len(g):
            raise FeatlabError(f"{len(ids):,} image ids for {len(g):,} rows")
        if (ids[empty] == "").any():
            raise FeatlabError("a row has neither a group nor an image id to key its split by")
        g[empty] = ["\x00id:" + x for x in ids[empty]]  # cannot collide with a real group string
    return g


def key_uniform(keys, seed: int) -> np.ndarray:
    """A number in [0, 1) per key: the first 8 bytes of ``blake2b(key, key=seed)`` over 2**64.

    A function of the key and the seed alone (the same on every machine and
    Python), so a key's draw does not depend on which other keys are there.
    """
    salt = str(int(seed)).encode("ascii")
    out = np.empty(len(keys), dtype=np.float64)
    cache: dict[str, float] = {}
    for i, k in enumerate(keys):
        u = cache.get(k)
        if u is None:
            h = hashlib.blake2b(str(k).encode("utf-8"), digest_size=8, key=salt).digest()
            u = cache[k] = int.from_bytes(h, "big") / 2.0**64
        out[i] = u
    return out


def _fractions(fractions) -> np.ndarray:
    f = np.asarray(fractions, dtype=np.float64)
    if f.ndim != 1 or len(f) != len(SPLITS) or not np.isfinite(f).all() or (f < 0).any() or f.sum() <= 0:
        raise FeatlabError(f"split fractions must be {len(SPLITS)} non-negative numbers, got {fractions}")
    return f / f.sum()


def assign_splits(df, seed: int = 0, fractions=DEFAULT_FRACTIONS):
    """Seeded train/val/test split of whole groups, each face's side a function of its group key and the seed.

    A row's key is its ``group`` (identity, ``face:...`` cluster), or its
    ``image_id`` when the group is empty (:func:`group_keys`). The key's
    keyed hash (:func:`key_uniform`) is a uniform number u in [0, 1); u below
    the train fraction is train, below train + val is val, else test. So a
    group is never divided, and adding, removing or correcting any row never
    moves another face: only the rows whose key changed can move. The split is
    not stratified (a stratified splitter cuts all rows at once, so one row
    changed moves hundreds of others); with a few thousand groups the shares
    land within about a point of ``fractions`` (UTKFace's 8,000 faces, seed 0:
    see README "prepare") and age and gender balance by chance, which
    :func:`split_balance` reports. Returns a new frame.
    """
    f = _fractions(fractions)
    df = df.copy()
    if len(df) == 0:
        df["split"] = np.empty(0, dtype=object)
        return df
    raw = df["group"].to_numpy() if "group" in df else np.full(len(df), "")
    u = key_uniform(group_keys(raw, df["image_id"].to_numpy()), seed)
    cut = np.cumsum(f)[:-1]
    df["split"] = np.asarray(SPLITS, dtype=object)[np.searchsorted(cut, u, side="right")]
    return df


def hold_out_groups(rows_or_groups, share: float, seed: int = 0, image_ids=None) -> tuple[np.ndarray, np.ndarray]:
    """Hold out a seeded ``share`` of whole groups as validation: ``(train_idx, val_idx)``, row positions.

    ``rows_or_groups``: a manifest or labels frame (its ``group`` and
    ``image_id`` columns) or a sequence of group strings, one per row (then
    ``image_ids`` keys the rows whose group is empty: each is a group of its
    own). Like :func:`assign_splits`, a group is held out when its key's hash
    (:func:`key_uniform`, this ``seed``) falls below ``share``, so the held-out
    faces do not move when other rows come or go, and the share of groups is
    close to ``share`` when groups are many. Only when no group (or every
    group) falls below it, as happens in a handful of groups, the group with
    the lowest (highest) draw is moved to make both sides non-empty. A group
    is never on both sides.
    """
    if hasattr(rows_or_groups, "columns"):
        groups = rows_or_groups["group"]
        if image_ids is None and "image_id" in rows_or_groups:
            image_ids = rows_or_groups["image_id"].to_numpy()
    else:
        groups = rows_or_groups
    keys = group_keys(list(groups), image_ids)
    n = len(keys)
    share = float(share)
    if not 0.0 < share < 1.0:
        raise FeatlabError(f"validation share must be between 0 and 1 (exclusive), got {share:g}")
    n_groups = len(set(keys))
    if n_groups < 2:
        raise FeatlabError(f"cannot hold out validation groups: {n} rows form {n_groups} group(s), need at least 2")
    u = key_uniform(keys, seed)
    val = u < share
    if not val.any():
        val = keys == keys[np.argmin(u)]
    elif val.all():
        val = keys != keys[np.argmax(u)]
    return np.flatnonzero(~val), np.flatnonzero(val)


def split_balance(df, by: str | None = None, scheme: str = "8"):
    """The balance of a split: one row per side (``SPLITS`` order, then ``all``), as a DataFrame.

    ``by``: the column to compare (``split``; ``fold`` when no row has a
    split, as for Adience). Columns: ``rows``, ``groups`` (distinct group keys,
    :func:`group_keys`), ``share`` (of all rows), then the share of the side's
    rows per gender (``f``, ``m``, ``gender ?`` when some are unknown) and per
    age group of ``scheme`` (the 8 Adience groups by default; a range label
    counts in a group only when it lies inside it, else under ``age ?`` with
    the unknown ages).
    """
    import pandas as pd

    from .bins import get_scheme

    if by is None:
        by = "split" if "split" in df and (df["split"].astype(str) != "").any() else "fold"
    side = df[by]
    if by == "fold":
        keep = side.notna().to_numpy()
        names = [f"fold {int(x)}" for x in side[keep]]
        order = [f"fold {k}" for k in sorted({int(x) for x in side[keep]})]
    else:
        side = side.astype(str)
        keep = (side != "").to_numpy()
        names = list(side[keep])
        order = [s for s in SPLITS if s in set(names)] + sorted(set(names) - set(SPLITS))
    sub = df.loc[keep]
    s = get_scheme(scheme)
    lo = sub["age_low"] if "age_low" in sub else sub["age"]
    hi = sub["age_high"] if "age_high" in sub else sub["age"]
    idx = s.assign_range(lo.to_numpy(np.float64), hi.to_numpy(np.float64))
    age = np.where(idx >= 0, np.asarray(s.names, dtype=object)[np.maximum(idx, 0)], "age ?").astype(object)
    gender = sub["gender"].astype(str).where(sub["gender"].astype(str).isin(["f", "m"]), "gender ?").to_numpy()
    keys = group_keys(sub["group"].to_numpy() if "group" in sub else np.full(len(sub), ""), sub["image_id"].to_numpy())
    t = pd.DataFrame({"side": names, "gender": gender, "age": age, "key": keys})
    rows = t.groupby("side").size()
    out = pd.DataFrame({"rows": rows, "groups": t.groupby("side")["key"].nunique()}).reindex(order)
    out.loc["all"] = [len(t), t["key"].nunique()]
    out = out.astype(np.int64)
    out["share"] = out["rows"] / max(len(t), 1)
    gcols = [g for g in ("f", "m", "gender ?") if (gender == g).any() or g != "gender ?"]
    acols = list(s.names) + (["age ?"] if (age == "age ?").any() else [])
    for col, vals in (("gender", gcols), ("age", acols)):
        counts = pd.crosstab(t["side"], t[col]).reindex(index=order, columns=vals, fill_value=0)
        counts.loc["all"] = counts.sum(axis=0)
        for v in vals:
            out[v] = counts[v] / out["rows"].where(out["rows"] > 0, 1)
    return out


def balance_lines(df, by: str | None = None, scheme: str = "8") -> list[str]:
    """:func:`split_balance` as a compact text table (shares in %), one string per line."""
    b = split_balance(df, by=by, scheme=scheme)
    shares = [c for c in b.columns if c not in ("rows", "groups", "share")]
    gcols = [c for c in shares if c in ("f", "m", "gender ?")]
    acols = [c for c in shares if c not in gcols]
    short = {"gender ?": "?", "age ?": "?"}
    head = (f"{'':7s}{'rows':>8s}{'groups':>8s}{'share':>7s} " + f"{'% gender':>{6 * len(gcols)}s} "
            + f"{'% age, ' + scheme + ' groups':>{6 * len(acols)}s}")
    cols = " " * 31 + "".join(f"{short.get(c, c):>6s}" for c in gcols) + " " + "".join(
        f"{short.get(c, c):>6s}" for c in acols)
    lines = [head, cols]
    for name, r in b.iterrows():
        lines.append(f"{str(name):7s}{int(r['rows']):>8,}{int(r['groups']):>8,}{100 * r['share']:>6.1f}% "
                     + "".join(f"{100 * r[c]:>6.1f}" for c in gcols) + " "
                     + "".join(f"{100 * r[c]:>6.1f}" for c in acols))
    return lines


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


def as_labels(df):
    """Manifest rows as a features file's labels table holds them (:meth:`featlab.features.store.FeatureStore.labels`):
    gender's first letter, fold -1 and group '' where unknown, a range's bounds defaulting to the age. For what
    reads faces straight from a manifest (networks trained from pixels) with the heads' label rules."""
    out = df.copy()
    out["gender"] = out["gender"].fillna("").astype(str).str[:1]
    out["race"] = out["race"].fillna("").astype(str)
    out["split"] = out["split"].fillna("").astype(str)
    out["group"] = out["group"].fillna("").astype(str)
    out["fold"] = out["fold"].fillna(-1).astype(np.int64)
    out["age"] = out["age"].astype(np.float64)
    for c in ("age_low", "age_high"):
        out[c] = out[c].astype(np.float64).where(out[c].notna(), out["age"])
    return out.reset_index(drop=True)


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
