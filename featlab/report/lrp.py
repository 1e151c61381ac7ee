"""Layer-wise relevance propagation (LRP) over the ONNX backbone and the Keras head, in NumPy (float64).

No torch: the rules are written over the ONNX graph featlab extracts with (:class:`Graph`) and over the head
rebuilt from its saved weights (:class:`NumpyHead`, read from ``head.keras`` with h5py, no TensorFlow).

The explained output of one face and head is a scalar ``s`` that is *linear* in the head's last layer
(LRP starts from it, so the relevance of every pixel sums to ``s`` where the rules conserve):

- classifier (softmax: gender, age bins): the logit contrast ``z_c - mean_{j != c} z_j`` of the explained class
  ``c`` (for two classes the log-odds ``log p_c / p_other``);
- CORAL: the mean of the K-1 ordinal logits (the shared score plus the mean threshold);
- linear age head: the raw output (the age in the head's target units);
- expected-age head (a softmax over an age grid ``y_i``): ``sum_i p_i (y_i - E) z_i`` with ``p`` and the predicted
  age ``E`` taken at the face: the logit score whose gradient is the predicted age's gradient at the face, so
  red = evidence pushing the predicted age up, blue = down.

Rules (``--rule``), after zennit's composites (Montavon et al. 2019, "Layer-wise relevance propagation: an
overview"):

- ``epsilon``: the epsilon rule on every Conv and dense layer (biases absorb their share: not exactly conserving);
- ``alpha2beta1``: alpha=2, beta=1 on convolutions, epsilon on dense layers (zennit's EpsilonAlpha2Beta1);
- ``epsilon-plus-flat``: the flat rule on the first convolution, z+ on the others, epsilon on dense layers
  (zennit's EpsilonPlusFlat).

z+ and alpha-beta ignore biases (zennit's ``zero_params='bias'``). z+ conserves layer by layer except at units
with no positive contribution (their relevance is dropped: ~2 % on IResNet's strided 1x1 shortcuts, nothing
measurable on dlib-rec); alpha-beta conserves where every unit has contributions of both signs and gains or loses
elsewhere (IResNet's shortcuts again); flat conserves exactly; epsilon loses what the biases and epsilon take
(with tiny epsilon, biases and PReLU it is unstable on IResNet). Conservation is measured per face, never assumed
(:func:`conservation`, bound :data:`BOUND`). Around the linear layers:

- BatchNormalization, and dlib's affine Mul + Add by per-channel constants, right after a Conv or Gemm are folded
  into it (zennit's canonizers); the head's standardisation, like a BatchNormalization with no such layer
  before it (IResNet's pre-activation bn1), is a 1-to-1 affine map and passes relevance unchanged, as do Relu,
  PRelu, LeakyRelu, Identity, Dropout and Mul/Sub/Add/Div by constants (input normalisation);
- residual sums (Add of two computed tensors) and average pools split relevance in proportion to the inputs'
  contributions (zennit's Norm rule); max pools give it to the window's maximum (winner takes all);
- Pad, Flatten, Reshape, Transpose, Squeeze/Unsqueeze and Concat move it back to where it came from.

Any other op between the input and the tap stops with one line naming it. The input's relevance is summed over
the three colour channels: a signed (H, W) map at the chip's resolution.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import FeatlabError

RULES = ("epsilon", "alpha2beta1", "epsilon-plus-flat")
EPSILON = 1e-6      # epsilon rule (zennit's composites' default)
STABILISER = 1e-6   # denominators of z+, alpha-beta, flat, sums and pools (zennit's default)
BOUND = 0.05        # conservation: a rule whose median relative error exceeds this is reported on the console

PASS_OPS = {"Relu", "PRelu", "LeakyRelu", "Identity", "Dropout", "BatchNormalization", "Cast"}
CONST_OPS = {"Mul", "Sub", "Add", "Div"}
SHAPE_OPS = {"Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose"}


def check_rule(rule: str) -> str:
    if rule not in RULES:
        raise FeatlabError(f"unknown --rule {rule!r}; choose from {', '.join(RULES)}")
    return rule


def _stab(z: np.ndarray, eps: float) -> np.ndarray:
    """zennit's stabilizer: z + eps * sign(z), with 0 -> eps."""
    return z + ((z == 0) + np.sign(z)) * eps


# ------------------------------------------------------------------------------------ conv primitives
@dataclass
class ConvGeom:
    stride: tuple = (1, 1)
    pads: tuple = (0, 0, 0, 0)  # top, left, bottom, right
    dil: tuple = (1, 1)
    group: int = 1


def _out_hw(h, w, kh, kw, g: ConvGeom):
    pt, pl, pb, pr = g.pads
    ho = (h + pt + pb - g.dil[0] * (kh - 1) - 1) // g.stride[0] + 1
    wo = (w + pl + pr - g.dil[1] * (kw - 1) - 1) // g.stride[1] + 1
    return ho, wo


def _windows(g: ConvGeom, i, j, ho, wo):
    s0, s1 = g.stride
    y0, x0 = i * g.dil[0], j * g.dil[1]
    return slice(y0, y0 + s0 * (ho - 1) + 1, s0), slice(x0, x0 + s1 * (wo - 1) + 1, s1)


