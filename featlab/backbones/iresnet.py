"""InsightFace ArcFace IResNet backbones: random-weight ONNX graphs and their taps.

The features this project reproduces come from InsightFace's IResNet-100
(see ``docs/taps.md`` for the tap-name contract). Real models come as ONNX in
two export styles: MXNet-exported (named nodes, every BatchNorm kept, input
normalised inside the graph) and PyTorch-exported (anonymous nodes, each
BatchNorm that follows a convolution folded into it, input expected already
normalised). This module

* builds random-weight stand-ins of both styles (:func:`build_iresnet`,
  :func:`save`); for one seed both styles are the same network, so that
  ``pytorch_graph(normalised x) == mxnet_graph(raw x)``;
* resolves the tap names of ``docs/taps.md`` (``conv0`` ... ``stageS_unitU_*``
  ... ``add_K`` ... ``fc1``) on any IResNet graph from the structure of the
  graph alone, never from node names (:func:`resolve_taps`, :func:`resolve`);
* tells whether a graph normalises its input itself (:func:`normalises_input`)
  and which depth / export style it has (:func:`describe_depth`).
"""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from featlab.backbones.taps import TapInfo, UnknownTap, find_tap

__all__ = [
    "UNITS",
    "INPUT_MEAN",
    "INPUT_SCALE",
    "PYTORCH_INPUT_SCALE",
    "NotIResNet",
    "build_iresnet",
    "save",
    "resolve_taps",
    "resolve",
    "normalises_input",
    "normalise_input",
    "describe_depth",
]

#: residual units per stage for each depth
UNITS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3)}
#: the MXNet graphs compute (x - INPUT_MEAN) * INPUT_SCALE on raw 0..255 pixels
INPUT_MEAN = 127.5
INPUT_SCALE = 0.0078125  # 1 / 128
#: PyTorch exports expect (x - INPUT_MEAN) * PYTORCH_INPUT_SCALE (InsightFace's
#: own code feeds glintr100 / w600k_r50 (x - 127.5) / 127.5)
PYTORCH_INPUT_SCALE = 1.0 / 127.5
BN_EPS = 2e-5  # InsightFace's MXNet BatchNorm epsilon
OPSET = 17
IR_VERSION = 8

_PASSTHROUGH = {"Identity", "Dropout"}
_NORMALISING = {"Sub", "Mul", "Div", "Add"}


class NotIResNet(ValueError):
    """The graph does not have the IResNet structure (stem, residual units, head)."""


# --------------------------------------------------------------------------
# building random-weight graphs
# --------------------------------------------------------------------------


def _coverage(n_in: int, kernel: int, stride: int, pad: int) -> tuple[float, int]:
    """Mean fraction of a kernel's taps that fall inside the input (1-D), and n_out."""
    n_out = (n_in + 2 * pad - kernel) // stride + 1
    inside = 0
    for i in range(n_out):
        start = i * stride - pad
        inside += sum(1 for k in range(kernel) if 0 <= start + k < n_in)
    return inside / (n_out * kernel), n_out


