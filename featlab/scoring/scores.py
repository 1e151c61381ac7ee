"""Figures from predictions: every headline figure with its 95 % interval over people, and the files a
scored split leaves (confusion matrices, scatter, subgroups, predictions, per-face values).

Takes a target, true labels, predictions and the faces' manifest rows; gives the flat figures
(``metrics``, each headline figure ``M`` with ``M_ci95``), the full breakdown (``report``), the per-face
values behind each headline figure and the note on what the intervals resample. Heads, baselines and
the zero-shot nets are all scored here, so their figures are computed alike.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ..data.bins import get_scheme, group_labels
from ..data.labels import GENDERS, HEADLINE, face_scores
from . import metrics as M
from .uncertainty import design_effect, interval, unit_of

BIN_VIEWS = (5, 7, 8)


def score_predictions(target: str, cats, y, pred: dict, sub, names=None, seed: int = 0) -> dict:
    """Like :func:`score_rows`, from predictions already made (``pred['pred']``, ``pred['proba']``)."""
    p = pred["pred"]
    age = sub["age"].to_numpy(dtype=np.float64)
    if target in ("bins", "gender"):
        names = list(names) if names else (list(get_scheme(cats).names) if target == "bins" else list(GENDERS))
        rep = M.classification_report(y, p, names, ordinal=(target == "bins"))
        flat = {"accuracy": rep["accuracy"]}
        if target == "bins":
            flat["one_off"] = rep["one_off"]
        flat["balanced_accuracy"] = rep["balanced_accuracy"]
        flat["macro_f1"] = rep["macro_f1"]
        for c in rep["per_class"]:
            flat[f"recall_{c['class']}"] = c["recall"]
        if target == "bins":
            # the centre of the predicted bin gives a coarse MAE, for reference only
            flat["mae_bin_centre"] = M.mae(age, get_scheme(cats).centre()[p])
    else:
        rep = M.regression_report(y, p, [get_scheme(c) for c in BIN_VIEWS])
        flat = {k: rep.get(k) for k in ("mae", "rmse", "cs5", "cs10", "bias", "pearson_r")}
        for name, b in rep["binned"].items():
            flat[f"accuracy_{name}"] = b["accuracy"]
            flat[f"one_off_{name}"] = b["one_off"]
    faces = face_scores(target, y, p)
    groups = groups_of(sub)
    for m in HEADLINE[target]:
        flat[f"{m}_ci95"] = interval(faces[m], seed=seed, groups=groups)
    return {"n": int(len(y)), "metrics": flat, "report": rep, "faces": faces, "y": y, "pred": pred, "sub": sub,
            "uncertainty": uncertainty_note(faces, groups, HEADLINE[target])}


def groups_of(sub) -> np.ndarray:
    """The independent unit of each face: its ``group`` (identity, face group); '' = a group of its own."""
    if sub is None or "group" not in sub:
        return np.full(0 if sub is None else len(sub), "", dtype=object)
    return sub["group"].fillna("").astype(str).to_numpy(dtype=object)


def uncertainty_note(faces: dict, groups, metrics) -> dict:
    """What the intervals resample: the unit (``person`` when faces share groups, else ``face``), the
    number of units, and each figure's design effect (cluster variance / face variance)."""
    return {**unit_of(groups), "interval": "95 % BCa bootstrap over the unit",
            "design_effect": {m: design_effect(faces[m], groups) for m in metrics}}


def _groups_of(sub, target, cats) -> dict:
    age = sub["age"].to_numpy(dtype=np.float64)
    scheme = get_scheme(cats if target == "bins" else 7)
    age_bin = np.array([scheme.names[i] if i >= 0 else "" for i in scheme.assign(age)], dtype=object)
    return {"gender": sub["gender"].astype(str).to_numpy(dtype=object), "age_bin": age_bin,
            "race": sub["race"].astype(str).to_numpy(dtype=object)}


