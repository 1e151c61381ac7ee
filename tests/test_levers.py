"""featlab.study.levers: each configuration's answer is the input validation chooses in it, and its paired test
against the reference is the difference of the two answers' per-face figures, people resampled."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from featlab.errors import FeatlabError


def _record(d: Path, test: np.ndarray, val_acc: float, key: str, ids=None):
    d.mkdir(parents=True, exist_ok=True)
    ids = ids if ids is not None else [f"img{i:04d}" for i in range(len(test))]
    rows = [{"image_id": "v0", "split": "val", "group": "pv", "accuracy": 1.0}]
    rows += [{"image_id": i, "split": "test", "group": f"p{k // 3}", "accuracy": float(v)} for k, (i, v) in enumerate(zip(ids, test))]
    pd.DataFrame(rows).to_csv(d / "faces.csv", index=False)
    (d / "metrics.json").write_text(json.dumps({
        "kind": "head", "head_key": key, "tap": key, "val": {"n": 1, "metrics": {"accuracy": val_acc}},
        "test": {"n": len(test), "metrics": {"accuracy": float(np.mean(test)), "accuracy_ci95": [0.0, 1.0]}}}))


def test_the_answer_is_chosen_on_val_per_seed_or_ensemble_and_tested_paired(tmp_path):
    from featlab.scoring.uncertainty import paired_difference
    from featlab.study.levers import answer, lever_rows, seed_choices, table

    rng = np.random.default_rng(0)
    n = 300
    base = tmp_path / "dlib-rec" / "ds"
    hits = {}
    # res10: best on val for seed 0 alone; res14: best ensemble on val; res12 best on TEST (never chosen)
    for tap, vals in {"res10": (0.80, 0.70, 0.60), "res12": (0.50, 0.50, 0.50), "res14": (0.70, 0.75, 0.90)}.items():
        p = {"res10": 0.70, "res12": 0.95, "res14": 0.80}[tap]
        hits[tap] = (rng.random(n) < p).astype(float)
        _record(base / tap / "gender", hits[tap], vals[2], tap)  # the ensemble
        _record(base / tap / "gender" / "seed0", hits[tap], vals[0], tap)
        _record(base / tap / "gender" / "seed1", hits[tap], vals[1], tap)
    one, ens = answer(tmp_path, "dlib-rec", "ds", "gender", seed=0), answer(tmp_path, "dlib-rec", "ds", "gender")
    assert (one["key"], ens["key"]) == ("res10", "res14") and answer(tmp_path, "dlib-rec", "ds", "gender", seed=1)["key"] == "res14"
    assert seed_choices(tmp_path, "dlib-rec", "ds", "gender") == {"single seeds": {0: "res10", 1: "res14"},
                                                                  "ensemble": "res14"}
    rows = lever_rows([("one seed", one), ("ensemble", ens)], "gender")
    assert "diff" not in rows[0] and rows[1]["input"] == "res14"
    groups = np.array([f"p{k // 3}" for k in range(n)])
    want = paired_difference(hits["res14"], hits["res10"], groups=groups, margin=0.01)
    assert rows[1]["diff"] == pytest.approx(hits["res14"].mean() - hits["res10"].mean())
    assert rows[1]["diff_ci95"] == want["ci95"] and rows[1]["p"] == pytest.approx(want["p"])  # one test: BH leaves p
    assert rows[1]["verdict"] == ("better" if want["p"] < 0.05 else "inconclusive")
    assert "| gender | ensemble | `res14` |" in table({"gender": rows})
    # an answer scored on other test faces is not paired with the reference: one line
    _record(tmp_path / "x" / "ds" / "res14" / "gender", hits["res14"], 0.9, "res14", ids=[f"o{i}" for i in range(n)])
    with pytest.raises(FeatlabError, match="other test faces"):
        lever_rows([("one seed", one), ("other", answer(tmp_path, "x", "ds", "gender"))], "gender")


def test_the_shipped_table_leaves_out_what_has_not_run_but_never_its_reference(tmp_path):
    from featlab.study.levers import SHIPPED, shipped_answers

    with pytest.raises(FeatlabError, match="no gender record"):
        shipped_answers(tmp_path, "gender", [])  # no reference: one line, even when the others may be left out
    kind, backbone, dataset, _ = SHIPPED[0][1]
    _record(tmp_path / backbone / dataset / "res14" / "gender", np.zeros(6), 0.5, "res14")
    missing: list = []
    got = shipped_answers(tmp_path, "gender", missing)
    assert [label for label, _ in got] == [SHIPPED[0][0]] and len(missing) == len(SHIPPED) - 1
    with pytest.raises(FeatlabError):
        shipped_answers(tmp_path, "gender")
