"""Explain: where in the face a head finds its evidence, and whether that is true (``featlab explain``).

Takes trained heads and faces (image files, or a features file's split); gives each face's signed maps by
the methods asked for, their means per age group drawn on the group's mean chip, the faithfulness of each
map against a random order, and ``explain_summary.json``.

- perturbation maps, :mod:`featlab.report.perturbation`: occlusion and RISE, with only the frozen ONNX
  backbone and the head as a black box ``f(chips) -> scores``;
- ``lrp``: layer-wise relevance propagation (:mod:`featlab.report.lrp`, NumPy over the ONNX graph and the
  head's saved weights): a per-pixel signed map whose sum is the explained output where the rules conserve;
  the conservation error per face (and per residual cut) goes into explain_summary.json and onto the console
  when its median exceeds the bound;
- faithfulness, :mod:`featlab.report.faithfulness`: deletion and insertion curves against a seeded random
  order, with intervals over face groups, and each pair of methods compared on the same faces.

:class:`HeadScorer` makes ``f`` from trained heads as ``featlab predict``
runs them (same chips, same stored-features transform); :func:`explain_images`
and :func:`explain_dataset` are the two views of ``featlab explain``. This
module imports numpy only; onnxruntime and the heads load when a scorer is made.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import FeatlabError
from .faithfulness import (cell_order, compare_methods, deletion_curve, faithfulness_line, random_order,
                           summarise_faithfulness, test_baseline)
from .perturbation import BASELINES, _scores, occlusion, rise

METHODS = ("occlusion", "rise", "lrp")
SUMMARY = "explain_summary.json"


# ------------------------------------------------------------------------------------ settings
@dataclass
class Settings:
    """How maps and deletion curves are made (all recorded in explain_summary.json)."""

    patch: int = 16          # occlusion patch side, px of the chip
    stride: int = 8          # occlusion stride, px
    masks: int = 1000        # RISE: number of random masks
    rise_grid: int = 8       # RISE: masks are drawn on a grid x grid raster, then upsampled
    rise_p: float = 0.5      # RISE: probability that a grid cell is kept
    baseline: str = "mean"   # what replaces removed pixels: the chip's mean colour, or a blurred chip
    cell: int = 16           # deletion: cell side, px
    steps: int = 16          # deletion: points on the curve after the intact chip
    batch: int = 64          # masked chips per call of the scorer
    seed: int = 0
    rule: str = "epsilon-plus-flat"  # LRP: epsilon, alpha2beta1 or epsilon-plus-flat (featlab.report.lrp)
    epsilon: float = 1e-6    # LRP: the epsilon rule's epsilon

    def check(self) -> Settings:
        for name in ("patch", "stride", "masks", "rise_grid", "cell", "steps", "batch"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise FeatlabError(f"--{name.replace('_', '-')} must be a positive whole number (got {v!r})")
        if not 0.0 < float(self.rise_p) < 1.0:
            raise FeatlabError(f"the RISE keep probability must be between 0 and 1 (got {self.rise_p})")
        from .lrp import check_rule

        check_rule(self.rule)
        if not (isinstance(self.epsilon, (int, float)) and self.epsilon > 0):
            raise FeatlabError(f"--epsilon must be a positive number (got {self.epsilon!r})")
        if self.baseline not in BASELINES:
            raise FeatlabError(f"--baseline must be one of {', '.join(BASELINES)} (got {self.baseline!r})")
        return self

    def describe(self, methods) -> dict:
        d = {"baseline": self.baseline, "test_baseline": test_baseline(self.baseline), "deletion_cell": self.cell,
             "deletion_steps": self.steps,
             "batch": self.batch, "seed": self.seed}
        if "occlusion" in methods:
            d.update(patch=self.patch, stride=self.stride)
        if "rise" in methods:
            d.update(masks=self.masks, rise_grid=self.rise_grid, rise_p=self.rise_p)
        if "lrp" in methods:
            from .lrp import BOUND

            d.update(rule=self.rule, epsilon=self.epsilon, conservation_bound=BOUND)
        return d


def check_methods(methods) -> list[str]:
    methods = list(dict.fromkeys(methods or ["occlusion"]))
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise FeatlabError(f"unknown --method {bad[0]!r}; choose from {', '.join(METHODS)}")
    return methods


def explain_chip(f, chip: np.ndarray, method: str, settings: Settings, reference: np.ndarray, lrp=None,
                 classes=None, conservation: dict | None = None) -> np.ndarray:
    """(K, H, W) maps of one chip for the K scores of ``f``. LRP (``method='lrp'``) needs ``lrp``, a
    :class:`featlab.report.lrp.LRPExplainer` of the same heads, and ``classes`` (per head the explained class or
    None); ``conservation`` collects per head its explained outputs, input relevance sums and per-layer sums."""
    s = settings
    if method == "lrp":
        res = lrp.explain(chip[None], [None if c is None else [c] for c in classes], batch=s.batch)
        if conservation is not None:
            for k in range(res["output"].shape[1]):
                c = conservation.setdefault(k, {"output": [], "input_sum": [], "tap_sum": [], "layers": {}})
                c["output"].append(float(res["output"][0, k]))
                c["input_sum"].append(float(res["input_sum"][0, k]))
                c["tap_sum"].append(float(res["tap_sum"][0, k]))
                for name, v in res["layers"].items():
                    c["layers"].setdefault(name, []).append(float(v[0, k]))
        return res["maps"][0]
    if method == "occlusion":
        return occlusion(lambda c: _scores(f, c), chip, s.patch, s.stride, s.baseline, s.batch, reference=reference)
    return rise(lambda c: _scores(f, c), chip, s.masks, s.rise_grid, s.rise_p, s.baseline, s.batch, s.seed, s.patch)


def deletion_pair(f, chip: np.ndarray, maps: np.ndarray, settings: Settings, face: int):
    """Per score k: (x, {curve name: (steps + 1,)}) for :func:`summarise_faithfulness`: deletion and insertion
    along map k's order and along a random order with the test perturbation, and deletion along both orders with
    the map's own. The random order is shared by the K scores, so it costs one set of passes per curve kind."""
    s = settings
    order0, cells = cell_order(maps[0], s.cell)
    rnd = random_order(len(cells), s.seed, face)
    plan = (("deletion", test_baseline(s.baseline), False), ("insertion", test_baseline(s.baseline), True),
            ("same_deletion", s.baseline, False))

    def run(order, base, ins):
        return deletion_curve(f, chip, order, cells, s.cell, s.steps, base, s.batch, s.patch, insertion=ins)

    rand = {}
    for name, base, ins in plan:
        x, rand[name] = run(rnd, base, ins)
    out = []
    for k in range(len(maps)):
        order = order0 if k == 0 else cell_order(maps[k], s.cell)[0]
        c = {}
        for name, base, ins in plan:
            c[name] = run(order, base, ins)[1][:, k]
            c[name.replace("deletion", "random_deletion").replace("insertion", "random_insertion")] = rand[name][:, k]
        out.append((x, c))
    return out


