"""Backbone descriptors: any frozen ONNX network as a featlab backbone, described by data, not code.

A descriptor is a small TOML table. It lives in one of three places (the first found wins):

- ``featlab.toml``, as ``[backbones.NAME]``: then ``--backbone NAME`` works in every command;
- beside the model file, as ``MODEL.onnx.toml`` (``--backbone NAME --model MODEL.onnx``; the table's
  ``name``, when given, must be NAME);
- any file, with ``featlab layers/extract --descriptor FILE`` (the backbone is then the file's ``name``,
  else its stem).

Example (every key but ``input_size`` and a model source is optional)::

    [backbones.mynet]
    summary = "my MobileNet face net"
    model = "models/mynet.onnx"          # relative to featlab.toml (or to the descriptor file)
    # package = "mywheel"                # or a file inside an installed wheel ...
    # resource = "models/mynet.onnx"     # ... at this path in the package
    # install = "mywheel>=1.0"           # what to pip install when the package is missing
    sha256 = "fb143e..."                 # pin: another file stops with one line
    input_size = 112                     # the square chip, in pixels
    geometry = "arcface"                 # arcface (112 template, 5-point warp), dlib-chip, resize
    padding = 0.0                        # dlib-chip padding
    color = "rgb"                        # channel order the network expects: rgb or bgr
    layout = "nchw"                      # nchw or nhwc
    mean = [127.5, 127.5, 127.5]         # subtracted from 0-255 pixels, in the network's channel order
    std = [127.5, 127.5, 127.5]          # then divided by (or scale = 0.0078125: multiplied by)
    input = "data"                       # the image input (default: the graph's only non-constant input)
    repair = false                       # true: drop graph inputs that are initializers or unused, free the batch dim
    tap_pattern = 'conv_\\d+_relu'       # taps: nodes whose name (or output) fully matches this regex ...
    tap_ops = ["Relu", "PRelu"]          # ... and/or whose op type is one of these (both given: both must hold)
    taps = ["pool"]                      # ... plus these nodes / tensors, by name
    embedding = "fc1"                    # the final output (default: the graph's first output); alias `embedding`
    aliases = { block1 = "conv_1_relu" } # more names for taps
    notes = { fc1 = "128-d identity embedding" }
    default_taps = ["conv_6_relu", "fc1"]
    default_batch = 64

A tap's canonical name is its node's name (its output tensor's when the node has none); the tensor name
is an alias when it differs. Taps are listed in graph order; ``depth`` (0 = input, 1 = embedding) is set
for them like for every backbone (:func:`featlab.backbones.taps.tap_depths`).

Everything is checked, and a problem is one line (:class:`FeatlabError`): an unknown or mistyped key,
a model file whose sha256 is not the pin, an input that is not in the graph or not of ``input_size``,
a pattern, op or name that matches no node, an alias or default tap that names no tap.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from ..errors import FeatlabError, did_you_mean

Triple = Union[float, list[float]]


class Descriptor(BaseModel):
    """One backbone, as data. See the module docstring for each key."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: Optional[str] = None
    summary: str = ""
    model: Optional[str] = None
    package: Optional[str] = None
    resource: Optional[str] = None
    install: Optional[str] = None
    sha256: Optional[str] = None
    input_size: int = Field(..., gt=0)
    geometry: Literal["arcface", "dlib-chip", "resize"] = "arcface"
    padding: float = Field(0.0, ge=0.0)
    color: Literal["rgb", "bgr"] = "rgb"
    layout: Literal["nchw", "nhwc"] = "nchw"
    mean: Triple = 0.0
    std: Optional[Triple] = None
    scale: Optional[Triple] = None
    input: Optional[str] = None
    repair: bool = False
    taps: list[str] = Field(default_factory=list)
    tap_pattern: Optional[str] = None
    tap_ops: list[str] = Field(default_factory=list)
    embedding: Optional[str] = None
    aliases: dict[str, str] = Field(default_factory=dict)
    notes: dict[str, str] = Field(default_factory=dict)
    default_taps: list[str] = Field(default_factory=list)
    default_batch: int = Field(64, gt=0)
    #: where the descriptor was read (relative model paths are relative to its folder); not a TOML key
    _origin: Optional[str] = PrivateAttr(None)

    @property
    def origin(self) -> Optional[str]:
        return self._origin

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v):
        if v is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", v):
            raise ValueError("must be 64 hexadecimal digits")
        return v.lower() if v else v

    @field_validator("mean", "std", "scale")
    @classmethod
    def _triple(cls, v):
        if isinstance(v, list) and len(v) != 3:
            raise ValueError("must be one number or three (one per channel)")
        return v

    @field_validator("tap_pattern")
    @classmethod
    def _regex(cls, v):
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"not a regular expression ({e})") from None
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.std is not None and self.scale is not None:
            raise ValueError("give std or scale, not both")
        if self.model is None and self.package is None:
            raise ValueError("needs `model` (a path) or `package` + `resource` (a file in an installed wheel)")
        if (self.package is None) != (self.resource is None):
            raise ValueError("`package` and `resource` go together")
        if not (self.taps or self.tap_pattern or self.tap_ops or self.embedding):
            raise ValueError("names no taps: give tap_pattern, tap_ops, taps or embedding")
        return self

    # ---- derived
    def normalisation(self):
        """(mean, scale) as featlab applies them: ``(x - mean) * scale``, per channel or one number."""
        mean = tuple(float(m) for m in self.mean) if isinstance(self.mean, list) else (float(self.mean),) * 3
        if self.std is not None:
            std = self.std if isinstance(self.std, list) else [self.std] * 3
            if any(s == 0 for s in std):
                raise FeatlabError(f"{self.where()}: std has a zero")
            scale = tuple(1.0 / float(s) for s in std)
        elif self.scale is not None:
            scale = tuple(float(s) for s in self.scale) if isinstance(self.scale, list) else (float(self.scale),) * 3
        else:
            scale = (1.0,) * 3
        return mean, (scale[0] if len(set(scale)) == 1 else scale)

    def where(self) -> str:
        return f"backbone {self.name}" + (f" ({self.origin})" if self.origin else "")


