"""Range-labelled datasets trained honestly: an Adience-like fixture holding every Adience range label.

The 8 Adience groups place every range; 5 or 7 groups and age regression would silently drop the
ranges that span one of their edges, so such a head stops (one line, with the count, before
TensorFlow) unless the user asks for it with ``--ranges drop`` / ``ranges = "drop"``, and then its
``config.json`` and the spec's report give the rows dropped per range label.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from featlab.cli import main
from featlab.errors import FeatlabError
from featlab.data.manifest import read_manifest, write_manifest
from featlab.features.store import FeatureStore, label_row

ROOT = Path(__file__).resolve().parents[1]
RANGES = [(0, 2), (4, 6), (8, 13), (15, 20), (25, 32), (38, 43), (48, 53), (60, 100)]  # every Adience group
PER_RANGE = 20
EXACT = [3, 10, 14, 23, 27, 35, 45, 57, 70, 90] * 4  # stray exact ages (Adience has a few): never dropped
N = PER_RANGE * len(RANGES) + len(EXACT)
EDGES = {5: (18, 30, 45, 60), 7: (13, 20, 30, 40, 50, 65)}  # each scheme's group edges, typed from bins.py's doc


def _lost(cats: int) -> dict[str, int]:
    """Range labels a scheme cannot place, counted without featlab: an edge e with lo < e <= hi splits the range."""
    return {f"{lo}-{hi}": PER_RANGE for lo, hi in RANGES if any(lo < e <= hi for e in EDGES[cats])}


@pytest.fixture(scope="module")
def adience(tmp_path_factory):
    """(manifest, features): 200 faces, 20 per Adience range label and 40 exact ages, 50 users of 4 photos,
    fold = user % 5; a 12-feature tap 'vec' whose first feature is the 8-group index plus noise."""
    from featlab.data.bins import get_scheme

    d = tmp_path_factory.mktemp("adience")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N):
        lo, hi = RANGES[i % len(RANGES)] if i < PER_RANGE * len(RANGES) else (EXACT[i - PER_RANGE * len(RANGES)],) * 2
        user = i // 4
        rows.append({"image_id": f"a{i:04d}", "path": f"/x/{i}.jpg", "age": (lo + hi) / 2.0, "gender": "fm"[user % 2],
                     "race": "", "split": "", "fold": user % 5, "source": "adience", "group": f"u{user}",
                     "age_low": float(lo), "age_high": float(hi)})
    import pandas as pd

    manifest = write_manifest(pd.DataFrame(rows), d / "adience.csv")
    vec = rng.normal(0, 0.3, (N, 12)).astype(np.float32)
    vec[:, 0] += get_scheme(8).assign([r["age"] for r in rows])
    vec[:, 1] += np.array([1.0 if r["gender"] == "m" else -1.0 for r in rows], dtype=np.float32)
    identity = {"backbone": "synthetic", "model_sha256": "cd" * 32, "preprocessing": {}, "flip": False, "align": False}
    feats = d / "adience.h5"
    with FeatureStore.open_for_append(feats, identity) as st:
        st.set_attr("dataset", "adience")
        st.ensure_array("vec", (12,), expected_rows=N)
        st.append({"vec": vec}, [label_row(r) for r in read_manifest(manifest).to_dict("records")])
    return manifest, feats


@pytest.fixture
def no_tensorflow(monkeypatch):
    """Fail the test if a head gets as far as setting up TensorFlow."""
    import featlab.heads.grid
    import featlab.heads.train

    def refuse(seed):
        raise AssertionError("TensorFlow was set up before the range check")

    monkeypatch.setattr(featlab.heads.train, "_setup_tf", refuse)
    monkeypatch.setattr(featlab.heads.grid, "_setup_tf", refuse)


def test_the_range_losses_of_every_scheme(adience):
    from featlab.data.labels import range_losses

    with FeatureStore.open_read(adience[1]) as s:
        labels = s.labels()
    assert range_losses(labels, "bins", 8) == {}
    assert range_losses(labels, "bins", 7) == _lost(7) and set(_lost(7)) == {f"{a}-{b}" for a, b in RANGES[2:]}
    assert range_losses(labels, "bins", 5) == _lost(5) == {"15-20": PER_RANGE, "25-32": PER_RANGE}
    assert range_losses(labels, "age") == {f"{a}-{b}": PER_RANGE for a, b in RANGES}  # exact ages only
    assert range_losses(labels, "gender") == {}


@pytest.mark.parametrize("args,count", [(["--cats", "7"], 120), (["--cats", "5"], 40), (["--regression"], 160),
                                        (["--cats", "8", "--cats", "7"], 120)])
def test_a_scheme_that_drops_ranges_stops_with_the_count(adience, no_tensorflow, capsys, tmp_path, monkeypatch, args,
                                                         count):
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    rc = main(["train-head", "--features", str(adience[1]), "--layer", "vec", "--folds", "all", "-q", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert f"would drop {count:,} range-labelled rows" in err[0] and "--ranges drop" in err[0] and "--cats 8" in err[0]
    if "--regression" not in args:
        for name, n in _lost(int(args[-1])).items():
            assert f"{name}: {n}" in err[0]
    assert not (tmp_path / "results").exists()


def test_eight_groups_keep_every_row(adience):
    """The Adience protocol's scheme: every row of every fold is a train, val or test row."""
    from featlab.heads.train import check_hyperparameters, plan_head

    hp = check_hyperparameters("bins", 8, {"verbose": 0})
    with FeatureStore.open_read(adience[1]) as s:
        tests = []
        for k in range(5):
            plan = plan_head(s, "vec", "bins", 8, None, k, hp, keep_x=False)
            assert len(plan["tr"]) + len(plan["va"]) + len(plan["te"]) == N and plan["dropped"] == 0
            assert plan["ranges"] == {"policy": "refuse", "dropped": 0, "by_range": {}}
            tests += plan["te"].tolist()
    assert sorted(tests) == list(range(N))  # every face is tested exactly once over the 5 folds