# ------------------------------------------------------------------------------------ heads as a scorer
class HeadScorer:
    """Trained heads of one backbone as ``f(chips) -> (N, K)``: the backbone runs once per chip, each head reads
    its tap as it was stored, and score k is head k's probability of class ``classes[k]`` (bins, gender) or its
    predicted age in years (regression)."""

    def __init__(self, head_dirs, model: str | None = None):
        from ..backbones.registry import Runner
        from ..heads.model import load_head
        from ..heads.model import backbone_for
        from ..features.store import parse_key

        self.heads = [load_head(d) for d in head_dirs]
        self.cfgs = [c for _, c in self.heads]
        self.backbone, self.flip, self.align = backbone_for(self.cfgs, model)
        keys, self.dtypes = {}, {}
        for c in self.cfgs:
            name, kind, grid = parse_key(c["tap"])
            keys[c["tap"]] = (self.backbone.tap(name), kind, grid)
            self.dtypes[c["tap"]] = (c.get("tap_info") or {}).get("dtype") or "float16"
        self.keys = keys
        outputs = None if self.flip else {k: (*v, self.dtypes[k]) for k, v in keys.items()}
        # no busy-waiting threads: masked batches leave the cores to the head and the mask code in between
        self.runner = Runner(self.backbone, [t for t, _, _ in keys.values()], outputs=outputs, uint8_input=True,
                             spinning=False)
        self.geometry = self.backbone.geometry
        self.calls = 0
        self.chips_scored = 0

    def focus(self, chip: np.ndarray, align: bool | None = None) -> None:
        """Nothing to fix here: a head of one network is explained over its own chip (see :class:`CrossScorer`)."""

    def crop(self, chip: np.ndarray) -> np.ndarray:
        """The part of a cut chip that is explained: all of it (see :class:`CNNScorer`)."""
        return chip

    def predictions(self, chips: np.ndarray) -> list[dict]:
        """Per head, ``outputs_to_prediction`` of the chips (uint8 (N, H, W, 3))."""
        from ..features.extract import stored_features
        from ..heads.model import outputs_to_prediction

        feats = stored_features(self.runner, np.asarray(chips, dtype=np.uint8), self.keys, self.flip)
        self.calls += 1
        self.chips_scored += len(chips)
        out = []
        for model, cfg in self.heads:
            x = feats[cfg["tap"]].astype(self.dtypes[cfg["tap"]]).astype(np.float32)  # as stored
            out.append(outputs_to_prediction(np.asarray(model(x, training=False)), cfg))
        return out

    def function(self, classes: list[int | None]):
        """``f(chips) -> (N, K)``: head k's probability of ``classes[k]``, or its predicted age where that is None."""

        def f(chips):
            preds = self.predictions(chips)
            cols = [p["pred"] if c is None else p["proba"][:, c] for p, c in zip(preds, classes)]
            return np.stack([np.asarray(v, dtype=np.float64) for v in cols], axis=1)

        return f

    def label(self, k: int) -> str:
        c = self.cfgs[k]
        return f"{c['tap']} {c['target_name']}"

    def describe(self, k: int, pred: dict, i: int = 0) -> tuple[int | None, str]:
        """(explained class or None, text of the prediction) of head k for row i of ``pred``."""
        c = self.cfgs[k]
        if c["target"] == "age":
            return None, f"{float(pred['pred'][i]):.1f} y"
        cls = int(pred["pred"][i])
        names = c.get("class_names") or []
        name = names[cls] if cls < len(names) else str(cls)
        return cls, f"{name} (p {float(pred['proba'][i][cls]):.2f})"


