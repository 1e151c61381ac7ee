"""Dataset adapters: each turns a dataset on disk into manifest rows.

An adapter is a function ``prepare(root: Path, **options) -> PrepareResult``
registered by name with :func:`register`. ``featlab prepare --list`` shows them.
Adapters are imported lazily so that ``featlab --help`` stays fast.
"""

from __future__ import annotations

import contextvars
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ...errors import FeatlabError
from ..manifest import PrepareResult, assign_splits, to_frame

from ..images import IMAGE_EXTS  # noqa: F401 - one definition of what counts as an image


@dataclass(frozen=True)
class Adapter:
    name: str
    module: str
    summary: str


ADAPTERS: dict[str, Adapter] = {
    a.name: a
    for a in [
        Adapter("utkface", "utkface", "UTKFace: labels in file names [age]_[gender]_[race]_[datetime].jpg(.chip.jpg)"),
        Adapter("imdb", "imdbwiki", "IMDB-WIKI, IMDB part: imdb.mat metadata (dob, photo_taken, face scores)"),
        Adapter("wiki", "imdbwiki", "IMDB-WIKI, Wikipedia part: wiki.mat metadata"),
        Adapter("adience", "adience", "Adience: fold_N_data.txt files; keeps the 5 folds"),
        Adapter("aaf", "aaf", "All-Age-Faces: image names carry the age; label files give gender"),
        Adapter("facial-age", "facialage", "facial-age: one folder per age (e.g. 026/)"),
        Adapter("chalearn", "chalearn", "ChaLearn LAP apparent age: CSVs of image, mean, stdev"),
        Adapter("csv", "csvfile", "any CSV with a path column and age and/or gender columns"),
    ]
}


_HINTS = contextvars.ContextVar("featlab_option_hints", default="cli")


def option_hint(key: str) -> str:
    """Where to set adapter option ``key`` in the context of this run: the flag (``--gender-col``) for
    ``featlab prepare``, the spec key (``[dataset] options.gender_col``) for ``featlab run``."""
    return f"[dataset] options.{key}" if _HINTS.get() == "spec" else f"--{key.replace('_', '-')}"


def get_adapter(name: str) -> Callable[..., PrepareResult]:
    try:
        a = ADAPTERS[name]
    except KeyError:
        raise FeatlabError(f"unknown dataset {name!r}; known: {', '.join(ADAPTERS)} (see `featlab prepare --list`)") from None
    mod = importlib.import_module(f"{__name__}.{a.module}")
    fn = getattr(mod, "prepare_" + name.replace("-", "_"), None) or mod.prepare
    return fn


def prepare_dataset(name: str, root: Path, *, seed: int = 0, hints: str = "cli", **options):
    """Run adapter ``name`` over ``root``; return (manifest DataFrame, PrepareResult).

    Datasets without their own split get a seeded one that never divides a
    ``group``. Grouping faces by what they look like needs a backbone, a stage above this one: the prepare
    step calls :func:`featlab.features.facegroups.group_prepared` on the result. ``hints``: ``"cli"`` or
    ``"spec"``, whether messages name an option by its flag or by its spec key (:func:`option_hint`).
    """
    token = _HINTS.set(hints)
    try:
        return _prepare_dataset(name, root, seed=seed, **options)
    finally:
        _HINTS.reset(token)


def _prepare_dataset(name: str, root: Path, *, seed: int, **options):
    root = Path(root)
    if not root.exists():
        raise FeatlabError(f"dataset root does not exist: {root}")
    result = get_adapter(name)(root, **options)
    if not result.rows:
        why = f" ({len(result.skipped)} skipped: {_top_reasons(result)})" if result.skipped else ""
        raise FeatlabError(f"no usable images found for dataset {name!r} under {root}{why}")
    df = to_frame(result.rows)
    if not result.has_splits:
        df = assign_splits(df, seed=seed)
    return df, result


def _top_reasons(result: PrepareResult) -> str:
    items = sorted(result.counts.items(), key=lambda kv: -kv[1])[:3]
    return "; ".join(f"{n} {r}" for r, n in items)


def iter_images(root: Path):
    """All image files under ``root``, sorted, as Paths."""
    return sorted(p for p in Path(root).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def row(source: str, root: Path, path: Path, *, age=None, gender="", race="", split="", fold=None, group="",
        age_low=None, age_high=None) -> dict:
    """One manifest row; path stored absolute; id from the path relative to root.

    ``age_low``/``age_high`` default to ``age`` (an exact age); ``group`` to '' (unknown identity).
    """
    from ..manifest import make_image_id

    path = Path(path)
    try:
        rel = path.resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        rel = path.as_posix()
    return {
        "image_id": make_image_id(source, rel),
        "path": str(path.resolve()),
        "age": age,
        "gender": gender,
        "race": race,
        "split": split,
        "fold": fold,
        "source": source,
        "group": group,
        "age_low": age if age_low is None else age_low,
        "age_high": age if age_high is None else age_high,
    }
