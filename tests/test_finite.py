"""float16 that cannot lie: no inf or nan ever reaches a features file, and readers can refuse them.

The backbone here is a tiny ONNX graph used as a ``dlib-age`` model file
(``--model``): each tap multiplies the normalised input by a constant, so its
exact values are known from the chips alone. ``loud`` (x 2**17) exceeds
float16's 65,504 wherever a pixel is bright; ``calm`` (x 1) never does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from featlab.errors import FeatlabError
from featlab.features.extract import extract
from featlab.data.manifest import read_manifest, write_manifest
from featlab.features.store import FeatureStore

LOUD = np.float32(2.0**17)


def _scale_model(path: Path, scales: dict[str, float], sqrt_of_negative: str | None = None) -> Path:
    """A graph with one ``Mul`` tap per entry (named as the key); ``sqrt_of_negative``: also a tap that is
    sqrt(x - 10), nan for every input (a backbone that itself produces non-finite values)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, outs = [], [], []
    for name, k in scales.items():
        inits.append(numpy_helper.from_array(np.asarray(k, np.float32), f"{name}_k"))
        nodes.append(helper.make_node("Mul", ["data", f"{name}_k"], [f"{name}_out"], name=name))
        outs.append(f"{name}_out")
    if sqrt_of_negative:
        inits.append(numpy_helper.from_array(np.asarray(10.0, np.float32), "ten"))
        nodes.append(helper.make_node("Sub", ["data", "ten"], ["neg"], name="neg"))
        nodes.append(helper.make_node("Sqrt", ["neg"], ["sick_out"], name=sqrt_of_negative))
        outs.append("sick_out")
    g = helper.make_graph(nodes, "scales", [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 64, 64])],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["N", 3, 64, 64]) for o in outs],
                          initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8  # readable by onnxruntime >= 1.10
    onnx.save(m, str(path))
    return path


def _expected(paths: list[str], k: np.float32) -> np.ndarray:
    """The tap computed independently in NumPy from the chips: (chip - dlib mean) / 256 * k, NCHW, float32."""
    from featlab.backbones.registry import DLIB_MEAN
    from featlab.data.faces import Geometry, prepare_many

    chips = np.stack([c for c, _ in prepare_many(paths, Geometry("dlib-chip", 64, 0.2), False)])
    x = (chips.astype(np.float32) - np.asarray(DLIB_MEAN, np.float32)) * np.float32(1 / 256)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) * k


def _all_finite(path: Path) -> None:
    with FeatureStore.open_read(path) as s:
        for key in s.keys():
            assert s.count_nonfinite(key) == (0, None), key
            assert s.array(key).nrows == s.nrows


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return _scale_model(tmp_path_factory.mktemp("onnx") / "scales.onnx", {"calm": 1.0, "loud": LOUD}, "sick")


@pytest.fixture(scope="module")
def faces8(utk_manifest, tmp_path_factory) -> Path:
    df = read_manifest(utk_manifest).iloc[:8]
    return write_manifest(df, tmp_path_factory.mktemp("m") / "faces8.csv")


def test_float16_overflow_stops_naming_the_tap_and_float32_is_exact(model, faces8, tmp_path, capsys):
    paths = read_manifest(faces8)["path"].tolist()
    want = _expected(paths, LOUD)
    assert np.abs(want).max() > 65504 and np.abs(want[:4]).max() > 65504  # real faces overflow at the first batch
    out = tmp_path / "f16.h5"
    with pytest.raises(FeatlabError) as e:
        extract(faces8, ["calm", "loud"], backbone="dlib-age", model=model, out=out, batch_size=4, progress=False)
    msg = str(e.value)
    assert "tap loud overflows float16" in msg and "--dtype float32" in msg and "\n" not in msg
    assert "calm" not in msg
    _all_finite(out)
    with FeatureStore.open_read(out) as s:
        assert s.nrows == 0  # the first batch overflowed: nothing of it is stored

    # as told: --dtype float32 (same file: its float16 arrays are still empty, so they are made again)
    rep = extract(faces8, ["calm", "loud"], backbone="dlib-age", model=model, out=out, batch_size=4, dtype="float32",
                  progress=False)
    assert rep.rows_total == 8
    with FeatureStore.open_read(out) as s:
        assert s.array("loud").atom.dtype == np.float32
        np.testing.assert_array_equal(s.read("loud"), want)  # exact, beyond float16's range
        np.testing.assert_array_equal(s.read("calm"), want / LOUD)
        assert {k: (t["nonfinite"], t["checked_rows"]) for k, t in s.tap_info().items()} == {"calm": (0, 8), "loud": (0, 8)}
        s.check_finite("loud")
        s.check_finite("loud", scan=True)
    from featlab.cli import main

    assert main(["info", str(out)]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "tap loud" in ln]
    assert len(lines) == 1 and lines[0].rstrip().endswith("nonfinite 0")