class CrossScorer(HeadScorer):
    """Heads across networks (:mod:`featlab.report.crosshead`) as ``f(images) -> (N, K)``. What is explained is the
    image as read (the face crop, or the photo with ``align``): :meth:`focus` fixes where each network cuts its
    chip from the clean image (its detection and landmarks), and every occluded or masked copy is cut there by
    each network with its own preprocessing, run through that network, and the heads read the parts' taps."""

    def __init__(self, head_dirs, model=None):
        from types import SimpleNamespace

        from .crosshead import NetworkRunners, is_cross_head
        from ..heads.model import load_head

        self.heads = [load_head(d) for d in head_dirs]
        self.cfgs = [c for _, c in self.heads]
        if not all(is_cross_head(c) for c in self.cfgs):
            raise FeatlabError("give heads across networks and heads of one network in separate runs")
        self.nets = NetworkRunners(self.cfgs, model, spinning=False)
        self.align, self.flip = self.nets.align, False
        self.backbone = SimpleNamespace(name=self.nets.name,
                                        sha256={n: bb.sha256 for n, bb in self.nets.backbones.items()})
        self.geometry = None
        self.cutters: dict = {}
        self.calls = 0
        self.chips_scored = 0

    def focus(self, chip: np.ndarray, align: bool | None = None) -> None:
        """Cut every later image where ``chip`` (the clean image) puts each network's face; BadImage if none."""
        from .crosshead import fixed_cutter

        align = self.align if align is None else bool(align)
        self.cutters = {n: fixed_cutter(g, chip, align) for n, g in self.nets.geometries.items()}

    def predictions(self, chips: np.ndarray) -> list[dict]:
        from ..heads.model import outputs_to_prediction

        images = np.asarray(chips, dtype=np.uint8)
        feats = self.nets.features({n: np.stack([cut(im) for im in images]) for n, cut in self.cutters.items()})
        self.calls += 1
        self.chips_scored += len(images)
        return [outputs_to_prediction(np.asarray(model([feats[p["tap"]] for p in cfg["fusion"]], training=False)), cfg)
                for model, cfg in self.heads]


class CNNScorer(HeadScorer):
    """Networks trained from pixels (``featlab train-cnn``) as ``f(crops) -> (N, K)``: what is explained is the centre
    crop each network sees, cut from the chip its training chips were cut like (backbone, preprocessing, side)."""

    def __init__(self, cnn_dirs):
        from types import SimpleNamespace

        from ..features.pixels import chip_geometry
        from ..heads.cnn import load_cnn

        self.heads = [load_cnn(d) for d in cnn_dirs]
        self.cfgs = [c for _, c in self.heads]
        chips = {json.dumps({k: c["chips"][k] for k in ("backbone", "preprocessing", "side", "crop", "align")},
                            sort_keys=True) for c in self.cfgs}
        if len(chips) > 1:
            raise FeatlabError("the CNNs were trained on chips cut differently (backbone, preprocessing, side or crop): "
                               "explain one kind at a time")
        c = self.cfgs[0]["chips"]
        self.geometry = chip_geometry(c["backbone"], c["preprocessing"]["name"], c["side"])[0]
        self.size = int(c["crop"])
        self.align, self.flip = bool(c.get("align")), False
        from ..backbones.registry import sha256_of

        self.backbone = SimpleNamespace(name="cnn", sha256=[sha256_of(Path(d) / "cnn.keras") for d in cnn_dirs])
        self.calls = 0
        self.chips_scored = 0

    def crop(self, chip: np.ndarray) -> np.ndarray:
        from ..heads.cnn import center_crops

        return center_crops(chip[None], self.size)[0].astype(np.uint8)

    def predictions(self, chips: np.ndarray) -> list[dict]:
        from ..heads.model import outputs_to_prediction

        x = np.asarray(chips, dtype=np.float32)
        self.calls += 1
        self.chips_scored += len(x)
        return [outputs_to_prediction(np.asarray(model(x, training=False)), cfg) for model, cfg in self.heads]


def _is_cnn_dir(d) -> bool:
    p = Path(d) / "config.json"
    try:
        return p.is_file() and json.loads(p.read_text()).get("kind") == "cnn"
    except ValueError:
        return False


