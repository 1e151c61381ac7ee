"""featlab's NumPy LRP (featlab.report.lrp) against zennit + onnx2torch on fixture networks.

Each fixture is an ONNX graph (random weights, seeded); featlab explains it straight from the graph, zennit
explains the same graph converted by onnx2torch, with the composite featlab's ``--rule`` names:

- ``epsilon``: Epsilon(1e-6) on Conv and Linear;
- ``alpha2beta1``: AlphaBeta(2, 1) on Conv (biases ignored), Epsilon on Linear (zennit's EpsilonAlpha2Beta1);
- ``epsilon-plus-flat``: Flat on the first layer, ZPlus on Conv (biases ignored), Epsilon on Linear
  (zennit's EpsilonPlusFlat with ``zero_params='bias'`` on the convolutions).

BatchNorm: featlab folds it into the conv before it; zennit gets the same graph with the BatchNorm folded by an
independent few lines here (onnx2torch's graph module has no Sequential for zennit's canonizers). Per net and
rule: the Pearson correlation of the two input-relevance maps (summed over colour channels) and their largest
absolute difference relative to the largest |relevance|.

Run it with a Python that has torch, zennit and onnx2torch (e.g. ``/work/torch-venv/bin/python
bench/lrp_zennit.py``; they are not featlab dependencies). ``--tiny``: two images per net; without torch it
prints featlab's own conservation per net and rule and a line saying the zennit comparison was skipped.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from featlab.report.lrp import RULES, Graph  # noqa: E402

SIZE = 32


def _model(nodes, inits, out):
    g = helper.make_graph(nodes, "fixture",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", 3])],
                          initializer=[numpy_helper.from_array(np.asarray(v, dtype=np.float32), k)
                                       for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def plain_net(seed=0):
    """Conv+bias, ReLU, MaxPool, Conv+bias, ReLU, AveragePool, Flatten, Gemm, ReLU, Gemm."""
    r = np.random.default_rng(seed)
    inits = {"w1": r.normal(size=(8, 3, 3, 3)) * 0.5, "b1": r.normal(size=8) * 0.1,
             "w2": r.normal(size=(8, 8, 3, 3)) * 0.3, "b2": r.normal(size=8) * 0.1,
             "w3": r.normal(size=(8 * 8 * 8, 16)) * 0.1, "b3": r.normal(size=16) * 0.1,
             "w4": r.normal(size=(16, 3)), "b4": r.normal(size=3) * 0.1}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("AveragePool", ["r2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p2"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["d1"]),
             helper.make_node("Relu", ["d1"], ["r3"]),
             helper.make_node("Gemm", ["r3", "w4", "b4"], ["y"])]
    return _model(nodes, inits, "y")


def bn_net(seed=1):
    """Conv (no bias) + BatchNorm, ReLU, Conv stride 2 + BatchNorm, ReLU, MaxPool, Flatten, Gemm."""
    r = np.random.default_rng(seed)
    inits = {"w1": r.normal(size=(8, 3, 3, 3)) * 0.5, "w2": r.normal(size=(8, 8, 3, 3)) * 0.3,
             "w3": r.normal(size=(8 * 8 * 8, 3)) * 0.1, "b3": r.normal(size=3) * 0.1}
    for k in ("1", "2"):
        inits.update({f"g{k}": r.uniform(0.5, 1.5, 8), f"be{k}": r.normal(size=8) * 0.1,
                      f"mu{k}": r.normal(size=8) * 0.1, f"var{k}": r.uniform(0.5, 1.5, 8)})
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "g1", "be1", "mu1", "var1"], ["n1"]),
             helper.make_node("Relu", ["n1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("BatchNormalization", ["c2", "g2", "be2", "mu2", "var2"], ["n2"]),
             helper.make_node("Relu", ["n2"], ["r2"]),
             helper.make_node("MaxPool", ["r2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p2"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["y"])]
    return _model(nodes, inits, "y")


def fold_bn(model):
    """A copy with every Conv -> BatchNormalization pair replaced by one Conv with bias (for zennit's side)."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    inits = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in g.initializer}
    nodes, out = list(g.node), []
    by_input = {n.input[0]: n for n in nodes if n.op_type == "BatchNormalization"}
    skip = set()
    for n in nodes:
        if n.name in skip or id(n) in skip:
            continue
        bn = by_input.get(n.output[0]) if n.op_type == "Conv" else None
        if bn is None:
            out.append(n)
            continue
        w = inits[n.input[1]]
        b = inits[n.input[2]] if len(n.input) > 2 else np.zeros(w.shape[0])
        gam, beta, mu, var = (inits[i] for i in bn.input[1:5])
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        k = gam / np.sqrt(var + eps)
        wn, bname = f"{n.input[1]}_folded", f"{n.input[1]}_folded_b"
        g.initializer.extend([numpy_helper.from_array((w * k[:, None, None, None]).astype(np.float32), wn),
                              numpy_helper.from_array(((b - mu) * k + beta).astype(np.float32), bname)])
        conv = helper.make_node("Conv", [n.input[0], wn, bname], [bn.output[0]])
        conv.attribute.extend(n.attribute)
        out.append(conv)
        skip.add(id(bn))
    out = [n for n in out if id(n) not in skip]
    del g.node[:]
    g.node.extend(out)
    return m


def featlab_maps(model, x, rule, column):
    g = Graph(model, ["y"])
    acts = g.forward(x)
    r = np.zeros_like(acts["y"])
    r[:, column] = acts["y"][:, column]
    rel = g.relevance(acts, "y", r, rule)
    return rel.sum(axis=1), acts["y"][:, column], rel.reshape(len(x), -1).sum(axis=1)


def zennit_maps(model, x, rule, column):
    import torch
    from onnx2torch import convert
    from zennit.composites import LayerMapComposite, SpecialFirstLayerMapComposite, layer_map_base
    from zennit.rules import AlphaBeta, Epsilon, Flat, ZPlus
    from zennit.types import Convolution, Linear

    net = convert(fold_bn(model)).double().eval()
    if rule == "epsilon":
        comp = LayerMapComposite(layer_map_base() + [(Convolution, Epsilon(1e-6)), (torch.nn.Linear, Epsilon(1e-6))])
    elif rule == "alpha2beta1":
        comp = LayerMapComposite(layer_map_base() + [(Convolution, AlphaBeta(2.0, 1.0, zero_params="bias")),
                                                     (torch.nn.Linear, Epsilon(1e-6))])
    else:
        comp = SpecialFirstLayerMapComposite(
            layer_map_base() + [(Convolution, ZPlus(zero_params="bias")), (torch.nn.Linear, Epsilon(1e-6))],
            first_map=[(Linear, Flat())])
    inp = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    with comp.context(net) as m:
        y = m(inp)
        grad = torch.zeros_like(y)
        grad[:, column] = y[:, column].detach()
        (rel,) = torch.autograd.grad(y, inp, grad)
    return rel.detach().numpy().sum(axis=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="two images per net; skip zennit when torch is missing")
    ap.add_argument("--n", type=int, default=16, help="images per net")
    args = ap.parse_args(argv)
    n = 2 if args.tiny else args.n
    try:
        import onnx2torch  # noqa: F401
        import torch  # noqa: F401
        import zennit  # noqa: F401
        have = True
    except ImportError:
        have = False
    nets = {"plain (conv, max/avg pool, dense)": plain_net(), "bn (conv + BatchNorm folded)": bn_net()}
    x = np.random.default_rng(3).uniform(-1, 1, (n, 3, SIZE, SIZE))
    print(f"featlab LRP vs zennit + onnx2torch, {n} images of {SIZE}x{SIZE} per net, explained output: column 0")
    print("| net | rule | featlab conservation (median rel. error) | correlation with zennit | max abs diff / max abs |")
    print("|---|---|---|---|---|")
    worst = 1.0
    for name, model in nets.items():
        for rule in RULES:
            t0 = time.perf_counter()
            ours, y, total = featlab_maps(model, x, rule, 0)
            cons = float(np.median(np.abs(total - y) / np.abs(y)))
            if have:
                theirs = zennit_maps(model, x, rule, 0)
                corr = float(np.mean([np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(ours, theirs)]))
                diff = float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))
                worst = min(worst, corr)
                print(f"| {name} | {rule} | {cons:.2e} | {corr:.6f} | {diff:.2e} |")
            else:
                print(f"| {name} | {rule} | {cons:.2e} | skipped | skipped |")
            del t0
    if have:
        import torch
        import zennit

        print(f"zennit comparison: {len(nets)} nets x {len(RULES)} rules, lowest mean correlation {worst:.6f} "
              f"(torch {torch.__version__}, zennit {getattr(zennit, '__version__', '?')})")
    else:
        print("zennit comparison: skipped (torch, zennit or onnx2torch not installed here; run this script with "
              "a Python that has them, e.g. /work/torch-venv/bin/python)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