def write_reports(out_dir: Path, cfg: dict, scored: dict, where: str) -> list[str]:
    """Confusion matrices / scatter, subgroups and predictions of one scored split into ``out_dir``."""
    from . import plots

    target = cfg["target"]
    rep, y, p = scored["report"], scored["y"], scored["pred"]["pred"]
    title = f"{cfg['backbone']} · {cfg.get('head_key', cfg['tap'])} → {cfg['target_name']}"
    if cfg.get("fold") is not None:
        title += f" (fold {cfg['fold']})"
    files = []
    if target in ("bins", "gender"):
        names = rep["names"]
        met = scored["metrics"]
        files += write_confusion(out_dir, "confusion", np.asarray(rep["confusion"]), names,
                                  f"{title}\n{where}", rep["accuracy"], rep.get("one_off"), plots,
                                  met.get("accuracy_ci95"), met.get("one_off_ci95"))
        metric_name = "accuracy"
        correct = (y == p)

        def metric(m):
            return float(correct[m].mean()) if m.any() else float("nan")
    else:
        groups = groups_of(scored["sub"])
        for name, b in rep["binned"].items():
            ci = _binned_intervals(y, p, get_scheme(int(name[4:])), groups, b)
            files += write_confusion(out_dir, f"confusion_{name}", np.asarray(b["confusion"]), b["names"],
                                      f"{title} (binned into {name})\n{where}", b["accuracy"], b["one_off"], plots,
                                      *ci)
        plots.scatter_png(y, p, out_dir / "scatter.png", title=f"{title}\n{where}", mae=rep["mae"],
                          cs5=rep["cs5"])
        files.append("scatter.png")
        metric_name = "mae"
        err = np.abs(p - y)

        def metric(m):
            return float(err[m].mean()) if m.any() else float("nan")

    sg = M.subgroup_table(_groups_of(scored["sub"], target, cfg.get("cats")), metric, metric_name,
                          crosses=[("gender", "age_bin")])
    with open(out_dir / "subgroups.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["grouping", "group", "n", metric_name])
        w.writeheader()
        w.writerows(sg)
    scored["subgroups"] = sg
    write_predictions(out_dir / "predictions.csv", scored["sub"], y, scored["pred"], cfg)
    return files + ["subgroups.csv", "predictions.csv"]


def write_faces(path: Path, sections: dict[str, dict]) -> None:
    """faces.csv: image_id, split, group (the unit intervals resample; '' = the face alone) and the per-face
    headline values of every scored split."""
    rows = []
    for split, s in sections.items():
        ids = s["sub"]["image_id"].astype(str).to_numpy()
        groups = groups_of(s["sub"])
        for i, iid in enumerate(ids):
            rows.append({"image_id": iid, "split": split, "group": groups[i],
                         **{m: float(v[i]) for m, v in s["faces"].items()}})
    names = list(next(iter(sections.values()))["faces"]) if sections else []
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image_id", "split", "group", *names])
        w.writeheader()
        w.writerows(rows)


def _binned_intervals(y, p, scheme, groups, rep) -> tuple:
    """95 % intervals over people of an age head's accuracy and 1-off in ``scheme``'s groups (its binned
    view); (None, None) where the per-face values do not give the report's figures."""
    t = scheme.assign(np.asarray(y, dtype=np.float64))
    q = scheme.assign(np.clip(np.asarray(p, dtype=np.float64), 0, None))
    ok = t >= 0
    correct = (t == q)[ok].astype(np.float64)
    off = ((np.abs(t - q) <= 1) & (q >= 0))[ok].astype(np.float64)
    g = np.asarray(groups, dtype=object)[ok] if len(groups) == len(t) else None
    out = []
    for v, key in ((correct, "accuracy"), (off, "one_off")):
        want = rep.get(key)
        out.append(interval(v, groups=g) if want is not None and len(v) and abs(v.mean() - want) < 1e-9 else None)
    return tuple(out)


def write_confusion(out_dir: Path, stem: str, cm: np.ndarray, names, title, acc, one_off, plots, acc_ci=None,
                    one_off_ci=None) -> list[str]:
    norm = M.normalise_rows(cm)

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
    # the figure names each age group with its real interval where the names leave gaps (8 groups)
    plots.confusion_png(cm, group_labels(names), out_dir / f"{stem}.png", title=title, accuracy=acc, one_off=one_off,
                        accuracy_ci=acc_ci, one_off_ci=one_off_ci)
    return [f"{stem}.csv", f"{stem}_counts.csv", f"{stem}.png"]


def write_predictions(path: Path, sub, y, pred, cfg) -> None:
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


def write_scored(out: Path, cfg: dict, score, head_key: str | None = None) -> tuple[dict, list[str]]:
    """Score a record's ``val`` and ``test`` faces with ``score(split)`` (None: the split has no faces) and
    write its files into ``out``: the test reports (confusion or scatter, subgroups, predictions; titled with
    ``head_key`` when given), the val predictions and ``faces.csv``. Returns (the scored sections, the files
    written besides faces.csv). One writer for heads, CNNs and seed ensembles."""
    sections, files = {}, []
    for split in ("val", "test"):
        s = score(split)
        if s is None:
            continue
        sections[split] = s
        if split == "test":
            files += write_reports(out, cfg if head_key is None else {**cfg, "head_key": head_key}, s, "test split")
        else:
            write_predictions(out / "predictions_val.csv", s["sub"], s["y"], s["pred"], cfg)
            files.append("predictions_val.csv")
    write_faces(out / "faces.csv", sections)
    return sections, files


def record_fields(kind: str, out: Path, cfg: dict, sections: dict, note: str, files: list[str]) -> dict:
    """The fields every record's ``metrics.json`` shares (a head's, a CNN's): what was scored, how the split
    was made, and each split's figures with their uncertainty."""
    return {
        "kind": kind, "head_dir": str(Path(out).resolve()), "feature_set": cfg.get("feature_set"),
        "backbone": cfg["backbone"], "dataset": cfg["dataset"], "dataset_key": cfg.get("dataset_key", cfg["dataset"]),
        "tap": cfg["tap"], "head_key": cfg.get("head_key", cfg["tap"]), "target": cfg["target"],
        "target_name": cfg["target_name"], "fold": cfg.get("fold"), "seed": cfg.get("seed"), "split_note": note,
        "chosen_on": "val",
        **{k: {"n": v["n"], "split_note": note, "metrics": v["metrics"], "uncertainty": v["uncertainty"],
               "report": v["report"]} for k, v in sections.items()},
        "subgroups_test": sections.get("test", {}).get("subgroups"),
        "files": ["metrics.json", "faces.csv", *files], "config": cfg,
    }