def check_head_dirs(head_dirs) -> list[Path]:
    """Cheap checks before anything heavy loads: each --head is a folder with config.json and head.keras."""
    if not head_dirs:
        raise FeatlabError("no --head given: pass a trained head folder (results/.../TARGET)")
    kinds = {_is_cnn_dir(d) for d in head_dirs}
    if len(kinds) > 1:
        raise FeatlabError("give heads on taps and networks trained from pixels (train-cnn) in separate runs: they "
                           "see different chips; the same --seed and --n explain the same faces")
    out = []
    for d in head_dirs:
        d = Path(d)
        if _is_cnn_dir(d) and (d / "cnn.keras").is_file():
            out.append(d)
            continue
        if not (d / "config.json").is_file() or not (d / "head.keras").is_file():
            raise FeatlabError(f"{d} is not a trained head (needs head.keras and config.json); train one with "
                               "`featlab train-head`")
        out.append(d)
    return out


# ------------------------------------------------------------------------------------ the two views
def _lrp_for(scorer: HeadScorer, head_dirs, methods, settings: Settings):
    """The LRP explainer of the scorer's heads (NumPy, float64) when ``lrp`` is among the methods."""
    if "lrp" not in methods:
        return None
    if isinstance(scorer, CNNScorer):
        from .cnnlrp import CNNExplainer

        return CNNExplainer(head_dirs, scorer.cfgs, settings.rule, settings.epsilon)
    from .lrp import LRPExplainer

    return LRPExplainer(scorer.backbone, head_dirs, [json.loads((Path(d) / "config.json").read_text())
                                                     for d in head_dirs], settings.rule, settings.epsilon)


@dataclass
class _Curves:
    x: np.ndarray | None = None
    curves: dict = field(default_factory=dict)  # name -> list of per-face curves

    def add(self, x, curves: dict):
        self.x = x
        for name, c in curves.items():
            self.curves.setdefault(name, []).append(c)

    def stacked(self) -> dict:
        return {name: np.stack(v) for name, v in self.curves.items()}


def _open_heads(head_dirs, model, methods, settings):
    """The heads' scorer (each config knowing its folder) and, with ``lrp`` among ``methods``, its LRP chain."""
    from .crosshead import is_cross_head

    if any(_is_cnn_dir(d) for d in head_dirs):
        scorer = CNNScorer(head_dirs)
    elif any(is_cross_head(json.loads((Path(d) / "config.json").read_text())) for d in head_dirs):
        if "lrp" in methods:
            raise FeatlabError("lrp does not run on a head across networks (relevance would have to pass back through "
                               "both networks' graphs and the join): use occlusion or rise")
        scorer = CrossScorer(head_dirs, model)
    else:
        if isinstance(model, dict):
            raise FeatlabError(f"--model {next(iter(model))}=...: these heads read one network; give --model FILE")
        scorer = HeadScorer(head_dirs, model)
    for d, c in zip(head_dirs, scorer.cfgs):
        c["_dir"] = str(d)
    return scorer, _lrp_for(scorer, head_dirs, methods, settings)


def _timed_map(f, chip, m, settings, ref, lrp, classes, cons, spent: dict):
    """:func:`explain_chip` for method ``m``, its time added to ``spent[m]``."""
    t_m = time.perf_counter()
    maps = explain_chip(f, chip, m, settings, ref, lrp, classes, cons)
    spent[m] += time.perf_counter() - t_m
    return maps


def _lrp_conservation(c: dict, rule: str) -> dict:
    """explain_summary.json's conservation block of one head: per face |sum of input relevance - explained output|
    / |explained output| (median, mean, max, share over the bound), the same at the tap (the head alone), and per
    residual sum of the backbone (cuts of the graph) the median of the relevance summed at its output /
    the explained output (1 = conserved down to there)."""
    from .lrp import conservation

    out = conservation(c["output"], c["input_sum"], rule)
    out["tap"] = conservation(c["output"], c["tap_sum"], rule)
    s = np.asarray(c["output"], dtype=np.float64)
    out["cuts_median_share"] = {name: round(float(np.median(np.asarray(v) / np.where(s == 0, np.nan, s))), 6)
                                  for name, v in c["layers"].items()}
    return out


