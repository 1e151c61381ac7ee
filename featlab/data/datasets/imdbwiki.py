"""IMDB-WIKI adapters (``imdb`` and ``wiki``): labels from the release's ``.mat`` metadata.

The metadata file is ``imdb.mat`` / ``wiki.mat`` (a MATLAB struct named ``imdb`` /
``wiki``, one entry per image) found at ``root/<name>.mat``, at
``root/<name>_crop/<name>.mat`` (the layout of the ``*_crop.tar`` download), or
given directly as ``root``. Image paths (``full_path``) are relative to the
folder that holds the ``.mat`` file.

Fields used:

- ``dob``: date of birth as a MATLAB serial date number (1 = 0000-01-01);
- ``photo_taken``: the year the photo was taken;
- ``gender``: 1 male, 0 female, NaN unknown;
- ``face_score``: detector score of the main face, ``-inf`` when no face was found;
- ``second_face_score``: NaN when there is no second face;
- ``full_path``: the image's relative path.

Age is a real number of years, assuming the photo was taken mid-year:
``(date(photo_taken, 7, 1) - birth).days / 365.25`` where ``birth`` is the
``dob`` converted with the MATLAB-to-Python rule
``datetime.fromordinal(int(dob)) + timedelta(days=dob % 1) - timedelta(days=366)``.

Filters, applied in this order; a record is counted once, under the first one
it fails (``PrepareResult.counts`` and the skipped list, with the image path):

1. ``no face detected (face_score -inf)``: also NaN scores;
2. ``face_score <= {face_score_min}``: a face is kept only when its score is
   strictly above ``face_score_min`` (option, default 1.0);
3. ``second face in the image``: ``second_face_score`` is not NaN (the label
   may belong to either face);
4. ``gender unknown``: anything but 0/1;
5. ``invalid date of birth or photo year``: values that are not a date;
6. ``age outside 0..100``: inclusive range; negative ages (photo before the
   birth date) land here too;
7. ``image file not found``: checked last, so that only plausible records
   cost a file-system look-up.

Gender becomes ``m``/``f``; there is no race and no official split
(``has_splits`` False: the registry assigns a seeded one, which never divides
a ``group``). ``group`` is the person: ``imdb.mat``'s ``celeb_id`` (as
``celeb:<id>``); ``wiki.mat`` has no ``celeb_id``, so its ``name`` (as
``name:<name>``: people who share a name share a group, which can only make
the split stricter). A file without either field leaves ``group`` empty.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

from ...errors import FeatlabError
from ..manifest import PrepareResult
from . import row

FIELDS = ("dob", "photo_taken", "full_path", "gender", "face_score", "second_face_score")
IDENTITY_FIELDS = ("celeb_id", "name")  # optional; the first present gives ``group``


def matlab_datenum_to_datetime(dob: float) -> datetime:
    """A MATLAB serial date number (1 = 0000-01-01, fractions are time of day) as a datetime."""
    return datetime.fromordinal(int(dob)) + timedelta(days=float(dob) % 1) - timedelta(days=366)


def age_at_photo(dob: float, photo_taken: int) -> float:
    """Age in years at 1 July of ``photo_taken`` for a MATLAB serial ``dob``."""
    return (datetime(int(photo_taken), 7, 1) - matlab_datenum_to_datetime(dob)).days / 365.25


def find_mat(root: Path, name: str) -> Path:
    """The metadata file for ``name`` (``imdb``/``wiki``) under ``root`` (or ``root`` itself)."""
    root = Path(root)
    if root.is_file():
        return root
    candidates = [root / f"{name}.mat", root / f"{name}_crop" / f"{name}.mat"]
    for c in candidates:
        if c.is_file():
            return c
    raise FeatlabError(f"no {name}.mat under {root} (looked for {', '.join(str(c) for c in candidates)})")


def load_mat(path: Path, name: str) -> dict[str, np.ndarray]:
    """The struct ``name`` from ``path`` as a dict of flat arrays, one entry per record."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as e:  # corrupt, truncated, v7.3/HDF5, not a .mat at all
        msg = " ".join(str(e).split()) or type(e).__name__
        raise FeatlabError(f"cannot read {path} as a MATLAB .mat file: {msg}") from None
    if name not in mat:
        found = ", ".join(k for k in mat if not k.startswith("__")) or "none"
        raise FeatlabError(f"{path} has no struct {name!r} (variables found: {found})")
    s = mat[name]
    if not isinstance(s, np.ndarray) or s.dtype.names is None or s.size < 1:
        raise FeatlabError(f"{path}: {name!r} is not a MATLAB struct")
    rec = s.flat[0]
    missing = [f for f in FIELDS if f not in s.dtype.names]
    if missing:
        raise FeatlabError(f"{path}: struct {name!r} lacks field(s) {', '.join(missing)} "
                           f"(fields found: {', '.join(s.dtype.names)})")
    out = {f: np.asarray(rec[f]).ravel() for f in FIELDS}
    lengths = {f: len(v) for f, v in out.items()}
    if len(set(lengths.values())) != 1:
        raise FeatlabError(f"{path}: fields of {name!r} differ in length: "
                           + ", ".join(f"{f}={n}" for f, n in lengths.items()))
    try:
        for f in ("dob", "photo_taken", "gender", "face_score", "second_face_score"):
            out[f] = out[f].astype(np.float64)
    except (TypeError, ValueError):
        raise FeatlabError(f"{path}: field {f!r} of {name!r} is not numeric") from None
    out["full_path"] = np.array([_cell_str(x) for x in out["full_path"]], dtype=object)
    out["group"] = _identities(path, name, s, rec, len(out["dob"]))
    return out


