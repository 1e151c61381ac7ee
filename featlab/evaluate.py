"""Evaluate a trained head on a split of a features file and write its report.

:func:`evaluate_head` writes, into the head's folder (or ``eval-{stem}`` for another features file):

- ``metrics.json``: every figure (``metrics`` holds the headline scalars, ``report`` the full
  breakdown), sample counts, input paths and the head's config
- bins and gender: ``confusion.csv`` (normalised per true class, class names on rows and columns),
  ``confusion_counts.csv``, ``confusion.png``
- age regression: ``scatter.png``, and the regression binned into the 5/7/8-group schemes as
  ``confusion_bins{5,7,8}.csv``/``_counts.csv``/``.png`` so it compares with bin heads
- ``subgroups.csv``: the main metric by gender, age bin, gender x age bin and race, with counts
- ``predictions.csv``: image_id, truth, prediction per evaluated row

A features file other than the training one is refused when its model_sha256
or the tap's shape differ, or when it lacks the tap.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from .bins import get_scheme
from .errors import FeatlabError
from .store import FeatureStore

BIN_VIEWS = (5, 7, 8)
SPLITS = ("test", "val", "train", "all")


def evaluate_head(head_dir, features=None, split: str = "test", out_dir=None) -> dict:
    """Evaluate the head in ``head_dir`` on ``split`` of ``features`` (default: the file it was trained on)."""
    from .heads import load_head

    head_dir = Path(head_dir)
    if split not in SPLITS:
        raise FeatlabError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if (head_dir / "config.json").is_file() and json.loads((head_dir / "config.json").read_text()).get("kind") != "head":
        raise FeatlabError(f"{head_dir} is not a single head (for --fold all, evaluate each fold{{K}} folder)")
    if not (head_dir / "config.json").is_file() and (head_dir / "fold0").is_dir():
        raise FeatlabError(f"{head_dir} holds per-fold heads: evaluate {head_dir}/fold0 ... fold4")
    model, cfg = load_head(head_dir)
    trained_on = Path(cfg["features"])
    path = Path(features) if features is not None else trained_on
    other = _resolved(path) != _resolved(trained_on)
    with FeatureStore.open_read(path) as store:
        if other:
            check_compatible(store, cfg)
        if out_dir is None:
            out_dir = head_dir / f"eval-{path.stem}" if other else head_dir
        return _evaluate(model, cfg, store, split, Path(out_dir), head_dir=head_dir, other=other)


def _resolved(p: Path) -> Path:
    try:
        return p.resolve()
    except OSError:
        return p


def check_compatible(store: FeatureStore, cfg: dict) -> None:
    """Refuse features the head cannot read: another backbone model file, no such tap, another shape."""
    attrs = store.attrs
    want = cfg.get("features_model_sha256")
    have = attrs.get("model_sha256")
    if want and have != want:
        raise FeatlabError(
            f"{store.path} was extracted with another model file (model_sha256 {str(have)[:12]}..., the head was "
            f"trained on {str(want)[:12]}... from {cfg.get('backbone')}); heads only apply to features of the same model"
        )
    key = cfg["tap"]
    if key not in store.keys():
        have_keys = ", ".join(store.keys()) or "none"
        raise FeatlabError(f"{store.path} has no tap {key!r} (it has: {have_keys}); extract it with `featlab extract --layer {key}`")
    shape = list(store.array(key).shape[1:])
    if shape != list(cfg["tap_shape"]):
        raise FeatlabError(f"{store.path}: tap {key} has shape {tuple(shape)}, the head expects {tuple(cfg['tap_shape'])} "
                           "(different pooling or input size)")


def _select_rows(store, cfg, labels, valid, split, other) -> tuple[np.ndarray, str]:
    from .heads import split_rows

    if split == "all":
        return np.flatnonzero(valid), "all rows"
    if not other:
        hp = cfg.get("hyperparameters", {})
        sp = split_rows(labels, valid, cfg.get("fold"), int(cfg.get("seed", 0)), float(hp.get("val_share", 0.1)))
        rows = sp[split]
        if not len(rows):
            raise FeatlabError(f"{store.path} has no '{split}' rows with a known {cfg['target']}; "
                               "choose another --split, or evaluate on a held-out features file")
        return rows, f"{split} split as in training ({sp['note']})"
    col = labels["split"].astype(str).to_numpy()
    rows = np.flatnonzero(valid & (col == split))
    if len(rows):
        return rows, f"rows with split '{split}'"
    return np.flatnonzero(valid), f"{store.path.name} has no '{split}' rows: evaluated on all {int(valid.sum())} rows"


def _evaluate(model, cfg: dict, store: FeatureStore, split: str, out_dir: Path, head_dir: Path, other: bool = False) -> dict:
    from . import metrics as M
    from . import plots
    from .heads import GENDERS, encode_target, predict_rows

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target, cats = cfg["target"], cfg.get("cats")
    labels = store.labels()
    y_all, valid = encode_target(labels, target, cats)
    rows, note = _select_rows(store, cfg, labels, valid, split, other)
    if not len(rows):
        raise FeatlabError(f"{store.path}: no rows with a known {target} to evaluate on")
    pred = predict_rows(model, cfg, store, rows)
    p = pred["pred"]
    y = y_all[rows]
    sub = labels.iloc[rows]
    age = sub["age"].to_numpy(dtype=np.float64)
    group_scheme = get_scheme(cats if target == "bins" else 7)
    age_bin = np.array([group_scheme.names[i] if i >= 0 else "" for i in group_scheme.assign(age)], dtype=object)
    groups = {"gender": sub["gender"].astype(str).to_numpy(dtype=object), "age_bin": age_bin,
              "race": sub["race"].astype(str).to_numpy(dtype=object)}
    title = f"{cfg['backbone']} · {cfg.get('head_key', cfg['tap'])} → {cfg['target_name']}"
    if cfg.get("fold") is not None:
        title += f" (fold {cfg['fold']})"
    where = f"{split} split" + (f" of {store.path.name}" if other else "")

    flat: dict = {}
    files = []
    if target in ("bins", "gender"):
        names = list(cfg["class_names"]) if target == "bins" else list(GENDERS)
        rep = M.classification_report(y, p, names, ordinal=(target == "bins"))
        flat = {"accuracy": rep["accuracy"]}
        if target == "bins":
            flat["one_off"] = rep["one_off"]
        flat["balanced_accuracy"] = rep["balanced_accuracy"]
        flat["macro_f1"] = rep["macro_f1"]
        for c in rep["per_class"]:
            flat[f"recall_{c['class']}"] = c["recall"]
        if target == "bins":
            # expected age from the bin probabilities is not comparable to a regression; the centre of the
            # predicted bin gives a coarse MAE for reference only
            flat["mae_bin_centre"] = M.mae(age, get_scheme(cats).centre()[p])
        files += _write_confusion(out_dir, "confusion", np.asarray(rep["confusion"]), names,
                                  f"{title}\n{where}", rep["accuracy"], rep.get("one_off"), plots)
        metric_name = "accuracy"
        correct = (y == p)

        def metric(m):
            return float(correct[m].mean()) if m.any() else float("nan")
    else:
        schemes = [get_scheme(c) for c in BIN_VIEWS]
        rep = M.regression_report(y, p, schemes)
        flat = {k: rep.get(k) for k in ("mae", "rmse", "cs5", "cs10", "bias", "pearson_r")}
        for name, b in rep["binned"].items():
            flat[f"accuracy_{name}"] = b["accuracy"]
            flat[f"one_off_{name}"] = b["one_off"]
            files += _write_confusion(out_dir, f"confusion_{name}", np.asarray(b["confusion"]), b["names"],
                                      f"{title} (binned into {name})\n{where}", b["accuracy"], b["one_off"], plots)
        plots.scatter_png(y, p, out_dir / "scatter.png", title=f"{title}\n{where}", mae=rep["mae"],
                          cs5=rep["cs5"])
        files.append("scatter.png")
        metric_name = "mae"
        err = np.abs(p - y)

        def metric(m):
            return float(err[m].mean()) if m.any() else float("nan")

    sg = M.subgroup_table(groups, metric, metric_name, crosses=[("gender", "age_bin")])
    with open(out_dir / "subgroups.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["grouping", "group", "n", metric_name])
        w.writeheader()
        w.writerows(sg)
    files.append("subgroups.csv")
    _write_predictions(out_dir / "predictions.csv", sub, y, pred, cfg)
    files.append("predictions.csv")

    result = {
        "kind": "evaluation",
        "head_dir": str(Path(head_dir).resolve()),
        "features": str(_resolved(Path(store.path))),
        "features_model_sha256": store.attrs.get("model_sha256"),
        "trained_on": cfg["features"],
        "split": split,
        "split_note": note,
        "n": int(len(rows)),
        "n_dropped_missing_target": int((~valid).sum()),
        "backbone": cfg["backbone"],
        "dataset": cfg["dataset"],
        "eval_dataset": store.attrs.get("dataset"),
        "tap": cfg["tap"],
        "head_key": cfg.get("head_key", cfg["tap"]),
        "target": target,
        "target_name": cfg["target_name"],
        "fold": cfg.get("fold"),
        "metrics": flat,
        "report": rep,
        "subgroups": sg,
        "files": ["metrics.json", *files],
        "config": cfg,
    }
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    return result


def _write_confusion(out_dir: Path, stem: str, cm: np.ndarray, names, title, acc, one_off, plots) -> list[str]:
    from .metrics import normalise_rows

    norm = normalise_rows(cm)
    def cell(v, counts):
        v = v.item() if hasattr(v, "item") else v
        if counts:
            return str(int(v))
        return "" if np.isnan(v) else f"{v:.4f}"

    for fname, mat, counts in ((f"{stem}.csv", norm, False), (f"{stem}_counts.csv", cm, True)):
        with open(out_dir / fname, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["true \\ predicted", *names])
            for name, row in zip(names, mat):
                w.writerow([name, *[cell(v, counts) for v in row]])
    plots.confusion_png(cm, names, out_dir / f"{stem}.png", title=title, accuracy=acc, one_off=one_off)
    return [f"{stem}.csv", f"{stem}_counts.csv", f"{stem}.png"]


def _write_predictions(path: Path, sub, y, pred, cfg) -> None:
    names = cfg.get("class_names") or []
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        if cfg["target"] == "age":
            w.writerow(["image_id", "age", "predicted_age"])
            for iid, t, p in zip(sub["image_id"], y, pred["pred"]):
                w.writerow([iid, f"{float(t):g}", f"{float(p):.2f}"])
        else:
            w.writerow(["image_id", "true", "predicted", "confidence"])
            conf = pred["proba"].max(axis=1)
            for iid, t, p, c in zip(sub["image_id"], y, pred["pred"], conf):
                w.writerow([iid, names[int(t)], names[int(p)], f"{float(c):.4f}"])