def _summary(scorer: HeadScorer, methods, settings: Settings, curves: dict, n_faces: int, view: str,
             explained: str, seconds: float, extra: dict | None = None, echo=print,
             conservation: dict | None = None) -> dict:
    out = {"view": view, "backbone": scorer.backbone.name, "model_sha256": scorer.backbone.sha256,
           "n_faces": n_faces, "explained": explained, "settings": settings.describe(methods),
           "seconds": round(seconds, 2), "chips_scored": scorer.chips_scored, "methods": {}}
    out.update(extra or {})
    for m in methods:
        out["methods"][m] = {}
        for k, cfg in enumerate(scorer.cfgs):
            c = curves[(m, k)]
            s = summarise_faithfulness(c.x, c.stacked(), settings.baseline, settings.seed,
                                       (extra or {}).get("face_groups"))
            s.update(head=str(Path(cfg.get("_dir", ""))), tap=cfg["tap"], target=cfg["target_name"], n_faces=n_faces)
            out["methods"][m][scorer.label(k)] = s
            echo(faithfulness_line(m, scorer.label(k), s, n_faces))
            if not s["beats_random"]:
                echo(f"warning: {m} on {scorer.label(k)} does not beat a random deletion order on these faces "
                     f"(the interval of the AUC difference does not lie below 0): its map is not shown faithful here")
            if m == "lrp" and conservation and k in conservation:
                cons = _lrp_conservation(conservation[k], settings.rule)
                s["conservation"] = cons
                echo(f"lrp ({settings.rule}) on {scorer.label(k)}: input relevance vs explained output, median "
                     f"relative error {cons['median_relative_error']:.2%} (mean {cons['mean_relative_error']:.2%}, "
                     f"{cons['faces_over_bound']:.0%} of faces over {cons['bound']:.0%}); "
                     f"{'its dense layers' if isinstance(scorer, CNNScorer) else 'the head'} alone "
                     f"{cons['tap']['median_relative_error']:.2%}")
                if not cons["within_bound"]:
                    echo(f"warning: lrp ({settings.rule}) on {scorer.label(k)} does not conserve relevance within "
                         f"{cons['bound']:.0%} (median relative error {cons['median_relative_error']:.2%}): "
                         "biases and epsilon absorb the rest")
    if len(methods) > 1:
        out["method_comparison"] = compare_methods(out["methods"], settings.seed, (extra or {}).get("face_groups"))
        for lab, pairs in out["method_comparison"].items():
            for pair, row in pairs.items():
                ci = {k: ("n/a" if row[f"{k}_ci95"] is None else
                          f"[{row[f'{k}_ci95'][0]:+.3f}, {row[f'{k}_ci95'][1]:+.3f}]")
                      for k in ("deletion", "insertion")}
                echo(f"{pair} on {lab}: deletion AUC difference {row['deletion_auc_difference']:+.3f} "
                     f"{ci['deletion']} (below 0: {pair.split(' - ')[0]} more faithful), insertion "
                     f"{row['insertion_auc_difference']:+.3f} {ci['insertion']} (above 0: more faithful)")
    return out


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".json.part")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


def _chip_for(scorer: HeadScorer, path: Path, align: bool) -> np.ndarray:
    from ..data.images import BadImage, load_rgb

    try:
        img = load_rgb(path)
    except BadImage as e:
        raise FeatlabError(f"{path}: unreadable image ({e})") from None
    if isinstance(scorer, CrossScorer):  # the image itself, each network's cut of it fixed on the clean image
        try:
            scorer.focus(img, align)
        except BadImage as e:
            raise FeatlabError(f"{path}: {e}") from None
        return img
    if not align:
        try:
            return scorer.crop(scorer.geometry.chip(img, align=False))
        except BadImage as e:  # template-5pt without usable landmarks
            raise FeatlabError(f"{path}: {e}") from None
    faces = scorer.geometry.faces(img, largest_only=True)
    if not faces:
        raise FeatlabError(f"{path}: no face found (pass --no-detect for images that are already face crops)")
    return scorer.crop(faces[0].chip)


def explain_images(images, head_dirs, out, methods=("occlusion",), settings: Settings | None = None,
                   model: str | None = None, align: bool | None = None, echo=print) -> dict:
    """Per image (its largest face) and method: one PNG with the chip and a signed map per head, the prediction
    in each title; and explain_summary.json. Every image is checked and explained before anything is written."""
    from ..scoring.heatmaps import deletion_png, image_png
    from .predict import expand_images

    settings = (settings or Settings()).check()
    methods = check_methods(methods)
    head_dirs = check_head_dirs(head_dirs)
    paths = expand_images(images)
    t0 = time.perf_counter()
    scorer, lrp = _open_heads(head_dirs, model, methods, settings)
    cons: dict = {}
    spent = {m: 0.0 for m in methods}
    align = scorer.align if align is None else bool(align)  # default: as the heads' features were made
    chips = [_chip_for(scorer, p, align) for p in paths]  # every image first: one bad one stops before any work
    curves = {(m, k): _Curves() for m in methods for k in range(len(scorer.cfgs))}
    figures = []
    for i, (path, chip) in enumerate(zip(paths, chips)):
        scorer.focus(chip, align)
        preds = scorer.predictions(chip[None])
        described = [scorer.describe(k, p) for k, p in enumerate(preds)]
        classes = [c for c, _ in described]
        f = scorer.function(classes)
        ref = f(chip[None])[0]
        for m in methods:
            maps = _timed_map(f, chip, m, settings, ref, lrp, classes, cons, spent)
            for k, (x, c) in enumerate(deletion_pair(f, chip, maps, settings, i)):
                curves[(m, k)].add(x, c)
            titles = [f"{scorer.label(k)}: {text}" for k, (_, text) in enumerate(described)]
            figures.append((path, m, chip, maps, titles))
        echo(f"{path}: " + "; ".join(f"{scorer.label(k)} {t}" for k, (_, t) in enumerate(described)))
    summary = _summary(scorer, methods, settings, curves, len(paths), "images",
                       "probability of the predicted class (bins, gender) or the predicted age in years (age)",
                       time.perf_counter() - t0, {"images": [str(p) for p in paths], "faces": [str(p) for p in paths],
                                                  "map_seconds": {m: round(v, 2) for m, v in spent.items()}},
                       echo=echo, conservation=cons)
    # write only now: nothing half-written when an image or a head is bad
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stems: dict[str, int] = {}
    for path, m, chip, maps, titles in figures:
        stem = path.name.split(".")[0]
        n = stems.get((stem, m), 0)
        stems[(stem, m)] = n + 1
        name = f"{stem}-{m}.png" if n == 0 else f"{stem}-{n + 1}-{m}.png"
        what = f"lrp ({settings.rule})" if m == "lrp" else m
        image_png(chip, list(maps), titles, out / name,
                  title=f"{path.name}: {what}, red = evidence for, blue = against",
                  **({"shown": "image as read (each network cuts its own chip)"} if isinstance(scorer, CrossScorer)
                     else {}))
    deletion_png(summary, out / "deletion.png")
    _write_json(out / SUMMARY, summary)
    echo(f"wrote {len(figures)} heatmap figures, deletion.png and {SUMMARY} in {out}")
    return summary


