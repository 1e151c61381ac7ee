"""Figures typed in README.md that a run can check: they must match what featlab actually makes."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _int(text: str) -> int:
    return int(text.replace(",", ""))


def _demo_manifest():
    """The manifest `featlab demo` makes: its built-in spec's adapter, root, options and seed (the cheap first step)."""
    from featlab.study.experiment import SAMPLE, builtin_spec, load_spec, prepare_frame, sample_root

    spec = load_spec(builtin_spec("demo"))
    ds = spec["dataset"]
    assert ds["root"] == SAMPLE
    df, _ = prepare_frame(ds.get("adapter") or ds["name"], sample_root(), ds.get("options", {}),
                          int(spec.get("seed", 0)))
    return df


def test_demo_figures_in_the_readme_are_the_demo_s():
    df = _demo_manifest()
    m = re.search(r"prepares\s+the\s+shipped\s+sample\s+grouped\s+by\s+face\s+\(([\d,]+)\s+face\s+groups\s+of\s+2-(\d+)"
                  r"\s+faces;\s+([\d,]+)\s+train\s+/\s+([\d,]+)\s+val\s+/\s+([\d,]+)\s+test\)", README)
    assert m, "the README's demo split sentence is gone: keep it, or update this test"
    counts = df["split"].value_counts()
    assert (_int(m[3]), _int(m[4]), _int(m[5])) == (counts["train"], counts["val"], counts["test"])
    sizes = df["group"].replace("", np.nan).dropna().value_counts()
    assert (_int(m[1]), _int(m[2])) == (int((sizes > 1).sum()), int(sizes.max()))
    m = re.search(r"### The demo \(`featlab demo`, ([\d,]+) faces", README)
    assert m and _int(m[1]) == len(df)
    m = re.search(r"a\s+([\d,]+)-image UTKFace sample shipped in the package", README)
    assert m and _int(m[1]) == len(df)
