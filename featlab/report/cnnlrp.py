"""LRP of a network trained from pixels (the Levi & Hassner CNN of ``featlab train-cnn``), in NumPy (float64).

Takes a trained CNN folder (``cnn.keras`` read with h5py, no TensorFlow) and crops as the CNN sees them; gives the
same result as :class:`featlab.report.lrp.LRPExplainer` (signed per-pixel maps, the explained output, the
relevance summed at the input, after the convolutions, and at each convolution's output), so ``featlab explain
--method lrp`` reports the CNN's conservation beside a frozen tap's head.

The explained output is the heads' (:meth:`featlab.report.lrp.NumpyHead.contrast`: the logit contrast of the
explained class, the expected-age score). Rules are the heads' composites (:func:`featlab.report.lrp.composite`):
under ``epsilon-plus-flat`` the flat rule on conv1, z+ on conv2 and conv3, epsilon on the dense layers. Around
them: the input standardisation is a 1-to-1 affine map (relevance unchanged), ReLU and dropout pass it, max
pools give it to the window's maximum (winner takes all), and the local response normalisation passes it
unchanged (the identity rule, as in Lapuschkin et al.'s LRP toolbox for Caffe). Other architectures (the
keras.applications ones, with batch normalisation and depthwise convolutions) are refused with one line: explain
them with occlusion or RISE.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import FeatlabError
from .lrp import (EPSILON, ConvGeom, NumpyHead, check_rule, composite, contribution_rule, conv, conv_t, keras_layers,
                  linear_rule)


class NumpyCNN(NumpyHead):
    """The Levi & Hassner CNN rebuilt from cnn.keras: standardise, (conv, relu, max-pool, LRN) x 2, conv, relu,
    max-pool, flatten (channels last, as Keras), dense layers, the output."""

    def __init__(self, cnn_dir, cfg: dict | None = None):
        cnn_dir = Path(cnn_dir)
        self.cfg = cfg or json.loads((cnn_dir / "config.json").read_text())
        if self.cfg.get("arch") != "levi-hassner":
            raise FeatlabError(f"{cnn_dir}: LRP explains the levi-hassner CNN, not {self.cfg.get('arch')} (batch "
                               "normalisation and depthwise convolutions have no rule here): use occlusion or rise")
        layers = []
        for cls, c, var in keras_layers(cnn_dir / "cnn.keras"):
            if cls in ("InputLayer", "Dropout"):
                continue
            if cls == "Normalization":
                mean = np.asarray(c["mean"], dtype=np.float64).reshape(-1)
                std = np.sqrt(np.asarray(c["variance"], dtype=np.float64).reshape(-1))
                layers.append(("standardise", mean, np.maximum(std, 1e-7)))
            elif cls == "Conv2D":
                if c.get("activation") != "relu":
                    raise FeatlabError(f"{cnn_dir}: conv layer {c['name']} is not followed by a ReLU")
                w = var[0].transpose(3, 2, 0, 1)  # (kh, kw, C, O) -> (O, C, kh, kw)
                kh = w.shape[2]
                p = kh // 2 if c["padding"] == "same" else 0
                layers.append(("conv", c["name"], w, var[1], ConvGeom(tuple(c["strides"]), (p, p, p, p))))
            elif cls == "MaxPooling2D":
                layers.append(("maxpool", int(c["pool_size"][0]), int(c["strides"][0])))
            elif cls == "LocalResponseNormalization":
                layers.append(("lrn", c["size"], c["alpha"], c["beta"], c["k"]))
            elif cls == "Flatten":
                layers.append(("flatten",))
            elif cls == "Dense":
                act = c.get("activation", "linear")
                if act not in ("relu", "linear", "softmax"):
                    raise FeatlabError(f"{cnn_dir}: LRP has no rule for the dense activation {act!r}")
                layers.append(("dense", var[0], var[1], act))
            else:
                raise FeatlabError(f"{cnn_dir}: LRP has no rule for the CNN's {cls} layer {c.get('name')!r}")
        self.layers = layers
        self.kind = self.cfg["output"]

    # ------------------------------------------------------------------------ forward
    @staticmethod
    def _pool(x, size, stride):
        n, c, h, w = x.shape
        ho, wo = (h - size) // stride + 1, (w - size) // stride + 1
        out = np.full((n, c, ho, wo), -np.inf)
        for i in range(size):
            for j in range(size):
                out = np.maximum(out, x[:, :, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride])
        return out

    @staticmethod
    def _pool_back(x, out, r, size, stride):
        """Winner takes all: each pooled unit's relevance to the first maximum of its window."""
        n, c, ho, wo = out.shape
        g = np.zeros_like(x)
        taken = np.zeros(out.shape, dtype=bool)
        for i in range(size):
            for j in range(size):
                sl = (slice(None), slice(None), slice(i, i + stride * (ho - 1) + 1, stride),
                      slice(j, j + stride * (wo - 1) + 1, stride))
                m = (x[sl] == out) & ~taken
                g[sl] += np.where(m, r, 0.0)
                taken |= m
        return g

    @staticmethod
    def _lrn(x, size, alpha, beta, k):
        r = size // 2
        sq = np.pad(np.square(x), ((0, 0), (r, r), (0, 0), (0, 0)))
        c = x.shape[1]
        s = sum(sq[:, i : i + c] for i in range(size))
        return x / np.power(k + (alpha / size) * s, beta)

    def trace(self, crops: np.ndarray) -> list:
        """Every layer's (kind, input, output) for uint8/float crops (N, H, W, 3)."""
        x = np.asarray(crops, dtype=np.float64).transpose(0, 3, 1, 2)
        steps = []
        for L in self.layers:
            kind = L[0]
            if kind == "standardise":
                y = (x - L[1][None, :, None, None]) / L[2][None, :, None, None]
            elif kind == "conv":
                y = np.maximum(conv(x, L[2], L[4]) + L[3][None, :, None, None], 0.0)
            elif kind == "maxpool":
                y = self._pool(x, L[1], L[2])
            elif kind == "lrn":
                y = self._lrn(x, *L[1:])
            elif kind == "flatten":
                y = x.transpose(0, 2, 3, 1).reshape(len(x), -1)  # Keras flattens channels last
            else:
                z = x @ L[1] + L[2]
                y = np.maximum(z, 0.0) if L[3] == "relu" else z
            steps.append((L, x, y))
            x = y
        return steps

    def forward_crops(self, crops):
        """(last logits z, outputs as Keras gives them)."""
        z = self.trace(crops)[-1][2]
        if self.layers[-1][3] == "softmax":
            e = np.exp(z - z.max(axis=1, keepdims=True))
            return z, e / e.sum(axis=1, keepdims=True)
        return z, z

    # ------------------------------------------------------------------------ relevance
    def explain_crops(self, crops, classes, rule: str, eps: float = EPSILON) -> dict:
        steps = self.trace(crops)
        z = steps[-1][2]
        out = self.forward_crops(crops)[1]
        v = self.contrast(z, out, classes)
        L, x, _ = steps[-1]
        c = np.einsum("nf,fk,nk->nf", x, L[1], v)
        bias = (v * L[2][None, :]).sum(axis=1)
        s = c.sum(axis=1) + bias
        r = contribution_rule(c, s, composite(rule, "dense", False), bias, eps)
        n = len(x)
        flat_sum, cuts = None, {}
        first_conv = next(i for i, st in enumerate(steps) if st[0][0] == "conv")
        for idx in range(len(steps) - 2, -1, -1):
            L, x, y = steps[idx]
            kind = L[0]
            if kind == "dense":
                r = linear_rule(x, L[1], L[2][None, :], r, composite(rule, "dense", False),
                                lambda a, m: a @ m, lambda g, m: g @ m.T, eps)
            elif kind == "flatten":
                flat_sum = r.sum(axis=1)
                r = r.reshape(n, x.shape[2], x.shape[3], x.shape[1]).transpose(0, 3, 1, 2)
            elif kind == "maxpool":
                r = self._pool_back(x, y, r, L[1], L[2])
            elif kind == "conv":
                cuts[L[1]] = r.reshape(n, -1).sum(axis=1)
                g = L[4]
                r = linear_rule(x, L[2], L[3][None, :, None, None], r, composite(rule, "conv", idx == first_conv),
                                lambda a, m: conv(a, m, g), lambda q, m, xs=x.shape: conv_t(q, m, g, xs), eps)
            # standardise, lrn: relevance unchanged
        return {"maps": r.sum(axis=1), "output": s, "input_sum": r.reshape(n, -1).sum(axis=1), "tap_sum": flat_sum,
                "layers": {k: cuts[k] / np.where(s == 0, np.nan, s) for k in cuts}}


