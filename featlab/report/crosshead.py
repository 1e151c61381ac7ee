"""A head across networks (trained on a joined file, :mod:`featlab.features.join`) applied to new data.

Such a head reads ``NETWORK:TAP`` parts of several networks; its ``config.json`` records each part's network,
source file and feature set (``join.parts``). To score it elsewhere, each network's part is checked against
that network's own record, never against the joined record (whose identity depends on the files joined):

- :func:`join_for_head`: one features file per network (``evaluate -f A.h5 -f B.h5``), each matched to its
  network by backbone (and preprocessing when the head reads one backbone twice), checked (model sha256,
  preprocessing, alignment, flip, pooling, dtype, tap shape) and joined by image id as training did;
- :func:`check_joined_file`: an already joined file, checked part by part from its own ``join`` record;
- :class:`NetworkRunners`: each network's backbone (its recorded model file, or ``--model NETWORK=FILE``),
  checked like its part, run on its own chips (its own preprocessing, flip, alignment), the parts' taps
  returned under the head's keys (``predict``, ``explain``);
- :func:`fixed_cutter`: a network's chip of an image cut where the clean image put it, so that occluded
  copies of the image go through each network at the same place (``explain``).

Every refusal is one line naming the network that does not match. No TensorFlow here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import FeatlabError
from ..paths import FUSION, differences, feature_set, preprocessing_name

#: What a file's part must share with the head's record of that network (the manifest and dataset may differ).
CHECKED = ("backbone", "preprocessing", "align", "flip", "pool", "dtype")


def is_cross_head(cfg: dict) -> bool:
    """Whether a head's config is of a head across networks (a fusion over a joined file)."""
    return bool(cfg.get("fusion")) and bool((cfg.get("join") or {}).get("parts"))


def head_parts(cfg: dict) -> list[dict]:
    """The head's parts in its input order: network, tap (as in the network's file), key (in the joined
    file), source file, feature set and tap shape."""
    by_key = {p["key"]: p for p in cfg["join"]["parts"]}
    out = []
    for f in cfg["fusion"]:
        p = by_key.get(f["tap"])
        if p is None:
            raise FeatlabError(f"the head's config.json records no network for its input part {f['tap']!r}")
        out.append({"network": p["network"], "tap": p["tap"], "key": p["key"], "file": p.get("file"),
                    "feature_set": dict(p.get("feature_set") or {}), "tap_shape": f.get("tap_shape")})
    return out


def head_networks(cfg: dict) -> dict[str, dict]:
    """{network: the feature set of its first part} in the head's order."""
    out: dict[str, dict] = {}
    for p in head_parts(cfg):
        out.setdefault(p["network"], p["feature_set"])
    return out


def _names(nets) -> str:
    nets = list(nets)
    return nets[0] if len(nets) == 1 else ", ".join(nets[:-1]) + " and " + nets[-1]


def match_files(cfg: dict, files) -> dict[str, Path]:
    """{network: file}: each file given matched to the head's network of its backbone (and preprocessing
    when the head reads that backbone twice); one line when a file fits none, two fit one, or one is missing."""
    from ..features.store import FeatureStore

    nets = head_networks(cfg)
    out: dict[str, Path] = {}
    for f in dict.fromkeys(Path(x) for x in files):
        with FeatureStore.open_read(f) as s:
            a = s.attrs
        bb = str(a.get("backbone"))
        cands = [n for n, fs in nets.items() if fs.get("backbone") == bb]
        if len(cands) > 1:
            pre = preprocessing_name(a.get("preprocessing"), bool(a.get("align")))
            cands = [n for n in cands if preprocessing_name(nets[n].get("preprocessing"),
                                                            bool(nets[n].get("align"))) == pre] or cands
        if not cands:
            raise FeatlabError(f"{f} holds network {bb}, which the head does not read (it reads {_names(nets)}): "
                               "give one features file per network")
        if len(cands) > 1:
            raise FeatlabError(f"{f} could be network {' or '.join(cands)} of the head (same backbone and "
                               "preprocessing): give one features file per network")
        if cands[0] in out:
            raise FeatlabError(f"{out[cands[0]]} and {f} are both network {cands[0]}: give one features file per "
                               "network")
        out[cands[0]] = f
    missing = [n for n in nets if n not in out]
    if missing:
        raise FeatlabError(f"no features file of network {missing[0]} given: the head reads {_names(nets)}; give "
                           "one features file per network (-f FILE.h5 for each)")
    return {n: out[n] for n in nets}