def test_ranges_drop_trains_and_records_the_rows_lost_per_range(adience, tmp_path, monkeypatch):
    from featlab.study.experiment import ranges_lines

    monkeypatch.chdir(tmp_path)
    rc = main(["train-head", "--features", str(adience[1]), "--layer", "vec", "--cats", "7", "--fold", "0",
               "--ranges", "drop", "--epochs", "2", "-q"])
    assert rc == 0
    d = tmp_path / "results" / "synthetic" / "adience" / "vec" / "bins7" / "fold0"
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["ranges"] == {"policy": "drop", "dropped": 120, "by_range": _lost(7)}
    assert cfg["hyperparameters"]["ranges"] == "drop"
    assert cfg["counts"]["dropped"] == {"range label spans several groups": 120}
    c = cfg["counts"]
    assert c["train"] + c["val"] + c["test"] == N - 120
    m = json.loads((d / "metrics.json").read_text())
    assert m["config"]["ranges"]["dropped"] == 120
    lines = ranges_lines({("vec", "bins7"): m}, "bins7")
    assert "120 range-labelled rows left out" in lines[0] and "15-20 (20)" in lines[0] and "60-100 (20)" in lines[0]
    assert ranges_lines({("vec", "bins7"): m}, "gender") == []


def test_a_bad_ranges_value_is_one_line(adience, capsys):
    rc = main(["train-head", "--features", str(adience[1]), "--layer", "vec", "--cats", "7", "--ranges", "keep"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--ranges must be refuse or drop" in err[0]


def test_the_shipped_adience_spec_runs_the_eight_group_fold_protocol(adience, tmp_path):
    """r100-adience.toml: 8 groups and gender over the 5 folds, nothing that drops a range; a spec asking for
    7 groups stops before extraction unless its [[heads]] say ranges = "drop"."""
    from featlab.study.experiment import _check_ranges, _heads, load_spec

    spec = load_spec(ROOT / "experiments" / "r100-adience.toml")
    heads = _heads(spec)
    assert [(h["target"], h["cats"], h["fold"]) for h in heads] == [("bins", 8, "all"), ("gender", None, "all")]
    _check_ranges(adience[0], heads)  # passes
    text = (ROOT / "experiments" / "r100-adience.toml").read_text()
    shipped_heads = text[text.index("[[heads]]"):]

    def with_heads(heads: str):  # the shipped spec with other [[heads]] (a --set cannot replace a list of tables)
        p = tmp_path / "r100-adience.toml"
        p.write_text(text.replace(shipped_heads, heads))
        return _heads(load_spec(p))

    seven = with_heads('[[heads]]\ntarget = "bins"\ncats = [7]\nfold = "all"\n')
    with pytest.raises(FeatlabError, match="bins7 would drop 120 range-labelled rows"):
        _check_ranges(adience[0], seven)
    dropping = with_heads('[[heads]]\ntarget = "bins"\ncats = [7]\nfold = "all"\nranges = "drop"\n')
    _check_ranges(adience[0], dropping)


def test_the_shipped_adience_spec_runs_the_protocol_end_to_end(tmp_path, monkeypatch):
    """`featlab run` of the shipped Adience spec on an Adience-format fixture (5 fold files, 120 real face
    chips of the shipped sample, 2 photos per user, every label an Adience range or a stray exact age), on
    dlib-age's res5 instead of the R100 (no weights here) and with 3 epochs: 8 groups and gender over the
    5 folds, every face tested exactly once, nothing dropped, exact and 1-off accuracy with intervals over
    users, and the report."""
    import shutil

    from featlab.data.bins import get_scheme
    from featlab.study.experiment import run_spec

    chips = sorted((ROOT / "featlab" / "data" / "utkface-sample").glob("*.jpg"))[::5][:120]
    scheme = get_scheme(8)
    header = ("user_id\toriginal_image\tface_id\tage\tgender\tx\ty\tdx\tdy\ttilt_ang\tfiducial_yaw_angle\t"
              "fiducial_score")
    folds: dict[int, list[str]] = {k: [] for k in range(5)}
    data = tmp_path / "adience"
    for i, p in enumerate(chips):
        age, g = int(p.name.split("_")[0]), p.name.split("_")[1]
        lo, hi = RANGES[scheme.assign(np.array([float(age)]))[0]]
        label = f"({lo}, {hi})" if i % 10 else str(age)  # mostly ranges, a few exact ages as in Adience
        user = f"user{i // 2}"
        image = f"{i}.jpg"
        dest = data / "faces" / user / f"coarse_tilt_aligned_face.{i}.{image}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dest)
        folds[(i // 2) % 5].append(f"{user}\t{image}\t{i}\t{label}\t{'m' if g == '0' else 'f'}\t0\t0\t1\t1\t0\t0\t0")
    for k, lines in folds.items():
        (data / f"fold_{k}_data.txt").write_text("\n".join([header, *lines]) + "\n")
    text = (ROOT / "experiments" / "r100-adience.toml").read_text()
    heads = text[text.index("[[heads]]"):]
    spec = tmp_path / "r100-adience.toml"  # the shipped spec, its heads trained for 3 epochs only
    spec.write_text(text.replace(heads, heads.replace('fold = "all"', 'fold = "all"\nepochs = 3')))
    monkeypatch.chdir(tmp_path)
    lines: list[str] = []
    report = run_spec(spec, [f"dataset.root={data}", "backbone.name=dlib-age", 'backbone.model=""',
                             'extract.taps=["res5"]', "extract.align=false"], echo=lines.append)
    base = tmp_path / "results" / "dlib-age" / "r100-adience" / "res5"
    for tname, metrics in (("bins8", ("accuracy", "one_off")), ("gender", ("accuracy",))):
        summary = json.loads((base / tname / "metrics.json").read_text())
        assert summary["kind"] == "folds" and summary["folds"] == [0, 1, 2, 3, 4]
        assert summary["test"]["n"] == len(chips)  # every face is a test face of exactly one fold
        assert summary["test"]["uncertainty"]["unit"] == "person"
        assert summary["test"]["uncertainty"]["n_units"] == len(chips) // 2
        for m in metrics:
            lo, hi = summary["test"]["metrics"][f"{m}_ci95"]
            assert lo <= summary["test"]["metrics"][m] <= hi
        for k in range(5):
            cfg = json.loads((base / tname / f"fold{k}" / "config.json").read_text())
            assert cfg["ranges"]["dropped"] == 0
    folds_csv = (base / "bins8" / "folds.csv").read_text().splitlines()
    assert folds_csv[0].startswith("fold,") and len(folds_csv) == 6
    text = report.read_text()
    assert "## bins8" in text and "## gender" in text and "range-labelled rows left out" not in text