def _identities(path: Path, name: str, s, rec, n: int) -> np.ndarray:
    """``group`` per record from the first identity field present ('' where the record has none)."""
    for f in IDENTITY_FIELDS:
        if f not in s.dtype.names:
            continue
        vals = np.asarray(rec[f]).ravel()
        if len(vals) != n:
            raise FeatlabError(f"{path}: field {f!r} of {name!r} has {len(vals)} entries, other fields {n}")
        if f == "celeb_id":
            try:
                ids = vals.astype(np.float64)
            except (TypeError, ValueError):
                raise FeatlabError(f"{path}: field 'celeb_id' of {name!r} is not numeric") from None
            return np.array([f"celeb:{int(v)}" if np.isfinite(v) else "" for v in ids], dtype=object)
        return np.array([f"name:{t}" if (t := _cell_str(v).strip()) else "" for v in vals], dtype=object)
    return np.full(n, "", dtype=object)


def _cell_str(x) -> str:
    if isinstance(x, str):
        return x
    a = np.asarray(x).ravel()
    return str(a[0]) if a.size else ""


def _prepare(name: str, root: Path, face_score_min: float = 1.0) -> PrepareResult:
    mat_path = find_mat(root, name)
    base = mat_path.parent
    meta = load_mat(mat_path, name)
    face_score_min = float(face_score_min)
    res = PrepareResult()
    for i in range(len(meta["dob"])):
        rel = meta["full_path"][i]
        what = str(base / rel) if rel else f"{mat_path}[record {i}]"
        fs = meta["face_score"][i]
        if not np.isfinite(fs):
            res.skip(what, "no face detected (face_score -inf)")
            continue
        if not fs > face_score_min:
            res.skip(what, f"face_score <= {face_score_min:g}")
            continue
        if not math.isnan(meta["second_face_score"][i]):
            res.skip(what, "second face in the image")
            continue
        g = meta["gender"][i]
        if g not in (0.0, 1.0):
            res.skip(what, "gender unknown")
            continue
        try:
            age = age_at_photo(meta["dob"][i], meta["photo_taken"][i])
        except (ValueError, OverflowError, TypeError):
            res.skip(what, "invalid date of birth or photo year")
            continue
        if not 0.0 <= age <= 100.0:
            res.skip(what, "age outside 0..100")
            continue
        p = base / rel
        if not rel or not p.is_file():
            res.skip(what, "image file not found")
            continue
        res.rows.append(row(name, base, p, age=age, gender="m" if g == 1.0 else "f", group=meta["group"][i]))
    return res


def prepare_imdb(root: Path, face_score_min: float = 1.0, **_options) -> PrepareResult:
    """IMDB part: ``imdb.mat`` with struct ``imdb``."""
    return _prepare("imdb", root, face_score_min)


def prepare_wiki(root: Path, face_score_min: float = 1.0, **_options) -> PrepareResult:
    """Wikipedia part: ``wiki.mat`` with struct ``wiki``."""
    return _prepare("wiki", root, face_score_min)