def check_network_file(store, network: str, cfg: dict) -> None:
    """Refuse a features file for ``network`` made differently from the head's record of that network."""
    a = store.attrs
    parts = [p for p in head_parts(cfg) if p["network"] == network]
    want, have = parts[0]["feature_set"].get("model_sha256"), a.get("model_sha256")
    if want and have != want:
        raise FeatlabError(f"{store.path} (network {network}) was extracted with another model file (model_sha256 "
                           f"{str(have)[:12]}..., the head's {network} part was trained on {str(want)[:12]}...); "
                           f"give features of {network}'s own model file")
    for p in parts:
        k = store.resolve_key(p["tap"])
        if k is None:
            raise store.missing_tap(p["tap"], f" (network {network})")
        shape = [int(d) for d in store.array(k).shape[1:]]
        if p["tap_shape"] is not None and shape != list(p["tap_shape"]):
            raise FeatlabError(f"{store.path} (network {network}): tap {k} has shape {tuple(shape)}, the head expects "
                               f"{tuple(p['tap_shape'])} (different pooling or input size)")
        d = differences(feature_set(a, k), p["feature_set"], CHECKED)
        if d:
            raise FeatlabError(f"{store.path} (network {network}) was made differently from the head's {network} "
                               f"features: {', '.join(d)}")


def check_joined_file(store, cfg: dict) -> None:
    """Refuse an already joined file (``join`` record) whose parts are not the head's, naming the network."""
    join = store.attrs.get("join") or {}
    theirs = {p.get("key"): p for p in join.get("parts") or []}
    for p in head_parts(cfg):
        q = theirs.get(p["key"])
        if q is None:
            raise FeatlabError(f"{store.path} joins no {p['key']} (network {p['network']}); it joins "
                               f"{', '.join(theirs) or 'nothing'}: give one features file per network instead")
        fs = q.get("feature_set") or {}
        want = p["feature_set"].get("model_sha256")
        if want and fs.get("model_sha256") != want:
            raise FeatlabError(f"{store.path}: its network {p['network']} part was extracted with another model file "
                               f"(model_sha256 {str(fs.get('model_sha256'))[:12]}..., the head's {p['network']} part "
                               f"was trained on {str(want)[:12]}...)")
        d = differences(fs, p["feature_set"], CHECKED)
        if d:
            raise FeatlabError(f"{store.path}: its network {p['network']} part was made differently from the head's: "
                               f"{', '.join(d)}")


def join_for_head(cfg: dict, files, root, echo=None) -> tuple[Path, dict[str, Path], bool]:
    """(joined file under ``root``, {network: file}, whether these are the files the head was trained on):
    each file matched to its network and checked (:func:`check_network_file`), then joined by image id
    (:func:`featlab.features.join.join_features`) under the head's own keys."""
    from ..features.join import SEP, join_features
    from ..features.store import FeatureStore

    nets = match_files(cfg, files)
    for n, f in nets.items():
        with FeatureStore.open_read(f) as s:
            check_network_file(s, n, cfg)
    parts = head_parts(cfg)
    layer = FUSION.join(f"{p['network']}{SEP}{p['tap']}" for p in parts)
    path, key = join_features([], layer, root=root, echo=echo, labels=nets)
    if key != cfg["tap"]:
        raise FeatlabError(f"the files given store the head's taps as {key}, the head reads {cfg['tap']}")
    same = all(p.get("file") and _resolved(nets[p["network"]]) == _resolved(Path(p["file"])) for p in parts)
    return path, nets, same


def _resolved(p: Path) -> Path:
    try:
        return Path(p).resolve()
    except OSError:
        return Path(p)


def parse_models(values) -> str | dict | None:
    """``--model`` values: None, one model file (a head of one network), or {network: file} from
    ``NETWORK=FILE`` values (a head across networks)."""
    values = [str(v) for v in (values or []) if str(v)]
    if not values:
        return None
    named = [v for v in values if "=" in v and not Path(v).exists()]
    if not named:
        if len(values) > 1:
            raise FeatlabError("give --model once (heads of one network), or NETWORK=FILE per network")
        return values[0]
    if len(named) != len(values):
        raise FeatlabError("give every --model as NETWORK=FILE for a head across networks, or one model file")
    out = {}
    for v in named:
        net, path = v.split("=", 1)
        if net in out:
            raise FeatlabError(f"--model names network {net} twice")
        out[net] = path
    return out