def conv(x: np.ndarray, w: np.ndarray, g: ConvGeom) -> np.ndarray:
    """ONNX Conv without bias: x (N, C, H, W), w (O, C/group, kh, kw) -> (N, O, Ho, Wo)."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    grp = g.group
    pt, pl, pb, pr = g.pads
    ho, wo = _out_hw(h, wd, kh, kw, g)
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr))).reshape(n, grp, cg, h + pt + pb, wd + pl + pr)
    wg = w.reshape(grp, o // grp, cg, kh, kw)
    out = np.zeros((grp, n * ho * wo, o // grp))
    for i in range(kh):
        for j in range(kw):
            sy, sx = _windows(g, i, j, ho, wo)
            a = xp[:, :, :, sy, sx].transpose(1, 0, 3, 4, 2).reshape(grp, n * ho * wo, cg)
            out += a @ wg[:, :, :, i, j].transpose(0, 2, 1)
    return out.reshape(grp, n, ho, wo, o // grp).transpose(1, 0, 4, 2, 3).reshape(n, o, ho, wo)


def conv_t(s: np.ndarray, w: np.ndarray, g: ConvGeom, xshape) -> np.ndarray:
    """The gradient of :func:`conv` with respect to x, applied to s (N, O, Ho, Wo): (N, C, H, W)."""
    n, c, h, wd = xshape
    o, cg, kh, kw = w.shape
    grp = g.group
    pt, pl, pb, pr = g.pads
    ho, wo = s.shape[2:]
    gp = np.zeros((n, grp, cg, h + pt + pb, wd + pl + pr))
    a = s.reshape(n, grp, o // grp, ho, wo).transpose(1, 0, 3, 4, 2).reshape(grp, n * ho * wo, o // grp)
    wg = w.reshape(grp, o // grp, cg, kh, kw)
    for i in range(kh):
        for j in range(kw):
            sy, sx = _windows(g, i, j, ho, wo)
            contrib = (a @ wg[:, :, :, i, j]).reshape(grp, n, ho, wo, cg).transpose(1, 0, 4, 2, 3)
            gp[:, :, :, sy, sx] += contrib
    return gp.reshape(n, c, h + pt + pb, wd + pl + pr)[:, :, pt : pt + h, pl : pl + wd]


# ------------------------------------------------------------------------------------ linear-layer rules
def linear_rule(x, w, b, r, rule: str, fwd, bwd, eps: float = EPSILON):
    """Relevance of x for a linear layer ``z = fwd(x, w) + b`` given the output relevance r.

    ``rule``: 'epsilon', 'zplus' (alpha1beta0), 'alpha2beta1' or 'flat'."""
    if rule == "epsilon":
        z = fwd(x, w) + (0.0 if b is None else b)
        return x * bwd(r / _stab(z, eps), w)
    if rule == "flat":
        ones_x, ones_w = np.ones_like(x), np.ones_like(w)
        return bwd(r / _stab(fwd(ones_x, ones_w), STABILISER), ones_w)
    alpha, beta = (1.0, 0.0) if rule == "zplus" else (2.0, 1.0)
    xp, xn = np.maximum(x, 0), np.minimum(x, 0)
    wp, wn = np.maximum(w, 0), np.minimum(w, 0)
    has_neg = bool((xn < 0).any())
    zp = fwd(xp, wp) + (fwd(xn, wn) if has_neg else 0.0)
    sp = r / _stab(zp, STABILISER)
    out = alpha * (xp * bwd(sp, wp) + (xn * bwd(sp, wn) if has_neg else 0.0))
    if beta:
        zn = fwd(xp, wn) + (fwd(xn, wp) if has_neg else 0.0)
        sn = r / _stab(zn, STABILISER)
        out = out - beta * (xp * bwd(sn, wn) + (xn * bwd(sn, wp) if has_neg else 0.0))
    return out


def contribution_rule(c, r, rule: str, bias=None, eps: float = EPSILON):
    """The same rules given per-input contributions c (N, F) to a single output per row (relevance r (N,))."""
    r = r[:, None]
    if rule == "epsilon":
        z = c.sum(axis=1, keepdims=True) + (0.0 if bias is None else bias[:, None])
        return c * r / _stab(z, eps)
    alpha, beta = (1.0, 0.0) if rule == "zplus" else (2.0, 1.0)
    cp, cn = np.maximum(c, 0), np.minimum(c, 0)
    out = alpha * cp * r / _stab(cp.sum(axis=1, keepdims=True), STABILISER)
    if beta:
        out = out - beta * cn * r / _stab(cn.sum(axis=1, keepdims=True), STABILISER)
    return out


def composite(rule: str, kind: str, first: bool) -> str:
    """The rule a layer gets under ``--rule`` (kind: 'conv' or 'dense'; first: the network's first layer)."""
    if rule == "epsilon" or kind == "dense":
        return "epsilon"
    if rule == "alpha2beta1":
        return "alpha2beta1"
    return "flat" if first else "zplus"


# ------------------------------------------------------------------------------------ the ONNX graph
@dataclass
class Op:
    kind: str               # linear, pass, sum, pad, maxpool, avgpool, shape, concat
    name: str
    op_type: str
    inputs: list            # variable inputs (tensor names)
    output: str
    params: dict = field(default_factory=dict)


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _pads4(p, n=2):
    p = list(p or [0] * (2 * n))
    return (p[0], p[1], p[2], p[3])


class Graph:
    """An ONNX graph compiled for LRP, from its input to the ``targets`` tensors, float64 throughout."""

    def __init__(self, model, targets: list[str]):
        from onnx import numpy_helper

        g = model.graph
        self.consts = {i.name: numpy_helper.to_array(i).astype(np.float64) if numpy_helper.to_array(i).dtype.kind == "f"
                       else numpy_helper.to_array(i) for i in g.initializer}
        nodes = list(g.node)
        for n in nodes:
            if n.op_type == "Constant":
                self.consts[n.output[0]] = numpy_helper.to_array(_attrs(n)["value"])
        inits = set(self.consts)
        self.input = next(i.name for i in g.input if i.name not in inits)
        producer = {o: n for n in nodes for o in n.output}
        need, stack = set(), list(targets)
        for t in targets:
            if t != self.input and t not in producer:
                raise FeatlabError(f"the ONNX graph has no tensor {t!r}")
        while stack:
            t = stack.pop()
            n = producer.get(t)
            if n is None or id(n) in need:
                continue
            need.add(id(n))
            stack.extend(i for i in n.input if i and i not in inits)
        nodes = [n for n in nodes if id(n) in need and n.op_type != "Constant"]
        consumers: dict[str, list] = {}
        for n in nodes:
            for i in n.input:
                consumers.setdefault(i, []).append(n)
        self.targets = list(targets)
        self.ops: list[Op] = []
        skip = set()
        for n in nodes:
            if id(n) in skip:
                continue
            op = self._compile(n)
            if op.kind == "linear":  # fold the BatchNorm / per-channel affine that follows alone
                while True:
                    nxt = consumers.get(op.output, [])
                    if len(nxt) != 1 or op.output in self.targets or not self._fold(op, nxt[0]):
                        break
                    skip.add(id(nxt[0]))
            self.ops.append(op)
        firsts = [o for o in self.ops if o.kind == "linear"]
        self.first = firsts[0].name if firsts else None

    # ---- compile
    def _var(self, name):
        return name and name not in self.consts

    def _compile(self, n) -> Op:
        t, a = n.op_type, _attrs(n)
        name = n.name or n.output[0]
        ins = [i for i in n.input if self._var(i)]
        where = f"the {t} node {name!r}"
        if t == "Conv":
            w = self.consts.get(n.input[1])
            if w is None or w.ndim != 4:
                raise FeatlabError(f"LRP has no rule for {where}: only 2-D convolutions with constant weights")
            b = self.consts.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
            geom = ConvGeom(tuple(a.get("strides", (1, 1))), _pads4(a.get("pads")), tuple(a.get("dilations", (1, 1))),
                            int(a.get("group", 1)))
            if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                raise FeatlabError(f"LRP has no rule for {where}: auto_pad is not supported")
            return Op("linear", name, t, ins[:1], n.output[0], {"conv": True, "w": w, "b": b, "geom": geom})
        if t in ("Gemm", "MatMul"):
            w = self.consts.get(n.input[1])
            if w is None or len(ins) != 1 or (t == "Gemm" and a.get("transA", 0)):
                raise FeatlabError(f"LRP has no rule for {where}: only x @ constant weights")
            if t == "Gemm":
                w = (w.T if a.get("transB", 0) else w) * float(a.get("alpha", 1.0))
                b = self.consts.get(n.input[2]) * float(a.get("beta", 1.0)) if len(n.input) > 2 and n.input[2] else None
            else:
                b = None
            return Op("linear", name, t, ins, n.output[0], {"conv": False, "w": w, "b": b})
        if t in PASS_OPS or (t in CONST_OPS and len(ins) == 1):
            p = {"attrs": a}
            if t in CONST_OPS:
                p["const"] = self.consts[next(i for i in n.input if i not in ins)]
                p["const_first"] = n.input[0] not in ins
            if t in ("PRelu", "BatchNormalization"):
                p["consts"] = [self.consts.get(i) for i in n.input[1:]]
            return Op("pass", name, t, ins, n.output[0], p)
        if t == "Add" and len(ins) == 2:
            return Op("sum", name, t, ins, n.output[0])
        if t == "Pad":
            mode = a.get("mode", b"constant")
            mode = mode.decode() if isinstance(mode, bytes) else mode
            pads = a.get("pads") if "pads" in a else self.consts.get(n.input[1])
            if mode != "constant" or pads is None or (np.asarray(pads) < 0).any():
                raise FeatlabError(f"LRP has no conserving rule for {where}: only constant, non-negative padding")
            return Op("pad", name, t, ins[:1], n.output[0], {"pads": [int(v) for v in pads]})
        if t in ("MaxPool", "AveragePool", "GlobalMaxPool", "GlobalAveragePool"):
            if a.get("ceil_mode", 0) or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                raise FeatlabError(f"LRP has no rule for {where}: ceil_mode / auto_pad pooling is not supported")
            glob = t.startswith("Global")
            p = {"global": glob}
            if not glob:
                p["k"] = tuple(a["kernel_shape"])
                p["geom"] = ConvGeom(tuple(a.get("strides", (1, 1))), _pads4(a.get("pads")),
                                     tuple(a.get("dilations", (1, 1))))
                p["count_include_pad"] = int(a.get("count_include_pad", 0))
            return Op("maxpool" if "Max" in t else "avgpool", name, t, ins, n.output[0], p)
        if t in SHAPE_OPS:
            p = {"attrs": a, "shape_in": [self.consts.get(i) for i in n.input[1:]]}
            return Op("shape", name, t, ins[:1], n.output[0], p)
        if t == "Concat":
            return Op("concat", name, t, ins, n.output[0], {"axis": int(a["axis"]), "all": list(n.input)})
        raise FeatlabError(f"LRP has no conserving rule for {where} (between the input and the tap); "
                           "supported: Conv, Gemm, MatMul, BatchNormalization, Relu, PRelu, LeakyRelu, Add, "
                           "Mul/Sub/Div by constants, Pad, MaxPool, AveragePool, Global*Pool, Flatten, Reshape, "
                           "Transpose, Concat")

    def _fold(self, op: Op, nxt) -> bool:
        """Fold a BatchNormalization, or a Mul/Add by a per-output-channel constant, into the linear op."""
        w, b = op.params["w"], op.params["b"]
        o = w.shape[0] if op.params["conv"] else w.shape[1]
        if nxt.op_type == "BatchNormalization" and all(i in self.consts for i in nxt.input[1:5]):
            sc, bb, mu, var = (self.consts[i] for i in nxt.input[1:5])
            eps = float(_attrs(nxt).get("epsilon", 1e-5))
            mul, add = sc / np.sqrt(var + eps), bb - mu * sc / np.sqrt(var + eps)
        elif nxt.op_type in ("Mul", "Add") and len([i for i in nxt.input if self._var(i)]) == 1:
            c = self.consts[next(i for i in nxt.input if not self._var(i))]
            flat = np.asarray(c, dtype=np.float64)
            ok = flat.size == 1 or (flat.size == o and (flat.shape[-1] == o if not op.params["conv"]
                                                         else flat.reshape(-1).size == o and flat.shape[-2:] in
                                                         ((1, 1),) and flat.ndim >= 3))
            if not ok:
                return False
            flat = np.broadcast_to(flat.reshape(-1), (o,)) if flat.size == 1 else flat.reshape(-1)
            mul, add = (flat, np.zeros(o)) if nxt.op_type == "Mul" else (np.ones(o), flat)
        else:
            return False
        b0 = np.zeros(o) if b is None else b
        op.params["w"] = w * mul.reshape(-1, 1, 1, 1) if op.params["conv"] else w * mul[None, :]
        op.params["b"] = b0 * mul + add
        op.params.setdefault("folded", []).append(nxt.name or nxt.output[0])
        op.output = nxt.output[0]
        return True

    # ---- forward
    def forward(self, x: np.ndarray) -> dict:
        acts = {self.input: np.asarray(x, dtype=np.float64)}
        for op in self.ops:
            acts[op.output] = self._eval(op, acts)
        return acts

    def _eval(self, op: Op, acts):
        x = acts[op.inputs[0]]
        p = op.params
        if op.kind == "linear":
            if p["conv"]:
                z = conv(x, p["w"], p["geom"])
                return z + p["b"].reshape(1, -1, 1, 1) if p["b"] is not None else z
            z = x @ p["w"]
            return z + p["b"] if p["b"] is not None else z
        if op.kind == "pass":
            t = op.op_type
            if t == "Relu":
                return np.maximum(x, 0)
            if t == "PRelu":
                return np.where(x < 0, x * p["consts"][0], x)
            if t == "LeakyRelu":
                return np.where(x < 0, x * float(p["attrs"].get("alpha", 0.01)), x)
            if t == "BatchNormalization":
                sc, bb, mu, var = (v.reshape(1, -1, *([1] * (x.ndim - 2))) for v in p["consts"][:4])
                return (x - mu) / np.sqrt(var + float(p["attrs"].get("epsilon", 1e-5))) * sc + bb
            if t in CONST_OPS:
                c = p["const"]
                a, b = (c, x) if p["const_first"] else (x, c)
                out = {"Mul": np.multiply, "Sub": np.subtract, "Add": np.add, "Div": np.divide}[t](a, b)
                if out.shape != x.shape:
                    raise FeatlabError(f"LRP has no conserving rule for the {t} node {op.name!r}: its constant "
                                       "broadcasts the tensor to a larger shape")
                return out
            return x
        if op.kind == "sum":
            a, b = acts[op.inputs[0]], acts[op.inputs[1]]
            if a.shape != b.shape:
                raise FeatlabError(f"LRP has no conserving rule for the Add node {op.name!r}: its inputs differ in "
                                   f"shape ({a.shape[1:]} vs {b.shape[1:]})")
            return a + b
        if op.kind == "pad":
            pads = p["pads"]
            k = len(pads) // 2
            return np.pad(x, [(pads[i], pads[i + k]) for i in range(k)])
        if op.kind in ("maxpool", "avgpool"):
            if p["global"]:
                red = np.max if op.kind == "maxpool" else np.mean
                return red(x, axis=(2, 3), keepdims=True)
            return self._pool(op, x)[0]
        if op.kind == "shape":
            return self._reshape(op, x)
        if op.kind == "concat":
            return np.concatenate([acts[i] if self._var(i) else self.consts[i] for i in p["all"]], axis=p["axis"])
        raise AssertionError(op.kind)

    def _pool(self, op: Op, x):
        """(pooled output, per-window input views) of a windowed max or average pool."""
        p = op.params
        kh, kw = p["k"]
        g = p["geom"]
        n, c, h, w = x.shape
        ho, wo = _out_hw(h, w, kh, kw, g)
        pt, pl, pb, pr = g.pads
        if op.kind == "maxpool":
            xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=-np.inf)
            out = np.full((n, c, ho, wo), -np.inf)
            for i in range(kh):
                for j in range(kw):
                    sy, sx = _windows(g, i, j, ho, wo)
                    out = np.maximum(out, xp[:, :, sy, sx])
            return out, xp
        ones = np.ones((c, 1, kh, kw))
        gd = ConvGeom(g.stride, g.pads, g.dil, c)
        s = conv(x, ones, gd)
        cnt = (np.full((1, 1, ho, wo), float(kh * kw)) if p["count_include_pad"]
               else conv(np.ones((1, c, h, w))[:, :1], np.ones((1, 1, kh, kw)), ConvGeom(g.stride, g.pads, g.dil, 1)))
        return s / cnt, None

    def _reshape(self, op: Op, x):
        t, a = op.op_type, op.params["attrs"]
        if t == "Flatten":
            ax = int(a.get("axis", 1))
            return x.reshape(int(np.prod(x.shape[:ax])), -1)
        if t == "Transpose":
            return np.transpose(x, a.get("perm", list(range(x.ndim))[::-1]))
        if t == "Reshape":
            shape = [int(v) for v in op.params["shape_in"][0]]
            shape = [x.shape[i] if v == 0 else v for i, v in enumerate(shape)]
            return x.reshape(shape)
        axes = a.get("axes") or (op.params["shape_in"][0].tolist() if op.params["shape_in"] else None)
        if t == "Squeeze":
            return np.squeeze(x, axis=tuple(axes) if axes is not None else None)
        return np.expand_dims(x, axis=tuple(axes))

    # ---- backward
    def relevance(self, acts: dict, target: str, r: np.ndarray, rule: str, eps: float = EPSILON,
                  layers: dict | None = None) -> np.ndarray:
        """Input relevance (N, C, H, W) from relevance r at ``target``; ``layers`` collects the relevance summed
        (N,) at the outputs of residual sums: cuts every path from the input to the tap passes through in featlab's
        ResNets, where a conserving rule keeps the sum equal to the relevance at the tap (a conv or a pool inside
        a residual branch or shortcut only sees that path's share)."""
        rel = {target: np.asarray(r, dtype=np.float64)}
        for op in reversed(self.ops):
            r = rel.pop(op.output, None)
            if r is None:
                continue
            if layers is not None and op.kind == "sum":
                layers[op.name] = r.reshape(len(r), -1).sum(axis=1)
            for name, ri in self._back(op, acts, r, rule, eps):
                rel[name] = rel[name] + ri if name in rel else ri
        if self.input not in rel:
            return np.zeros_like(acts[self.input])
        return rel[self.input]

    def _back(self, op: Op, acts, r, rule, eps):
        x = acts[op.inputs[0]]
        p = op.params
        if op.kind == "linear":
            which = composite(rule, "conv" if p["conv"] else "dense", op.name == self.first)
            if p["conv"]:
                geom = p["geom"]
                fwd = lambda v, w: conv(v, w, geom)  # noqa: E731
                bwd = lambda s, w: conv_t(s, w, geom, x.shape)  # noqa: E731
                b = None if p["b"] is None else p["b"].reshape(1, -1, 1, 1)
            else:
                fwd = lambda v, w: v @ w  # noqa: E731
                bwd = lambda s, w: s @ w.T  # noqa: E731
                b = p["b"]
            return [(op.inputs[0], linear_rule(x, p["w"], b, r, which, fwd, bwd, eps))]
        if op.kind == "pass":
            return [(op.inputs[0], r)]
        if op.kind == "sum":
            a, b = acts[op.inputs[0]], acts[op.inputs[1]]
            s = r / _stab(a + b, STABILISER)
            return [(op.inputs[0], a * s), (op.inputs[1], b * s)]
        if op.kind == "pad":
            pads = p["pads"]
            k = len(pads) // 2
            return [(op.inputs[0], r[tuple(slice(pads[i], r.shape[i] - pads[i + k]) for i in range(k))])]
        if op.kind == "shape":
            if op.op_type == "Transpose":
                perm = p["attrs"].get("perm", list(range(x.ndim))[::-1])
                return [(op.inputs[0], np.transpose(r, np.argsort(perm)))]
            return [(op.inputs[0], r.reshape(x.shape))]
        if op.kind == "concat":
            out, at = [], 0
            for i in p["all"]:
                size = (acts[i] if self._var(i) else self.consts[i]).shape[p["axis"]]
                if self._var(i):
                    out.append((i, np.take(r, range(at, at + size), axis=p["axis"])))
                at += size
            return out
        if op.kind == "avgpool":
            if p["global"]:
                z = x.sum(axis=(2, 3), keepdims=True)
                return [(op.inputs[0], x * r / _stab(z, STABILISER))]
            c = x.shape[1]
            ones = np.ones((c, 1, *p["k"]))
            gd = ConvGeom(p["geom"].stride, p["geom"].pads, p["geom"].dil, c)
            z = conv(x, ones, gd)
            return [(op.inputs[0], x * conv_t(r / _stab(z, STABILISER), ones, gd, x.shape))]
        if op.kind == "maxpool":
            if p["global"]:
                m = x == x.max(axis=(2, 3), keepdims=True)
                first = m & (np.cumsum(m.reshape(*m.shape[:2], -1), axis=2).reshape(m.shape) == 1)
                return [(op.inputs[0], first * r)]
            out, xp = self._pool(op, x)
            g = p["geom"]
            kh, kw = p["k"]
            ho, wo = out.shape[2:]
            grad = np.zeros_like(xp)
            taken = np.zeros(out.shape, dtype=bool)
            for i in range(kh):
                for j in range(kw):
                    sy, sx = _windows(g, i, j, ho, wo)
                    win = (xp[:, :, sy, sx] == out) & ~taken
                    taken |= win
                    grad[:, :, sy, sx] += win * r
            pt, pl, pb, pr = g.pads
            return [(op.inputs[0], grad[:, :, pt : pt + x.shape[2], pl : pl + x.shape[3]])]
        raise AssertionError(op.kind)


