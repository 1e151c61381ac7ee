"""Predict: age and gender for every face in the user's own photos, from trained heads.

Faces are found on every image (dlib HOG, or SCRFD when its pack is on disk). For heads trained on face
crops (UTKFace's aligned chips, a CSV of crops), each face is cut out the way those crops were made: the
similarity transform that puts its eyes and nose where they sit in the heads' training images (measured
on up to 64 of them, else UTKFace's template), so a face of a group photo or a small face in a large
photo becomes a chip like the training chips; an image that already is such a crop is read whole,
exactly as in training. Heads trained on detected faces (``extract --align``) get every face aligned
as then. Each chip runs once through the backbone for every tap the heads need, and each head reads its
tap. One line per face is printed; with ``annotate`` a copy of each image is written with boxes and
labels ("F 25-32"). An image without a face, or a file that is not an image, is a named skip.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import FeatlabError
from ..data.images import IMAGE_EXTS, BadImage, load_rgb


def expand_images(items) -> list[Path]:
    out = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_EXTS)
        elif p.is_file():
            out.append(p)
        else:
            raise FeatlabError(f"no such image or folder: {p}")
    if not out:
        raise FeatlabError("no images found in " + ", ".join(map(str, items)))
    return out


def is_image(path: Path) -> bool:
    """Whether Pillow recognises the file as an image (its header only; nothing is decoded)."""
    from PIL import Image

    try:
        with Image.open(path):
            return True
    except Exception:  # noqa: BLE001 - anything Pillow cannot identify is not an image
        return False


def check_images(paths: list[Path]) -> list[Path]:
    """``paths`` unchanged, or one line (FeatlabError) when none of them is an image: checked before the
    heads and TensorFlow load. Files that are not images among images are skipped by name later."""
    if not any(is_image(p) for p in paths):
        names = ", ".join(str(p) for p in paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
        what = "is not an image" if len(paths) == 1 else "are not images"
        raise FeatlabError(f"{names} {what} (featlab reads {', '.join(sorted(IMAGE_EXTS))})")
    return paths


def _label(cfg: dict, pred: dict, i: int) -> tuple[str, str]:
    """(long text for the console, short text for the picture)."""
    t = cfg["target"]
    if t == "age":
        v = float(pred["pred"][i])
        return f"age {v:.1f} y", f"{v:.0f}y"
    names = cfg.get("class_names") or []
    k = int(pred["pred"][i])
    conf = float(pred["proba"][i][k]) if "proba" in pred else float("nan")
    if t == "gender":
        g = {"f": "F", "m": "M"}.get(names[k] if k < len(names) else "?", "?")
        return f"gender {g} ({conf:.2f})", g
    return f"age {names[k]} ({conf:.2f})", names[k]


def training_template(cfg: dict, limit: int = 64):
    """Where faces sit in the crops the head was trained on (:class:`featlab.data.faces.CropTemplate`), measured
    on up to ``limit`` of the training images its features file lists; UTKFace's template when none of
    them is on disk or shows a face."""
    from ..data.faces import UTKFACE_TEMPLATE, crop_template
    from ..features.store import FeatureStore

    feats = Path(cfg.get("features", ""))
    if feats.is_file():
        with FeatureStore.open_read(feats) as s:
            lab = s.labels()
        paths = [p for p in lab.loc[lab.split == "train", "path"] if Path(p).is_file()]
        tpl = crop_template(paths, limit=limit) if paths else None
        if tpl is not None:
            return tpl
    return UTKFACE_TEMPLATE


def predict_paths(images, head_dirs, annotate=None, model=None, detect: bool | None = None, echo=print,
                  upsample: int = 1, keep_features: bool = False) -> list[dict]:
    """Run the heads on every face of ``images``, with chips made as the heads' training features were
    (alignment, flip, preprocessing from the heads' record).

    ``detect``: None (default) finds the faces of every image; for heads trained on face crops each face is
    cut like their training crops (:func:`featlab.data.faces.training_crops`: an image that is such a crop is
    read whole), for heads trained on aligned detections each face is aligned as then. True: every face is
    detected and aligned with the backbone's geometry even for heads trained on crops (``extract --align``'s
    chips). False: each image is taken as one face crop, no detection (for images known to be training-like
    crops). A record per face (``path``, ``face``, ``box``, ``whole``: the image is the crop, ``labels``),
    or per skipped image (``path``, ``error``). ``keep_features``: each face record also holds the tap values
    the heads read (``features``: {tap: array}), as stored."""
    from ..backbones.registry import Runner
    from .crosshead import NetworkRunners, is_cross_head
    from ..features.extract import stored_features
    from ..data.faces import UTKFACE_TEMPLATE
    from ..heads.model import backbone_for, load_head, outputs_to_prediction
    from ..features.store import parse_key

    heads = [load_head(d) for d in head_dirs]
    cfgs = [c for _, c in heads]
    cross = [is_cross_head(c) for c in cfgs]
    if any(cross):  # heads across networks: each network runs on its own chip of each face
        if not all(cross):
            raise FeatlabError("give heads across networks and heads of one network in separate runs")
        nets = NetworkRunners(cfgs, model)
        geometries, trained_align, featurise = nets.geometries, nets.align, nets.features
    else:
        bb, flip, trained_align = backbone_for(cfgs, model if not isinstance(model, dict) else _one_model(model))
        geometries = {None: bb.geometry}
        keys, dtypes = {}, {}
        for c in cfgs:
            fused = {p["tap"]: (p.get("feature_set") or {}).get("dtype") for p in (c.get("fusion") or [])}
            for key in fused or [c["tap"]]:  # a fusion head needs every one of its taps
                name, kind, grid = parse_key(key)
                keys[key] = (bb.tap(name), kind, grid)
                dtypes[key] = (fused.get(key) if fused else (c.get("tap_info") or {}).get("dtype")) or "float16"
        # the same transform as extraction, so that heads see their inputs exactly as they were stored
        outputs = None if flip else {k: (*v, dtypes[k]) for k, v in keys.items()}
        runner = Runner(bb, [t for t, _, _ in keys.values()], outputs=outputs, uint8_input=True)

        def featurise(chips):
            raw_feats = stored_features(runner, chips[None], keys, flip)  # {None: chips}: one network
            return {k: v.astype(dtypes[k]).astype(np.float32) for k, v in raw_feats.items()}  # as stored
    align = trained_align if detect is None else bool(detect)
    if align and not trained_align:
        echo("note: the heads were trained on unaligned crops; these faces are detected and aligned instead")
    template = None
    if detect is None and not trained_align:
        template = training_template(cfgs[0])
        if template is UTKFACE_TEMPLATE:
            echo("note: the heads' training images are not on disk; faces are cut like UTKFace's aligned crops")
    if annotate:
        Path(annotate).mkdir(parents=True, exist_ok=True)
    records = []

    def skip(path, reason):
        echo(f"{path}: skipped ({reason})")
        records.append({"path": str(path), "error": reason})

    for path in expand_images(images):
        try:
            img = load_rgb(path)
        except BadImage as e:
            skip(path, f"not an image ({path.suffix or 'no extension'})" if path.suffix.lower() not in IMAGE_EXTS
                 else str(e))
            continue
        try:  # a face without usable landmarks (template-5pt) is a named skip, as in extraction
            boxes, wholes, chips = _cut(img, geometries, template, align, upsample)
        except BadImage as e:
            skip(path, str(e))
            continue
        if not boxes:
            skip(path, "no face found")
            continue
        feats = featurise({n: np.stack(c) for n, c in chips.items()})
        preds = []
        for model_, cfg in heads:
            parts = [p["tap"] for p in cfg.get("fusion") or []] or [cfg["tap"]]
            x = [feats[k] for k in parts] if cfg.get("fusion") else feats[parts[0]]
            raw = np.asarray(model_(x, training=False))  # eager: no tf.function retraced per batch shape
            preds.append(outputs_to_prediction(raw, cfg))
        short_all = []
        for i, box in enumerate(boxes):
            texts = [_label(cfg, p, i) for (_, cfg), p in zip(heads, preds)]
            what = " (the whole image, a face crop)" if wholes[i] else ""
            echo(f"{path} face {i + 1} box {box}{what}: " + ", ".join(t for t, _ in texts))
            short = " ".join(s for _, s in sorted(texts, key=lambda ts: ts[1] not in ("F", "M")))
            short_all.append(short)
            records.append({"path": str(path), "face": i + 1, "box": box, "whole": wholes[i],
                            "labels": [t for t, _ in texts],
                            **({"features": {k: v[i] for k, v in feats.items()}} if keep_features else {})})
        if annotate:
            _draw(img, boxes, short_all, Path(annotate) / f"{path.stem}.jpg")
    if annotate:
        echo(f"annotated images in {annotate}")
    return records


def _one_model(model: dict):
    raise FeatlabError(f"--model {next(iter(model))}=...: these heads read one network; give --model FILE")


def _cut(img: np.ndarray, geometries: dict, template, align: bool, upsample: int):
    """(boxes, whole-image flags, {network: chips}) of every face of ``img``: cut like the heads' training crops
    (``template``), detected and aligned (``align``), or the image as one crop; each network's chip cut by its
    own geometry from the same face. A face one network cannot cut (no usable landmarks) is left out for all."""
    from ..data.faces import detect, training_crops

    if template is not None:
        crops = training_crops(img, template, upsample=upsample)
        boxes = [c.box if not c.whole else (0, 0, img.shape[1] - 1, img.shape[0] - 1) for c in crops]
        return boxes, [c.whole for c in crops], {n: [g.chip(c.crop, align=False) for c in crops]
                                                 for n, g in geometries.items()}
    if align:
        if len(geometries) == 1:
            ((n, g),) = geometries.items()
            faces = g.faces(img, upsample=upsample)
            return [f.box for f in faces], [False] * len(faces), {n: [f.chip for f in faces]}
        boxes, chips = [], {n: [] for n in geometries}
        for rect, score, kps in detect(img, upsample):
            try:
                cut = {n: g._chip_of(img, rect, score, kps) for n, g in geometries.items()}
            except BadImage:
                continue
            boxes.append((rect.left(), rect.top(), rect.right(), rect.bottom()))
            for n, c in cut.items():
                chips[n].append(c)
        return boxes, [False] * len(boxes), chips
    return ([(0, 0, img.shape[1] - 1, img.shape[0] - 1)], [True],
            {n: [g.chip(img, align=False)] for n, g in geometries.items()})


def _draw(img: np.ndarray, boxes, labels, out: Path) -> None:
    from PIL import Image, ImageDraw, ImageFont

    im = Image.fromarray(img)
    d = ImageDraw.Draw(im)
    size = max(12, min(img.shape[:2]) // 40)
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # old Pillow
        font = ImageFont.load_default()
    width = max(2, min(img.shape[:2]) // 300)
    for (l, t, r, b), text in zip(boxes, labels):
        d.rectangle([l, t, r, b], outline=(0, 255, 0), width=width)
        tb = d.textbbox((l, t), text, font=font)
        y = max(0, t - (tb[3] - tb[1]) - 4)
        d.rectangle([l, y, l + (tb[2] - tb[0]) + 6, y + (tb[3] - tb[1]) + 4], fill=(0, 255, 0))
        d.text((l + 3, y + 1), text, fill=(0, 0, 0), font=font)
    im.save(out, quality=92)