class _Init:
    """Draws the weights of one network; tracks the activations' mean square so
    that BatchNorm running statistics keep every layer at unit scale."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def conv(self, c_out, c_in, k, m2, size, stride):
        """He-initialised weights; returns (W, m2 of the output, output size)."""
        fan_in = c_in * k * k
        w = self.rng.standard_normal((c_out, c_in, k, k), dtype=np.float32)
        w *= np.float32(math.sqrt(2.0 / fan_in))
        cov, n_out = _coverage(size, k, stride, k // 2)
        return w, 2.0 * m2 * cov * cov, n_out

    def bn(self, c, m2, gamma=(0.8, 1.2)):
        r = self.rng
        p = {
            "gamma": r.uniform(*gamma, c),
            "beta": r.normal(0.0, 0.1, c),
            "mean": r.normal(0.0, 0.1 * math.sqrt(m2), c),
            "var": m2 * r.uniform(0.8, 1.25, c),
        }
        out_m2 = float(np.mean(p["gamma"] ** 2) + np.mean(p["beta"] ** 2))
        return {k: v.astype(np.float32) for k, v in p.items()}, out_m2

    def prelu(self, c, m2):
        a = self.rng.uniform(0.1, 0.3, c).astype(np.float32)
        return a, m2 * float(np.mean((1.0 + a**2) / 2.0))


def _draw_network(depth, widths, input_size, embedding, seed):
    """The weights of one IResNet, independent of the export style."""
    if depth not in UNITS:
        raise ValueError(f"depth must be one of {sorted(UNITS)}, got {depth}")
    if len(widths) != 4:
        raise ValueError(f"widths must give 4 stage widths, got {widths!r}")
    if input_size % 16:
        raise ValueError(f"input_size must be a multiple of 16, got {input_size}")
    init = _Init(seed)
    net = {}
    size = input_size
    m2 = 1.0 / 3.0  # normalised uniform pixels
    w, m2, size = init.conv(widths[0], 3, 3, m2, size, 1)
    net["conv0"] = w
    net["bn0"], m2 = init.bn(widths[0], m2)
    net["relu0"], m2 = init.prelu(widths[0], m2)
    c_in = widths[0]
    units = []
    for s, (n_units, c) in enumerate(zip(UNITS[depth], widths), start=1):
        for u in range(1, n_units + 1):
            stride = 2 if u == 1 else 1
            unit = {"name": f"stage{s}_unit{u}", "stride": stride}
            unit["bn1"], b = init.bn(c_in, m2)
            unit["conv1"], b, _ = init.conv(c, c_in, 3, b, size, 1)
            unit["bn2"], b = init.bn(c, b)
            unit["relu1"], b = init.prelu(c, b)
            unit["conv2"], b, out_size = init.conv(c, c, 3, b, size, stride)
            unit["bn3"], b = init.bn(c, b, gamma=(0.2, 0.4))
            if u == 1:
                unit["conv1sc"], sc, _ = init.conv(c, c_in, 1, m2, size, 2)
                unit["sc"], m2 = init.bn(c, sc)
            m2 += b
            size, c_in = out_size, c
            units.append(unit)
    net["units"] = units
    net["head_bn1"], m2 = init.bn(c_in, m2)
    fan_in = c_in * size * size
    fc = init.rng.standard_normal((embedding, fan_in), dtype=np.float32)
    fc *= np.float32(math.sqrt(1.0 / fan_in))
    net["pre_fc1_w"] = fc
    net["pre_fc1_b"] = init.rng.normal(0.0, 0.1, embedding).astype(np.float32)
    net["fc1"], _ = init.bn(embedding, m2)
    return net


def _fold(w, bn):
    """Fold a BatchNorm that follows a bias-free conv into the conv: (W', b')."""
    scale = bn["gamma"].astype(np.float64) / np.sqrt(bn["var"].astype(np.float64) + BN_EPS)
    w2 = (w.astype(np.float64) * scale[:, None, None, None]).astype(np.float32)
    b2 = (bn["beta"].astype(np.float64) - bn["mean"].astype(np.float64) * scale).astype(np.float32)
    return w2, b2


class _Writer:
    """Emits ONNX nodes; names them like MXNet (semantic) or like torch.onnx (anonymous)."""

    def __init__(self, style):
        self.style = style
        self.nodes = []
        self.inits = []
        self.counter = 0

    def _names(self, op, name):
        """(node name, output tensor name) for a new node."""
        if self.style == "mxnet":
            return name, name
        k = self.counter
        self.counter += 1
        return f"{op}_{k}", str(100 + k)

    def _init(self, array, node_name, role, op):
        from onnx import numpy_helper

        if self.style == "mxnet":
            iname = f"{node_name}_{role}"
        else:
            iname = f"onnx::{op}_{1000 + len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), iname))
        return iname

    def node(self, op, inputs, name, params=(), **attrs):
        from onnx import helper

        node_name, out = self._names(op, name)
        names = [self._init(a, node_name, role, op) for role, a in params]
        self.nodes.append(helper.make_node(op, list(inputs) + names, [out], name=node_name, **attrs))
        return out

    def conv(self, x, w, name, stride=1, bias=None):
        k = w.shape[-1]
        params = [("weight", w)] + ([("bias", bias)] if bias is not None else [])
        return self.node(
            "Conv", [x], name, params,
            kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4, dilations=[1, 1], group=1,
        )

    def bn(self, x, p, name):
        params = [("gamma", p["gamma"]), ("beta", p["beta"]), ("moving_mean", p["mean"]), ("moving_var", p["var"])]
        return self.node("BatchNormalization", [x], name, params, epsilon=BN_EPS, momentum=0.9)

    def prelu(self, x, slope, name):
        return self.node("PRelu", [x], name, [("gamma", slope.reshape(-1, 1, 1))])

    def conv_bn(self, x, w, bn, conv_name, bn_name, stride=1):
        """Conv -> BatchNorm (MXNet) or one Conv with the BatchNorm folded in (PyTorch)."""
        if self.style == "mxnet":
            return self.bn(self.conv(x, w, conv_name, stride), bn, bn_name)
        w2, b2 = _fold(w, bn)
        return self.conv(x, w2, conv_name, stride, bias=b2)


def build_iresnet(
    depth: int = 50,
    style: str = "mxnet",
    widths: tuple[int, int, int, int] = (64, 128, 256, 512),
    input_size: int = 112,
    embedding: int = 512,
    seed: int = 0,
):
    """Build a random-weight InsightFace IResNet as an ``onnx.ModelProto``.

    ``style="mxnet"``: nodes named as in docs/taps.md (``conv0``,
    ``stage4_unit1_conv1``, ...; residual sums ``_plus0``, ``_plus1``, ... as
    MXNet names them), all BatchNorms kept, raw 0..255 input normalised in
    the graph by ``(x - 127.5) * 0.0078125``; input ``data``, output ``fc1``.

    ``style="pytorch"``: the same network (same ``seed`` -> same weights) as
    torch.onnx exports it: anonymous names (``Conv_12``, tensor ``112``),
    every BatchNorm that follows a conv folded into the conv, and the input
    expected already normalised as InsightFace normalises it for its PyTorch
    exports, ``(x - 127.5) / 127.5`` (conv0 absorbs the 127.5/128 factor).
    ``pytorch(normalise_input(x)) == mxnet(x)`` up to float32 rounding.

    The batch dimension is dynamic; the spatial size is ``input_size``.
    """
    from onnx import TensorProto, helper

    if style not in ("mxnet", "pytorch"):
        raise ValueError(f"style must be 'mxnet' or 'pytorch', got {style!r}")
    net = _draw_network(depth, tuple(widths), input_size, embedding, seed)
    wr = _Writer(style)
    in_name = "data" if style == "mxnet" else "input.1"
    x = in_name
    if style == "mxnet":
        x = wr.node("Sub", [x], "_minusscalar0", [("second", np.array(INPUT_MEAN, np.float32))])
        x = wr.node("Mul", [x], "_mulscalar0", [("second", np.array(INPUT_SCALE, np.float32))])
    w0 = net["conv0"]
    if style == "pytorch":  # inputs come scaled by 1/127.5 instead of 1/128
        w0 = w0.astype(np.float64) * (INPUT_SCALE / PYTORCH_INPUT_SCALE)
    x = wr.conv_bn(x, w0, net["bn0"], "conv0", "bn0")
    x = wr.prelu(x, net["relu0"], "relu0")
    for k, unit in enumerate(net["units"]):
        n = unit["name"]
        b = wr.bn(x, unit["bn1"], f"{n}_bn1")
        b = wr.conv_bn(b, unit["conv1"], unit["bn2"], f"{n}_conv1", f"{n}_bn2")
        b = wr.prelu(b, unit["relu1"], f"{n}_relu1")
        b = wr.conv_bn(b, unit["conv2"], unit["bn3"], f"{n}_conv2", f"{n}_bn3", stride=unit["stride"])
        if "conv1sc" in unit:
            sc = wr.conv_bn(x, unit["conv1sc"], unit["sc"], f"{n}_conv1sc", f"{n}_sc", stride=2)
        else:
            sc = x
        x = wr.node("Add", [b, sc], f"_plus{k}")
    x = wr.bn(x, net["head_bn1"], "bn1")
    x = wr.node("Flatten", [x], "flatten0", axis=1)
    x = wr.node("Gemm", [x], "pre_fc1", [("weight", net["pre_fc1_w"]), ("bias", net["pre_fc1_b"])],
                alpha=1.0, beta=1.0, transA=0, transB=1)
    x = wr.bn(x, net["fc1"], "fc1")

    inp = helper.make_tensor_value_info(in_name, TensorProto.FLOAT, ["N", 3, input_size, input_size])
    out = helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", embedding])
    graph = helper.make_graph(wr.nodes, f"iresnet{depth}_{style}", [inp], [out], initializer=wr.inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="featlab.iresnet",
        doc_string=f"random-weight IResNet-{depth} ({style} export style), seed {seed}",
    )
    model.ir_version = IR_VERSION
    return model


def save(model, path) -> None:
    """Write an ONNX model to ``path`` (one file; the parent folder must exist)."""
    import onnx

    onnx.save_model(model, str(path))


def normalise_input(pixels: np.ndarray, scale: float = PYTORCH_INPUT_SCALE) -> np.ndarray:
    """Raw 0..255 pixels -> ``(x - 127.5) * scale`` in float32: the input a
    PyTorch-exported IResNet expects (InsightFace feeds glintr100 and
    w600k_r50 ``(x - 127.5) / 127.5``). For graphs from :func:`build_iresnet`,
    ``pytorch_graph(normalise_input(x)) == mxnet_graph(x)``. ``scale=INPUT_SCALE``
    gives what the MXNet graphs compute inside.
    """
    x = np.asarray(pixels, dtype=np.float32)
    return (x - np.float32(INPUT_MEAN)) * np.float32(scale)


# --------------------------------------------------------------------------
# finding the structure of a graph
# --------------------------------------------------------------------------


def _load(model):
    """An ``onnx.ModelProto``, or a path to one."""
    if isinstance(model, (str, os.PathLike)):
        import onnx

        return onnx.load(str(model))
    return model


class _Graph:
    """Producer/consumer maps of an ONNX graph, with Identity/Dropout see-through."""

    def __init__(self, model):
        g = model.graph
        self.consts = {t.name for t in g.initializer}
        for n in g.node:
            if n.op_type == "Constant":
                self.consts.update(n.output)
        self.producer = {}
        self.consumers = defaultdict(list)
        for n in g.node:
            for o in n.output:
                self.producer[o] = n
            for i in n.input:
                if i:
                    self.consumers[i].append(n)
        self.outputs = {o.name for o in g.output}
        data = [i.name for i in g.input if i.name not in self.consts]
        if not data:
            raise NotIResNet("not an IResNet graph: it has no data input")
        self.input = data[0]
        self.input_info = next(i for i in g.input if i.name == self.input)

    def after(self, t: str) -> list:
        """Nodes that consume ``t``, looking through Identity/Dropout."""
        out = []
        for n in self.consumers.get(t, []):
            if n.op_type in _PASSTHROUGH:
                out.extend(self.after(n.output[0]))
            else:
                out.append(n)
        return out

    def origin(self, t: str) -> str:
        """``t`` with any Identity/Dropout in front of it looked through."""
        n = self.producer.get(t)
        while n is not None and n.op_type in _PASSTHROUGH:
            t = n.input[0]
            n = self.producer.get(t)
        return t

    def only(self, t: str, ops) -> object | None:
        """The single consumer of ``t`` if it is one of ``ops``, else None
        (a Shape consumer, as in torch's dynamic flatten, is ignored)."""
        nxt = [n for n in self.after(t) if n.op_type != "Shape"]
        if len(nxt) == 1 and nxt[0].op_type in ops:
            return nxt[0]
        return None

    def is_const_operand_op(self, n) -> bool:
        data = [i for i in n.input if i and i not in self.consts]
        return len(data) == 1 and len(n.input) == 2


@dataclass
class _Unit:
    conv1: object
    relu1: object
    conv2: object
    add: object
    bn1: object | None = None
    bn2: object | None = None
    bn3: object | None = None
    conv1sc: object | None = None
    sc: object | None = None
    stage: int = 0
    index: int = 0  # unit number within the stage

    @property
    def name(self) -> str:
        return f"stage{self.stage}_unit{self.index}"


@dataclass
class _Structure:
    preprocess: list
    conv0: object
    bn0: object | None
    relu0: object
    units: list
    head_bn1: object | None = None
    pre_fc1: object | None = None  # node whose output is the FC result (Gemm, or MatMul's bias Add)
    fc1: object | None = None
    input: str = ""


def _out(n) -> str:
    return n.output[0]


def _match_branch(g: _Graph, first):
    """[BN] -> Conv -> [BN] -> PRelu -> Conv -> [BN] -> Add, starting at node ``first``."""
    n = first
    parts = {}
    if n.op_type == "BatchNormalization":
        parts["bn1"] = n
        n = g.only(_out(n), {"Conv"})
    if n is None or n.op_type != "Conv":
        return None
    parts["conv1"] = n
    n = g.only(_out(n), {"BatchNormalization", "PRelu"})
    if n is not None and n.op_type == "BatchNormalization":
        parts["bn2"] = n
        n = g.only(_out(n), {"PRelu"})
    if n is None:
        return None
    parts["relu1"] = n
    n = g.only(_out(n), {"Conv"})
    if n is None:
        return None
    parts["conv2"] = n
    n = g.only(_out(n), {"BatchNormalization", "Add"})
    if n is not None and n.op_type == "BatchNormalization":
        parts["bn3"] = n
        n = g.only(_out(n), {"Add"})
    if n is None:
        return None
    parts["add"] = n
    return parts


def _match_unit(g: _Graph, x: str) -> _Unit | None:
    """The residual unit whose input is the tensor ``x``, or None."""
    x = g.origin(x)
    for first in g.after(x):
        if first.op_type not in ("BatchNormalization", "Conv"):
            continue
        parts = _match_branch(g, first)
        if parts is None:
            continue
        add = parts["add"]
        tail = _out(parts.get("bn3") or parts["conv2"])
        ins = [g.origin(i) for i in add.input]
        if len(ins) != 2 or tail not in ins:
            continue
        other = ins[1] if ins[0] == tail else ins[0]
        if other == x:
            return _Unit(**parts)
        p = g.producer.get(other)
        sc = None
        if p is not None and p.op_type == "BatchNormalization":
            sc = p
            p = g.producer.get(g.origin(p.input[0]))
        if p is not None and p.op_type == "Conv" and g.origin(p.input[0]) == x and p is not first:
            return _Unit(**parts, conv1sc=p, sc=sc)
    return None


def _match_head(g: _Graph, x: str, s: _Structure) -> bool:
    """BN -> Flatten/Reshape -> Gemm (or MatMul + Add) -> [BN]; fills ``s``."""
    n = g.only(x, {"BatchNormalization", "Flatten", "Reshape"})
    if n is None:
        return False
    bn = None
    if n.op_type == "BatchNormalization":
        bn = n
        n = g.only(_out(n), {"Flatten", "Reshape"})
        if n is None:
            return False
    n = g.only(_out(n), {"Gemm", "MatMul"})
    if n is None:
        return False
    if n.op_type == "MatMul":
        bias = g.only(_out(n), {"Add"})
        if bias is not None and g.is_const_operand_op(bias):
            n = bias
    s.head_bn1, s.pre_fc1 = bn, n
    s.fc1 = g.only(_out(n), {"BatchNormalization"})
    return True


def _describe_ops(g: _Graph, t: str) -> str:
    nxt = g.after(t)
    if not nxt:
        return "nothing"
    return ", ".join(f"{n.op_type} {n.name or _out(n)!r}" for n in nxt[:3])


def _find_preprocess(g: _Graph) -> tuple[list, str]:
    """Elementwise ops by constants (Sub/Mul/Div/Add) right after the input:
    the in-graph input normalisation. Returns (nodes, tensor after them)."""
    t = g.input
    pre = []
    while True:
        n = g.only(t, _NORMALISING)
        if n is None or not g.is_const_operand_op(n):
            break
        pre.append(n)
        t = _out(n)
    return pre, t


def _find_structure(model) -> _Structure:
    g = _Graph(model)
    pre, t = _find_preprocess(g)
    convs = [n for n in g.after(t) if n.op_type == "Conv"]
    if len(convs) != 1:
        raise NotIResNet(
            f"not an IResNet graph: the input {g.input!r} should feed one Conv (the stem conv0), "
            f"but feeds {_describe_ops(g, t)}"
        )
    conv0 = convs[0]
    n = g.only(_out(conv0), {"BatchNormalization", "PRelu"})
    bn0 = None
    if n is not None and n.op_type == "BatchNormalization":
        bn0 = n
        n = g.only(_out(n), {"PRelu"})
    if n is None:
        raise NotIResNet(
            "not an IResNet graph: the stem conv0 should be followed by [BatchNormalization ->] PRelu, "
            f"found {_describe_ops(g, _out(bn0 or conv0))}"
        )
    s = _Structure(preprocess=pre, conv0=conv0, bn0=bn0, relu0=n, units=[], input=g.input)
    x = _out(n)
    stage = unit_no = 0
    while True:
        u = _match_unit(g, x)
        if u is None:
            break
        if u.conv1sc is not None or stage == 0:
            stage, unit_no = stage + 1, 0
        unit_no += 1
        u.stage, u.index = stage, unit_no
        s.units.append(u)
        x = _out(u.add)
    if not s.units:
        raise NotIResNet(
            "not an IResNet graph: no residual unit ([BN] -> Conv -> [BN] -> PRelu -> Conv -> [BN] -> Add) "
            f"follows the stem; relu0 feeds {_describe_ops(g, x)}"
        )
    if not _match_head(g, x, s) and g.origin(x) not in g.outputs and x not in g.outputs:
        raise NotIResNet(
            f"not an IResNet graph: {len(s.units)} residual units are followed by {_describe_ops(g, x)}, "
            "not by the head (BatchNormalization -> Flatten -> Gemm)"
        )
    return s


# --------------------------------------------------------------------------
# taps
# --------------------------------------------------------------------------


def _folded_note(bn_name: str) -> str:
    return f"BatchNorm folded in (equals {bn_name} of the MXNet graph)"


def _add_name(k: int) -> str:
    return "add" if k == 0 else f"add_{k}"


def _tap_entries(s: _Structure) -> list[dict]:
    """(name, tensor, aliases, note) in network order, before shapes are known."""
    entries = []

    def tap(name, node):
        entries.append({"name": name, "tensor": _out(node), "aliases": [], "note": ""})

    def conv_bn(conv_name, conv, bn_name, bn):
        tap(conv_name, conv)
        if bn is not None:
            tap(bn_name, bn)
        else:
            entries[-1]["aliases"].append(bn_name)
            entries[-1]["note"] = _folded_note(bn_name)

    adds = 0

    def alias_add():
        nonlocal adds
        entries[-1]["aliases"].append(_add_name(adds))
        adds += 1

    conv_bn("conv0", s.conv0, "bn0", s.bn0)
    tap("relu0", s.relu0)
    alias_add()
    for u in s.units:
        n = u.name
        if u.bn1 is not None:
            tap(f"{n}_bn1", u.bn1)
        conv_bn(f"{n}_conv1", u.conv1, f"{n}_bn2", u.bn2)
        tap(f"{n}_relu1", u.relu1)
        alias_add()
        conv_bn(f"{n}_conv2", u.conv2, f"{n}_bn3", u.bn3)
        if u.conv1sc is not None:
            conv_bn(f"{n}_conv1sc", u.conv1sc, f"{n}_sc", u.sc)
        tap(f"{n}_out", u.add)
        alias_add()
    if s.pre_fc1 is not None:
        if s.head_bn1 is not None:
            tap("bn1", s.head_bn1)
        tap("pre_fc1", s.pre_fc1)
        alias_add()
        if s.fc1 is not None:
            tap("fc1", s.fc1)
        else:
            entries[-1]["aliases"].append("fc1")
            entries[-1]["note"] = _folded_note("fc1")
    return entries


def _shape_model(model, input_name: str, input_size: int | None):
    """A weight-free copy of ``model`` (big initializers become typed inputs) for
    shape inference, with the input's spatial size fixed."""
    import onnx
    from onnx import helper

    g = model.graph
    inputs = []
    for i in g.input:
        v = onnx.ValueInfoProto()
        v.CopyFrom(i)
        inputs.append(v)
    data = next(v for v in inputs if v.name == input_name)
    dims = data.type.tensor_type.shape.dim
    if len(dims) != 4:
        raise NotIResNet(f"not an IResNet graph: input {input_name!r} has rank {len(dims)}, expected N x 3 x H x W")
    fixed = [d.dim_value if d.HasField("dim_value") else None for d in dims[2:]]
    if None in fixed:
        if input_size is None:
            raise ValueError(
                f"the graph's input {input_name!r} has a dynamic spatial size: pass input_size (e.g. 112)"
            )
        for d in dims[2:]:
            d.dim_value = int(input_size)
    elif input_size is not None and tuple(fixed) != (input_size, input_size):
        raise ValueError(
            f"input_size={input_size} does not match the graph's fixed input size {fixed[0]}x{fixed[1]}"
        )
    have = {v.name for v in inputs}
    small = []
    for t in g.initializer:
        n = 1
        for d in t.dims:
            n *= d
        if n <= 64 or t.data_type == onnx.TensorProto.INT64:
            small.append(t)
        elif t.name not in have:
            inputs.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    graph = helper.make_graph(list(g.node), g.name, inputs, list(g.output), initializer=small)
    m = helper.make_model(graph, opset_imports=list(model.opset_import))
    m.ir_version = model.ir_version
    return m


def _infer_shapes(model, input_name, input_size, tensors) -> dict[str, tuple[int, ...]]:
    from onnx import shape_inference

    inferred = shape_inference.infer_shapes(_shape_model(model, input_name, input_size), data_prop=True)
    vis = list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)
    shapes = {}
    for v in vis:
        if v.name in tensors and v.type.tensor_type.HasField("shape"):
            dims = v.type.tensor_type.shape.dim
            per_face = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims[1:])
            if per_face and None not in per_face:
                shapes[v.name] = per_face
    missing = [t for t in tensors if t not in shapes]
    if missing:
        raise ValueError(f"ONNX shape inference gave no static shape for tensor(s) {', '.join(missing[:5])}")
    return shapes


