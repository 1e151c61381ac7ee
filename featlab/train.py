"""Training one lean Keras head on one tap (no evaluation here: :mod:`featlab.workflow` chains both).

:func:`fit_head` trains one small head (standardisation -> optional hidden layers with dropout ->
output) on one tap and saves it with everything needed to reproduce it::

    {results}/{backbone}/{dataset-key}/{head-key}/{target}/[fold{K}/][seed{S}/]
        head.keras          the model: input = the tap as stored (C, H, W) or (D,)
        config.json         feature-set identity, tap, target, every hyperparameter, seed, counts,
                            standardisation, target transform, training summary
        standardisation.npz mean/std of the (pooled, flattened) train features (also inside head.keras)
        history.csv/.png    loss and accuracy (or MAE in years) per epoch, train vs val

(paths: :mod:`featlab.paths`). Keras is imported inside the functions, never at import time.
"""

from __future__ import annotations

import csv
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np

from . import __version__
from .bins import get_scheme
from .errors import FeatlabError
from .featureio import ShuffledBatches, feature_stats, row_bytes
from .keras_env import keras as _keras
from .keras_env import tensorflow as _tensorflow
from .labels import (TARGETS, class_names, class_weights, dropped_reasons, encode_target, make_targets,
                     soft_bin_labels, split_rows, target_name, to_years_np)
from .model import build_model
from .paths import dataset_key, feature_set, head_dir, head_key
from .store import FeatureStore


def keras_batches(batches: ShuffledBatches):
    """A Keras PyDataset over :class:`featlab.featureio.ShuffledBatches` (a new permutation every epoch)."""
    keras = _keras()

    class _Batches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=1, use_multiprocessing=False)
            self.b = batches

        def __len__(self):
            return len(self.b)

        def __getitem__(self, i):
            return self.b.batch(i)

        def on_epoch_end(self):
            self.b.next_epoch()

    return _Batches()


def _setup_tf(seed: int):
    keras = _keras()
    tf = _tensorflow()

    keras.utils.set_random_seed(int(seed))
    try:
        tf.config.experimental.enable_op_determinism()
    except Exception:  # noqa: BLE001
        pass
    return keras, tf


