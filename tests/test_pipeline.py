"""The whole pipeline from the command line: the offline demo (prepare -> extract -> heads ->
evaluate -> compare -> report), a cheap rerun, predict on a group photo, specs that fail fast,
and the R100 path on a generated IResNet graph."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from featlab.cli import main


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    from featlab.study.experiment import run_demo

    out = tmp_path_factory.mktemp("demo")
    report = run_demo(out)
    return out, report


def test_demo_writes_every_artifact(demo_dir):
    out, report = demo_dir
    assert report.is_file() and report.name == "report.md"
    root = out / "results" / "dlib-rec" / "utkface-sample"
    text = report.read_text()
    assert "## bins7" in text and "## age" in text and "## gender" in text
    for tap in ("res12", "res14", "embedding"):
        for t in ("bins7", "age", "gender"):
            d = root / tap / t
            for f in ("head.keras", "config.json", "history.csv", "history.png", "metrics.json"):
                assert (d / f).is_file(), d / f
        assert (root / tap / "bins7" / "confusion.csv").is_file()
        assert (root / tap / "bins7" / "confusion.png").is_file()
        assert (root / tap / "age" / "scatter.png").is_file()
    for t in ("bins7", "age", "gender"):
        assert (root / "compare" / t / "layer_comparison.csv").is_file()
        assert (root / "compare" / t / "layer_comparison.png").is_file()
    # the features file carries the config that made it
    from featlab.features.store import FeatureStore

    with FeatureStore.open_read(out / "features" / "dlib-rec" / "utkface-sample.h5") as s:
        assert s.nrows == 600 and len(s.skipped()) == 0
        assert len(s.attrs["model_sha256"]) == 64


def test_demo_heads_beat_the_majority_class(demo_dir):
    """Each demo head beats its majority baseline, and that baseline is the share of the most frequent
    training class among the test faces (computed here from the labels)."""
    from featlab.data.bins import get_scheme
    from featlab.features.store import FeatureStore

    out, _ = demo_dir
    with FeatureStore.open_read(out / "features" / "dlib-rec" / "utkface-sample.h5") as s:
        lab = s.labels()
    tr, te = lab[lab.split == "train"], lab[lab.split == "test"]
    root = out / "results" / "dlib-rec" / "utkface-sample" / "embedding"
    g = json.loads((root / "gender" / "metrics.json").read_text())
    base = json.loads((root / "gender" / "baselines.json").read_text())
    top = tr.gender.value_counts().idxmax()
    assert base["majority"]["test"]["metrics"]["accuracy"] == pytest.approx((te.gender == top).mean())
    assert g["test"]["metrics"]["accuracy"] > base["majority"]["test"]["metrics"]["accuracy"] + 0.2
    b = json.loads((root / "bins7" / "metrics.json").read_text())
    k = np.bincount(get_scheme(7).assign(tr.age.to_numpy())).argmax()
    majority = float((get_scheme(7).assign(te.age.to_numpy()) == k).mean())
    assert b["test"]["metrics"]["accuracy"] > majority + 0.1
    a = json.loads((root / "age" / "metrics.json").read_text())
    assert a["test"]["metrics"]["mae"] < float(np.abs(te.age - tr.age.median()).mean()) - 3.0
    lo, hi = a["test"]["metrics"]["mae_ci95"]
    assert lo < a["test"]["metrics"]["mae"] < hi and a["test"]["n"] == len(te)


def test_demo_compare_chooses_on_validation(demo_dir):
    """The demo's comparison picks the head input (a tap, or the fusion of all three) with the best
    validation figure, whatever test says."""
    import pandas as pd

    out, _ = demo_dir
    root = out / "results" / "dlib-rec" / "utkface-sample"
    for t, m, best in (("bins7", "accuracy", max), ("age", "mae", min), ("gender", "accuracy", max)):
        vals = {tap: json.loads((root / tap / t / "metrics.json").read_text())["val"]["metrics"][m]
                for tap in ("res12", "res14", "embedding", "res12+res14+embedding")}
        table = pd.read_csv(root / "compare" / t / "layer_comparison.csv")
        chosen = table[table.chosen]
        assert list(chosen.tap) == [best(vals, key=vals.get)]
        assert set(table.reader) >= {"head", "linear", "majority"}


def test_demo_rerun_skips_finished_steps(demo_dir, capsys):
    from featlab.study.experiment import run_demo

    out, _ = demo_dir
    capsys.readouterr()
    run_demo(out)
    text = capsys.readouterr().out
    assert "is current" in text and text.count("current, skipped") == 12 and "(0 new)" in text


def test_predict_annotates_the_group_photo(demo_dir, tmp_path, capsys):
    out, _ = demo_dir
    photo = Path(str(resources.files("insightface") / "data" / "images" / "t1.jpg"))
    heads = out / "results" / "dlib-rec" / "utkface-sample" / "embedding"
    rc = main(["predict", str(photo), "--head", str(heads / "bins7"), "--head", str(heads / "gender"),
               "--annotate", str(tmp_path / "ann"), "--detect"])
    lines = [x for x in capsys.readouterr().out.splitlines() if " face " in x]
    assert rc == 0 and len(lines) == 6  # the six friends
    assert all("gender " in x and "age " in x for x in lines)
    assert (tmp_path / "ann" / "t1.jpg").is_file()


def test_predict_with_a_fusion_head_gives_its_recorded_test_predictions(demo_dir):
    """The demo's fusion heads (res12+res14+embedding) in predict: each tap is computed from the image,
    fed in the key's order, rounded as stored; the ages and genders printed for test faces are the ones
    evaluation recorded from the stored features (predictions.csv)."""
    import pandas as pd

    from featlab.report.predict import predict_paths

    out, _ = demo_dir
    root = out / "results" / "dlib-rec" / "utkface-sample" / "res12+res14+embedding"
    ages = pd.read_csv(root / "age" / "predictions.csv").head(8)
    genders = pd.read_csv(root / "gender" / "predictions.csv").set_index("image_id")
    paths = pd.read_csv(out / "features" / "manifests" / "utkface-sample.csv").set_index("image_id")["path"]
    recs = predict_paths([paths[i] for i in ages.image_id], [root / "age", root / "gender"], echo=lambda *a: None)
    assert len(recs) == 8
    # a chip in which dlib's detector finds no face is a named skip (2 of the 600 sample chips), never scored
    scored = [(rec, row) for rec, (_, row) in zip(recs, ages.iterrows()) if "error" not in rec]
    assert len(scored) >= 6 and all("no face" in rec["error"] for rec in recs if "error" in rec)
    for rec, row in scored:
        age_text, gender_text = rec["labels"]
        assert float(age_text.split()[1]) == pytest.approx(row.predicted_age, abs=0.051), (rec, row)
        assert gender_text.split()[1] == genders.loc[row.image_id, "predicted"].upper()


def test_demo_grid_heads_score_like_heads_trained_alone_on_real_faces(demo_dir, tmp_path):
    """Real features (the demo's dlib-rec taps of 600 UTKFace faces): the demo trained its 12 heads as
    one grid; the same heads trained alone with the same seed and settings land within a stated
    tolerance on the 119 test faces (8 points of gender accuracy, 12 of 7-group accuracy, 1.5 years
    of MAE; a head that learned nothing scores ~53 %, ~25 % and MAE ~15)."""
    from featlab.study.workflow import train_head

    out, _ = demo_dir
    feats = out / "features" / "dlib-rec" / "utkface-sample.h5"
    root = out / "results" / "dlib-rec" / "utkface-sample"
    for key, target, cats, tname, m, tol in (("res14", "gender", None, "gender", "accuracy", 0.08),
                                             ("res12+res14+embedding", "age", None, "age", "mae", 1.5),
                                             ("embedding", "bins", 7, "bins7", "accuracy", 0.12)):
        grid = json.loads((root / key / tname / "metrics.json").read_text())
        assert grid["config"]["training"]["grid"]["heads"] == 12
        alone = json.loads((train_head(feats, key, target, cats, out_root=tmp_path, baselines=False, verbose=0)
                            / "metrics.json").read_text())
        assert "grid" not in alone["config"]["training"]
        a, g = alone["test"]["metrics"][m], grid["test"]["metrics"][m]
        assert abs(a - g) <= tol, (key, tname, a, g)


def test_predict_reports_images_without_faces(demo_dir, tmp_path, capsys):
    from PIL import Image

    out, _ = demo_dir
    Image.new("RGB", (300, 300), (30, 200, 90)).save(tmp_path / "lawn.jpg")
    head = out / "results" / "dlib-rec" / "utkface-sample" / "embedding" / "gender"
    rc = main(["predict", str(tmp_path / "lawn.jpg"), "--head", str(head), "--detect"])
    assert rc == 1 and "lawn.jpg: skipped (no face found)" in capsys.readouterr().out  # exit 1: something skipped


def test_seed_specs_fail_fast_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("INSIGHTFACE_HOME", str(tmp_path / "nothing"))
    specs = Path(__file__).resolve().parents[1] / "experiments"
    for name in ("r100-utkface", "r100-imdb", "r100-adience"):
        rc = main(["run", str(specs / f"{name}.toml"), "--set", f"dataset.root={tmp_path}"])
        err = capsys.readouterr().err
        assert rc == 2 and "no model file for backbone r100" in err and "Traceback" not in err
        assert err.count("\n") == 1
    rc = main(["run", str(specs / "utkface-dlib-age.toml")])
    err = capsys.readouterr().err
    assert rc == 2 and "no dataset root" in err


def test_r100_path_on_a_generated_graph(utk_small, tmp_path, capsys, monkeypatch):
    """extract -> train-head -> evaluate on a tiny random-weight IResNet-100 (PyTorch export style)."""
    from featlab.backbones.iresnet import build_iresnet, save

    monkeypatch.chdir(tmp_path)
    model = tmp_path / "tiny_r100.onnx"
    save(build_iresnet(100, "pytorch", widths=(8, 16, 32, 64), seed=1), model)
    assert main(["layers", "-b", "r100", "--model", str(model), "--main"]) == 0
    listing = capsys.readouterr().out
    assert "stage4_unit3_out" in listing and "add_98" in listing and "BatchNorm folded in" in listing
    rc = main(["extract", "-b", "r100", "--model", str(model), "-m", str(utk_small), "-q",
               "-l", "add_98", "-l", "stage3_unit15_conv1", "-l", "stage4_unit1_conv1"])
    assert rc == 0
    feats = tmp_path / "features" / "r100" / "utksmall.h5"
    from featlab.features.store import FeatureStore

    with FeatureStore.open_read(feats) as s:
        assert s.array("add_98").shape == (240, 64, 7, 7)
        assert s.array("stage3_unit15_conv1").shape == (240, 32, 14, 14)
        assert s.array("stage4_unit1_conv1").shape == (240, 64, 14, 14)
    rc = main(["train-head", "--target", "gender", "-f", str(feats), "-l", "add_98", "--epochs", "3", "-q"])
    assert rc == 0
    head = tmp_path / "results" / "r100" / "utksmall" / "add_98" / "gender"
    before = (head / "metrics.json").read_bytes()
    assert main(["evaluate", "--head", str(head)]) == 0
    assert "gender: accuracy" in capsys.readouterr().out
    # a re-evaluation of the same rows gives the head's own test figure, written beside it, not over it
    own = json.loads(before)["test"]["metrics"]
    again = json.loads((head / "eval" / "utksmall" / "test" / "metrics.json").read_text())["metrics"]
    assert again["accuracy"] == pytest.approx(own["accuracy"]) and again["accuracy_ci95"] == own["accuracy_ci95"]
    assert (head / "metrics.json").read_bytes() == before


def test_compare_sweep_trains_every_residual_unit(utk_small, tmp_path, monkeypatch, capsys):
    import pandas as pd

    monkeypatch.chdir(tmp_path)
    rc = main(["compare", "--sweep", "--target", "gender", "-b", "dlib-age", "-m", str(utk_small)])
    assert rc == 0
    out = tmp_path / "results" / "dlib-age" / "utksmall" / "compare" / "gender"
    table = pd.read_csv(out / "layer_comparison.csv")
    assert (out / "sweep_accuracy.png").is_file()
    heads = table[table.reader == "head"]
    assert list(heads["tap"]) == [f"res{i}@avg2" for i in range(1, 6)]  # network order
    # each figure is the mean of the head's own per-face test values; the chosen tap is validation's best
    val = {}
    for _, row in heads.iterrows():
        d = tmp_path / "results" / "dlib-age" / "utksmall" / row["tap"] / "gender"
        faces = pd.read_csv(d / "faces.csv")
        assert row["accuracy"] == pytest.approx(faces[faces.split == "test"]["accuracy"].mean())
        val[row["tap"]] = json.loads((d / "metrics.json").read_text())["val"]["metrics"]["accuracy"]
    assert list(heads[heads.chosen]["tap"]) == [max(val, key=val.get)]


def test_readme_demo_table_is_what_the_demo_makes(demo_dir):
    """The README's demo table: the same chosen taps and, within a rounding-level tolerance, the same figures
    and intervals as a fresh demo run (summary_table is what report.md holds)."""
    import re

    from featlab.report.compare import compare
    from featlab.study.experiment import summary_table

    out, _ = demo_dir
    comps = {t: compare("dlib-rec", "utkface-sample", target=tg, cats=c, results_root=out / "results")
             for t, tg, c in (("bins7", "bins", 7), ("age", "age", None), ("gender", "gender", None))}
    ours = [x for x in summary_table(comps)[2:]]
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("### The demo"):readme.index("### UTKFace")]
    theirs = [x for x in section.splitlines() if x.startswith("| ") and ("bins," in x or "MAE" in x or "gender," in x)]
    assert len(theirs) == len(ours) == 3

    def numbers(line):
        return [float(v) for v in re.findall(r"\d+\.\d+", line)]

    for a, b in zip(ours, theirs):
        assert a.split("|")[1:3] == b.split("|")[1:3]  # target and the tap chosen on validation
        x, y = numbers(a), numbers(b)
        tol = 0.3 if "MAE" in a else 2.6  # years; points (~3 of 120 test faces)
        assert len(x) == len(y) and np.allclose(x, y, atol=tol), (a, b)
        assert a.count("*") == b.count("*") and a.count("≈") == b.count("≈")  # the verdicts
