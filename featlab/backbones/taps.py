"""Taps: named intermediate tensors of a backbone graph, and how to expose them.

A tap is what a researcher asks for by name (``stage4_unit1_conv1``, ``res3``)
or by index in network order. Backbone-specific resolvers (``iresnet``,
``dlibnet``, the dlib-age rules in ``backbones``) turn a graph into a list of
:class:`TapInfo`; this module holds the common record and the helpers that
every backbone shares: lookup with suggestions, and rewriting an ONNX graph so
that the requested tensors become graph outputs.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class TapInfo:
    """One tap, in the spirit of timm's ``feature_info``.

    name:    canonical name users ask for.
    tensor:  the ONNX tensor (node output) that holds it.
    shape:   per-face shape, e.g. (C, H, W) or (D,), at the backbone's input size.
    index:   position in network order (0 = closest to the input).
    aliases: other names that resolve to the same tensor.
    note:    anything a user must know (e.g. "BatchNorm folded into this conv").
    depth:   relative depth in the network, 0 = input, 1 = the embedding / final output: the number of
             weighted layers (Conv, ConvTranspose, Gemm, MatMul) on the longest path from the input to
             the tap over that number for the final output (:func:`tap_depths`). NaN until set.
    """

    name: str
    tensor: str
    shape: tuple[int, ...]
    index: int
    aliases: tuple[str, ...] = field(default=())
    note: str = ""
    depth: float = float("nan")

    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n


from ..errors import FeatlabError


class UnknownTap(FeatlabError, KeyError):
    """A tap name that the backbone does not define; the message lists near names."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0])


def find_tap(taps: list[TapInfo], wanted: str | int) -> TapInfo:
    """Resolve a tap by canonical name, alias, or integer index (negative allowed)."""
    if isinstance(wanted, int) or (isinstance(wanted, str) and wanted.lstrip("-").isdigit()):
        i = int(wanted)
        try:
            return taps[i]
        except IndexError:
            raise UnknownTap(f"tap index {i} is out of range: this backbone has {len(taps)} taps (0..{len(taps) - 1})") from None
    for t in taps:
        if wanted == t.name or wanted in t.aliases:
            return t
    names = [t.name for t in taps] + [a for t in taps for a in t.aliases]
    near = difflib.get_close_matches(wanted, names, n=5, cutoff=0.5)
    hint = f"; nearest valid names: {', '.join(near)}" if near else ""
    raise UnknownTap(f"unknown tap {wanted!r}{hint} (run `featlab layers` for the full list)")


def expose_outputs(model, tensors: list[str]):
    """Return a copy of the ONNX ``model`` whose outputs are exactly ``tensors``.

    Shapes and element types come from ONNX shape inference; nodes that no
    requested output depends on are pruned so that a shallow tap does not pay
    for the rest of the network.
    """
    import onnx
    from onnx import helper, shape_inference

    m = onnx.ModelProto()
    m.CopyFrom(model)
    try:
        inferred = shape_inference.infer_shapes(m)
    except Exception:  # noqa: BLE001 - inference is a convenience only
        inferred = m
    vi = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)}
    outs = []
    for t in tensors:
        if t in vi:
            v = onnx.ValueInfoProto()
            v.CopyFrom(vi[t])
            outs.append(v)
        else:
            outs.append(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    del m.graph.output[:]
    m.graph.output.extend(outs)
    # prune nodes that no output needs
    needed = set(tensors)
    keep = []
    for node in reversed(m.graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    keep.reverse()
    del m.graph.node[:]
    m.graph.node.extend(keep)
    used = {i for n in keep for i in n.input}
    inits = [t for t in m.graph.initializer if t.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(inits)
    return m


def infer_shapes(model, input_size: int | None = None) -> dict[str, tuple[int, ...]]:
    """Per-face shapes (batch dimension dropped) of every tensor, by ONNX shape inference.

    When the graph's spatial input dims are dynamic, ``input_size`` fixes them.
    """
    import onnx
    from onnx import shape_inference

    m = onnx.ModelProto()
    m.CopyFrom(model)
    inp = m.graph.input[0]
    dims = inp.type.tensor_type.shape.dim
    if input_size and len(dims) == 4:
        for d in dims[2:]:
            if not d.dim_value:
                d.ClearField("dim_param")
                d.dim_value = int(input_size)
    return tensor_shapes(shape_inference.infer_shapes(m))


def tensor_shapes(inferred) -> dict[str, tuple[int, ...]]:
    """Per-face shapes (batch dimension dropped) of every tensor of a shape-inferred ONNX model."""
    out = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        ds = v.type.tensor_type.shape.dim
        if len(ds) >= 1:
            out[v.name] = tuple(int(d.dim_value) for d in ds[1:])
    return out


#: ops counted as one layer of depth (a learned linear map)
WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "ConvInteger", "QLinearConv", "MatMulInteger",
                          "QLinearMatMul"})


def weighted_counts(model) -> dict[str, int]:
    """Per tensor: the number of weighted layers (:data:`WEIGHTED_OPS`) on the longest path from a graph
    input to it. Constant branches (weights, dequantisation) count 0. ONNX nodes are topologically sorted."""
    count: dict[str, int] = {}
    for n in model.graph.node:
        c = max((count.get(i, 0) for i in n.input if i), default=0) + (1 if n.op_type in WEIGHTED_OPS else 0)
        for o in n.output:
            count[o] = c
    return count


def tap_depths(model, tensors: list[str], final: str | None = None) -> list[float]:
    """Relative depth of each tensor: weighted layers up to it over those up to ``final`` (default: the
    deepest graph output), 0 = input, 1 = final, clipped to [0, 1]. A graph with no weighted layer falls
    back to node positions."""
    count = weighted_counts(model)
    outs = [final] if final else [o.name for o in model.graph.output]
    top = max((count.get(o, 0) for o in outs), default=0)
    if top > 0:
        return [min(1.0, count.get(t, 0) / top) for t in tensors]
    pos = {o: i + 1 for i, n in enumerate(model.graph.node) for o in n.output}
    last = max((pos.get(o, 0) for o in outs), default=0) or len(model.graph.node) or 1
    return [min(1.0, pos.get(t, 0) / last) for t in tensors]


def with_depths(model, taps: list[TapInfo], final: str | None = None) -> list[TapInfo]:
    """``taps`` with their ``depth`` set from ``model`` (see :func:`tap_depths`)."""
    from dataclasses import replace

    depths = tap_depths(model, [t.tensor for t in taps], final)
    return [replace(t, depth=round(float(d), 4)) for t, d in zip(taps, depths)]


def pool_features(x: np.ndarray, kind: str | None, grid: int) -> np.ndarray:
    """Pool (N, C, H, W) maps globally (grid 0) or to a grid x grid map by adaptive pooling."""
    if kind is None or x.ndim != 4:
        return x
    n, c, h, w = x.shape
    red = np.mean if kind == "avg" else np.max
    if grid <= 0:
        return red(x, axis=(2, 3))
    out = np.empty((n, c, grid, grid), dtype=x.dtype)
    for i in range(grid):
        h0, h1 = (i * h) // grid, -(-((i + 1) * h) // grid)
        for j in range(grid):
            w0, w1 = (j * w) // grid, -(-((j + 1) * w) // grid)
            out[:, :, i, j] = red(x[:, :, h0:h1, w0:w1], axis=(2, 3))
    return out


def pooled_shape(shape: tuple[int, ...], kind: str | None, grid: int) -> tuple[int, ...]:
    if kind is None or len(shape) != 3:
        return tuple(shape)
    return (shape[0],) if grid <= 0 else (shape[0], grid, grid)