def _check_not_stale(scorer: HeadScorer, features: Path, rows: np.ndarray, chips: list, paths: list,
                     tolerance: float = 0.02) -> None:
    """The chips cut now must give the tap rows the features file holds (relative L2 difference per face within
    ``tolerance``): otherwise the images changed since extraction, or the chips are not cut the same way."""
    from ..features.extract import stored_features
    from ..features.store import FeatureStore

    with FeatureStore.open_read(features) as s:
        for key in scorer.keys:
            stored_key = s.resolve_key(key)
            if stored_key is None:
                raise FeatlabError(f"{features.name} has no tap {key}, which the head reads")
            stored = s.read(stored_key, rows).reshape(len(rows), -1)
            for a in range(0, len(chips), 64):
                now = stored_features(scorer.runner, np.stack(chips[a : a + 64]), {key: scorer.keys[key]},
                                      scorer.flip)[key].astype(np.float32).reshape(-1, stored.shape[1])
                ref = stored[a : a + 64]
                err = np.linalg.norm(now - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-6)
                bad = np.flatnonzero(~(err <= tolerance))
                if len(bad):
                    i = a + int(bad[0])
                    raise FeatlabError(f"{paths[i]} no longer gives the {key} features stored in {features.name} "
                                       f"(relative difference {err[bad[0]]:.3f}): the image changed since extraction; "
                                       "extract again")


def compare_heads(features, target_name: str, results=None) -> list[Path]:
    """Every trained head of ``target_name`` (``age``, ``bins7``, ``gender``...) on the features file's backbone,
    dataset and model file, as ``compare`` files them (results/BACKBONE/DATASET/TAP/TARGET), shallow to deep."""
    from .. import config
    from ..backbones.registry import Backbone
    from ..paths import dataset_key, feature_set
    from ..features.store import FeatureStore, parse_key

    features = Path(features)
    if not features.is_file():
        raise FeatlabError(f"no such features file: {features}")
    with FeatureStore.open_read(features) as s:
        a = s.attrs
    root = Path(results or config.results_dir()) / str(a.get("backbone")) / dataset_key(feature_set(a))
    found = []
    for cfg_path in sorted(root.glob(f"*/{target_name}/config.json")):
        c = json.loads(cfg_path.read_text())
        if (cfg_path.parent / "head.keras").is_file() and c.get("features_model_sha256") == a.get("model_sha256"):
            found.append((cfg_path.parent, c))
    if not found:
        raise FeatlabError(f"no trained '{target_name}' heads of this model file under {root}; train them with "
                           "`featlab train-head` or `featlab compare --sweep`")
    model = a.get("model_path") if a.get("model_path") and Path(str(a.get("model_path"))).is_file() else None
    bb = Backbone(str(a["backbone"]), model)

    def depth(c):
        try:
            return bb.tap(parse_key(c["tap"])[0]).index
        except FeatlabError:
            return 1 << 30

    found.sort(key=lambda dc: (depth(dc[1]), dc[1]["tap"]))
    return [d for d, _ in found]


def per_face_normalised(maps: np.ndarray) -> np.ndarray:
    """Each head's map of one face divided by its sum of |values| (a zero map stays zero): the map's shape
    without its scale, so that a mean over faces weighs every face alike."""
    m = np.asarray(maps, dtype=np.float64)
    s = np.abs(m).reshape(len(m), -1).sum(axis=1)
    return m / np.where(s > 0, s, 1.0)[:, None, None]