def _message(err: dict) -> str:
    loc = ".".join(str(x) for x in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        near = did_you_mean(err["loc"][-1], Descriptor.model_fields, n=1).strip()
        return f"unknown key {loc!r}" + (f" ({near})" if near else "")
    return f"{loc}: {msg}" if loc else msg


def parse(data: dict, name: str | None = None, origin: str | None = None) -> Descriptor:
    """A loaded TOML table -> a checked :class:`Descriptor`; one line on any problem."""
    where = f"backbone {name or data.get('name') or '?'}" + (f" ({origin})" if origin else "")
    if not isinstance(data, dict):
        raise FeatlabError(f"{where}: a backbone descriptor must be a table of keys")
    given = data.get("name")
    if name and given and given != name:
        raise FeatlabError(f"{where}: its name is {given!r}, not {name!r}")
    try:
        d = Descriptor.model_validate(dict(data, name=name or given))
    except ValidationError as err:
        first = min(err.errors(), key=lambda e: e["type"] != "extra_forbidden")
        raise FeatlabError(f"{where}: {_message(first)}") from None
    d._origin = origin
    if not d.name:
        raise FeatlabError(f"{where}: the descriptor has no name")
    return d


def read_file(path: str | Path, name: str | None = None) -> Descriptor:
    """A descriptor file: its top-level keys, or one ``[backbones.NAME]`` table. Beside its model
    (``MODEL.onnx.toml``) it needs no ``model`` key."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FeatlabError(f"--descriptor {path}: no such file")
    try:
        data = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise FeatlabError(f"{p}: not valid TOML ({e})") from None
    tables = data.get("backbones")
    if isinstance(tables, dict) and len(data) == 1:
        if name and name in tables:
            return parse(tables[name], name, str(p))
        if len(tables) == 1:
            (key, table), = tables.items()
            return parse(table, key, str(p))
        raise FeatlabError(f"{p}: holds backbones {', '.join(tables)}; say which with --backbone")
    if p.name.endswith(".onnx.toml") and "model" not in data and "package" not in data:
        data = dict(data, model=p.name.removesuffix(".toml"))
    return parse(data, name or data.get("name") or p.name.removesuffix(".toml").removesuffix(".onnx"), str(p))


def from_config(name: str) -> Descriptor | None:
    """``[backbones.NAME]`` of featlab.toml, or None."""
    from .. import config

    tables = config.load().get("backbones") or {}
    if name not in tables:
        return None
    return parse(tables[name], name, str(Path.cwd() / config.FILE_NAME))


def config_names() -> list[str]:
    from .. import config

    try:
        return list(config.load().get("backbones") or {})
    except FeatlabError:
        return []


def sidecar(model: str | Path | None) -> Path | None:
    """``MODEL.onnx.toml`` beside a model file, when there is one."""
    if not model:
        return None
    p = Path(str(model) + ".toml").expanduser()
    return p if p.is_file() else None


# ------------------------------------------------------------------------------------------ the graph
def real_inputs(model) -> list:
    """Graph inputs that are not initializers (what must be fed)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def repair_inputs(model):
    """A copy of ``model`` that onnxruntime takes: graph inputs that are initializers or that no node reads
    (left over by some exporters, e.g. MXNet's) are removed, and the batch dimension of the image input and
    the outputs is left free. Nothing that is computed changes."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    inits = {t.name for t in g.initializer}
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep = [i for i in g.input if i.name not in inits and i.name in used]
    del g.input[:]
    g.input.extend(keep)
    for v in list(g.input) + list(g.output):
        dims = v.type.tensor_type.shape.dim
        if len(dims) >= 2:
            dims[0].ClearField("dim_value")
            dims[0].dim_param = "N"
    del g.value_info[:]  # recorded with batch 1; shape inference redoes them
    return m


def _fixed_shapes(model, d: Descriptor) -> dict[str, tuple[int, ...]]:
    """Per-face shapes of every tensor, with the image input fixed to ``input_size`` (either layout)."""
    import onnx
    from onnx import shape_inference

    m = onnx.ModelProto()
    m.CopyFrom(model)
    inp = next(i for i in m.graph.input if i.name == image_input(model, d))
    dims = inp.type.tensor_type.shape.dim
    if len(dims) == 4:
        spatial = (2, 3) if d.layout == "nchw" else (1, 2)
        for k in spatial:
            if not dims[k].dim_value:
                dims[k].ClearField("dim_param")
                dims[k].dim_value = int(d.input_size)
    try:
        m = shape_inference.infer_shapes(m)
    except Exception as e:  # noqa: BLE001
        raise FeatlabError(f"{d.where()}: ONNX shape inference fails on the graph ({str(e).splitlines()[0][:160]})") from None
    from .taps import tensor_shapes

    return tensor_shapes(m)


def image_input(model, d: Descriptor) -> str:
    """The name of the image input, checked: it exists, it is the first graph input, it has input_size."""
    real = real_inputs(model)
    names = [i.name for i in real]
    fix = " (set repair = true to drop inputs that no node reads)" if not d.repair else ""
    if d.input is not None:
        if d.input not in names:
            raise FeatlabError(f"{d.where()}: the graph has no input {d.input!r}; its inputs are {', '.join(names) or 'none'}")
        want = d.input
    elif len(real) == 1:
        want = names[0]
    else:
        raise FeatlabError(f"{d.where()}: the graph has {len(real)} inputs ({', '.join(names[:5])}), featlab feeds "
                           f"one image: name it with `input`{fix}")
    if model.graph.input[0].name != want or len(real) > 1:
        raise FeatlabError(f"{d.where()}: the graph's inputs are {', '.join(names[:5])}; featlab feeds only {want!r}{fix}")
    dims = [x.dim_value for x in real[0].type.tensor_type.shape.dim]
    if len(dims) != 4:
        raise FeatlabError(f"{d.where()}: input {want!r} has {len(dims)} dimensions, not 4 (N, C, H, W or N, H, W, C)")
    hw = (dims[2], dims[3]) if d.layout == "nchw" else (dims[1], dims[2])
    ch = dims[1] if d.layout == "nchw" else dims[3]
    if any(x and x != d.input_size for x in hw):
        raise FeatlabError(f"{d.where()}: input {want!r} is {hw[0]}x{hw[1]} ({d.layout}), not input_size "
                           f"{d.input_size}x{d.input_size}")
    if ch and ch != 3:
        raise FeatlabError(f"{d.where()}: input {want!r} has {ch} channels in {d.layout} layout, not 3 (check `layout`)")
    return want


def resolve(model, d: Descriptor) -> list:
    """The descriptor's taps in ``model``, in graph order, with shapes; one line when something is not there."""
    from .taps import TapInfo

    image_input(model, d)
    shapes = _fixed_shapes(model, d)
    nodes = [n for n in model.graph.node if n.output and n.output[0]]
    by_name: dict[str, int] = {}
    for i, n in enumerate(nodes):
        by_name.setdefault(n.name or n.output[0], i)
        for o in n.output:
            by_name.setdefault(o, i)
    example = ", ".join((n.name or n.output[0]) for n in nodes[:: max(1, len(nodes) // 4)][:4])
    chosen: set[int] = set()
    if d.tap_pattern or d.tap_ops:
        rx = re.compile(d.tap_pattern) if d.tap_pattern else None
        ops = set(d.tap_ops)
        hit = [i for i, n in enumerate(nodes)
               if (rx is None or rx.fullmatch(n.name) or rx.fullmatch(n.output[0]))
               and (not ops or n.op_type in ops)]
        if not hit:
            what = " and ".join(x for x in (f"tap_pattern {d.tap_pattern!r}" if rx else "",
                                            f"tap_ops {sorted(ops)}" if ops else "") if x)
            have = sorted({n.op_type for n in nodes})
            raise FeatlabError(f"{d.where()}: {what} matches no node of the graph (its nodes are named like {example}; "
                               f"its ops are {', '.join(have[:12])})")
        chosen.update(hit)
    for t in d.taps:
        if t not in by_name:
            raise FeatlabError(f"{d.where()}: tap {t!r} is not a node or tensor of the graph{_near(t, by_name)}")
        chosen.add(by_name[t])
    emb = d.embedding or (model.graph.output[0].name if model.graph.output else None)
    emb_index = None
    if emb is not None:
        if emb not in by_name:
            raise FeatlabError(f"{d.where()}: embedding {emb!r} is not a node or tensor of the graph{_near(emb, by_name)}")
        emb_index = by_name[emb]
        chosen.add(emb_index)
    taps = []
    for i in sorted(chosen):
        n = nodes[i]
        tensor = n.output[0]
        if i == emb_index and emb in n.output:
            tensor = emb
        canonical = n.name or tensor
        others = [tensor] + (["embedding"] if i == emb_index and canonical != "embedding" else [])
        taps.append(TapInfo(canonical, tensor, tuple(shapes.get(tensor, ())), len(taps),
                            tuple(x for x in dict.fromkeys(others) if x != canonical)))
    # user aliases and notes, by any name of a tap
    known = {}
    for k, t in enumerate(taps):
        for x in (t.name, t.tensor, *t.aliases):
            known.setdefault(x, k)
    for alias, target in d.aliases.items():
        if target not in known:
            raise FeatlabError(f"{d.where()}: alias {alias} = {target!r} names no tap{_near(target, known)}")
        if alias in known and known[alias] != known[target]:
            raise FeatlabError(f"{d.where()}: alias {alias!r} already names tap {taps[known[alias]].name}")
        k = known[target]
        taps[k] = _with(taps[k], aliases=tuple(dict.fromkeys((*taps[k].aliases, alias))))
        known[alias] = k
    for target, note in d.notes.items():
        if target not in known:
            raise FeatlabError(f"{d.where()}: note for {target!r}, which names no tap{_near(target, known)}")
        taps[known[target]] = _with(taps[known[target]], note=note)
    for t in d.default_taps:
        if t not in known:
            raise FeatlabError(f"{d.where()}: default tap {t!r} names no tap{_near(t, known)}")
    return taps


def _with(tap, **kw):
    from dataclasses import replace

    return replace(tap, **kw)


def _near(name: str, names) -> str:
    near = difflib.get_close_matches(name, list(names), n=3, cutoff=0.5)
    return f"; nearest: {', '.join(near)}" if near else ""


def locate(d: Descriptor, model: str | None) -> Path:
    """The model file: ``--model``, else ``[models] NAME`` of featlab.toml, else the descriptor's ``model`` or
    its ``package``/``resource``; checked against the ``sha256`` pin."""
    from importlib import resources

    from .. import config
    from ..data.manifest import file_sha256

    looked = []
    path = None
    if model:
        path = Path(model).expanduser()
        if not path.is_file():
            raise FeatlabError(f"--model {model}: no such file")
    elif config.get("models", d.name):
        cfg = config.get("models", d.name)
        path = Path(cfg).expanduser()
        if not path.is_file():
            raise FeatlabError(f"featlab.toml [models] {d.name} = {cfg}: no such file")
    elif d.model is not None:
        path = Path(d.model).expanduser()
        if not path.is_absolute() and d.origin:
            path = Path(d.origin).parent / path
        if not path.is_file():
            raise FeatlabError(f"{d.where()}: model file {path} not found (pass --model PATH.onnx)")
    else:
        install = d.install or d.package
        looked.append("--model (not given)")
        looked.append(f"featlab.toml [models].{d.name} (not set)")
        try:
            path = Path(str(resources.files(d.package).joinpath(d.resource)))
        except ModuleNotFoundError:
            raise FeatlabError(f"no model file for backbone {d.name}: looked at {'; '.join(looked)}; package "
                               f"{d.package!r} is not installed: `pip install '{install}'`, or pass --model PATH.onnx") from None
        if not path.is_file():
            raise FeatlabError(f"no model file for backbone {d.name}: looked at {'; '.join(looked)}; {path} "
                               f"(missing from the {d.package} package): `pip install --force-reinstall '{install}'`, "
                               "or pass --model PATH.onnx")
    if d.sha256:
        got = file_sha256(path)
        if got != d.sha256:
            raise FeatlabError(f"{path} is not the model {d.where()} pins: sha256 {got[:16]}…, expected "
                               f"{d.sha256[:16]}… (another file or version; pass the right --model)")
    return path