def test_float16_overflow_of_the_flip_mean_is_caught_after_the_numpy_cast(model, faces8, tmp_path, capsys):
    """With --flip, chip and mirror are averaged in float32 and cast to float16 by the store, not the graph.
    From the CLI: one line, exit status 2."""
    import re

    from featlab.cli import main

    out = tmp_path / "flip.h5"
    rc = main(["extract", "-m", str(faces8), "-b", "dlib-age", "--model", str(model), "-l", "loud", "-o", str(out),
               "--flip", "--batch-size", "4", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "Traceback" not in err
    assert re.search(r"tap loud overflows float16 .*largest \|x\| [\d,]+.*--dtype float32", " ".join(err.split()))
    _all_finite(out)


def test_an_overflow_in_a_later_batch_keeps_the_earlier_rows(model, tmp_path):
    """Grey faces fit float16, white ones overflow: the batches before the white ones stay, valid and resumable."""
    from PIL import Image

    rows = []
    for i, (name, v) in enumerate([("grey", 128)] * 4 + [("white", 255)] * 4 + [("grey", 128)] * 4):
        p = tmp_path / f"{name}{i:02d}.png"
        Image.new("RGB", (120, 120), (v, v, v)).save(p)
        rows.append({"image_id": f"{i:016d}", "path": str(p), "age": 30.0, "gender": "f", "race": "", "split": "train",
                     "fold": None, "source": "test"})
    from featlab.data.manifest import to_frame

    df = to_frame(rows)
    m = write_manifest(df, tmp_path / "grey.csv")
    out = tmp_path / "grey.h5"
    with pytest.raises(FeatlabError) as e:
        extract(m, ["loud"], backbone="dlib-age", model=model, out=out, batch_size=4, progress=False)
    msg = str(e.value)
    assert "tap loud overflows float16" in msg and f"first image {4:016d} (row 4)" in msg and "new --out" in msg
    _all_finite(out)
    grey_first = df["path"].iloc[:4].tolist()
    with FeatureStore.open_read(out) as s:
        assert list(s.labels()["image_id"]) == [f"{i:016d}" for i in range(4)]
        np.testing.assert_array_equal(s.read("loud"), _expected(grey_first, LOUD).astype(np.float16).astype(np.float32))
    # resume without the white faces: the file goes on from row 4
    keep = write_manifest(df.drop(index=range(4, 8)), tmp_path / "grey.csv")
    rep = extract(keep, ["loud"], backbone="dlib-age", model=model, out=out, batch_size=4, progress=False)
    assert rep.rows_before == 4 and rep.rows_added == 4 and rep.rows_total == 8
    _all_finite(out)


def test_a_tap_added_to_a_file_is_checked_too(model, faces8, tmp_path):
    """Adding a tap fills the rows already stored (FeatureStore.fill): an overflow there stops too, and the
    float32 rerun the message asks for works in the same file."""
    out = tmp_path / "add.h5"
    extract(faces8, ["calm"], backbone="dlib-age", model=model, out=out, batch_size=4, progress=False)
    with pytest.raises(FeatlabError, match="tap loud overflows float16"):
        extract(faces8, ["loud"], backbone="dlib-age", model=model, out=out, batch_size=4, progress=False)
    with FeatureStore.open_read(out) as s:
        assert s.nrows == 8 and s.array("loud").nrows == 0 and s.count_nonfinite("calm") == (0, None)
    rep = extract(faces8, ["loud"], backbone="dlib-age", model=model, out=out, batch_size=4, dtype="float32",
                  progress=False)
    assert rep.filled == {"loud": 8} and rep.rows_added == 0
    with FeatureStore.open_read(out) as s:
        assert s.array("loud").atom.dtype == np.float32 and s.array("calm").atom.dtype == np.float16
        np.testing.assert_array_equal(s.read("loud"), _expected(read_manifest(faces8)["path"].tolist(), LOUD))
    _all_finite(out)


def test_non_finite_values_from_the_backbone_stop_the_run(model, faces8, tmp_path):
    out = tmp_path / "nan.h5"
    with pytest.raises(FeatlabError) as e:
        extract(faces8, ["calm", "sick"], backbone="dlib-age", model=model, out=out, dtype="float32", batch_size=4,
                progress=False)
    msg = str(e.value)
    assert "backbone gives non-finite values (nan/inf) in tap sick" in msg and "\n" not in msg
    assert "49,152 values in 4 of 4 faces" in msg  # 3 x 64 x 64 per face, every one nan
    _all_finite(out)


def _store_with(path: Path, x: np.ndarray, key: str = "t") -> None:
    """A features file holding ``x`` under ``key`` (written through the store: finite values only)."""
    with FeatureStore.open_for_append(path, {"backbone": "test"}) as s:
        s.ensure_array(key, x.shape[1:], dtype="float16")
        labels = [(f"{i:016d}".encode(), b"/x.png", np.float32(20), b"m", b"", b"train", np.int8(-1), b"",
                   np.float32(20), np.float32(20)) for i in range(len(x))]
        s.append({key: x}, labels)


def test_check_finite_names_the_tap_and_first_bad_row(tmp_path):
    path = tmp_path / "old.h5"
    x = np.random.default_rng(0).normal(size=(300, 5, 4)).astype(np.float16)
    _store_with(path, x)
    with FeatureStore.open_for_append(path, {"backbone": "test"}) as s:
        with pytest.raises(FeatlabError, match="overflows float16"):  # the store itself refuses to write inf
            s.append({"t": np.full((1, 5, 4), 1e6, np.float32)}, [(b"x" * 16, b"", 0, b"", b"", b"", -1, b"", 0, 0)])
        assert s.nrows == 300 and s.array("t").nrows == 300
    # an older featlab wrote inf and nan without looking (and recorded no count): write them behind the store
    import tables

    with tables.open_file(str(path), "a") as h5:
        a = h5.root.taps.t
        a[217, 1, 2], a[217, 0, 0], a[250, 4, 3] = np.inf, -np.inf, np.nan
        import json

        info = json.loads(h5.root._v_attrs["taps"])
        for k in ("nonfinite", "checked_rows"):
            del info["t"][k]
        h5.root._v_attrs["taps"] = json.dumps(info)
    with FeatureStore.open_read(path) as s:
        assert s.count_nonfinite("t") == (3, 217)
        assert s.count_nonfinite("t", slice(218, 300)) == (1, 250)
        assert s.count_nonfinite("t", np.array([5, 250, 3])) == (1, 250)
        s.check_finite("t", rows=np.arange(217))  # rows before the first bad one are fine
        with pytest.raises(FeatlabError) as e:
            s.check_finite("t", rows=np.array([10, 250, 217]))
        msg = str(e.value)
        assert msg.startswith(f"{path}: tap t holds 3 non-finite values (inf/nan), first in row 217 (image {217:016d})")
    # reopening it for append counts the rows no check has seen, records the count, and refuses to go on
    with pytest.raises(FeatlabError, match=r"already holds 3 non-finite values .* tap t, first in row 217"):
        FeatureStore.open_for_append(path, {"backbone": "test"})
    with FeatureStore.open_read(path) as s:
        assert s.tap_info()["t"]["nonfinite"] == 3 and s.tap_info()["t"]["checked_rows"] == 300
        with pytest.raises(FeatlabError, match="first in row 217"):
            s.check_finite("t")  # the record says 3: not trusted as clean


def test_check_finite_trusts_only_rows_extraction_counted(tmp_path):
    path = tmp_path / "ok.h5"
    _store_with(path, np.ones((40, 3), np.float16))
    import tables

    with tables.open_file(str(path), "a") as h5:  # rows appended behind the store's back: not counted
        h5.root.taps.t.append(np.full((1, 3), np.nan, np.float16))
    with FeatureStore.open_read(path) as s:
        s.check_finite("t", rows=slice(0, 40))  # counted at write: no read needed
        with pytest.raises(FeatlabError, match="first in row 40"):
            s.check_finite("t")  # row 40 was never counted: read, and refused


def test_info_says_when_a_file_was_never_checked(tmp_path, capsys):
    path = tmp_path / "old.h5"
    _store_with(path, np.ones((12, 3), np.float16))
    import json

    import tables

    with tables.open_file(str(path), "a") as h5:
        info = json.loads(h5.root._v_attrs["taps"])
        info["t"] = {k: v for k, v in info["t"].items() if k not in ("nonfinite", "checked_rows")}
        h5.root._v_attrs["taps"] = json.dumps(info)
    from featlab.cli import main

    assert main(["info", str(path)]) == 0
    assert "nonfinite ? (12 rows unchecked)" in capsys.readouterr().out
    with FeatureStore.open_for_append(path, {"backbone": "test"}) as s:  # counted once when reopened
        assert (s.tap_info()["t"]["nonfinite"], s.tap_info()["t"]["checked_rows"]) == (0, 12)