# ------------------------------------------------------------------------------------ the head
def _snake(name: str) -> str:
    """Keras' folder name of a layer class in model.weights.h5 (``Dense`` -> ``dense``, ``Conv2D`` -> ``conv2d``)."""
    import re

    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def keras_layers(model_file: Path):
    """(class name, config, weights as float64 arrays) of every layer of a saved ``.keras`` model, in order,
    read with h5py (no TensorFlow); one line when the file cannot be read."""
    import h5py

    try:
        with zipfile.ZipFile(model_file) as z:
            arch = json.loads(z.read("config.json"))
            weights = z.read("model.weights.h5")
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise FeatlabError(f"cannot read {model_file}: {e}") from None
    import io

    counts: dict[str, int] = {}
    out = []
    with h5py.File(io.BytesIO(weights), "r") as h5:
        for layer in arch["config"]["layers"]:
            cls, c = layer["class_name"], layer["config"]
            key = _snake(cls)
            k = counts.get(key, 0)
            counts[key] = k + 1
            path = f"layers/{key}" + (f"_{k}" if k else "") + "/vars"
            out.append((cls, c, [np.asarray(h5[path][str(i)], dtype=np.float64) for i in range(len(h5[path]))]
                        if path in h5 else []))
    return out


class NumpyHead:
    """A saved Keras head rebuilt in NumPy from head.keras (config.json + model.weights.h5; h5py, no TensorFlow):
    optional global pool, flatten, standardisation, dense layers, the output.

    The standardisation ``(x - mean) / std`` is a 1-to-1 affine map: relevance passes through it unchanged, so a
    tap unit's relevance is that of its standardised value (its deviation from the training faces' mean)."""

    def __init__(self, head_dir, cfg: dict | None = None):
        head_dir = Path(head_dir)
        self.cfg = cfg or json.loads((head_dir / "config.json").read_text())
        if self.cfg.get("fusion") or isinstance((self.cfg.get("tap_shape") or [0])[0], (list, tuple)):
            raise FeatlabError(f"{head_dir}: LRP explains single-tap heads, not fusion heads")
        if self.cfg.get("flip") or (self.cfg.get("feature_set") or {}).get("flip"):
            raise FeatlabError(f"{head_dir}: LRP does not explain heads trained on flip-averaged features")
        layers = []
        for cls, c, var in keras_layers(head_dir / "head.keras"):
            if cls in ("InputLayer", "Dropout"):
                continue
            if cls == "Flatten":
                layers.append(("flatten",))
            elif cls in ("GlobalAveragePooling2D", "GlobalMaxPooling2D"):
                if c.get("data_format") != "channels_first":
                    raise FeatlabError(f"{head_dir}: pooling layer {c['name']} is not channels_first")
                layers.append(("pool", "avg" if "Average" in cls else "max"))
            elif cls == "Normalization":
                mean = np.asarray(c["mean"], dtype=np.float64) if c.get("mean") is not None else var[0]
                v = np.asarray(c["variance"], dtype=np.float64) if c.get("variance") is not None else var[1]
                layers.append(("affine", 1.0 / np.maximum(np.sqrt(v), 1e-7), mean))
            elif cls == "Dense":
                act = c.get("activation", "linear")
                if act not in ("relu", "linear", "softmax"):
                    raise FeatlabError(f"{head_dir}: LRP has no rule for the dense activation {act!r}")
                layers.append(("dense", var[0], var[1] if len(var) > 1 else np.zeros(var[0].shape[1]), act))
            elif cls == "CoralOutput":
                layers.append(("dense", np.repeat(var[0], var[1].shape[0], axis=1), var[1], "linear"))
            else:
                raise FeatlabError(f"{head_dir}: LRP has no rule for the head's {cls} layer {c.get('name')!r}")
        out = layers
        if not out or out[-1][0] != "dense":
            raise FeatlabError(f"{head_dir}: the head does not end in a dense layer")
        self.layers = out
        self.kind = self.cfg["output"]

    def _pre(self, tap):
        x = np.asarray(tap, dtype=np.float64)
        for L in self.layers:
            if L[0] == "pool":
                x = x.mean(axis=(2, 3)) if L[1] == "avg" else x.max(axis=(2, 3))
            elif L[0] == "flatten":
                x = x.reshape(len(x), -1)
            elif L[0] == "affine":
                x = (x.reshape(len(x), -1) - L[2]) * L[1]
            else:
                break
        return x

    def _pooled(self, tap):
        kind = next(L[1] for L in self.layers if L[0] == "pool")
        return tap.mean(axis=(2, 3)) if kind == "avg" else tap.max(axis=(2, 3))

    def forward(self, tap):
        """(list of dense-layer inputs, last layer's pre-activation logits z (N, K), outputs as Keras gives them)."""
        x = self._pre(tap)
        if x.ndim != 2:
            x = x.reshape(len(x), -1)
        dense = [L for L in self.layers if L[0] == "dense"]
        ins = []
        for k, (_, w, b, act) in enumerate(dense):
            ins.append(x)
            z = x @ w + b
            if k < len(dense) - 1:
                x = np.maximum(z, 0) if act == "relu" else z
        last_act = dense[-1][3]
        if last_act == "softmax":
            e = np.exp(z - z.max(axis=1, keepdims=True))
            out = e / e.sum(axis=1, keepdims=True)
        else:
            out = z
        return ins, z, out

    def contrast(self, z: np.ndarray, out: np.ndarray, classes) -> np.ndarray:
        """The explained output's weights v (N, K) over the last logits: s = z . v (see the module's docstring)."""
        n, k = z.shape
        if self.kind == "expectation":
            from ..data.labels import to_years_np

            years = np.asarray(to_years_np(self.cfg["age_grid"], self.cfg["target_transform"]), dtype=np.float64)
            e = out @ years
            return out * (years[None, :] - e[:, None])
        if self.kind in ("linear", "coral"):
            return np.full((n, k), 1.0 / k)
        v = np.full((n, k), -1.0 / max(k - 1, 1))
        cls = np.asarray(classes, dtype=np.int64)
        v[np.arange(n), cls] = 1.0
        return v

    def relevance(self, tap, classes, rule: str, eps: float = EPSILON):
        """(relevance at the tap (tap's shape), explained output s (N,), relevance at the head's input (N,))."""
        tap = np.asarray(tap, dtype=np.float64)
        ins, z, out = self.forward(tap)
        v = self.contrast(z, out, classes)
        dense = [L for L in self.layers if L[0] == "dense"]
        _, w, b, _ = dense[-1]
        h = ins[-1]
        c = h[:, :, None] * w[None, :, :]             # (N, F, K) contributions to each logit
        c = np.einsum("nfk,nk->nf", c, v)              # contributions to s
        bias = (v * b[None, :]).sum(axis=1)
        s = c.sum(axis=1) + bias
        r = contribution_rule(c, s, composite(rule, "dense", False), bias, eps)
        for (_, w, b, _), x in zip(reversed(dense[:-1]), reversed(ins[:-1])):
            r = linear_rule(x, w, b[None, :], r, composite(rule, "dense", False),
                            lambda a, m: a @ m, lambda g, m: g @ m.T, eps)
        head_in = r.sum(axis=1)
        pre = [L for L in self.layers if L[0] in ("pool", "flatten")]
        pooled = self._pooled(tap) if any(L[0] == "pool" for L in pre) else None
        if pooled is not None:  # back through the global pool
            kind = next(L[1] for L in pre if L[0] == "pool")
            r = r.reshape(pooled.shape)[:, :, None, None]
            if kind == "avg":
                z = tap.sum(axis=(2, 3), keepdims=True)
                return tap * r / _stab(z, STABILISER), s, head_in
            m = tap == tap.max(axis=(2, 3), keepdims=True)
            m = m & (np.cumsum(m.reshape(*m.shape[:2], -1), axis=2).reshape(m.shape) == 1)
            return m * r, s, head_in
        return r.reshape(tap.shape), s, head_in


