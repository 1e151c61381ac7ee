"""Every image or label a study leaves out, by name and reason: one CSV, counts per reason on the console.

A row of the list (:data:`COLUMNS`) is one of:

- ``prepare``: a row or image of the dataset that the manifest does not hold (the adapter's skipped list:
  an image file not found, a duplicate, no usable label);
- ``labels``: a manifest row kept without one label (an age that is empty, not a number or outside 0..120,
  an unrecognised gender), named with its value; the heads of that label leave the face out;
- ``extract``: an image the backbone never saw (cannot be decoded, no usable landmarks), from the features
  file's ``/skipped`` table;
- ``warning``: a face that was extracted but flagged (no face found in the chip), from the features file's
  ``/warnings`` table: stored, and named so that it can be looked at.

``featlab prepare`` writes the first two beside the manifest (:func:`prepare_list_path`), ``featlab extract``
the last two beside the features file (:func:`extract_list_path`); ``featlab run`` joins them in the results
folder (``skipped.csv``), which ``report.md`` links.
"""

from __future__ import annotations

import csv
from pathlib import Path

COLUMNS = ("step", "image_id", "item", "reason")
#: How each step's rows are introduced on the console and in the report.
STEP_TITLES = {"prepare": "left out at prepare", "labels": "kept without a label",
               "extract": "skipped at extraction", "warning": "extracted with a warning"}


def prepare_list_path(manifest: Path | str) -> Path:
    """``features/manifests/NAME.skipped.csv`` beside ``NAME.csv``."""
    manifest = Path(manifest)
    return manifest.with_name(f"{manifest.stem}.skipped.csv")


def extract_list_path(features: Path | str) -> Path:
    """``features/BACKBONE/NAME.skipped.csv`` beside ``NAME.h5``."""
    features = Path(features)
    return features.with_name(f"{features.stem}.skipped.csv")


def from_prepare(res) -> list[dict]:
    """The rows of a :class:`featlab.data.manifest.PrepareResult`: its skipped list, then its label skips."""
    rows = [{"step": "prepare", "image_id": "", "item": str(what), "reason": str(why)} for what, why in res.skipped]
    rows += [{"step": "labels", "image_id": str(i), "item": str(what), "reason": str(why)}
             for i, what, why in getattr(res, "label_skips", ())]
    return rows


def from_store(store, ids=None) -> list[dict]:
    """The rows of a features file: its skipped images, then its warnings; ``ids``: only these image ids
    (the manifest's)."""
    rows = []
    for step, df in (("extract", store.skipped()), ("warning", store.warnings())):
        for r in df.itertuples(index=False):
            if ids is None or r.image_id in ids:
                rows.append({"step": step, "image_id": r.image_id, "item": r.path, "reason": r.reason})
    return rows


def write(rows: list[dict], path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows({c: r.get(c, "") for c in COLUMNS} for r in rows)
    tmp.replace(path)
    return path


def read(path: Path | str) -> list[dict]:
    """The rows of a list written by :func:`write`; none when the file is not there."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return [dict(r) for r in csv.DictReader(f)]


def counts(rows: list[dict], step: str) -> dict[str, int]:
    """Rows of ``step`` per reason, most frequent first."""
    out: dict[str, int] = {}
    for r in rows:
        if r["step"] == step:
            out[r["reason"]] = out.get(r["reason"], 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def by_reason(n: dict[str, int]) -> str:
    """``2 image file not found; 1 duplicate image path``."""
    return "; ".join(f"{v:,} {k}" for k, v in n.items())


def lines(rows: list[dict], step: str, limit: int = 20) -> list[str]:
    """Console lines for one step: the count per reason, then up to ``limit`` names with their reason."""
    mine = [r for r in rows if r["step"] == step]
    if not mine:
        return []
    out = [f"{len(mine):,} {STEP_TITLES[step]}: {by_reason(counts(rows, step))}"]
    out += [f"  {r['item']}: {r['reason']}" for r in mine[:limit]]
    if len(mine) > limit:
        out.append(f"  ... and {len(mine) - limit:,} more")
    return out
