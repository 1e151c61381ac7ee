"""Baselines next to every head, on the same faces: what a trivial and a linear reader score.

- ``majority``: the most frequent training class (bins, gender), or the median training age (age).
- ``linear``: a scikit-learn linear probe on the same tap, standardised exactly as the head's input
  (the head's own train-row mean/std, after the head's pooling): ``LogisticRegression`` (bins,
  gender; C chosen on the validation rows, fits warm-started from the strongest regularisation, at most
  100 L-BFGS iterations) or ``Ridge`` (age; LSQR, alpha chosen on the validation rows).

:func:`fit_baselines` writes ``baselines.json`` (per baseline: settings, ``val`` and ``test`` figures
with intervals) and ``baselines_faces.csv`` (image_id, split, baseline, per-face values) into the
head's folder. The zero-shot nets are in :mod:`featlab.zeroshot`.
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np

from .evaluate import score_predictions
from .featureio import read_blocks, read_pooled, row_bytes
from .labels import encode_target, face_scores, selection_metric, split_rows
from .staging import checkpoint
from .store import FeatureStore

C_GRID = (1e-3, 1e-2, 1e-1)
MAX_ITER = 100
ALPHA_GRID = (1.0, 10.0, 100.0, 1000.0, 10000.0)


def _design(store: FeatureStore, key: str, rows, pool, mean, std, budget: int) -> np.ndarray:
    parts = []
    for r in read_blocks(rows, store, key, max(1 << 20, budget // 4)):
        x = read_pooled(store, key, r, pool)  # a fusion key: its taps concatenated
        parts.append(((x - mean) / std).astype(np.float32))
    return np.concatenate(parts) if parts else np.empty((0, len(mean)), np.float32)


def _proba_pred(target: str, raw, classes, n_classes: int) -> dict:
    if target == "age":
        return {"pred": np.clip(np.asarray(raw, dtype=np.float64).ravel(), 0.0, None)}
    proba = np.zeros((len(raw), n_classes))
    proba[:, classes] = raw
    return {"pred": proba.argmax(axis=1).astype(np.int64), "proba": proba}


def fit_baselines(store: FeatureStore, cfg: dict, head_dir: Path, memory_mb: float = 2048) -> dict:
    """Fit and score the majority and linear baselines of the head in ``head_dir`` (see the module doc)."""
    from sklearn.linear_model import LogisticRegression, Ridge

    head_dir = Path(head_dir)
    target, cats = cfg["target"], cfg.get("cats")
    labels = store.labels()
    y_all, valid = encode_target(labels, target, cats)
    hp = cfg.get("hyperparameters", {})
    sp = split_rows(labels, valid, cfg.get("fold"), float(hp.get("val_share", 0.1)))
    tr, va, te = sp["train"], sp["val"], sp["test"]
    n_classes = len(cfg.get("class_names") or []) or 1
    names = cfg.get("class_names")
    out: dict = {}
    preds: dict = {}

    # ---- majority / median
    if target == "age":
        const = float(np.median(y_all[tr]))
        setting = {"predicts": f"the median training age, {const:g}"}
        make = lambda rows: {"pred": np.full(len(rows), const)}  # noqa: E731
    else:
        k = int(np.bincount(y_all[tr], minlength=n_classes).argmax())
        setting = {"predicts": f"the most frequent training class, {names[k]}"}

        def make(rows):
            proba = np.zeros((len(rows), n_classes))
            proba[:, k] = 1.0
            return {"pred": np.full(len(rows), k, dtype=np.int64), "proba": proba}
    preds["majority"] = ({"val": make(va), "test": make(te)}, setting)

    # ---- linear probe on the head's standardised input
    key = cfg["tap"]
    budget = int(float(memory_mb) * (1 << 20))
    need = (len(tr) + len(va) + len(te)) * row_bytes(store, key)
    std_file = head_dir / "standardisation.npz"
    if std_file.is_file() and need <= budget:
        z = np.load(std_file)
        mean, std = z["mean"], z["std"]
        pool = hp.get("pool")
        x = {s: _design(store, key, r, pool, mean, std, budget) for s, r in (("train", tr), ("val", va), ("test", te))}
        sel = selection_metric(target)
        if target == "age":
            best = None
            for c in ALPHA_GRID:  # LSQR: a few matrix-vector products per alpha, also for very wide taps
                r = Ridge(alpha=c, solver="lsqr").fit(x["train"], y_all[tr])
                pv = {"pred": np.clip(r.predict(x["val"]), 0.0, None)}
                score = face_scores(target, y_all[va], pv["pred"])[sel].mean()  # the figure, without its interval
                if best is None or score < best[0]:
                    best = (score, c, r, pv)
            _, c, m, pv = best
            pt = {"pred": np.clip(m.predict(x["test"]), 0.0, None)}
        else:
            best = None
            m = LogisticRegression(C=C_GRID[0], max_iter=MAX_ITER, warm_start=True)
            for c in C_GRID:  # weakest first, each fit warm-started from the last
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # convergence notes at the iteration cap
                    m.set_params(C=c).fit(x["train"], y_all[tr])
                pv = _proba_pred(target, m.predict_proba(x["val"]), m.classes_, n_classes)
                score = face_scores(target, y_all[va], pv["pred"])[sel].mean()  # the figure, without its interval
                if best is None or score > best[0]:
                    best = (score, c, m.coef_.copy(), m.intercept_.copy(), pv)
            _, c, m.coef_, m.intercept_, pv = best
            pt = _proba_pred(target, m.predict_proba(x["test"]), m.classes_, n_classes)
        preds["linear"] = ({"val": pv, "test": pt},
                           {"model": "Ridge(alpha, solver='lsqr')" if target == "age" else "LogisticRegression(C)",
                            "chosen_on": "val",
                            "grid": list(ALPHA_GRID if target == "age" else C_GRID), "chosen": c,
                            "max_iter": None if target == "age" else MAX_ITER,
                            "input": "the head's standardised input (train-row mean/std)"})
    else:
        out["linear"] = {"skipped": ("no standardisation.npz beside the head" if not std_file.is_file() else
                                     f"the tap needs {need >> 20} MiB, over the {int(memory_mb)} MiB budget")}

    checkpoint("baselines")
    rows = {"val": va, "test": te}
    faces = []
    for name, (pp, setting) in preds.items():
        entry = {"settings": setting}
        for split in ("val", "test"):
            if not len(rows[split]):
                continue
            s = score_predictions(target, cats, y_all[rows[split]], pp[split], labels.iloc[rows[split]], names)
            entry[split] = {"n": s["n"], "metrics": s["metrics"]}
            ids = labels["image_id"].to_numpy()[rows[split]]
            for i, iid in enumerate(ids):
                faces.append({"image_id": iid, "split": split, "baseline": name,
                              **{mm: float(v[i]) for mm, v in s["faces"].items()}})
        out[name] = entry
    (head_dir / "baselines.json").write_text(json.dumps(out, indent=2))
    if faces:
        with open(head_dir / "baselines_faces.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(faces[0]))
            w.writeheader()
            w.writerows(faces)
    return out