def fit_head(features, layer, target, cats=None, *, out_root=None, fold=None, hidden=(64,), dropout=0.5,
               epochs=60, batch_size=128, lr=1e-3, optimizer="adam", patience=8, class_weight=False,
               ordinal=False, pool=None, seed=0, memory_mb=2048, verbose=1,
               input_dropout: float | None = None, weight_decay: float = 0.0, label_smoothing: float = 0.0,
               age_head: str = "expectation", age_sigma: float | None = None, age_transform: str = "z",
               age_loss: str = "mae", monitor: str = "val_loss", val_share: float = 0.1,
               seed_dir: bool = False) -> Path:
    """Train one head on tap ``layer`` of ``features`` for ``target`` (no evaluation: see featlab.workflow).

    target: ``"bins"`` (with ``cats`` 5, 7 or 8), ``"age"`` (years) or ``"gender"``.
    fold: None (the manifest's train/val/test split) or K (Adience-style: test on fold K, train on the
    others, val = a seeded ``val_share`` of their groups).

    The head: the tap as stored -> optional global ``pool`` ("avg"/"max") -> flatten -> standardisation
    fit on the train rows -> ``input_dropout`` (default: 0.5 on inputs of 512 features or more, else 0.2)
    -> ``hidden`` ReLU layers with ``dropout`` -> output:
    softmax over the bins (or CORAL cumulative logits with ``ordinal=True``), softmax over f/m for
    gender; for age, ``age_head="expectation"`` (default) is a softmax over whole years whose expected
    value is the prediction, trained with L1 on that value plus cross-entropy to a Gaussian of
    ``age_sigma`` years (default 2) around the true age; ``age_head="linear"`` is one linear unit on
    the standardised (``age_transform="z"``) or log (``"log1p"``) age with ``age_loss`` mae/mse/huber.
    Adam (or SGD with Nesterov momentum, or AdamW), ReduceLROnPlateau and EarlyStopping on ``monitor``
    ("val_loss", or "val_metric": accuracy / MAE) restoring the best weights. ``class_weight``: False,
    True/"balanced" or "sqrt". ``age_sigma`` > 0 with bins trains on soft bin targets (a Gaussian
    around the true age). Train rows are read at once when they fit ``memory_mb`` (float32),
    otherwise streamed: a fresh permutation of all train rows every epoch, read in blocks within the budget.

    Returns the head's folder (``.../seed{S}`` with ``seed_dir``).
    """
    if target not in TARGETS:
        raise FeatlabError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    tname = target_name(target, cats)
    if age_sigma is None:
        age_sigma = 2.0 if target == "age" else 0.0
    if target != "bins":
        cats = int(cats) if cats is not None else None
    if ordinal and target != "bins":
        raise FeatlabError("--ordinal applies to age bins only")
    if pool not in (None, "avg", "max"):
        raise FeatlabError(f"pool must be 'avg' or 'max', not {pool!r}")
    if optimizer not in ("adam", "sgd", "adamw"):
        raise FeatlabError(f"optimizer must be 'adam', 'adamw' or 'sgd', not {optimizer!r}")
    if age_transform not in ("z", "log1p"):
        raise FeatlabError(f"age_transform must be 'z' or 'log1p', not {age_transform!r}")
    if age_head not in ("linear", "expectation"):
        raise FeatlabError(f"age_head must be 'linear' or 'expectation', not {age_head!r}")
    kw = dict(hidden=tuple(int(h) for h in (hidden or ())), dropout=float(dropout), epochs=int(epochs),
              batch_size=int(batch_size), lr=float(lr), optimizer=optimizer, patience=int(patience),
              class_weight=class_weight, ordinal=bool(ordinal), pool=pool, seed=int(seed),
              memory_mb=float(memory_mb), verbose=verbose, label_smoothing=float(label_smoothing),
              age_sigma=float(age_sigma), age_head=age_head, age_transform=age_transform, age_loss=age_loss,
              input_dropout=(None if input_dropout is None else float(input_dropout)),
              weight_decay=float(weight_decay), val_share=float(val_share), monitor=monitor,
              seed_dir=bool(seed_dir))
    if fold == "all":
        raise FeatlabError("fit_head trains one fold; featlab.workflow.train_head runs --fold all")
    with FeatureStore.open_read(features) as store:
        return _train_one(store, layer, target, cats, tname, out_root, None if fold is None else int(fold), **kw)


def default_hyperparameters() -> dict:
    """train_head's keyword defaults (chosen by measurement on 8,000 UTKFace faces, dlib-age taps)."""
    import inspect

    return {k: p.default for k, p in inspect.signature(fit_head).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and k not in ("out_root", "fold", "verbose", "seed_dir")}


