"""Predict: age and gender for every face in the user's own photos, from trained heads.

Each face is detected (dlib HOG) and aligned the way the heads' backbone
expects, run once through the backbone for every tap the heads need, and
each head reads its tap. One line per face is printed; with ``annotate`` a
copy of each image is written with boxes and labels ("F 25-32"). Images
without a face are reported, not dropped silently.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import FeatlabError
from .images import IMAGE_EXTS, BadImage, load_rgb


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


def backbone_for(cfgs: list[dict], model: str | None):
    from .backbones import Backbone
    from .store import FeatureStore

    names = {c["backbone"] for c in cfgs}
    shas = {c.get("features_model_sha256") for c in cfgs}
    if len(names) > 1 or len(shas) > 1:
        raise FeatlabError("the heads were trained on different backbones or model files; predict with one backbone at a time")
    cfg = cfgs[0]
    sets = {json.dumps({k: (c.get("feature_set") or {}).get(k) for k in ("align", "flip", "preprocessing")},
                       sort_keys=True) for c in cfgs}
    if len(sets) > 1:
        raise FeatlabError("the heads' features were prepared differently (align, flip or preprocessing): "
                           "predict with heads of one feature set at a time")
    ident = cfg.get("feature_set") or {}
    flip = bool(ident.get("flip", False))
    model_path = model
    feats = Path(cfg.get("features", ""))
    if feats.is_file() and not model_path:
        with FeatureStore.open_read(feats) as s:
            model_path = s.attrs.get("model_path")
    if model_path and not Path(model_path).is_file():
        model_path = None
    bb = Backbone(cfg["backbone"], model_path)
    want = cfg.get("features_model_sha256")
    if want and bb.sha256 != want:
        raise FeatlabError(f"the model file {bb.model_path} (sha256 {bb.sha256[:12]}…) is not the one the heads were "
                           f"trained on (sha256 {want[:12]}…); pass the right file with --model")
    if ident.get("preprocessing") and bb.preprocessing() != ident["preprocessing"]:
        raise FeatlabError(f"{cfg['backbone']} now prepares images differently from the heads' training features "
                           f"({bb.preprocessing()} vs {ident['preprocessing']})")
    return bb, flip, bool(ident.get("align", False))


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


def predict_paths(images, head_dirs, annotate=None, model=None, detect: bool | None = None, echo=print,
                  upsample: int = 1, keep_features: bool = False) -> list[dict]:
    """Run the heads on every face of ``images``, with chips made as the heads' training features were
    (alignment, flip, preprocessing from the heads' record). ``detect``: find and align every face even when
    the heads were trained on unaligned crops (a group photo); default: as in training. ``keep_features``:
    each record also holds the tap values the heads read (``features``: {tap: array}), as stored."""
    from .backbones import Runner
    from .extract import stored_features
    from .model import load_head, outputs_to_prediction
    from .store import parse_key

    heads = [load_head(d) for d in head_dirs]
    cfgs = [c for _, c in heads]
    bb, flip, trained_align = backbone_for(cfgs, model)
    align = trained_align if detect is None else bool(detect)
    if align and not trained_align:
        echo("note: the heads were trained on unaligned crops; these faces are detected and aligned instead")
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
    geometry = bb.geometry
    if annotate:
        Path(annotate).mkdir(parents=True, exist_ok=True)
    records = []
    for path in expand_images(images):
        try:
            img = load_rgb(path)
        except BadImage as e:
            echo(f"{path}: skipped ({e})")
            records.append({"path": str(path), "error": str(e)})
            continue
        if align:
            faces = geometry.faces(img, upsample=upsample)
            boxes = [f.box for f in faces]
            chips = [f.chip for f in faces]
        else:
            boxes = [(0, 0, img.shape[1] - 1, img.shape[0] - 1)]
            chips = [geometry.chip(img, align=False)]
        if not chips:
            echo(f"{path}: no face found")
            records.append({"path": str(path), "error": "no face found"})
            continue
        raw_feats = stored_features(runner, np.stack(chips), keys, flip)
        feats = {k: v.astype(dtypes[k]).astype(np.float32) for k, v in raw_feats.items()}  # as stored
        preds = []
        for model_, cfg in heads:
            parts = [p["tap"] for p in cfg.get("fusion") or []] or [cfg["tap"]]
            x = [feats[k] for k in parts] if cfg.get("fusion") else feats[parts[0]]
            raw = np.asarray(model_.predict(x, verbose=0, batch_size=256))
            preds.append(outputs_to_prediction(raw, cfg))
        short_all = []
        for i, box in enumerate(boxes):
            texts = [_label(cfg, p, i) for (_, cfg), p in zip(heads, preds)]
            echo(f"{path} face {i + 1} box {box}: " + ", ".join(t for t, _ in texts))
            short = " ".join(s for _, s in sorted(texts, key=lambda ts: ts[1] not in ("F", "M")))
            short_all.append(short)
            records.append({"path": str(path), "face": i + 1, "box": box, "labels": [t for t, _ in texts],
                            **({"features": {k: v[i] for k, v in feats.items()}} if keep_features else {})})
        if annotate:
            _draw(img, boxes, short_all, Path(annotate) / f"{path.stem}.jpg")
    if annotate:
        echo(f"annotated images in {annotate}")
    return records


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
