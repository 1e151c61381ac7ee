"""Backbone descriptors (featlab.backbones.descriptor): a random-weight MobileNet-style graph of another family than
featlab's built-ins, described by TOML only, lists the planted taps (by name pattern, by op, by name) and
extracts exactly what onnxruntime computes on those nodes; relative depths follow the graph; a descriptor
that does not fit its model file is one line and exit status 2."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from featlab.backbones import registry as backbones
from featlab.cli import main
from featlab.errors import FeatlabError

SIZE = 32
MEAN = [104.0, 117.0, 123.0]  # in the network's (BGR) channel order
STD = [57.0, 58.0, 59.0]


def mobilenet(path: Path, seed: int = 0) -> Path:
    """stem conv (stride 2) + Relu; two depthwise-separable blocks (dw conv + PRelu, pw conv + Relu);
    global average pool; Gemm to a 10-d output. Random weights, NCHW input ``img`` of 3x32x32."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def w(name, *shape):
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name))
        return name

    def conv(name, x, cin, cout, k, stride, group=1):
        nodes.append(helper.make_node("Conv", [x, w(f"{name}_w", cout, cin // group, k, k), w(f"{name}_b", cout)],
                                      [name], name=name, kernel_shape=[k, k], strides=[stride, stride],
                                      pads=[k // 2] * 4, group=group))
        return name

    def act(op, name, x, ch):
        ins = [x] + ([w(f"{name}_slope", ch, 1, 1)] if op == "PRelu" else [])
        nodes.append(helper.make_node(op, ins, [name], name=name))
        return name

    x = act("Relu", "stem_act", conv("stem", "img", 3, 8, 3, 2), 8)
    x = act("PRelu", "b1_dw_act", conv("b1_dw", x, 8, 8, 3, 1, group=8), 8)
    x = act("Relu", "b1_pw_act", conv("b1_pw", x, 8, 16, 1, 1), 16)
    x = act("PRelu", "b2_dw_act", conv("b2_dw", x, 16, 16, 3, 2, group=16), 16)
    x = act("Relu", "b2_pw_act", conv("b2_pw", x, 16, 32, 1, 1), 32)
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flat", axis=1))
    nodes.append(helper.make_node("Gemm", ["flat", w("fc_w", 10, 32), w("fc_b", 10)], ["emb"], name="fc", transB=1))
    graph = helper.make_graph(nodes, "mobilenet", [helper.make_tensor_value_info("img", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
                              [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def toml_of(d: dict) -> str:
    import json

    return "\n".join(f"{k} = {json.dumps(v)}" if not isinstance(v, dict)
                     else f"{k} = {{ {', '.join(f'{a} = {json.dumps(b)}' for a, b in v.items())} }}" for k, v in d.items()) + "\n"


@pytest.fixture
def net(tmp_path):
    return mobilenet(tmp_path / "mnet.onnx")


@pytest.fixture(autouse=True)
def _clean_registry():
    before = dict(backbones.REGISTRY)
    yield
    backbones.REGISTRY.clear()
    backbones.REGISTRY.update(before)


BASE = {"input_size": SIZE, "geometry": "resize", "color": "bgr", "mean": MEAN, "std": STD, "embedding": "emb"}


def describe(path: Path, **keys) -> Path:
    out = path.parent / f"{path.name}.toml"
    out.write_text(toml_of({**BASE, **keys}))
    return out


def test_taps_by_pattern_by_op_and_by_name(net):
    describe(net, tap_pattern=r"b\d+_pw_act", taps=["gap"], aliases={"last_block": "b2_pw_act"})
    bb = backbones.Backbone("mnet", net)  # MODEL.onnx.toml beside the model
    assert [t.name for t in bb.taps] == ["b1_pw_act", "b2_pw_act", "gap", "fc"]
    assert [t.shape for t in bb.taps] == [(16, 16, 16), (32, 8, 8), (32, 1, 1), (10,)]
    assert bb.tap("embedding").tensor == "emb" and bb.tap("last_block").name == "b2_pw_act"
    # depth: Conv/Gemm layers on the path over the 6 up to the embedding
    assert [t.depth for t in bb.taps] == pytest.approx([3 / 6, 5 / 6, 5 / 6, 1.0], abs=1e-4)

    describe(net, tap_ops=["PRelu"])
    backbones.REGISTRY.pop("mnet")
    bb = backbones.Backbone("mnet", net)
    assert [t.name for t in bb.taps] == ["b1_dw_act", "b2_dw_act", "fc"]
    assert [t.depth for t in bb.taps] == pytest.approx([2 / 6, 4 / 6, 1.0], abs=1e-4)
    assert bb.preprocessing()["color"] == "BGR"


def test_featlab_toml_descriptor_and_layers(net, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    table = toml_of({**BASE, "model": "mnet.onnx", "tap_ops": ["Relu", "PRelu"], "tap_pattern": r"b1_.*"})
    (tmp_path / "featlab.toml").write_text("[backbones.tiny]\n" + table)
    assert main(["layers", "--backbone", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "b1_dw_act" in out and "b1_pw_act" in out and "stem_act" not in out and "b2_pw_act" not in out
    assert "16x16x16" in out and "0.500" in out  # shape and depth of b1_pw_act


def _manifest(utk_dir: Path, out: Path, n: int = 6) -> Path:
    import pandas as pd

    from featlab.data.manifest import COLUMNS, write_manifest

    files = sorted(p for p in utk_dir.iterdir() if p.name.endswith(".jpg") and p.name.count("_") >= 3)[:n]
    rows = [{"image_id": f"utk/{p.name}", "path": str(p), "age": float(p.name.split("_")[0]), "gender": "m",
             "race": "", "split": ("train", "val", "test")[i % 3], "fold": pd.NA, "source": "utkface",
             "group": f"g{i}", "age_low": pd.NA, "age_high": pd.NA} for i, p in enumerate(files)]
    return write_manifest(pd.DataFrame(rows, columns=COLUMNS), out)


def test_extract_equals_onnxruntime_on_the_node(net, utk_dir, tmp_path):
    import onnx
    import onnxruntime as ort

    from featlab.features.extract import extract
    from featlab.data.faces import Geometry, prepare
    from featlab.features.store import FeatureStore

    describe(net, tap_pattern=r"b\d+_pw_act", tap_ops=["Relu"])
    manifest = _manifest(utk_dir, tmp_path / "m.csv")
    out = tmp_path / "f.h5"
    extract(manifest, ["b1_pw_act", "b2_pw_act@avg", "embedding"], backbone="mnet", model=str(net), out=out,
            dtype="float32", progress=False, batch_size=4)

    # independently: the chip, BGR, (x - mean) / std, NCHW, onnxruntime with the nodes exposed as outputs
    m = onnx.load(str(net))
    for t in ("b1_pw_act", "b2_pw_act"):
        m.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    with FeatureStore.open_read(out) as s:
        paths = list(s.labels()["path"])
        chips = np.stack([prepare(p, Geometry("resize", SIZE), False)[0] for p in paths]).astype(np.float32)
        x = ((chips[..., ::-1] - np.float32(MEAN)) / np.float32(STD)).transpose(0, 3, 1, 2)
        emb, b1, b2 = sess.run(["emb", "b1_pw_act", "b2_pw_act"], {"img": np.ascontiguousarray(x, np.float32)})
        assert len(paths) == 6
        np.testing.assert_allclose(s.read("b1_pw_act"), b1, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(s.read("b2_pw_act@avg"), b2.mean(axis=(2, 3)), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(s.read("embedding"), emb, rtol=1e-4, atol=1e-4)
        info = s.attrs["taps"]
        assert info["b1_pw_act"]["depth"] == pytest.approx(0.5) and info["embedding"]["depth"] == 1.0
        assert s.attrs["preprocessing"]["color"] == "BGR"


def _one_line(args, capsys):
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("featlab: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


@pytest.mark.parametrize("case", ["sha256", "pattern", "op", "input", "size", "key", "alias", "inputs"])
def test_a_descriptor_that_does_not_fit_is_one_line(case, net, tmp_path, capsys):
    keys = {"tap_pattern": r"b\d+_pw_act", "model": str(net)}
    sha = hashlib.sha256(net.read_bytes()).hexdigest()
    if case == "sha256":
        keys["sha256"] = ("0" if sha[0] != "0" else "1") + sha[1:]
    elif case == "pattern":
        keys["tap_pattern"] = r"conv_\d+_relu"
    elif case == "op":
        keys = {"tap_ops": ["Sigmoid"], "model": str(net)}
    elif case == "input":
        keys["input"] = "data"
    elif case == "size":
        keys["input_size"] = 112
    elif case == "key":
        keys["tap_patern"] = keys.pop("tap_pattern")
    elif case == "alias":
        keys["aliases"] = {"deep": "b9_pw_act"}
    else:  # an extra graph input that no node reads (as some exporters leave): refused unless repair = true
        import onnx

        m = onnx.load(str(net))
        m.graph.input.append(onnx.helper.make_tensor_value_info("unused_w", onnx.TensorProto.FLOAT, [4]))
        onnx.save(m, str(net))
    desc = tmp_path / "d.toml"
    desc.write_text(toml_of({**BASE, "name": "bad", **keys}))
    err = _one_line(["layers", "--descriptor", str(desc)], capsys)
    word = {"sha256": "sha256", "pattern": "matches no node", "op": "matches no node", "input": "no input 'data'",
            "size": "not input_size", "key": "did you mean 'tap_pattern'", "alias": "names no tap",
            "inputs": "repair = true"}[case]
    assert word in err, err
    if case == "inputs":  # ... and with repair = true it is taken, the same taps as before
        desc.write_text(toml_of({**BASE, "name": "fixed", **keys, "repair": True}))
        assert main(["layers", "--descriptor", str(desc)]) == 0
        assert "b2_pw_act" in capsys.readouterr().out


def test_unknown_backbone_says_how_to_describe_one():
    with pytest.raises(FeatlabError, match=r"unknown backbone 'nope'.*descriptor"):
        backbones.get_spec("nope")


def test_every_builtin_tap_has_a_depth_from_0_to_1():
    bb = backbones.Backbone("dlib-age")
    d = [t.depth for t in bb.taps]
    assert all(0.0 <= x <= 1.0 for x in d)
    res = [bb.tap(f"res{i}").depth for i in range(1, 6)]
    # residual unit k ends after the stem conv and 2 convs per unit: (1 + 2k) of the 12 up to the logits
    assert res == pytest.approx([(1 + 2 * k) / 12 for k in range(1, 6)], abs=1e-4)
    assert bb.tap("logits").depth == 1.0
