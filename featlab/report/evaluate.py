"""Score a trained head on rows of a features file: every figure with its 95 % interval.

:func:`score_rows` runs the head on one set of rows and scores its predictions
(:func:`featlab.scoring.scores.score_predictions`: the flat figures, each headline figure ``M`` with ``M_ci95``
beside it, the full breakdown, the per-face values and the predictions).

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
network's own record (:mod:`featlab.report.crosshead`), then they are joined by image id as in training; on the files
it was trained on it gives its record's test figures.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..data.labels import encode_target, split_rows
from ..errors import FeatlabError
from ..features.featureio import check_finite
from ..paths import dataset_key, differences, feature_set
from ..scoring.scores import record_fields, score_predictions, write_faces, write_reports, write_scored
from ..features.store import FeatureStore

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
        raise store.missing_tap(key)
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
    from ..heads.model import predict_rows

    labels = store.labels() if labels is None else labels
    check_finite(store, cfg["tap"], rows)
    target, cats = cfg["target"], cfg.get("cats")
    y_all, _ = encode_target(labels, target, cats)
    pred = predict_rows(model, cfg, store, rows)
    return score_predictions(target, cats, y_all[rows], pred, labels.iloc[rows], cfg.get("class_names"), seed)


def record_head(model, cfg: dict, store: FeatureStore, head_dir: Path) -> dict:
    """Score a freshly trained head on its val and test rows and write its record (see the module doc)."""
    head_dir = Path(head_dir)
    labels = store.labels()
    y_all, valid = encode_target(labels, cfg["target"], cfg.get("cats"))
    hp = cfg.get("hyperparameters", {})
    sp = split_rows(labels, valid, cfg.get("fold"), float(hp.get("val_share", 0.1)))
    sections, files = write_scored(head_dir, cfg, lambda split: score_rows(model, cfg, store, sp[split], labels)
                                   if len(sp[split]) else None)
    result = {**record_fields("head", head_dir, cfg, sections, sp["note"], files),
              "features": str(_resolved(store.path))}
    (head_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    return result


def evaluate_head(head_dir, features=None, split: str | None = None, out_dir=None) -> dict:
    """Score the head in ``head_dir`` on ``split`` of ``features`` (default: its own file's test split;
    every row of another file) into ``{head}/eval/{dataset-key}/{split}/metrics.json`` (or ``out_dir``)."""
    from ..heads.model import load_head

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
    from .crosshead import check_network_file, is_cross_head, match_files

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

    from .crosshead import check_joined_file, join_for_head

    unchecked = {**cfg, "features_model_sha256": None,  # the parts are checked, each against its network
                 "fusion": [{**p, "feature_set": None} for p in cfg["fusion"]]}
    if len(files) == 1:
        with FeatureStore.open_read(files[0]) as store:
            if not store.attrs.get("join"):
                from .crosshead import head_networks

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