def _train_one(store: FeatureStore, layer, target, cats, tname, out_root, fold, *, hidden, dropout, epochs,
               batch_size, lr, optimizer, patience, class_weight, ordinal, pool, seed, memory_mb, verbose,
               label_smoothing, age_sigma, age_head, age_transform, age_loss, input_dropout, weight_decay, val_share,
               monitor, seed_dir) -> Path:
    t_start = time.perf_counter()
    attrs = store.attrs
    key = str(layer)
    if key not in store.keys():
        store.array(key)  # raises the helpful error
    arr = store.array(key)
    tap_shape = tuple(int(d) for d in arr.shape[1:])
    if pool and len(tap_shape) != 3:
        pool = None  # pooling a vector is a no-op
    backbone = str(attrs.get("backbone", "unknown"))
    ident = feature_set(attrs, key)
    if not ident["dataset"]:
        ident["dataset"] = Path(store.path).stem
    hkey = head_key(key, pool, tap_shape, ident["dtype"])
    out = head_dir(backbone, dataset_key(ident), hkey, tname, fold, seed if seed_dir else None, out_root)

    store.check_labels_current()
    labels = store.labels()
    y_all, valid = encode_target(labels, target, cats)
    dropped = int((~valid).sum())
    if not valid.any():
        raise FeatlabError(f"no row of {store.path.name} has a usable {target} label "
                           f"({', '.join(f'{v:,} {k}' for k, v in dropped_reasons(labels, target, valid).items())})")
    sp = split_rows(labels, valid, fold, seed, val_share)
    tr, va, te = sp["train"], sp["val"], sp["test"]
    for rows in (tr, va, te):
        store.check_finite(key, rows)  # heads never learn from, or are scored on, inf/NaN
    n_classes = get_scheme(cats).n if target == "bins" else (2 if target == "gender" else 1)
    names = class_names(target, cats)
    if target != "age" and len(set(y_all[tr].tolist())) < 2:
        raise FeatlabError(f"the training rows hold a single class of {tname}; nothing to learn")
    if verbose:
        print(f"[featlab] {backbone}/{dataset_key(ident)} tap {key} -> {tname}{'' if fold is None else f' fold {fold}'}: "
              f"train {len(tr)}, val {len(va)}, test {len(te)}; {dropped} rows without {target} dropped")

    keras, tf = _setup_tf(seed)

    # ---- data
    rb = row_bytes(store, key)
    budget = float(memory_mb) * (1 << 20)
    stream = len(tr) * rb > budget
    stream_val = len(va) * rb > budget
    x_tr = None if stream else store.read(key, tr)
    # statistics walk the rows in slices: their float64 copies stay within a fraction of the budget
    mean, std = feature_stats(store, key, tr, pool, x=x_tr, budget_bytes=int(min(256 << 20, budget / 4)))
    if input_dropout is None:
        input_dropout = 0.5 if len(mean) >= 512 else 0.2
    transform = None
    if target == "age":
        a = y_all[tr].astype(np.float64)
        if age_transform == "log1p":
            a = np.log1p(a)
        transform = {"kind": age_transform, "mean": float(a.mean()), "scale": float(a.std() or 1.0)}
    kind = (age_head if target == "age" else ("coral" if ordinal else "softmax"))
    age_grid = None
    if kind == "expectation":
        # one class per year from 0 to the oldest training age, their values in target units
        g = np.arange(0.0, math.ceil(float(np.max(y_all[tr]))) + 1.0)
        g = np.log1p(g) if transform["kind"] == "log1p" else g
        age_grid = (g - transform["mean"]) / transform["scale"]
    y_tr = make_targets(target, ordinal, n_classes, y_all[tr], transform)
    if target == "bins" and age_sigma > 0 and not ordinal:
        y_tr = soft_bin_labels(labels["age"].to_numpy()[tr], get_scheme(cats), age_sigma)
    y_va = make_targets(target, ordinal, n_classes, y_all[va], transform)
    cw = class_weights(y_all[tr], n_classes, class_weight) if target != "age" else None
    w_tr = cw[y_all[tr]].astype(np.float32) if cw is not None else None

    # ---- model
    model = build_model(tap_shape, n_classes, kind, mean, std, hidden, dropout, pool, input_dropout, weight_decay,
                        age_grid)
    if optimizer == "sgd":
        opt = keras.optimizers.SGD(learning_rate=lr, momentum=0.9, nesterov=True)
    elif optimizer == "adamw":
        opt = keras.optimizers.AdamW(learning_rate=lr, weight_decay=weight_decay or 1e-4)
    else:
        opt = keras.optimizers.Adam(learning_rate=lr)
    metrics = []
    metric_name = "mae_years" if target == "age" else "accuracy"
    if kind == "softmax":
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)
        metrics = [keras.metrics.CategoricalAccuracy(name="accuracy")]
    elif kind == "coral":
        loss = keras.losses.BinaryCrossentropy(from_logits=True)

        def accuracy(y_true, y_pred):
            t = keras.ops.sum(y_true, axis=-1)
            p = keras.ops.sum(keras.ops.cast(y_pred > 0.0, "float32"), axis=-1)
            return keras.ops.mean(keras.ops.cast(keras.ops.equal(t, p), "float32"))

        metrics = [accuracy]
    else:
        tsc, tmean, tkind = transform["scale"], transform["mean"], transform["kind"]

        def to_years(v):
            v = v * tsc + tmean
            return keras.ops.expm1(v) if tkind == "log1p" else v

        if kind == "expectation":
            grid_t = keras.ops.convert_to_tensor(np.asarray(age_grid, dtype=np.float32))
            grid_y = keras.ops.convert_to_tensor(np.asarray(to_years_np(age_grid, transform), dtype=np.float32))
            sig = float(age_sigma)

            def expectation_loss(y_true, y_pred):
                # L1 on the expected value (target units), plus, with age_sigma, cross-entropy to a Gaussian
                # label distribution around the true age (DLDL-v2 style): keeps the distribution unimodal
                e = keras.ops.sum(y_pred * grid_t, axis=-1)
                l1 = keras.ops.abs(e - y_true[:, 0])
                if sig <= 0:
                    return l1
                yy = to_years(y_true)  # (N, 1) years
                q = keras.ops.exp(-keras.ops.square(grid_y[None, :] - yy) / (2.0 * sig * sig))
                q = q / keras.ops.sum(q, axis=-1, keepdims=True)
                ce = -keras.ops.sum(q * keras.ops.log(keras.ops.clip(y_pred, 1e-7, 1.0)), axis=-1)
                return l1 + ce

            loss = expectation_loss

            def mae_years(y_true, y_pred):
                e = keras.ops.sum(y_pred * grid_t, axis=-1, keepdims=True)
                return keras.ops.mean(keras.ops.abs(to_years(y_true) - to_years(e)))
        else:
            loss = {"mae": keras.losses.MeanAbsoluteError(), "mse": keras.losses.MeanSquaredError(),
                    "huber": keras.losses.Huber(delta=0.5)}[age_loss]

            def mae_years(y_true, y_pred):
                return keras.ops.mean(keras.ops.abs(to_years(y_true) - to_years(y_pred)))

        metrics = [mae_years]
    model.compile(optimizer=opt, loss=loss, metrics=metrics)

    mon_key = {"val_loss": "val_loss", "val_metric": "val_" + metric_name}.get(monitor)
    if mon_key is None:
        raise FeatlabError(f"monitor must be 'val_loss' or 'val_metric', not {monitor!r}")
    mon_mode = "max" if mon_key == "val_accuracy" else "min"
    callbacks = [
        keras.callbacks.EarlyStopping(monitor=mon_key, mode=mon_mode, patience=patience, restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(monitor=mon_key, mode=mon_mode, factor=0.5, patience=max(2, patience // 3),
                                          min_lr=lr / 64, verbose=0),
    ]
    block_budget = int(min(256 << 20, budget / 4))
    if stream:
        train_data = keras_batches(ShuffledBatches(store, key, tr, y_tr, w_tr, batch_size, True, seed, block_budget))
        fit_kw = dict(x=train_data, shuffle=False)
    else:
        fit_kw = dict(x=x_tr, y=y_tr, sample_weight=w_tr, batch_size=batch_size, shuffle=True)
    if stream_val:
        val_data = keras_batches(ShuffledBatches(store, key, va, y_va, None, max(batch_size, 1024), False, seed,
                                                 block_budget))
    else:
        val_data = (store.read(key, va), y_va)
    t_fit = time.perf_counter()
    with warnings.catch_warnings():
        # Keras 3.15 + TF 2.21 + numpy 2.4: np.array(EagerTensor) inside fit warns about `copy`; not ours
        warnings.filterwarnings("ignore", message="__array__ implementation", category=DeprecationWarning)
        hist = model.fit(validation_data=val_data, epochs=epochs, callbacks=callbacks,
                         verbose=2 if verbose and verbose > 1 else 0, **fit_kw)
    fit_seconds = time.perf_counter() - t_fit
    h = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
    h.pop("learning_rate", None)
    lrs = [float(v) for v in hist.history.get("learning_rate", [])]
    best_epoch = int(np.argmax(h[mon_key]) if mon_mode == "max" else np.argmin(h[mon_key])) + 1
    epochs_run = len(h["loss"])

    # ---- save
    out.mkdir(parents=True, exist_ok=True)
    for old in ("metrics.json", "confusion*.csv", "confusion*.png", "scatter.png", "subgroups*.csv", "predictions*.csv",
                "faces.csv", "baselines*"):
        for f in out.glob(old):  # a previous run's report must not outlive its head
            f.unlink()
    model.save(out / "head.keras")
    np.savez(out / "standardisation.npz", mean=mean, std=std)
    cfg = {
        "featlab_version": __version__,
        "kind": "head",
        "features": str(Path(store.path).resolve()),
        "features_model_sha256": attrs.get("model_sha256"),
        "feature_set": ident,
        "backbone": backbone,
        "dataset": ident["dataset"],
        "dataset_key": dataset_key(ident),
        "tap": key,
        "head_key": hkey,
        "tap_info": (attrs.get("taps") or {}).get(key),
        "tap_shape": list(tap_shape),
        "target": target,
        "target_name": tname,
        "cats": int(cats) if cats is not None else None,
        "class_names": names,
        "n_outputs": (n_classes - 1 if kind == "coral" else len(age_grid) if kind == "expectation"
                      else 1 if target == "age" else n_classes),
        "age_grid": (age_grid.round(6).tolist() if age_grid is not None else None),
        "output": kind,
        "fold": fold,
        "split_note": sp["note"],
        "hyperparameters": {
            "hidden": list(hidden), "dropout": dropout, "input_dropout": input_dropout, "epochs": epochs,
            "batch_size": batch_size, "lr": lr, "optimizer": optimizer, "patience": patience,
            "class_weight": class_weight, "ordinal": ordinal, "pool": pool, "label_smoothing": label_smoothing,
            "age_sigma": age_sigma if target == "bins" else None,
            "age_head": age_head if target == "age" else None,
            "age_transform": age_transform if target == "age" else None,
            "age_loss": age_loss if target == "age" else None, "weight_decay": weight_decay,
            "val_share": val_share, "early_stopping": f"{mon_key}, restore best weights",
            "reduce_lr": {"monitor": mon_key, "factor": 0.5, "patience": max(2, patience // 3), "min_lr": lr / 64},
        },
        "seed": seed,
        "memory_mb": memory_mb,
        "data_loading": ("streamed: a fresh permutation of all train rows every epoch, read in blocks of "
                         f"{block_budget >> 20} MiB" if stream else "train rows read in one go"),
        "counts": {"train": int(len(tr)), "val": int(len(va)), "test": int(len(te)),
                   "dropped_missing_target": dropped, "dropped": dropped_reasons(labels, target, valid),
                   "rows_in_file": int(store.nrows)},
        "class_counts_train": (np.bincount(y_all[tr], minlength=n_classes).tolist() if target != "age" else None),
        "class_weights": (cw.round(6).tolist() if cw is not None else None),
        "standardisation": {
            "fit_on": f"the {len(tr)} train rows" + (f", after global {pool} pooling" if pool else ""),
            "where": "head.keras (Normalization layer 'standardise') and standardisation.npz (mean, std)",
            "n_features": int(len(mean)),
            "constant_features": int((std == 1.0).sum()),
        },
        "target_transform": transform,
        "training": {"epochs_run": epochs_run, "best_epoch": best_epoch, "stopped_early": epochs_run < epochs,
                     "fit_seconds": round(fit_seconds, 2), "final_lr": lrs[-1] if lrs else lr,
                     "best_val_loss": float(min(h["val_loss"]))},
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    _write_history(out, h, lrs, cfg)
    cfg["training"]["total_seconds"] = round(time.perf_counter() - t_start, 2)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    if verbose:
        print(f"[featlab] {out}: {epochs_run} epochs (best {best_epoch}), {time.perf_counter() - t_start:.1f} s")
    return out


def _write_history(out: Path, h: dict, lrs: list, cfg: dict) -> None:
    from .plots import history_png

    keys = list(h)
    with open(out / "history.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", *keys, *(["learning_rate"] if lrs else [])])
        for i in range(len(h["loss"])):
            w.writerow([i + 1, *[h[k][i] for k in keys], *([lrs[i]] if lrs else [])])
    metric = "mae_years" if cfg["target"] == "age" else "accuracy"
    title = f"{cfg['backbone']} / {cfg['dataset']} / {cfg['head_key']} -> {cfg['target_name']}" + (
        f" (fold {cfg['fold']})" if cfg["fold"] is not None else "")
    history_png(h, out / "history.png", metric=metric, title=title, best_epoch=cfg["training"]["best_epoch"])
