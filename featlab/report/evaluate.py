"""Score a trained head on rows of a features file: every figure with its 95 % interval.

:func:`score_rows` computes, for one set of rows, the flat figures (``metrics``: accuracy, 1-off, MAE,
... each headline figure ``M`` with ``M_ci95`` beside it, a seeded bootstrap over the faces), the full
breakdown (``report``), the per-face values behind each headline figure and the predictions.

:func:`record_head` writes a freshly trained head's own record, into its folder:

- ``metrics.json``: a ``val`` and a ``test`` section (``n``, ``metrics`` with intervals, ``report``),
  the subgroups of the test split, and the head's config. Choices (tap, head size, ...) are made on
  ``val``; ``test`` is what is reported.
- ``faces.csv``: image_id, split and the per-face headline values (0/1 correct, |error| ...), which
  comparisons pair across heads.
- test split reports: ``confusion.csv``/``_counts.csv``/``.png`` (bins, gender); ``scatter.png`` and the
  regression binned into 5/7/8 groups (age); ``subgroups.csv``; ``predictions.csv``
  (``predictions_val.csv`` for val).

:func:`evaluate_head` scores a saved head on another split or another features file and writes to
``{head}/eval/{dataset-key}/{split}/``; it never changes the head's own record. On another features
file it uses every row unless a split is asked for, and refuses features made differently. A head across
networks takes one features file per network (or a file they were joined into): each is checked against that
network's own record (:mod:`featlab.crosshead`), then they are joined by image id as in training; on the files
it was trained on it gives its record's test figures.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from . import metrics as M
from ..data.bins import get_scheme, group_labels
from ..errors import FeatlabError
from ..featureio import check_finite
from ..data.labels import GENDERS, HEADLINE, encode_target, face_scores, split_rows
from ..paths import dataset_key, differences, feature_set
from ..store import FeatureStore
from .uncertainty import design_effect, interval, unit_of

BIN_VIEWS = (5, 7, 8)
SPLITS = ("test", "val", "train", "all")


def _resolved(p: Path) -> Path:
    try:
        return Path(p).resolve()
    except OSError:
        return Path(p)


def check_compatible(store: FeatureStore, cfg: dict) -> None:
    """Refuse features the head cannot read, or that were made differently from its training features:
    another model file, preprocessing, alignment, flip, pooling or dtype, a missing tap, another shape."""
    attrs = store.attrs
    want = cfg.get("features_model_sha256")
    have = attrs.get("model_sha256")
    if want and have != want:
        raise FeatlabError(
            f"{store.path} was extracted with another model file (model_sha256 {str(have)[:12]}..., the head was "
            f"trained on {str(want)[:12]}... from {cfg.get('backbone')}); heads only apply to features of the same model"
        )
    if cfg.get("fusion"):  # a fusion head: every tap checked like a head of its own
        for part in cfg["fusion"]:
            check_compatible(store, {**cfg, **part, "fusion": None})
        return
    key = cfg["tap"]
    if key not in store.keys():
        have_keys = ", ".join(store.keys()) or "none"
        raise FeatlabError(f"{store.path} has no tap {key!r} (it has: {have_keys}); extract it with `featlab extract --layer {key}`")
    shape = list(store.array(key).shape[1:])
    if shape != list(cfg["tap_shape"]):
        raise FeatlabError(f"{store.path}: tap {key} has shape {tuple(shape)}, the head expects {tuple(cfg['tap_shape'])} "
                           "(different pooling or input size)")
    mine = cfg.get("feature_set")
    if mine:
        keys = ("backbone", "preprocessing", "align", "flip", "pool", "dtype")
        d = differences(feature_set(attrs, key), mine, keys)
        if d:
            raise FeatlabError(f"{store.path} was made differently from the head's training features: {', '.join(d)}")


def score_rows(model, cfg: dict, store: FeatureStore, rows: np.ndarray, labels=None, seed: int = 0) -> dict:
    """Figures, intervals, report, per-face values and predictions of the head on ``rows``."""
    from ..model import predict_rows

    labels = store.labels() if labels is None else labels
    check_finite(store, cfg["tap"], rows)
    target, cats = cfg["target"], cfg.get("cats")
    y_all, _ = encode_target(labels, target, cats)
    pred = predict_rows(model, cfg, store, rows)
    return score_predictions(target, cats, y_all[rows], pred, labels.iloc[rows], cfg.get("class_names"), seed)


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
        files += _write_confusion(out_dir, "confusion", np.asarray(rep["confusion"]), names,
                                  f"{title}\n{where}", rep["accuracy"], rep.get("one_off"), plots)
        metric_name = "accuracy"
        correct = (y == p)

        def metric(m):
            return float(correct[m].mean()) if m.any() else float("nan")
    else:
        for name, b in rep["binned"].items():
            files += _write_confusion(out_dir, f"confusion_{name}", np.asarray(b["confusion"]), b["names"],
                                      f"{title} (binned into {name})\n{where}", b["accuracy"], b["one_off"], plots)
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
    _write_predictions(out_dir / "predictions.csv", scored["sub"], y, scored["pred"], cfg)
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


def _section(s: dict, note: str) -> dict:
    return {"n": s["n"], "split_note": note, "metrics": s["metrics"], "uncertainty": s["uncertainty"],
            "report": s["report"]}


def record_head(model, cfg: dict, store: FeatureStore, head_dir: Path) -> dict:
    """Score a freshly trained head on its val and test rows and write its record (see the module doc)."""
    head_dir = Path(head_dir)
    labels = store.labels()
    y_all, valid = encode_target(labels, cfg["target"], cfg.get("cats"))
    hp = cfg.get("hyperparameters", {})
    sp = split_rows(labels, valid, cfg.get("fold"), float(hp.get("val_share", 0.1)))
    sections, files = {}, []
    for split in ("val", "test"):
        if not len(sp[split]):
            continue
        sections[split] = score_rows(model, cfg, store, sp[split], labels)
        if split == "test":
            files += write_reports(head_dir, cfg, sections[split], "test split")
        else:
            _write_predictions(head_dir / "predictions_val.csv", sections[split]["sub"], sections[split]["y"],
                               sections[split]["pred"], cfg)
            files.append("predictions_val.csv")
    write_faces(head_dir / "faces.csv", sections)
    result = {
        "kind": "head",
        "head_dir": str(head_dir.resolve()),
        "features": str(_resolved(store.path)),
        "feature_set": cfg.get("feature_set"),
        "backbone": cfg["backbone"],
        "dataset": cfg["dataset"],
        "dataset_key": cfg.get("dataset_key", cfg["dataset"]),
        "tap": cfg["tap"],
        "head_key": cfg.get("head_key", cfg["tap"]),
        "target": cfg["target"],
        "target_name": cfg["target_name"],
        "fold": cfg.get("fold"),
        "seed": cfg.get("seed"),
        "split_note": sp["note"],
        "chosen_on": "val",
        **{k: _section(v, sp["note"]) for k, v in sections.items()},
        "subgroups_test": sections.get("test", {}).get("subgroups"),
        "files": ["metrics.json", "faces.csv", *files],
        "config": cfg,
    }
    (head_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    return result


def evaluate_head(head_dir, features=None, split: str | None = None, out_dir=None) -> dict:
    """Score the head in ``head_dir`` on ``split`` of ``features`` (default: its own file's test split;
    every row of another file) into ``{head}/eval/{dataset-key}/{split}/metrics.json`` (or ``out_dir``)."""
    from ..model import load_head

    head_dir = Path(head_dir)
    if split is not None and split not in SPLITS:
        raise FeatlabError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    cfg_path = head_dir / "config.json"
    if not cfg_path.is_file():
        if any((head_dir / f"{p}0").is_dir() for p in ("fold", "seed")):
            raise FeatlabError(f"{head_dir} holds several heads (folds or seeds): evaluate one of its fold*/seed* folders")
        raise FeatlabError(f"{head_dir} is not a trained head (needs head.keras and config.json); train one with `featlab train-head`")
    try:
        kind = json.loads(cfg_path.read_text()).get("kind")
    except ValueError:
        raise FeatlabError(f"{cfg_path} is not valid JSON") from None
    if kind != "head":
        raise FeatlabError(f"{head_dir} is not a single head (evaluate one of its fold*/seed* folders)")
    files = [] if features is None else [Path(f) for f in (features if isinstance(features, (list, tuple))
                                                            else [features])]
    from ..crosshead import check_network_file, is_cross_head, match_files

    if len(files) > 1 and is_cross_head(json.loads(cfg_path.read_text())):  # one line before TensorFlow loads
        cfg = json.loads(cfg_path.read_text())
        for n, f in match_files(cfg, files).items():
            with FeatureStore.open_read(f) as s:
                check_network_file(s, n, cfg)
    model, cfg = load_head(head_dir)
    if is_cross_head(cfg):
        return _evaluate_cross(model, cfg, head_dir, files, split, out_dir)
    if len(files) > 1:
        raise FeatlabError(f"{head_dir} reads one network's features: give one features file (several only for a "
                           "head across networks)")
    trained_on = Path(cfg["features"])
    path = files[0] if files else trained_on
    other = _resolved(path) != _resolved(trained_on)
    with FeatureStore.open_read(path) as store:
        check_compatible(store, cfg)
        return _evaluate_store(model, cfg, head_dir, store, other, split, out_dir)


def _evaluate_cross(model, cfg: dict, head_dir: Path, files: list[Path], split, out_dir) -> dict:
    """evaluate_head for a head across networks: one features file per network, each checked against that
    network's record and joined by image id (in a temporary folder of the head, removed after), or one file
    already joined, checked part by part; the head's own joined file when none is given."""
    import tempfile

    from ..crosshead import check_joined_file, join_for_head

    unchecked = {**cfg, "features_model_sha256": None,  # the parts are checked, each against its network
                 "fusion": [{**p, "feature_set": None} for p in cfg["fusion"]]}
    if len(files) == 1:
        with FeatureStore.open_read(files[0]) as store:
            if not store.attrs.get("join"):
                from ..crosshead import head_networks

                nets = list(head_networks(cfg))
                raise FeatlabError(f"{files[0]}: the head reads networks {' and '.join(nets)}; give one features "
                                   "file per network (-f FILE.h5 for each), or a file they were joined into")
            check_joined_file(store, cfg)
            check_compatible(store, unchecked)
            other = _resolved(files[0]) != _resolved(Path(cfg["features"]))
            return _evaluate_store(model, cfg, head_dir, store, other, split, out_dir)
    if not files:
        with FeatureStore.open_read(cfg["features"]) as store:
            check_compatible(store, cfg)
            return _evaluate_store(model, cfg, head_dir, store, False, split, out_dir)
    with tempfile.TemporaryDirectory(dir=head_dir, prefix=".join-") as tmp:
        path, nets, same = join_for_head(cfg, files, Path(tmp))
        with FeatureStore.open_read(path) as store:
            check_compatible(store, unchecked)
            extra = {"features": {n: str(_resolved(f)) for n, f in nets.items()},
                     "joined": "the files joined by image id for this evaluation (not kept)"}
            return _evaluate_store(model, cfg, head_dir, store, not same, split, out_dir, extra,
                                   " + ".join(f.name for f in nets.values()))