def _said(cfg: dict, score: float) -> str:
    """What head ``cfg`` said of a face, as its explained output: the predicted age, or the probability of
    the true class."""
    return f"predicted {score:.1f} y" if cfg["target"] == "age" else f"p(true class) {score:.2f}"


def _groups(cfgs: list[dict], labels, groups: str | int | None):
    """(group index per row (-1: none), group names, what the groups are)."""
    from ..data.bins import get_scheme
    from ..data.labels import GENDERS

    targets = {c["target"] for c in cfgs}
    if "gender" in targets and len(targets) > 1:
        raise FeatlabError("the heads explain gender and age at once: give heads of one kind (gender, or age/bins)")
    if targets == {"gender"}:
        g = labels["gender"].astype(str).str.lower().str[:1].to_numpy()
        idx = np.where(g == "f", 0, np.where(g == "m", 1, -1))
        return idx, list(GENDERS), "gender"
    cats = groups or next((c["cats"] for c in cfgs if c["target"] == "bins" and c.get("cats")), None) or 5
    scheme = get_scheme(cats)
    age = labels["age"].to_numpy(dtype=np.float64)
    idx = np.full(len(age), -1, dtype=np.int64)
    ok = np.isfinite(age)
    idx[ok] = scheme.assign(age[ok])
    return idx, list(scheme.names), f"age group ({scheme.n} groups)"


