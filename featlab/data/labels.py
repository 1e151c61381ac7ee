"""Labels for heads: targets, their encodings, and the train/val/test rows (numpy and pandas only).

- :func:`target_name`, :func:`encode_target`: ``bins`` (5/7/8 groups), ``age`` (years) and ``gender``
  as integer classes or floats, with a validity mask. Range labels (Adience's ``(25, 32)``, kept in the
  ``age_low``/``age_high`` columns) go to a bin only when the range lies inside one group, and are left
  out of age regression (they have no single true age to score against). :func:`check_ranges` stops a
  head that would lose range labels that way unless the user asks for it (``ranges="drop"``);
  :func:`range_losses` counts them per range.
- :func:`split_rows`: the rows of each split. Validation rows that featlab holds out itself (datasets
  without a val split, the fold protocol) are whole ``group``s (identities), never single images.
- :func:`class_weights`, :func:`soft_bin_labels`, :func:`make_targets`, :func:`to_years_np`.
"""

from __future__ import annotations

import numpy as np

from .bins import get_scheme
from ..errors import FeatlabError, did_you_mean

TARGETS = ("bins", "age", "gender")
GENDERS = ("f", "m")
HEADLINE = {"bins": ("accuracy", "one_off"), "age": ("mae", "cs5"), "gender": ("accuracy",)}
LOWER_IS_BETTER = {"mae", "rmse", "mae_bin_centre"}


def target_name(target: str, cats=None) -> str:
    """``bins`` + cats -> ``bins7``; ``age``; ``gender``."""
    if target not in TARGETS:
        raise FeatlabError(f"unknown target {target!r}; {did_you_mean(target, TARGETS)}choose one of {', '.join(TARGETS)}")
    if target == "bins":
        if cats is None:
            raise FeatlabError("target 'bins' needs --cats 5, 7 or 8")
        return f"bins{get_scheme(cats).n}"
    return target


def format_figure(name: str, value: float, ci=None) -> str:
    """``0.661`` -> ``66.1%``, MAE ``5.14`` -> ``5.14``; with ``ci``: ``66.1% [63.9%, 68.4%]``."""
    f = (lambda v: f"{v:.2f}") if name in LOWER_IS_BETTER else (lambda v: f"{100 * v:.1f}%")  # years, or a share
    return f(value) + (f" [{f(ci[0])}, {f(ci[1])}]" if ci else "")


def selection_metric(target: str) -> str:
    """The figure a tap or setting is chosen by (on validation): accuracy, or MAE for age."""
    return "mae" if target == "age" else "accuracy"


def _ranges(labels) -> tuple[np.ndarray, np.ndarray]:
    age = labels["age"].to_numpy(dtype=np.float64)
    lo = labels["age_low"].to_numpy(dtype=np.float64) if "age_low" in labels else age
    hi = labels["age_high"].to_numpy(dtype=np.float64) if "age_high" in labels else age
    lo = np.where(np.isfinite(lo), lo, age)
    hi = np.where(np.isfinite(hi), hi, age)
    return lo, hi


def encode_target(labels, target: str, cats=None) -> tuple[np.ndarray, np.ndarray]:
    """(y, valid) for every row: bins -> int class, age -> float years, gender -> 0 (f) / 1 (m).

    A range label is valid for a bin scheme only when the whole range lies in one group, and never
    for age regression."""
    if target in ("bins", "age"):
        age = labels["age"].to_numpy(dtype=np.float64)
        lo, hi = _ranges(labels)
        exact = np.isfinite(age) & (hi - lo <= 0)
        if target == "age":
            return age.astype(np.float32), exact
        y = get_scheme(cats).assign_range(np.where(np.isfinite(age), lo, np.nan), np.where(np.isfinite(age), hi, np.nan))
        return y, y >= 0
    if target == "gender":
        g = labels["gender"].astype(str).str.lower().str[:1].to_numpy()
        y = np.where(g == "m", 1, np.where(g == "f", 0, -1)).astype(np.int64)
        return y, y >= 0
    raise FeatlabError(f"unknown target {target!r}; {did_you_mean(target, TARGETS)}choose one of {', '.join(TARGETS)}")


def dropped_reasons(labels, target: str, valid: np.ndarray) -> dict[str, int]:
    """Why rows have no usable target: counted per reason (for the head's record)."""
    out: dict[str, int] = {}
    if target == "gender":
        out["no gender"] = int((~valid).sum())
    else:
        age = labels["age"].to_numpy(dtype=np.float64)
        lo, hi = _ranges(labels)
        no_age = ~np.isfinite(age)
        rng = ~no_age & (hi - lo > 0) & ~valid
        out["no age"] = int(no_age.sum())
        out["range label spans several groups" if target == "bins" else "range label (no single age)"] = int(rng.sum())
    return {k: v for k, v in out.items() if v}


