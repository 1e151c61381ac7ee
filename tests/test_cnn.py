"""featlab train-cnn: a network trained from pixels on the shipped sample, recorded like a head, resumed to the same
numbers, explained by LRP with its conservation, and put beside heads in compare as a reference row.

The CNN here is the Levi & Hassner network at 64 px (the smallest crop it takes) for 2 epochs on the 600 shipped
faces: seconds, not a useful model. The full runs are in bench/RESULTS.md and docs/studies.md."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from featlab.cli import main
from featlab.errors import FeatlabError

SAMPLE = Path(__file__).resolve().parents[1] / "featlab" / "data" / "utkface-sample"
SIZE = 64


@pytest.fixture(scope="module")
def sample_manifest(tmp_path_factory) -> Path:
    from featlab.data.datasets import prepare_dataset
    from featlab.data.manifest import write_manifest

    df, _ = prepare_dataset("utkface", SAMPLE)
    return write_manifest(df, tmp_path_factory.mktemp("cnn-manifest") / "sample.csv")


@pytest.fixture(scope="module")
def trained(sample_manifest, tmp_path_factory):
    """(results root, features root, the bins8 CNN's folder), trained uninterrupted."""
    from featlab.heads.cnntrain import train_cnn

    base = tmp_path_factory.mktemp("cnn")
    d = train_cnn(sample_manifest, "bins", 8, size=SIZE, epochs=2, out_root=base / "results",
                  features_root=base / "features", verbose=0)
    return base / "results", base / "features", d


def _split_counts(manifest: Path) -> dict:
    df = pd.read_csv(manifest)
    return df["split"].value_counts().to_dict()


def test_the_cnn_is_recorded_like_a_head(trained, sample_manifest):
    from featlab.data.bins import get_scheme
    from featlab.features.pixels import load_chips
    from featlab.heads.cnn import center_crops, load_cnn

    root, feats, d = trained
    assert d.parent.parent.name.startswith("manifest-") and d.parent.name == f"levi-hassner-{SIZE}"
    m = json.loads((d / "metrics.json").read_text())
    counts = _split_counts(sample_manifest)
    assert m["kind"] == "cnn" and m["test"]["n"] == counts["test"] and m["val"]["n"] == counts["val"]
    faces = pd.read_csv(d / "faces.csv", dtype={"image_id": str})
    assert (faces["split"] == "test").sum() == counts["test"]
    # the test accuracy, recomputed from the saved network on the cached chips' centre crops
    model, cfg = load_cnn(d)
    chips = load_chips(sample_manifest, side=cfg["chips"]["side"], root=feats, verbose=False)
    df = pd.read_csv(sample_manifest)
    test = np.flatnonzero(df["split"].to_numpy()[chips.rows] == "test")
    proba = np.asarray(model(center_crops(np.asarray(chips.chips[test]), SIZE), training=False))
    truth = get_scheme(8).assign(df["age"].to_numpy(dtype=float)[chips.rows][test])
    assert m["test"]["metrics"]["accuracy"] == pytest.approx(float((proba.argmax(1) == truth).mean()), abs=1e-12)
    lo, hi = m["test"]["metrics"]["accuracy_ci95"]
    assert lo < m["test"]["metrics"]["accuracy"] < hi
    assert cfg["chips"]["side"] == 72 and cfg["params"] > 100_000 and (d / "confusion.png").is_file()


def test_an_interrupted_cnn_resumes_to_the_uninterrupted_numbers(trained, sample_manifest, monkeypatch, tmp_path):
    from featlab.heads.cnntrain import RESUME, train_cnn

    root, feats, d = trained
    out = tmp_path / "results"
    monkeypatch.setenv("FEATLAB_KILL_AT", "cnn-epoch:1")
    old = signal.signal(signal.SIGINT, signal.default_int_handler)  # a shell may have left SIGINT ignored
    try:
        with pytest.raises(KeyboardInterrupt):
            train_cnn(sample_manifest, "bins", 8, size=SIZE, epochs=2, out_root=out, features_root=feats, verbose=0)
    finally:
        signal.signal(signal.SIGINT, old)
    assert not list(out.glob("cnn/*/*/*/bins8/metrics.json"))  # nothing half-written in place
    assert len(list((out / RESUME).glob("*/epoch-0001/done"))) == 1
    monkeypatch.delenv("FEATLAB_KILL_AT")
    again = train_cnn(sample_manifest, "bins", 8, size=SIZE, epochs=2, out_root=out, features_root=feats, verbose=0)
    assert (again / "faces.csv").read_bytes() == (d / "faces.csv").read_bytes()
    a, b = (json.loads((x / "metrics.json").read_text()) for x in (again, d))
    assert a["test"]["metrics"] == b["test"]["metrics"] and a["val"]["metrics"] == b["val"]["metrics"]
    assert a["config"]["training"]["resumed_at_epoch"] == 1 and not (out / RESUME).exists()


def test_ten_crops_are_the_corners_and_centre_mirrored():
    from featlab.heads.cnn import center_crops, ten_crops

    chip = np.arange(10 * 10 * 3, dtype=np.uint8).reshape(1, 10, 10, 3)
    views = ten_crops(chip, 8)
    assert len(views) == 10
    assert np.array_equal(views[0][0], chip[0, :8, :8]) and np.array_equal(views[7][0], chip[0, 2:, 2:, :][:, ::-1])
    assert np.array_equal(views[8], center_crops(chip, 8)) and np.array_equal(views[9][0], views[8][0][:, ::-1])


def test_lrp_of_the_cnn_matches_keras_and_conserves_through_the_convolutions(trained):
    from featlab.features.pixels import load_chips
    from featlab.heads.cnn import center_crops, load_cnn
    from featlab.report.cnnlrp import CNNExplainer

    root, feats, d = trained
    model, cfg = load_cnn(d)
    chips = load_chips(cfg["manifest"], side=cfg["chips"]["side"], root=feats, verbose=False)
    x = center_crops(np.asarray(chips.chips[:6]), SIZE)
    keras_out = np.asarray(model(x, training=False), dtype=np.float64)
    e = CNNExplainer([d])
    assert np.abs(e.predict(x)[0] - keras_out).max() < 1e-5
    r = e.explain(x, [keras_out.argmax(1)])
    assert r["maps"].shape == (6, 1, SIZE, SIZE)
    # z+ and flat conserve layer by layer: what reaches the input is what left the dense layers
    assert np.allclose(r["input_sum"], r["tap_sum"], rtol=1e-4)  # stabilisers and units with no positive input
    assert np.allclose(r["layers"]["conv1"][:, 0] * r["output"][:, 0], r["tap_sum"][:, 0], rtol=1e-4)


def test_explain_runs_lrp_on_the_cnn_and_reports_its_conservation(trained, tmp_path, capsys):
    root, feats, d = trained
    imgs = sorted(SAMPLE.glob("*.jpg"))[:2]
    rc = main(["explain", *map(str, imgs), "--head", str(d), "--method", "lrp", "-o", str(tmp_path / "x")])
    assert rc in (0, None)
    s = json.loads((tmp_path / "x" / "explain_summary.json").read_text())
    cons = s["methods"]["lrp"][f"levi-hassner-{SIZE} bins8"]["conservation"]
    assert 0 <= cons["median_relative_error"] < 0.2 and s["backbone"] == "cnn"
    assert "median relative error" in capsys.readouterr().out


@pytest.mark.parametrize("args, says", [
    (["--arch", "mobilenetv2", "--weights", "/no/such/weights.h5"], "featlab downloads nothing"),
    (["--arch", "resnet5O"], "unknown --arch"),
    (["--size", "40"], "at least 63 px"),
    (["--predict", "all"], "--predict must be"),
])
def test_bad_cnn_options_are_one_line_before_tensorflow(sample_manifest, args, says, capsys):
    import sys

    before = "tensorflow" in sys.modules
    rc = main(["train-cnn", "-m", str(sample_manifest), "--target", "gender", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and says in err and len(err.splitlines()) == 1
    assert ("tensorflow" in sys.modules) == before


def test_every_listed_application_exists():
    from featlab.heads.cnn import APPLICATIONS
    from featlab.heads.keras_env import keras

    missing = [a for a in APPLICATIONS if not hasattr(keras().applications, a)]
    assert not missing


@pytest.mark.slow
def test_a_mobilenetv2_trains_through_the_same_command(sample_manifest, tmp_path):
    from featlab.heads.cnntrain import train_cnn

    d = train_cnn(sample_manifest, "gender", size=32, arch="mobilenetv2", epochs=1, out_root=tmp_path / "r",
                  features_root=tmp_path / "f", verbose=0)
    m = json.loads((d / "metrics.json").read_text())
    assert d.parent.name == "mobilenetv2-32" and m["config"]["arch"] == "MobileNetV2"
    assert m["test"]["n"] == _split_counts(sample_manifest)["test"] and 0 <= m["test"]["metrics"]["accuracy"] <= 1


# ------------------------------------------------------------------------------------ compare (records by hand)
def _record(d: Path, values: dict, val: float, kind: str, identity: dict, head_key: str):
    d.mkdir(parents=True, exist_ok=True)
    rows = [{"image_id": f"img{i:04d}", "split": s, "group": f"p{i // 2}", "accuracy": v}
            for s, vals in values.items() for i, v in enumerate(vals)]
    pd.DataFrame(rows).to_csv(d / "faces.csv", index=False)
    mean = {s: {"accuracy": float(np.mean(v))} for s, v in values.items()}
    (d / "metrics.json").write_text(json.dumps({
        "kind": kind, "feature_set": identity, "head_key": head_key, "val": {"n": len(values["val"]),
        "metrics": {**mean["val"], "accuracy": val}}, "test": {"n": len(values["test"]), "metrics": mean["test"]},
        "config": {}}))


def test_compare_puts_the_cnn_beside_the_heads_as_a_reference(tmp_path):
    from featlab.paths import cnn_dir
    from featlab.report.compare import compare

    sha = "ab" * 32
    ident = {"backbone": "mystery", "model_sha256": "0" * 64, "manifest_sha256": sha}
    rng = np.random.default_rng(0)
    n = 200
    root = tmp_path / "results"
    best = (rng.random(n) < 0.7).astype(float)
    _record(root / "mystery" / "ds" / "a" / "gender", {"val": best[:50], "test": best}, 0.80, "head", ident, "a")
    _record(root / "mystery" / "ds" / "b" / "gender", {"val": best[:50], "test": best}, 0.60, "head", ident, "b")
    cnn = (rng.random(n) < 0.9).astype(float)
    c = cnn_dir("ds", sha, "levi-hassner-64", "gender", out_root=root)
    _record(c, {"val": cnn[:50], "test": cnn}, 0.95, "cnn", {}, "levi-hassner-64")  # best on val: still never chosen
    other = cnn_dir("ds", "cd" * 32, "levi-hassner-64", "gender", out_root=root)  # another manifest: not found
    _record(other, {"val": cnn[:50], "test": cnn}, 0.99, "cnn", {}, "levi-hassner-64")
    r = compare("mystery", "ds", "gender", None, results_root=root)
    assert r["chosen"] == "a"
    rows = [x for x in r["rows"] if x["reader"].startswith("cnn")]
    assert len(rows) == 1 and rows[0]["family"] == "references" and not rows[0]["chosen"]
    assert rows[0]["diff_vs_best"] == pytest.approx(cnn.mean() - best.mean())  # paired on the same faces
    assert rows[0]["verdict"] == "better" and r["summary"]["families"]["references"] == ["cnn levi-hassner-64"]
    # a CNN of this manifest that scored other test faces stops the comparison with one line
    _record(cnn_dir("ds", sha, "mobilenetv2-96", "gender", out_root=root), {"val": cnn[:50], "test": cnn[:150]},
            0.5, "cnn", {}, "mobilenetv2-96")
    with pytest.raises(FeatlabError, match="scored different test faces"):
        compare("mystery", "ds", "gender", None, results_root=root)


def test_a_spec_cnn_section_trains_each_target_once(sample_manifest, tmp_path, monkeypatch):
    from featlab.study.experiment import cnn_step

    monkeypatch.chdir(tmp_path)  # results/ and features/ of the working directory, as `featlab run` uses them
    spec = {"name": "s", "seed": 0, "cnn": {"size": SIZE, "epochs": 1}}
    said = []
    first = cnn_step(spec, sample_manifest, [{"target": "gender", "cats": None}], False, said.append)
    again = cnn_step(spec, sample_manifest, [{"target": "gender", "cats": None}], False, said.append)
    assert first == again and first[0].name == "gender" and first[0].parent.name == f"levi-hassner-{SIZE}"
    assert said[-1].endswith(": done") and json.loads((first[0] / "config.json").read_text())["training"]["epochs_run"] == 1
    # another spec whose manifest has the same bytes (utkface-two-networks and utkface-dlib-rec) uses that CNN:
    # nothing is trained again
    import featlab.study.workflow

    twin = tmp_path / "twin.csv"
    twin.write_bytes(sample_manifest.read_bytes())
    monkeypatch.setattr(featlab.study.workflow, "train_cnn", lambda *a, **k: pytest.fail("trained again"))
    used = cnn_step({**spec, "name": "twin"}, twin, [{"target": "gender", "cats": None}], False, said.append)
    assert used == first and said[-1].endswith("(trained on the same manifest bytes)")
    twin.write_bytes(sample_manifest.read_bytes() + b"\n")  # other bytes: not the same CNN
    with pytest.raises(pytest.fail.Exception, match="trained again"):
        cnn_step({**spec, "name": "twin"}, twin, [{"target": "gender", "cats": None}], False, said.append)


def test_the_fold_protocol_trains_one_cnn_per_fold_and_summarises_them(sample_manifest, tmp_path):
    """--folds all (Adience's protocol) on the sample cut into 3 folds: one CNN per fold, then every fold's test
    faces together in the summary compare reads."""
    from featlab.data.manifest import read_manifest, write_manifest
    from featlab.study.workflow import train_cnn

    df = read_manifest(sample_manifest)
    df["split"] = ""
    df["fold"] = np.arange(len(df)) % 3
    folds = write_manifest(df, tmp_path / "folds.csv")
    d = train_cnn(folds, "gender", None, fold="all", size=SIZE, epochs=1, out_root=tmp_path / "r",
                  features_root=tmp_path / "f", verbose=0)
    m = json.loads((d / "metrics.json").read_text())
    per = [json.loads((d / f"fold{k}" / "metrics.json").read_text())["test"] for k in range(3)]
    assert m["kind"] == "folds" and m["folds"] == [0, 1, 2] and m["test"]["n"] == len(df) == sum(p["n"] for p in per)
    hits = sum(p["metrics"]["accuracy"] * p["n"] for p in per)
    assert m["test"]["metrics"]["accuracy"] == pytest.approx(hits / len(df))


def test_compare_of_two_networks_tests_the_cnn_against_each_choice(tmp_path):
    from featlab.paths import cnn_dir
    from featlab.report.crossnet import compare_networks

    sha = "ab" * 32
    rng = np.random.default_rng(1)
    n = 200
    root = tmp_path / "results"
    hits = {}
    for net, p in (("neta", 0.7), ("netb", 0.75)):
        ident = {"backbone": net, "model_sha256": net[-1] * 64, "manifest_sha256": sha}
        hits[net] = (rng.random(n) < p).astype(float)
        _record(root / net / "ds" / "t1" / "gender", {"val": hits[net][:50], "test": hits[net]}, 0.8, "head", ident, "t1")
    cnn = (rng.random(n) < 0.6).astype(float)
    _record(cnn_dir("ds", sha, "levi-hassner-64", "gender", out_root=root), {"val": cnn[:50], "test": cnn}, 0.99,
            "cnn", {}, "levi-hassner-64")
    r = compare_networks(["neta", "netb"], ["ds"], "gender", None, results_root=root)
    row = next(x for x in r["rows"] if x["network"] == "cnn")
    assert row["tap"] == "levi-hassner-64" and not row["chosen_in_network"]
    pairs = {(t["first"], t["second"]): t for t in r["tests"]}
    t = pairs[("neta:t1", "cnn:levi-hassner-64")]
    assert t["accuracy_diff"] == pytest.approx(cnn.mean() - hits["neta"].mean())  # second minus first, same faces
    assert set(r["choices"]) == {"neta", "netb"}  # never a network's choice