def _evaluate_store(model, cfg: dict, head_dir: Path, store: FeatureStore, other: bool, split, out_dir,
                    extra: dict | None = None, what: str | None = None) -> dict:
    """Score the head on ``split`` of an open, checked features file and write the evaluation record."""
    path = Path(store.path)
    name = what or path.name
    store.check_labels_current()
    labels = store.labels()
    y_all, valid = encode_target(labels, cfg["target"], cfg.get("cats"))
    if other and split is None:
        split, rows, note = "all", np.flatnonzero(valid), f"every row of {name} with a known {cfg['target']}"
    else:
        split = split or "test"
        rows, note = _rows_for(store, cfg, labels, valid, split, other)
    if not len(rows):
        raise FeatlabError(f"{store.path}: no rows with a known {cfg['target']} in split '{split}'")
    dkey = dataset_key(feature_set(store.attrs)) if store.attrs.get("dataset") else path.stem
    out = Path(out_dir) if out_dir is not None else head_dir / "eval" / dkey / split
    out.mkdir(parents=True, exist_ok=True)
    scored = score_rows(model, cfg, store, rows, labels)
    files = write_reports(out, cfg, scored, f"{split} of {name}")
    write_faces(out / "faces.csv", {split: scored})
    result = {
        "kind": "evaluation",
        "head_dir": str(head_dir.resolve()),
        "features": str(_resolved(store.path)),
        "trained_on": cfg["features"],
        "split": split,
        "split_note": note,
        "n": scored["n"],
        "backbone": cfg["backbone"],
        "dataset": cfg["dataset"],
        "eval_dataset": store.attrs.get("dataset"),
        "tap": cfg["tap"],
        "head_key": cfg.get("head_key", cfg["tap"]),
        "target": cfg["target"],
        "target_name": cfg["target_name"],
        "fold": cfg.get("fold"),
        "metrics": scored["metrics"],
        "uncertainty": scored["uncertainty"],
        "report": scored["report"],
        "subgroups": scored.get("subgroups"),
        "files": ["metrics.json", "faces.csv", *files],
        "out_dir": str(out),
        **(extra or {}),
    }
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    return result


def _rows_for(store, cfg, labels, valid, split, other) -> tuple[np.ndarray, str]:
    if split == "all":
        return np.flatnonzero(valid), "all rows"
    if not other:
        hp = cfg.get("hyperparameters", {})
        sp = split_rows(labels, valid, cfg.get("fold"), float(hp.get("val_share", 0.1)))
        return sp[split], f"{split} split as in training ({sp['note']})"
    col = labels["split"].astype(str).to_numpy()
    return np.flatnonzero(valid & (col == split)), f"rows with split '{split}'"


def _write_confusion(out_dir: Path, stem: str, cm: np.ndarray, names, title, acc, one_off, plots) -> list[str]:
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
    plots.confusion_png(cm, group_labels(names), out_dir / f"{stem}.png", title=title, accuracy=acc, one_off=one_off)
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