class NetworkRunners:
    """The networks of heads across networks, each bound to its model file and run on its own chips.

    ``features(chips)``, with ``chips`` = {network: uint8 chips}, gives {head key (``NETWORK:TAP``): rows as
    the features files stored them}. All heads must read the same networks, made the same way."""

    def __init__(self, cfgs: list[dict], model=None, spinning: bool | None = None):
        from ..backbones.registry import Runner
        from ..heads.model import backbone_for
        from ..features.store import parse_key

        nets = head_networks(cfgs[0])
        for c in cfgs[1:]:
            other = head_networks(c)
            same = list(other) == list(nets) and all(
                not differences(other[n], nets[n], ("backbone", "model_sha256", "preprocessing", "align", "flip"))
                for n in nets)
            if not same:
                raise FeatlabError("the heads read different networks (or networks made differently): give heads "
                                   "across the same networks at a time")
        if model is not None and not isinstance(model, dict):
            raise FeatlabError(f"the head reads networks {_names(nets)}: name each model file's network, "
                               "--model NETWORK=FILE")
        model = dict(model or {})
        unknown = [n for n in model if n not in nets]
        if unknown:
            raise FeatlabError(f"--model {unknown[0]}=...: the head reads no network {unknown[0]} (it reads "
                               f"{_names(nets)})")
        first = {}
        for c in cfgs:
            for p in head_parts(c):
                first.setdefault(p["network"], p)
        self.networks = list(nets)
        self.backbones, self.flips, self.aligns, self.keys, self.dtypes, self.runners = {}, {}, {}, {}, {}, {}
        for n in self.networks:
            fs = nets[n]
            pseudo = {"backbone": fs.get("backbone"), "features_model_sha256": fs.get("model_sha256"),
                      "feature_set": fs, "features": first[n].get("file") or ""}
            try:
                bb, flip, align = backbone_for([pseudo], model.get(n))
            except FeatlabError as e:
                raise FeatlabError(f"network {n}: {e}") from None
            self.backbones[n], self.flips[n], self.aligns[n] = bb, flip, align
            keys, dtypes = {}, {}
            for c in cfgs:
                for p in head_parts(c):
                    if p["network"] == n:
                        name, kind, grid = parse_key(p["tap"])
                        keys[p["key"]] = (bb.tap(name), kind, grid)
                        dtypes[p["key"]] = p["feature_set"].get("dtype") or "float16"
            self.keys[n] = keys
            self.dtypes.update(dtypes)
            # the same transform as extraction, so that the heads see their inputs exactly as they were stored
            outputs = None if flip else {k: (*v, dtypes[k]) for k, v in keys.items()}
            self.runners[n] = Runner(bb, [t for t, _, _ in keys.values()], outputs=outputs, uint8_input=True,
                                     spinning=spinning)
        if len(set(self.aligns.values())) > 1:
            raise FeatlabError("the head's networks were extracted with and without --align: featlab cannot cut "
                               "one face for both")
        self.align = next(iter(self.aligns.values()))
        self.geometries = {n: bb.geometry for n, bb in self.backbones.items()}

    @property
    def name(self) -> str:
        return FUSION.join(self.networks)

    def features(self, chips: dict) -> dict[str, np.ndarray]:
        """{head key: float32 rows as stored} from each network's chips (``{network: (N, H, W, 3) uint8}``)."""
        from ..features.extract import stored_features

        out = {}
        for n in self.networks:
            raw = stored_features(self.runners[n], np.asarray(chips[n], dtype=np.uint8), self.keys[n], self.flips[n])
            for k, v in raw.items():
                out[k] = v.astype(self.dtypes[k]).astype(np.float32)  # as stored
        return out


def fixed_cutter(geometry, image: np.ndarray, align: bool):
    """``cut(img) -> chip``: the chip ``geometry`` cuts from ``image`` (as ``geometry.chip(image, align)``), with
    the detection and landmarks found on ``image`` kept for every image of its size (an occluded copy is cut
    at the same place, not re-detected). BadImage when ``image`` gives no face or no usable landmarks."""
    from ..data.faces import ARCFACE_DST, _dlib, check_landmarks, detect, warp_arcface, warp_to_template
    from ..data.images import BadImage

    h, w = image.shape[:2]
    if align:
        dets = detect(image)
        if not dets:
            raise BadImage("no face found")
        rect, _, kps = dets[0]
        if kps is not None and geometry.kind == "arcface" and geometry.preprocessing == "template-5pt":
            pts = np.asarray(kps, dtype=np.float64)
            return lambda im: warp_to_template(im, pts, ARCFACE_DST, geometry.size)
    elif geometry.preprocessing != "template-5pt":
        return lambda im: geometry.chip(im, align=False)  # resize / center-crop: no landmarks to keep
    else:
        rect = _dlib()[0].rectangle(0, 0, w - 1, h - 1)
    if geometry.preprocessing != "template-5pt":
        return lambda im: geometry._chip_from_rect(im, rect)  # the detection box, kept
    dlib, _, predictor = _dlib()
    shape = predictor(image, rect)
    pts = np.array([[shape.part(i).x, shape.part(i).y] for i in range(5)], dtype=np.float64)
    check_landmarks(pts, image.shape)
    if geometry.kind == "dlib-chip":
        return lambda im: np.ascontiguousarray(dlib.get_face_chip(im, shape, size=geometry.size,
                                                                  padding=geometry.padding))
    return lambda im: warp_arcface(im, pts, geometry.size)