class CNNExplainer:
    """LRP maps of trained CNNs on crops: ``explain(crops, classes) -> dict`` as :class:`featlab.report.lrp.LRPExplainer`."""

    def __init__(self, cnn_dirs, cfgs=None, rule: str = "epsilon-plus-flat", epsilon: float = EPSILON):
        self.rule = check_rule(rule)
        self.epsilon = float(epsilon)
        self.nets = [NumpyCNN(d, c) for d, c in zip(cnn_dirs, cfgs or [None] * len(cnn_dirs))]

    def predict(self, crops) -> list[np.ndarray]:
        return [n.forward_crops(crops)[1] for n in self.nets]

    def explain(self, crops, classes, batch: int = 16) -> dict:
        crops = np.asarray(crops)
        parts = []
        for a in range(0, len(crops), batch):
            per = []
            for k, net in enumerate(self.nets):
                cls = classes[k] if classes[k] is not None else [0] * len(crops)
                per.append(net.explain_crops(crops[a : a + batch], np.asarray(cls)[a : a + batch], self.rule,
                                             self.epsilon))
            parts.append(per)
        out = {key: np.concatenate([np.stack([p[k][key] for k in range(len(self.nets))], axis=1) for p in parts])
               for key in ("maps", "output", "input_sum", "tap_sum")}
        names = list(dict.fromkeys(name for p in parts for q in p for name in q["layers"]))
        out["layers"] = {name: np.concatenate([np.stack([q["layers"].get(name, np.full(len(q["output"]), np.nan))
                                                         for q in p], axis=1) for p in parts]) for name in names}
        return out