def resolve_taps(model, input_size: int | None = None) -> list[TapInfo]:
    """Every tap of docs/taps.md on an IResNet ONNX graph (ModelProto or path),
    found from its structure.

    Canonical names, in network order: ``conv0``, ``bn0``, ``relu0``; per
    residual unit ``stageS_unitU_`` + ``bn1``, ``conv1``, ``bn2``, ``relu1``,
    ``conv2``, ``bn3``, (unit 1: ``conv1sc``, ``sc``), ``out`` (the residual
    sum); head ``bn1``, ``pre_fc1``, ``fc1``. ``add_K`` names are aliases
    (``add`` = relu0, then per unit its relu1 and its residual sum, then
    pre_fc1). Stages start at each unit with a projection (conv) shortcut.
    On folded graphs a missing ``bn0``/``bnX``/``sc`` is an alias of the conv
    that includes it, and that tap's ``note`` says so. Shapes are per face,
    from ONNX shape inference at the graph's input size (``input_size`` when
    the graph's spatial dims are dynamic). Raises :class:`NotIResNet`.
    """
    model = _load(model)
    s = _find_structure(model)
    entries = _tap_entries(s)
    shapes = _infer_shapes(model, s.input, input_size, {e["tensor"] for e in entries})
    return [
        TapInfo(
            name=e["name"],
            tensor=e["tensor"],
            shape=shapes[e["tensor"]],
            index=i,
            aliases=tuple(e["aliases"]),
            note=e["note"],
        )
        for i, e in enumerate(entries)
    ]