# ------------------------------------------------------------------------------------ backbone + heads
class LRPExplainer:
    """LRP maps of a backbone's heads: ``explain(chips, classes) -> LRPResult``."""

    def __init__(self, backbone, head_dirs, cfgs=None, rule: str = "epsilon-plus-flat", epsilon: float = EPSILON):
        from ..features.store import parse_key

        self.rule = check_rule(rule)
        self.epsilon = float(epsilon)
        self.backbone = backbone
        self.heads = [NumpyHead(d, c) for d, c in zip(head_dirs, cfgs or [None] * len(head_dirs))]
        self.taps = []
        for h in self.heads:
            name, kind, grid = parse_key(h.cfg["tap"])
            if grid:
                raise FeatlabError(f"LRP does not explain heads on grid-pooled taps ({h.cfg['tap']})")
            tap = backbone.tap(name)
            self.taps.append((tap.tensor, kind))
        self.graph = Graph(backbone.onnx_model, list(dict.fromkeys(t for t, _ in self.taps)))
        self.mean, self.scale = backbone.normalisation

    def to_input(self, chips: np.ndarray) -> np.ndarray:
        x = np.asarray(chips, dtype=np.float64) - np.asarray(self.mean, dtype=np.float64)
        return (x * float(self.scale)).transpose(0, 3, 1, 2)

    def tap_values(self, chips) -> list[np.ndarray]:
        acts = self.graph.forward(self.to_input(chips))
        return [self._pooled(acts[t], kind) for t, kind in self.taps]

    @staticmethod
    def _pooled(a, kind):
        if kind is None or a.ndim != 4:
            return a
        return a.mean(axis=(2, 3)) if kind == "avg" else a.max(axis=(2, 3))

    def predict(self, chips) -> list[np.ndarray]:
        """Per head, its outputs as the Keras head gives them (probabilities, CORAL logits or the linear output)."""
        return [h.forward(t)[2] for h, t in zip(self.heads, self.tap_values(chips))]

    def explain(self, chips, classes, batch: int = 16) -> dict:
        """maps (N, K, H, W) summed over colour channels; output s (N, K); input_sum (N, K); tap_sum (N, K);
        layers {name: (N, K) relevance at the layer's output / s}. Chips are done ``batch`` at a time."""
        chips = np.asarray(chips)
        parts = [self._explain(chips[a : a + batch], [None if c is None else np.asarray(c)[a : a + batch]
                                                      for c in classes]) for a in range(0, len(chips), batch)]
        out = {k: np.concatenate([p[k] for p in parts]) for k in ("maps", "output", "input_sum", "tap_sum")}
        out["layers"] = {k: np.concatenate([p["layers"][k] for p in parts]) for k in parts[0]["layers"]}
        return out

    def _explain(self, chips, classes) -> dict:
        n = len(chips)
        acts = self.graph.forward(self.to_input(chips))
        maps, outs, tap_sums, in_sums, layers = [], [], [], [], {}
        for k, (h, (tensor, kind)) in enumerate(zip(self.heads, self.taps)):
            a = acts[tensor]
            cls = classes[k] if classes[k] is not None else np.zeros(n, dtype=np.int64)
            r_tap, s, _ = h.relevance(self._pooled(a, kind), cls, self.rule, self.epsilon)
            if kind is not None and a.ndim == 4:  # back through the stored features' global pooling
                r = r_tap.reshape(n, -1)[:, :, None, None]
                if kind == "avg":
                    r_tap = a * r / _stab(a.sum(axis=(2, 3), keepdims=True), STABILISER)
                else:
                    m = a == a.max(axis=(2, 3), keepdims=True)
                    r_tap = (m & (np.cumsum(m.reshape(*m.shape[:2], -1), axis=2).reshape(m.shape) == 1)) * r
            per_layer: dict = {}
            r_in = self.graph.relevance(acts, tensor, r_tap.reshape(a.shape), self.rule, self.epsilon, per_layer)
            maps.append(r_in.sum(axis=1))
            outs.append(s)
            tap_sums.append(r_tap.reshape(n, -1).sum(axis=1))
            in_sums.append(r_in.reshape(n, -1).sum(axis=1))
            for name, v in per_layer.items():
                layers.setdefault(name, [np.full(n, np.nan) for _ in self.heads])[k] = v
        return {"maps": np.stack(maps, axis=1), "output": np.stack(outs, axis=1),
                "input_sum": np.stack(in_sums, axis=1), "tap_sum": np.stack(tap_sums, axis=1),
                "layers": {name: np.stack(v, axis=1) for name, v in layers.items()}}


def conservation(output: np.ndarray, input_sum: np.ndarray, rule: str, bound: float = BOUND) -> dict:
    """Per-face relative error |sum of input relevance - explained output| / |explained output| of one head."""
    output, input_sum = np.asarray(output, dtype=np.float64), np.asarray(input_sum, dtype=np.float64)
    err = np.abs(input_sum - output) / np.maximum(np.abs(output), 1e-12)
    return {"rule": rule, "bound": bound, "median_relative_error": round(float(np.median(err)), 6),
            "mean_relative_error": round(float(np.mean(err)), 6), "max_relative_error": round(float(np.max(err)), 6),
            "faces_over_bound": float(round(float(np.mean(err > bound)), 4)),
            "within_bound": bool(np.median(err) <= bound),
            "mean_explained_output": round(float(output.mean()), 6),
            "mean_input_relevance": round(float(input_sum.mean()), 6)}
