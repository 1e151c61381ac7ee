"""Tests for featlab.backbones.iresnet: random IResNet graphs in both export styles, and
tap resolution by structure checked against independent references."""

from __future__ import annotations

import re

import numpy as np
import pytest

import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from featlab.backbones import iresnet as ir
from featlab.backbones.taps import UnknownTap, expose_outputs, find_tap

WIDTHS = (8, 16, 32, 64)
SIZE = 32
SEED = 7


# -------------------------------------------------------------------- helpers


def _run(model, tensors, x):
    """Values of ``tensors`` for input ``x`` (one onnxruntime session)."""
    tensors = list(dict.fromkeys(tensors))
    m = expose_outputs(model, tensors)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    in_name = sess.get_inputs()[0].name
    return dict(zip(tensors, sess.run(tensors, {in_name: x})))


def _pixels(n=2, size=SIZE):
    return np.random.default_rng(123).uniform(0, 255, (n, 3, size, size)).astype(np.float32)


def _anonymise(model, seed=0):
    """A copy of ``model`` with every node, tensor and initializer renamed at random."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    names = set()
    for v in list(g.input) + list(g.output) + list(g.initializer):
        names.add(v.name)
    for n in g.node:
        names.update(i for i in n.input if i)
        names.update(n.output)
    order = sorted(names)
    perm = np.random.default_rng(seed).permutation(len(order))
    new = {name: f"x{int(p)}" for name, p in zip(order, perm)}
    for v in list(g.input) + list(g.output) + list(g.initializer):
        v.name = new[v.name]
    for k, n in enumerate(g.node):
        n.name = f"n{int(perm[k % len(perm)])}"
        for j, i in enumerate(n.input):
            if i:
                n.input[j] = new[i]
        for j, o in enumerate(n.output):
            n.output[j] = new[o]
    return m, new


def _mxnet_name(name: str, unit_index: dict[str, int]) -> str:
    """The node name the builder gives the tensor of canonical tap ``name``."""
    m = re.fullmatch(r"(stage\d+_unit\d+)_out", name)
    if m:
        return f"_plus{unit_index[m.group(1)]}"
    return name


def _unit_index(taps) -> dict[str, int]:
    units = [t.name[: -len("_out")] for t in taps if re.fullmatch(r"stage\d+_unit\d+_out", t.name)]
    return {u: k for k, u in enumerate(units)}


def _assert_close(a, b, what):
    scale = float(np.abs(b).max()) or 1.0
    err = float(np.abs(a - b).max())
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    assert err <= 1e-4 * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


# ------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """Depth 18 and 50, both styles, same seed; saved and loaded back."""
    d = tmp_path_factory.mktemp("iresnet")
    out = {}
    for depth in (18, 50):
        for style in ("mxnet", "pytorch"):
            path = d / f"r{depth}_{style}.onnx"
            ir.save(ir.build_iresnet(depth, style, widths=WIDTHS, input_size=SIZE, embedding=32, seed=SEED), path)
            out[depth, style] = onnx.load(str(path))
    return out


@pytest.fixture(scope="module")
def r100():
    return {
        style: ir.build_iresnet(100, style, widths=WIDTHS, input_size=SIZE, embedding=32, seed=SEED)
        for style in ("mxnet", "pytorch")
    }


# ---------------------------------------------------------------------- build


def test_builds_valid_graphs_with_dynamic_batch(graphs):
    for (depth, style), m in graphs.items():
        onnx.checker.check_model(m)
        dims = m.graph.input[0].type.tensor_type.shape.dim
        assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, SIZE, SIZE]
    # batch of 3 runs and gives a finite, non-degenerate embedding
    y = _run(graphs[50, "mxnet"], ["fc1"], _pixels(3))["fc1"]
    assert y.shape == (3, 32) and np.isfinite(y).all() and 0.1 < y.std() < 10


def test_same_seed_same_network_in_both_styles(graphs):
    x = _pixels()
    for depth in (18, 50):
        mx, pt = graphs[depth, "mxnet"], graphs[depth, "pytorch"]
        a = _run(mx, [mx.graph.output[0].name], x)[mx.graph.output[0].name]
        # PyTorch exports take (x - 127.5) / 127.5, as InsightFace feeds them
        b = _run(pt, [pt.graph.output[0].name], (x - 127.5) / 127.5)[pt.graph.output[0].name]
        _assert_close(b, a, f"R{depth} embedding")
        np.testing.assert_allclose(ir.normalise_input(x), (x - 127.5) / 127.5, rtol=1e-6, atol=1e-7)
    other = ir.build_iresnet(18, "mxnet", widths=WIDTHS, input_size=SIZE, embedding=32, seed=SEED + 1)
    c = _run(other, ["fc1"], x)["fc1"]
    assert not np.allclose(c, _run(graphs[18, "mxnet"], ["fc1"], x)["fc1"])


def test_pytorch_style_is_anonymous_and_folded(graphs):
    m = graphs[50, "pytorch"]
    names = [n.name for n in m.graph.node] + [o for n in m.graph.node for o in n.output]
    assert not [n for n in names if re.search(r"stage|unit|conv|bn|relu|fc", n)]
    ops = [n.op_type for n in m.graph.node]
    assert "Sub" not in ops and "Mul" not in ops
    # only the BNs that do not follow a conv remain: one per unit (bn1), head bn1, fc1
    assert ops.count("BatchNormalization") == sum(ir.UNITS[50]) + 2


def test_build_is_fast_and_rejects_bad_arguments():
    import time

    t = time.perf_counter()
    ir.build_iresnet(100, "pytorch", widths=WIDTHS, input_size=112)
    assert time.perf_counter() - t < 3
    with pytest.raises(ValueError, match="depth"):
        ir.build_iresnet(101)
    with pytest.raises(ValueError, match="style"):
        ir.build_iresnet(18, "caffe")
    with pytest.raises(ValueError, match="multiple of 16"):
        ir.build_iresnet(18, input_size=100)


# ----------------------------------------------------------------------- taps


@pytest.mark.parametrize("depth", [18, 50])
def test_mxnet_taps_match_named_nodes(graphs, depth):
    """Resolve on an anonymised copy; every tap's values equal the named node's."""
    named = graphs[depth, "mxnet"]
    taps = ir.resolve_taps(named)
    uidx = _unit_index(taps)
    # on the named graph, the structure finds exactly the builder's tensors
    for t in taps:
        assert t.tensor == _mxnet_name(t.name, uidx), t.name
        assert not t.note
    anon, rename = _anonymise(named)
    anon_taps = ir.resolve_taps(anon)
    assert [(t.name, t.aliases, t.shape, t.index) for t in anon_taps] == [
        (t.name, t.aliases, t.shape, t.index) for t in taps
    ]
    x = _pixels()
    got = _run(anon, [t.tensor for t in anon_taps], x)
    ref = _run(named, [_mxnet_name(t.name, uidx) for t in taps], x)
    for t in anon_taps:
        a, b = got[t.tensor], ref[_mxnet_name(t.name, uidx)]
        assert a.shape[1:] == t.shape, t.name
        np.testing.assert_array_equal(a, b, err_msg=t.name)


@pytest.mark.parametrize("depth", [18, 50])
def test_pytorch_taps_match_mxnet_graph(graphs, depth):
    """Folded graph, normalised input vs the MXNet graph of the same seed, raw input."""
    mx, pt = graphs[depth, "mxnet"], graphs[depth, "pytorch"]
    mx_taps, pt_taps = ir.resolve_taps(mx), ir.resolve_taps(pt)
    uidx = _unit_index(mx_taps)
    x = _pixels()
    got = _run(pt, [t.tensor for t in pt_taps], ir.normalise_input(x))
    ref = _run(mx, [t.tensor for t in mx_taps], x)
    n_folded = 0
    for t in pt_taps:
        for name in (t.name,) + t.aliases:
            m = find_tap(mx_taps, name)
            if t.note:  # a conv with its BN folded in: compare with the MXNet BN
                bn = next(a for a in t.aliases if not a.startswith("add"))
                assert f"equals {bn} of the MXNet graph" in t.note and "folded" in t.note
                m = find_tap(mx_taps, bn)
                n_folded += name == t.name
            assert m.shape == t.shape, name
            _assert_close(got[t.tensor], ref[m.tensor], f"R{depth} {name}")
    # bn0, and bn2 + bn3 per unit, and sc per stage are folded
    assert n_folded == 1 + 2 * sum(ir.UNITS[depth]) + 4
    assert find_tap(pt_taps, "stage2_unit1_bn2").name == "stage2_unit1_conv1"
    assert find_tap(pt_taps, "bn0").tensor == find_tap(pt_taps, "conv0").tensor
    assert find_tap(pt_taps, "stage3_unit1_sc").name == "stage3_unit1_conv1sc"
    # mxnet conv1 is the conv before its BN: a different tensor from the folded one
    assert find_tap(mx_taps, "stage2_unit1_conv1").tensor == "stage2_unit1_conv1"
    assert _mxnet_name("stage2_unit1_out", uidx) == find_tap(mx_taps, "stage2_unit1_out").tensor


def test_tap_order_and_names_r18(graphs):
    taps = ir.resolve_taps(graphs[18, "mxnet"])
    assert [t.index for t in taps] == list(range(len(taps)))
    units = [t.name[:-4] for t in taps if t.name.endswith("_out")]
    assert units == [f"stage{s}_unit{u}" for s in range(1, 5) for u in (1, 2)]
    names = [t.name for t in taps]
    assert names[:3] == ["conv0", "bn0", "relu0"]
    assert names[-3:] == ["bn1", "pre_fc1", "fc1"]
    assert names[3:13] == [
        f"stage1_unit1_{p}" for p in ("bn1", "conv1", "bn2", "relu1", "conv2", "bn3", "conv1sc", "sc", "out")
    ] + ["stage1_unit2_bn1"]
    assert find_tap(taps, "stage1_unit1_conv1").shape == (8, SIZE, SIZE)
    assert find_tap(taps, "stage1_unit1_out").shape == (8, SIZE // 2, SIZE // 2)
    assert find_tap(taps, "fc1").shape == (32,)


def test_r100_add_numbering(r100):
    for style, m in r100.items():
        taps = ir.resolve_taps(m)
        assert ir.describe_depth(m)["units"] == (3, 13, 30, 3)
        adds = [n for n in m.graph.node if n.op_type == "Add"]
        assert len(adds) == 49
        last_sum = find_tap(taps, "add_98")
        assert last_sum.name == "stage4_unit3_out" and last_sum.tensor == adds[-1].output[0]
        assert find_tap(taps, "add_99").name == "pre_fc1"
        assert find_tap(taps, "pre_fc1").tensor == next(n for n in m.graph.node if n.op_type == "Gemm").output[0]
        assert find_tap(taps, "add").name == "relu0"
        assert find_tap(taps, "add_1").name == "stage1_unit1_relu1"
        assert find_tap(taps, "add_2").name == "stage1_unit1_out"
        assert find_tap(taps, "add_3").name == "stage1_unit2_relu1"
        assert find_tap(taps, "add_97").name == "stage4_unit3_relu1"
        n_add = sum(a.startswith("add") for t in taps for a in t.aliases)
        assert n_add == 100
        assert find_tap(taps, "add_98").shape == (64, SIZE // 16, SIZE // 16)
        with pytest.raises(UnknownTap) as e:
            ir.resolve(taps, "add_200")
        msg = str(e.value)
        assert "add_200 is past the last addition" in msg and "99" in msg and "add_98" in msg
        assert "add_99 (pre_fc1)" in msg
        assert ir.resolve(taps, "add_98") is last_sum


def test_full_width_r100_shapes_at_112():
    m = ir.build_iresnet(100, "pytorch")
    taps = ir.resolve_taps(m)
    assert find_tap(taps, "stage3_unit15_conv1").shape == (256, 14, 14)
    assert find_tap(taps, "stage4_unit1_conv1").shape == (512, 14, 14)
    assert find_tap(taps, "add_98").shape == (512, 7, 7)
    assert find_tap(taps, "add_98").name == "stage4_unit3_out"
    assert find_tap(taps, "conv0").shape == (64, 112, 112)
    assert find_tap(taps, "fc1").shape == (512,)
    assert ir.describe_depth(m) == {
        "depth": 100, "units": (3, 13, 30, 3), "style": "folded", "normalises_input": False, "has_head": True,
    }


def test_dynamic_spatial_input_needs_input_size(graphs):
    m = onnx.ModelProto()
    m.CopyFrom(graphs[18, "pytorch"])
    dims = m.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    with pytest.raises(ValueError, match="input_size"):
        ir.resolve_taps(m)
    fixed = ir.resolve_taps(graphs[18, "pytorch"])
    assert ir.resolve_taps(m, input_size=SIZE) == fixed
    assert ir.resolve_taps(graphs[18, "pytorch"], input_size=SIZE) == fixed
    with pytest.raises(ValueError, match="does not match"):
        ir.resolve_taps(graphs[18, "pytorch"], input_size=112)


# ----------------------------------------------------------------- errors etc


def _tiny_graph(nodes, inits, out_shape):
    g = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, out_shape)],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_not_an_iresnet():
    w = np.ones((4, 3, 3, 3), np.float32)
    plain = _tiny_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"])],
        {"w": w}, ["N", 4, 8, 8],
    )
    with pytest.raises(ir.NotIResNet, match="PRelu") as e:
        ir.resolve_taps(plain)
    assert "\n" not in str(e.value) and str(e.value).startswith("not an IResNet graph")
    # stem is right, but no residual unit follows
    stem_only = _tiny_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("PRelu", ["c", "a"], ["p"]),
            helper.make_node("Conv", ["p", "w2"], ["c2"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c2"], ["r"]),
        ],
        {"w": w, "a": np.full((4, 1, 1), 0.25, np.float32), "w2": np.ones((4, 4, 3, 3), np.float32)},
        ["N", 4, 8, 8],
    )
    with pytest.raises(ir.NotIResNet, match="no residual unit"):
        ir.resolve_taps(stem_only)
    mlp = _tiny_graph([helper.make_node("Flatten", ["x"], ["f"])], {}, ["N", 192])
    with pytest.raises(ir.NotIResNet, match="should feed one Conv"):
        ir.resolve_taps(mlp)
    with pytest.raises(ValueError, match="not an IResNet"):
        ir.describe_depth(mlp)
    assert ir.normalises_input(mlp) is False


def test_unknown_tap_lists_near_names(graphs):
    taps = ir.resolve_taps(graphs[18, "pytorch"])
    with pytest.raises(UnknownTap, match="stage4_unit1_conv1"):
        ir.resolve(taps, "stage4_unit1_conv")
    with pytest.raises(UnknownTap, match="out of range"):
        ir.resolve(taps, 10_000)
    # R18: 17 additions (add .. add_16), then add_17 = pre_fc1
    assert ir.resolve(taps, "add_17").name == "pre_fc1"
    assert ir.resolve(taps, "add_16").name == "stage4_unit2_out"
    with pytest.raises(UnknownTap) as e:
        ir.resolve(taps, "add_18")
    assert str(e.value) == (
        "add_18 is past the last addition: this graph has 17 (add .. add_16) plus add_17 (pre_fc1)"
    )
    with pytest.raises(UnknownTap, match="nearest valid names"):
        find_tap(taps, "add_18")


def test_normalises_input_and_describe_depth(graphs):
    for depth in (18, 50):
        assert ir.normalises_input(graphs[depth, "mxnet"]) is True
        assert ir.normalises_input(graphs[depth, "pytorch"]) is False
    d = ir.describe_depth(graphs[50, "mxnet"])
    assert d == {"depth": 50, "units": (3, 4, 14, 3), "style": "unfolded", "normalises_input": True, "has_head": True}
    assert ir.describe_depth(graphs[18, "pytorch"])["style"] == "folded"
    # normalisation is found by structure, not by name
    anon, _ = _anonymise(graphs[18, "mxnet"])
    assert ir.normalises_input(anon) is True


def _replace_flatten_by_dynamic_reshape(m):
    """torch's ``x.view(x.size(0), -1)``: Shape -> Gather -> Unsqueeze -> Concat -> Reshape."""
    g = m.graph
    k = next(i for i, n in enumerate(g.node) if n.op_type == "Flatten")
    flat = g.node[k]
    x, y = flat.input[0], flat.output[0]
    new = [
        helper.make_node("Shape", [x], ["shp"]),
        helper.make_node("Gather", ["shp", "zero"], ["n0"], axis=0),
        helper.make_node("Unsqueeze", ["n0", "axes0"], ["n0u"]),
        helper.make_node("Concat", ["n0u", "minus1"], ["newshape"], axis=0),
        helper.make_node("Reshape", [x, "newshape"], [y]),
    ]
    g.initializer.extend([
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array([0], np.int64), "axes0"),
        numpy_helper.from_array(np.array([-1], np.int64), "minus1"),
    ])
    del g.node[k]
    for j, n in enumerate(new):
        g.node.insert(k + j, n)