def explain_dataset(head_dirs, features, n: int, out, methods=("occlusion",), settings: Settings | None = None,
                    model: str | None = None, groups: int | None = None, split: str = "test", echo=print) -> dict:
    """Dataset view: N seeded faces of ``split`` in the features file; per true class (age group or gender) the
    mean map of each head drawn on the class's mean chip (LRP's maps normalised per face first); one figure
    per method (rows = classes, columns = heads), mean maps in maps-METHOD.npz, a panel of single faces (the
    first of each class, with each head's prediction: faces-METHOD.png), and explain_summary.json.

    Classifier heads explain the probability of each face's true class; age heads the predicted age."""
    from ..scoring.scores import groups_of
    from ..scoring.heatmaps import class_grid_png, deletion_png, faces_png
    from ..features.store import FeatureStore

    settings = (settings or Settings()).check()
    methods = check_methods(methods)
    head_dirs = check_head_dirs(head_dirs)
    if n is None or n < 1:
        raise FeatlabError("--n must be a positive number of faces")
    features = Path(features)
    if not features.is_file():
        raise FeatlabError(f"no such features file: {features}")
    with FeatureStore.open_read(features) as s:
        attrs, labels = s.attrs, s.labels()
    cfgs = [json.loads((Path(d) / "config.json").read_text()) for d in head_dirs]
    from .crosshead import is_cross_head

    if any(is_cross_head(c) for c in cfgs):
        raise FeatlabError("the dataset view (--features) does not take a head across networks yet: explain its "
                           "faces as images (featlab explain IMAGE... --head DIR)")
    cnn = any(c.get("kind") == "cnn" for c in cfgs)
    for d, c in zip(head_dirs, cfgs):
        if cnn:  # a network trained from pixels: the faces and their split must be its manifest's
            if c.get("manifest_sha256") != attrs.get("manifest_sha256"):
                raise FeatlabError(f"the CNN {d} was trained on another manifest (sha256 {str(c.get('manifest_sha256'))[:12]}…) "
                                   f"than {features.name} was extracted from ({str(attrs.get('manifest_sha256'))[:12]}…)")
            continue
        if c.get("backbone") != attrs.get("backbone") or (c.get("features_model_sha256") and
                                                          c["features_model_sha256"] != attrs.get("model_sha256")):
            raise FeatlabError(f"the head {d} was trained on backbone {c.get('backbone')} (model sha256 "
                               f"{str(c.get('features_model_sha256'))[:12]}…) but {features.name} holds "
                               f"{attrs.get('backbone')} (sha256 {str(attrs.get('model_sha256'))[:12]}…)")
    group, names, grouped_by = _groups(cfgs, labels, groups)
    rows = np.flatnonzero((labels["split"].astype(str).to_numpy() == split) & (group >= 0))
    if not len(rows):
        raise FeatlabError(f"{features.name} has no '{split}' rows with a usable label to group by")
    rng = np.random.default_rng(settings.seed)
    rows = np.sort(rng.choice(rows, size=min(int(n), len(rows)), replace=False))
    if len(rows) < n:
        echo(f"only {len(rows)} '{split}' faces in {features.name}: explaining all of them")
    paths = [Path(p) for p in labels["path"].to_numpy()[rows]]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FeatlabError(f"{len(missing)} images of {features.name} are not where its labels say, e.g. {missing[0]}")

    t0 = time.perf_counter()
    scorer, lrp = _open_heads(head_dirs, model, methods, settings)
    cons: dict = {}
    spent = {m: 0.0 for m in methods}
    align = bool(attrs.get("align", False))
    if isinstance(scorer, CNNScorer):
        align = scorer.align
    chips = [_chip_for(scorer, p, align) for p in paths]
    if not isinstance(scorer, CNNScorer):  # a CNN reads pixels, not the stored taps
        _check_not_stale(scorer, features, rows, chips, paths)
    h, w = chips[0].shape[:2]
    K, G = len(scorer.cfgs), len(names)
    sums = {m: np.zeros((G, K, h, w)) for m in methods}
    raw_lrp = np.zeros((G, K, h, w)) if "lrp" in methods else None  # LRP's group sums as the rules give them
    singles: list = []  # the first face of each group: (group, chip, {method: maps}, scores, true label)
    face_sum = np.zeros((G, h, w, 3))
    count = np.zeros(G, dtype=np.int64)
    curves = {(m, k): _Curves() for m in methods for k in range(K)}
    age = labels["age"].to_numpy(dtype=np.float64)[rows]
    gender = labels["gender"].astype(str).str.lower().str[:1].to_numpy()[rows]
    for i, chip in enumerate(chips):
        g = int(group[rows[i]])
        classes = []
        for c in scorer.cfgs:
            if c["target"] == "age":
                classes.append(None)
            elif c["target"] == "gender":
                classes.append(0 if gender[i] == "f" else 1)
            else:
                from ..data.bins import get_scheme

                classes.append(int(get_scheme(c["cats"]).assign(np.array([age[i]]))[0]))
        f = scorer.function(classes)
        ref = f(chip[None])[0]
        first = count[g] == 0
        if first:
            singles.append((g, chip, {}, ref, f"{age[i]:g} y, {gender[i] or '?'}"))
        for m in methods:
            maps = _timed_map(f, chip, m, settings, ref, lrp, classes, cons, spent)
            # LRP's maps are summed per face normalised (each face's map over its own sum of |relevance|), so a
            # group's mean is not led by the few faces with the largest relevance; the others' in their units
            sums[m][g] += per_face_normalised(maps) if m == "lrp" else maps
            if m == "lrp":
                raw_lrp[g] += maps
            if first:
                singles[-1][2][m] = maps
            for k, (x, c) in enumerate(deletion_pair(f, chip, maps, settings, i)):
                curves[(m, k)].add(x, c)
        face_sum[g] += chip
        count[g] += 1
        if (i + 1) % 10 == 0 or i + 1 == len(chips):
            el = time.perf_counter() - t0
            echo(f"  {i + 1}/{len(chips)} faces, {el:.0f} s ({scorer.chips_scored / el:.0f} chips/s)")
    summary = _summary(scorer, methods, settings, curves, len(chips), "dataset",
                       "probability of the true class (bins, gender) or the predicted age in years (age)",
                       time.perf_counter() - t0,
                       {"features": str(features), "split": split, "grouped_by": grouped_by,
                        "faces": [str(v) for v in labels["image_id"].to_numpy()[rows]],
                        "face_groups": groups_of(labels.iloc[rows]).tolist(),
                        "groups": {nm: int(c) for nm, c in zip(names, count)},
                        "map_seconds": {m: round(v, 2) for m, v in spent.items()}}, echo=echo, conservation=cons)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    have = count > 0
    mean_faces = face_sum[have] / count[have, None, None, None]
    row_names = [f"{nm} (n={c})" for nm, c in zip(np.array(names)[have], count[have])]
    col_names = [scorer.label(k) for k in range(K)]
    for m in methods:
        mean_maps = sums[m][have] / count[have, None, None, None]
        raw = {"maps_raw": raw_lrp[have] / count[have, None, None, None]} if m == "lrp" else {}
        np.savez_compressed(out / f"maps-{m}.npz", maps=mean_maps, mean_faces=mean_faces.astype(np.float32),
                            groups=np.array(names)[have], heads=np.array(col_names), **raw)
        class_grid_png(mean_faces, mean_maps, row_names, col_names, out / f"classes-{m}.png",
                       title=f"{scorer.backbone.name} on {features.stem}: mean "
                             f"{f'lrp ({settings.rule}), each face normalised' if m == 'lrp' else m} map per "
                             f"{grouped_by}, {len(chips)} {split} faces (red = for, blue = against)")
        faces_png([s[1] for s in singles], np.stack([s[2][m] for s in singles]),
                  [f"{names[s[0]]}: {s[4]}" for s in singles],
                  [[_said(scorer.cfgs[k], s[3][k]) for k in range(K)] for s in singles], col_names,
                  out / f"faces-{m}.png",
                  title=f"{scorer.backbone.name}: {f'lrp ({settings.rule})' if m == 'lrp' else m} maps of single "
                        f"faces, the first of each {grouped_by} among the {len(chips)} (red = for, blue = against)")
    deletion_png(summary, out / "deletion.png")
    _write_json(out / SUMMARY, summary)
    echo(f"wrote classes-{{{','.join(methods)}}}.png, faces-*.png, maps-*.npz, deletion.png and {SUMMARY} in {out}")
    return summary