RANGE_POLICIES = ("refuse", "drop")


def _range_name(lo: float, hi: float) -> str:
    return f"{lo:g}-{hi:g}"


def range_losses(labels, target: str, cats=None) -> dict[str, int]:
    """Rows whose age label is a range (``age_low < age_high``) that ``target`` leaves out, counted per
    range label (``{"15-20": 1234, "25-32": 987}``, youngest first): for bins the ranges that span
    several of the scheme's groups, for age regression every range (it keeps exact ages only)."""
    if target == "gender":
        return {}
    _, valid = encode_target(labels, target, cats)
    age = labels["age"].to_numpy(dtype=np.float64)
    lo, hi = _ranges(labels)
    lost = np.isfinite(age) & (hi - lo > 0) & ~valid
    if not lost.any():
        return {}
    pairs, counts = np.unique(np.stack([lo[lost], hi[lost]], axis=1), axis=0, return_counts=True)
    return {_range_name(a, b): int(n) for (a, b), n in zip(pairs.tolist(), counts.tolist())}


def check_ranges(labels, target: str, cats=None, ranges: str = "refuse") -> dict:
    """The range labels a head of ``target`` would lose, checked against the policy ``ranges``:
    ``"refuse"`` (the default) stops with one line giving the count when any would be dropped;
    ``"drop"`` (asked for explicitly: ``--ranges drop``, ``ranges = "drop"`` in a spec's [[heads]])
    lets the head train on the rest. Returns ``{"policy", "dropped", "by_range"}`` for the head's record."""
    if ranges not in RANGE_POLICIES:
        raise FeatlabError(f"ranges must be {' or '.join(repr(r) for r in RANGE_POLICIES)}, not {ranges!r}")
    lost = range_losses(labels, target, cats)
    n = sum(lost.values())
    if n and ranges != "drop":
        tname = target_name(target, cats)
        detail = ", ".join(f"{k}: {v:,}" for k, v in lost.items())
        why = ("age regression keeps exact ages only" if target == "age"
               else f"their ranges span several of the {tname[4:]} groups")
        raise FeatlabError(f"{tname} would drop {n:,} range-labelled rows ({why}; by range {detail}): train the "
                           "8 Adience groups (--cats 8), or pass --ranges drop (ranges = \"drop\" in a spec's "
                           "[[heads]]) to train on the rest")
    return {"policy": ranges, "dropped": int(n), "by_range": lost}


def hold_out(rows: np.ndarray, labels, seed: int, share: float) -> tuple[np.ndarray, np.ndarray]:
    """A seeded ``share`` of whole groups among ``rows`` -> (rest, held out), both sorted
    (:func:`featlab.data.manifest.hold_out_groups`: a group is held out by the hash of its key, so the held-out
    faces do not depend on the other rows; rows without a group are groups of their own, keyed by image id)."""
    from .manifest import hold_out_groups

    rows = np.asarray(rows, dtype=np.int64)
    groups = labels["group"].to_numpy()[rows] if "group" in labels else np.full(len(rows), "", dtype=object)
    tr, va = hold_out_groups(list(groups), share, seed + 7919, image_ids=labels["image_id"].to_numpy()[rows])
    return np.sort(rows[tr]), np.sort(rows[va])


SPLIT_SEED = 0  # the held-out validation groups never depend on a head's training seed