_ADD_RE = re.compile(r"^add(?:_(\d+))?$")


def resolve(taps: list[TapInfo], wanted: str | int) -> TapInfo:
    """:func:`featlab.backbones.taps.find_tap` for IResNet taps: an ``add_K`` past the end
    says how many additions the graph has."""
    try:
        return find_tap(taps, wanted)
    except UnknownTap:
        m = _ADD_RE.match(wanted) if isinstance(wanted, str) else None
        if m is None:
            raise
        ks = []
        fc = None
        for t in taps:
            for a in t.aliases:
                am = _ADD_RE.match(a)
                if am:
                    k = int(am.group(1) or 0)
                    ks.append(k)
                    if t.name == "pre_fc1":
                        fc = k
        residual = sorted(k for k in ks if k != fc)
        last = _add_name(residual[-1]) if residual else "none"
        msg = (
            f"{wanted} is past the last addition: this graph has {len(residual)} "
            f"(add .. {last})"
        )
        if fc is not None:
            msg += f" plus {_add_name(fc)} (pre_fc1)"
        raise UnknownTap(msg) from None


def normalises_input(model) -> bool:
    """True when the graph normalises its input itself (MXNet exports start with
    Sub/Mul by constants before the first conv), False when it expects the
    input already normalised (PyTorch exports). Looks only at the ops right
    after the input, so it works on any graph."""
    return bool(_find_preprocess(_Graph(_load(model)))[0])


def describe_depth(model) -> dict:
    """Units per stage, depth, export style ("unfolded" keeps every BatchNorm,
    "folded" has BatchNorms folded into convs) and whether the input is
    normalised in the graph."""
    s = _find_structure(_load(model))
    per_stage = defaultdict(int)
    for u in s.units:
        per_stage[u.stage] += 1
    units = tuple(per_stage[k] for k in sorted(per_stage))
    bns = [s.bn0] + [b for u in s.units for b in (u.bn2, u.bn3)] + [u.sc for u in s.units if u.conv1sc is not None]
    n_folded = sum(b is None for b in bns)
    style = "unfolded" if n_folded == 0 else ("folded" if n_folded == len(bns) else "partly folded")
    return {
        "depth": 2 * len(s.units) + 2,
        "units": units,
        "style": style,
        "normalises_input": bool(s.preprocess),
        "has_head": s.pre_fc1 is not None,
    }