def test_export_variants_resolve_the_same(graphs):
    """Dynamic flatten, Identity/Dropout in the flow, initializers listed as
    inputs (old MXNet exports), and an fc1 BN folded into the Gemm."""
    base = graphs[18, "pytorch"]
    ref = ir.resolve_taps(base)
    m = onnx.ModelProto()
    m.CopyFrom(base)
    _replace_flatten_by_dynamic_reshape(m)
    g = m.graph
    # Identity after relu0, Dropout after the head BN
    relu0 = find_tap(ref, "relu0").tensor
    bn1 = find_tap(ref, "bn1").tensor
    for src, op in ((relu0, "Identity"), (bn1, "Dropout")):
        for n in g.node:
            for j, i in enumerate(n.input):
                if i == src:
                    n.input[j] = src + "_pass"
        k = next(j for j, n in enumerate(g.node) if src in n.output)
        g.node.insert(k + 1, helper.make_node(op, [src], [src + "_pass"]))
    g.input.extend(
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in g.initializer
    )
    onnx.checker.check_model(m)
    taps = ir.resolve_taps(m)
    assert [(t.name, t.tensor, t.shape, t.aliases) for t in taps] == [
        (t.name, t.tensor, t.shape, t.aliases) for t in ref
    ]
    x = ir.normalise_input(_pixels())
    a = _run(m, [find_tap(taps, "fc1").tensor], x)
    b = _run(base, [find_tap(ref, "fc1").tensor], x)
    _assert_close(next(iter(a.values())), next(iter(b.values())), "fc1")

    # the embedding BN folded into the Gemm: fc1 becomes an alias of pre_fc1
    del g.node[-1]
    del g.output[:]
    g.output.append(helper.make_tensor_value_info(find_tap(ref, "pre_fc1").tensor, TensorProto.FLOAT, ["N", 32]))
    taps = ir.resolve_taps(m)
    assert taps[-1].name == "pre_fc1" and "fc1" in taps[-1].aliases and "folded" in taps[-1].note
    assert ir.resolve(taps, "add_17") is taps[-1]


def test_resolve_from_a_saved_file(tmp_path, graphs):
    path = tmp_path / "r18.onnx"
    ir.save(graphs[18, "mxnet"], path)
    assert ir.resolve_taps(path) == ir.resolve_taps(graphs[18, "mxnet"])
    assert ir.normalises_input(str(path)) is True