def split_rows(labels, valid: np.ndarray, fold=None, val_share: float = 0.1) -> dict:
    """Row indices (sorted) for train/val/test, only rows with a valid target.

    Without ``fold``: the manifest's split column; when it has no 'val' rows a seeded ``val_share`` of
    the training groups is held out (seed ``SPLIT_SEED``, the same for every head and training seed, so
    seeds differ in training only and heads are compared on the same validation faces). With ``fold=K`` (Adience-style folds 0..4): test = fold K, train =
    the other folds, val = a seeded ``val_share`` of their groups (whole subjects).
    """
    split = labels["split"].astype(str).to_numpy()
    folds = labels["fold"].to_numpy(dtype=np.int64)
    note = "manifest split"
    if fold is not None:
        k = int(fold)
        have = sorted(set(folds[folds >= 0].tolist()))
        if not have:
            raise FeatlabError("this features file has no folds (fold is -1 for every row); leave out --fold")
        if k not in have:
            raise FeatlabError(f"fold {k} is not in this features file (it has folds {', '.join(map(str, have))})")
        test = np.flatnonzero(valid & (folds == k))
        pool = np.flatnonzero(valid & (folds >= 0) & (folds != k))
        train, val = hold_out(pool, labels, SPLIT_SEED, val_share)
        note = f"fold {k} as test, the other folds as train, a seeded {val_share:.0%} of their groups as val"
    else:
        train = np.flatnonzero(valid & (split == "train"))
        val = np.flatnonzero(valid & (split == "val"))
        test = np.flatnonzero(valid & (split == "test"))
        if not len(train):
            if (folds >= 0).any():
                raise FeatlabError("this features file has no 'train' split but has folds: use --fold K or --fold all")
            raise FeatlabError("this features file has no rows with split 'train' (and no folds): "
                               "give the manifest a split column (train/val/test)")
        if not len(val):
            train, val = hold_out(train, labels, SPLIT_SEED, val_share)
            note = f"manifest split; no 'val' rows, so a seeded {val_share:.0%} of the training groups is val"
    if len(val) == 0:
        raise FeatlabError("no validation rows: too few training rows")
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test), "note": note}


def class_weights(y: np.ndarray, n: int, mode) -> np.ndarray | None:
    """Per-class weights: ``True``/``"balanced"`` -> n_rows / (n_classes * count), ``"sqrt"`` -> its square
    root; normalised so that the mean weight over the rows is 1. ``False``/``None`` -> None."""
    if mode in (False, None, "none"):
        return None
    counts = np.bincount(y, minlength=n).astype(np.float64)
    w = np.where(counts > 0, len(y) / (n * np.maximum(counts, 1)), 0.0)
    if mode == "sqrt":
        w = np.sqrt(w)
    elif mode not in (True, "balanced"):
        raise FeatlabError(f"class_weight must be true, false, 'balanced' or 'sqrt', not {mode!r}")
    w /= (w[y].mean() if len(y) else 1.0)
    return w


def soft_bin_labels(ages: np.ndarray, scheme, sigma: float) -> np.ndarray:
    """Bin targets that keep the age: a Gaussian of ``sigma`` years around each true age, integrated over
    each bin's interval (rows sum to 1). A 22-year-old then counts mostly for 15-20 and partly for 25-32."""
    from scipy.special import ndtr

    edges = np.asarray([*scheme.lower[1:]], dtype=np.float64)
    a = np.asarray(ages, dtype=np.float64)[:, None]
    cdf = ndtr((edges[None, :] - a) / float(sigma))
    cdf = np.concatenate([np.zeros((len(a), 1)), cdf, np.ones((len(a), 1))], axis=1)
    p = np.diff(cdf, axis=1)
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def to_years_np(v, transform: dict) -> np.ndarray:
    """Values in target units (standardised age, or standardised ``log1p`` age) -> years."""
    v = np.asarray(v, dtype=np.float64) * transform.get("scale", 1.0) + transform.get("mean", 0.0)
    return np.expm1(v) if transform["kind"] == "log1p" else v


def make_targets(target: str, ordinal: bool, n_classes: int, y: np.ndarray, transform: dict | None):
    if target == "age":
        v = y.astype(np.float64)
        if transform["kind"] == "log1p":
            v = np.log1p(v)
        return ((v - transform["mean"]) / transform["scale"]).astype(np.float32).reshape(-1, 1)
    if ordinal:
        return (y[:, None] > np.arange(n_classes - 1)[None, :]).astype(np.float32)
    return np.eye(n_classes, dtype=np.float32)[y]


def class_names(target: str, cats=None) -> list[str]:
    if target == "bins":
        return list(get_scheme(cats).names)
    return list(GENDERS) if target == "gender" else []


def face_scores(target: str, y: np.ndarray, pred: np.ndarray) -> dict[str, np.ndarray]:
    """Per-face values whose mean is each headline figure: accuracy/one_off (0/1), mae (|error|), cs5 (0/1)."""
    if target == "age":
        err = np.abs(np.asarray(pred, dtype=np.float64) - np.asarray(y, dtype=np.float64))
        return {"mae": err, "cs5": (err <= 5.0).astype(np.float64)}
    y, pred = np.asarray(y, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    out = {"accuracy": (y == pred).astype(np.float64)}
    if target == "bins":
        out["one_off"] = (np.abs(y - pred) <= 1).astype(np.float64)
    return out
