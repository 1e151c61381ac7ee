"""featlab.data.labels: targets from range labels, and validation rows held out as whole groups."""

from __future__ import annotations

import numpy as np
import pandas as pd

from featlab.data.labels import dropped_reasons, encode_target, split_rows


def _labels(n=600, seed=0, folds=True):
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 60, n)
    age = rng.integers(0, 80, n).astype(float)
    return pd.DataFrame({
        "image_id": [f"i{i:04d}" for i in range(n)], "age": age, "age_low": age, "age_high": age,
        "gender": rng.choice(["f", "m"], n), "race": "", "split": "",
        "fold": (users % 5) if folds else -1, "group": [f"user:{u}" for u in users],
    })


def test_fold_validation_rows_are_whole_subjects():
    lab = _labels()
    _, valid = encode_target(lab, "gender")
    for k in range(5):
        sp = split_rows(lab, valid, fold=k)
        g = lab["group"].to_numpy()
        assert not set(g[sp["val"]]) & set(g[sp["train"]])  # no subject on both sides
        assert set(g[sp["test"]]).isdisjoint(g[sp["train"]])
        assert 0.03 < len(sp["val"]) / (len(sp["val"]) + len(sp["train"])) < 0.25


def test_manifest_without_val_holds_out_whole_groups():
    lab = _labels(folds=False)
    lab["split"] = np.where(lab.index % 5 == 0, "test", "train")
    _, valid = encode_target(lab, "gender")
    sp = split_rows(lab, valid)
    g = lab["group"].to_numpy()
    assert len(sp["val"]) and not set(g[sp["val"]]) & set(g[sp["train"]])


def test_range_labels_go_to_a_bin_only_inside_one_group_and_never_to_regression():
    lab = pd.DataFrame({"image_id": list("abcde"), "age": [17.5, 28.5, 15.5, 40.0, np.nan],
                        "age_low": [15, 25, 8, 40, np.nan], "age_high": [20, 32, 23, 40, np.nan],
                        "gender": ["f"] * 5, "race": "", "split": "train", "fold": -1, "group": ""})
    y8, v8 = encode_target(lab, "bins", 8)
    assert list(v8) == [True, True, False, True, False] and list(y8[v8]) == [3, 4, 5]  # 15-20, 25-32, 38-43
    y5, v5 = encode_target(lab, "bins", 5)
    assert list(v5) == [False, False, False, True, False]  # (15, 20) straddles 0-17 | 18-29
    _, va = encode_target(lab, "age")
    assert list(va) == [False, False, False, True, False]
    assert dropped_reasons(lab, "age", va) == {"no age": 1, "range label (no single age)": 3}
    assert dropped_reasons(lab, "bins", v5) == {"no age": 1, "range label spans several groups": 3}
