"""Training one lean Keras head on one tap (no evaluation here: :mod:`featlab.study.workflow` chains both).

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
import hashlib
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np

from .. import __version__
from ..data.bins import get_scheme
from ..errors import FeatlabError, did_you_mean
from ..features.featureio import ShuffledBatches, feature_stats, fusion_parts, read_input, row_bytes
from .keras_env import keras as _keras
from .keras_env import tensorflow as _tensorflow
from ..data.labels import (RANGE_POLICIES, TARGETS, check_ranges, class_names, class_weights, dropped_reasons,
                     encode_target, make_targets, soft_bin_labels, split_rows, target_name, to_years_np)
from .model import build_model
from ..paths import dataset_key, feature_set, head_dir, input_key
from ..features.store import FeatureStore


#: peak copies of in-memory rows during Keras' fit (measured: ~0.8 GB of float32 rows -> 2.4 GB over
#: TensorFlow's own RSS; bench/scale.py); the in-memory/streamed choice counts them against --memory-mb
IN_MEMORY_COPIES = 3


def available_memory() -> "int | None":
    """Bytes of memory the machine has available now (``MemAvailable``; None where it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import os
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


#: batches a streamed fit prepares ahead (Keras' default queue of 10 holds ten batches of a 400 KB tap:
#: 500 MB at batch 128, outside any budget)
PREFETCH_BATCHES = 2


def keras_batches(batches: ShuffledBatches):
    """A Keras PyDataset over :class:`featlab.features.featureio.ShuffledBatches` (a new permutation every epoch)."""
    keras = _keras()

    class _Batches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=1, use_multiprocessing=False, max_queue_size=PREFETCH_BATCHES)
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
               ranges: str = "refuse", seed_dir: bool = False) -> Path:
    """Train one head on tap ``layer`` of ``features`` for ``target`` (no evaluation: see featlab.study.workflow).

    target: ``"bins"`` (with ``cats`` 5, 7 or 8), ``"age"`` (years) or ``"gender"``.
    fold: None (the manifest's train/val/test split) or K (Adience-style: test on fold K, train on the
    others, val = a seeded ``val_share`` of their groups).

    The head: the tap as stored -> optional global ``pool`` ("avg"/"max") -> flatten -> standardisation
    fit on the train rows -> ``input_dropout`` (default: 0.5 on inputs of 512 features or more, else 0.2)
    -> ``hidden`` ReLU layers with ``dropout`` -> output:
    softmax over the bins (or CORAL cumulative logits with ``ordinal=True``), softmax over f/m for
    gender; for age, ``age_head="expectation"`` (default) is a softmax over whole years whose expected
    value in years is the prediction (also with ``age_transform="log1p"``, where the L1 is taken on the
    log1p of that expected age), trained with L1 on that value plus cross-entropy to a Gaussian of
    ``age_sigma`` years (default 2) around the true age; ``age_head="linear"`` is one linear unit on
    the standardised (``age_transform="z"``) or log (``"log1p"``) age with ``age_loss`` mae/mse/huber.
    Adam (or SGD with Nesterov momentum, or AdamW), ReduceLROnPlateau and EarlyStopping on ``monitor``
    ("val_loss", or "val_metric": accuracy / MAE) restoring the best weights. ``class_weight``: False,
    True/"balanced" or "sqrt". ``age_sigma`` > 0 with bins trains on soft bin targets (a Gaussian
    around the true age). Train rows are read at once when they fit ``memory_mb`` (float32),
    otherwise streamed: a fresh permutation of all train rows every epoch, read in blocks within the budget.

    ``ranges``: range labels (Adience's ``(15, 20)``) that the target cannot place (a range across two
    groups of ``cats``; every range for age regression): ``"refuse"`` stops with one line giving their
    count, ``"drop"`` trains on the other rows and records the count per range in ``config.json``
    (``ranges``); see :func:`featlab.data.labels.check_ranges`.

    Returns the head's folder (``.../seed{S}`` with ``seed_dir``).
    """
    if target != "bins":
        cats = int(cats) if cats is not None else None
    kw = check_hyperparameters(target, cats, dict(
        hidden=hidden, dropout=dropout, epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
        patience=patience, class_weight=class_weight, ordinal=ordinal, pool=pool, seed=seed, memory_mb=memory_mb,
        verbose=verbose, label_smoothing=label_smoothing, age_sigma=age_sigma, age_head=age_head,
        age_transform=age_transform, age_loss=age_loss, input_dropout=input_dropout, weight_decay=weight_decay,
        val_share=val_share, monitor=monitor, ranges=ranges, seed_dir=seed_dir))
    tname = target_name(target, cats)
    if fold == "all":
        raise FeatlabError("fit_head trains one fold; featlab.study.workflow.train_head runs --fold all")
    with FeatureStore.reading(features) as store:
        return _train_one(store, layer, target, cats, tname, out_root, None if fold is None else int(fold), **kw)


def default_hyperparameters() -> dict:
    """train_head's keyword defaults (chosen by measurement on 8,000 UTKFace faces, dlib-age taps)."""
    import inspect

    return {k: p.default for k, p in inspect.signature(fit_head).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and k not in ("out_root", "fold", "verbose", "seed_dir")}


def check_hyperparameters(target, cats, hp: dict) -> dict:
    """Validate and normalise the keyword hyperparameters of :func:`fit_head` (one line on a bad value)."""
    if target not in TARGETS:
        raise FeatlabError(f"unknown target {target!r}; {did_you_mean(target, TARGETS)}choose one of {', '.join(TARGETS)}")
    hp = {**default_hyperparameters(), "verbose": 1, "seed_dir": False, **hp}
    if hp["age_sigma"] is None:
        hp["age_sigma"] = 2.0 if target == "age" else 0.0
    if hp["ordinal"] and target != "bins":
        raise FeatlabError("--ordinal applies to age bins only")
    if hp["pool"] not in (None, "avg", "max"):
        raise FeatlabError(f"pool must be 'avg' or 'max', not {hp['pool']!r}")
    if hp["optimizer"] not in ("adam", "sgd", "adamw"):
        raise FeatlabError(f"optimizer must be 'adam', 'adamw' or 'sgd', not {hp['optimizer']!r}")
    if hp["age_transform"] not in ("z", "log1p"):
        raise FeatlabError(f"age_transform must be 'z' or 'log1p', not {hp['age_transform']!r}")
    if hp["age_head"] not in ("linear", "expectation"):
        raise FeatlabError(f"age_head must be 'linear' or 'expectation', not {hp['age_head']!r}")
    if hp["monitor"] not in ("val_loss", "val_metric"):
        raise FeatlabError(f"monitor must be 'val_loss' or 'val_metric', not {hp['monitor']!r}")
    if hp["ranges"] not in RANGE_POLICIES:
        raise FeatlabError(f"ranges must be {' or '.join(repr(r) for r in RANGE_POLICIES)}, not {hp['ranges']!r}")
    return dict(hidden=tuple(int(h) for h in (hp["hidden"] or ())), dropout=float(hp["dropout"]),
                epochs=int(hp["epochs"]), batch_size=int(hp["batch_size"]), lr=float(hp["lr"]),
                optimizer=hp["optimizer"], patience=int(hp["patience"]), class_weight=hp["class_weight"],
                ordinal=bool(hp["ordinal"]), pool=hp["pool"], seed=int(hp["seed"]), memory_mb=float(hp["memory_mb"]),
                verbose=hp["verbose"], label_smoothing=float(hp["label_smoothing"]), age_sigma=float(hp["age_sigma"]),
                age_head=hp["age_head"], age_transform=hp["age_transform"], age_loss=hp["age_loss"],
                input_dropout=(None if hp["input_dropout"] is None else float(hp["input_dropout"])),
                weight_decay=float(hp["weight_decay"]), val_share=float(hp["val_share"]), monitor=hp["monitor"],
                ranges=hp["ranges"], seed_dir=bool(hp["seed_dir"]))


def _train_one(store: FeatureStore, layer, target, cats, tname, out_root, fold, **hp) -> Path:
    t_start = time.perf_counter()
    plan = plan_head(store, layer, target, cats, out_root, fold, hp)  # bad input fails here, before TensorFlow
    keras, tf = _setup_tf(hp["seed"])
    key, tr, va = plan["key"], plan["tr"], plan["va"]
    model = build_model(plan["tap_shape"], plan["n_classes"], plan["kind"], plan["mean"], plan["std"], hp["hidden"],
                        hp["dropout"], plan["pool"], plan["input_dropout"], hp["weight_decay"], plan["age_grid"])
    loss, metrics = loss_and_metrics(plan, hp)
    model.compile(optimizer=make_optimizer(hp), loss=loss, metrics=metrics)
    mon_key, mon_mode = plan["mon_key"], plan["mon_mode"]
    patience, lr = hp["patience"], hp["lr"]
    callbacks = [
        keras.callbacks.EarlyStopping(monitor=mon_key, mode=mon_mode, patience=patience, restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(monitor=mon_key, mode=mon_mode, factor=0.5, patience=max(2, patience // 3),
                                          min_lr=lr / 64, verbose=0),
    ]
    block_budget = plan["block_budget"]
    if plan["stream"]:
        train_data = keras_batches(ShuffledBatches(store, key, tr, plan["y_tr"], plan["w_tr"], hp["batch_size"], True,
                                                   hp["seed"], block_budget))
        fit_kw = dict(x=train_data, shuffle=False)
    else:
        fit_kw = dict(x=plan.pop("x_tr"), y=plan["y_tr"], sample_weight=plan["w_tr"], batch_size=hp["batch_size"],
                      shuffle=True)
    if plan["stream_val"]:
        # val batches of at most a block (Keras queues PREFETCH_BATCHES + 1 of them: within the budget)
        val_bs = max(hp["batch_size"], min(1024, max(1, block_budget // max(1, row_bytes(store, key)))))
        val_data = keras_batches(ShuffledBatches(store, key, va, plan["y_va"], None, val_bs, False,
                                                 hp["seed"], block_budget))
    else:
        val_data = (read_input(store, key, va), plan["y_va"])
    t_fit = time.perf_counter()
    with warnings.catch_warnings():
        # Keras 3.15 + TF 2.21 + numpy 2.4: np.array(EagerTensor) inside fit warns about `copy`; not ours
        warnings.filterwarnings("ignore", message="__array__ implementation", category=DeprecationWarning)
        hist = model.fit(validation_data=val_data, epochs=hp["epochs"], callbacks=callbacks,
                         verbose=2 if hp["verbose"] and hp["verbose"] > 1 else 0, **fit_kw)
    fit_seconds = time.perf_counter() - t_fit
    h = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
    h.pop("learning_rate", None)
    lrs = [float(v) for v in hist.history.get("learning_rate", [])]
    return save_head(plan, store, model, h, lrs, fit_seconds, t_start, hp)


def plan_head(store: FeatureStore, layer, target, cats, out_root, fold, hp: dict, read=None, memo=None,
              keep_x: bool = True) -> dict:
    """Everything about one head before its fit: rows, targets, weights, standardisation, output kind,
    folder. ``layer`` may be a fusion key (``a+b``). ``read(part, rows)`` replaces ``store.read`` (a
    cache of rows already in memory); ``memo``: a dict shared by the plans of one grid, so that the
    finiteness checks and statistics of a tap over the same rows are computed once. Holds ``x_tr``
    (the train input) unless the rows are streamed or ``keep_x`` is false (the grid feeds its own)."""
    read = read or store.read
    memo = {} if memo is None else memo

    def once(key, fn):
        if key not in memo:
            memo[key] = fn()
        return memo[key]
    tname = target_name(target, cats)
    attrs = store.attrs
    key = str(layer)
    parts = fusion_parts(key)
    fused = len(parts) > 1
    for p in parts:
        if p not in store.keys():
            store.array(p)  # raises the helpful error
    shapes = [tuple(int(d) for d in store.array(p).shape[1:]) for p in parts]
    pool = hp["pool"]
    if pool and not any(len(sh) == 3 for sh in shapes):
        pool = None  # pooling a vector is a no-op
    backbone = str(attrs.get("backbone", "unknown"))
    ident = feature_set(attrs, parts[0])
    if not ident["dataset"]:
        ident["dataset"] = Path(store.path).stem
    part_ids = [feature_set(attrs, p) for p in parts]
    if fused:
        ident.update(tap=key, pool=[i["pool"] for i in part_ids], dtype=[i["dtype"] for i in part_ids])
    hkey = input_key(key, pool, attrs, dict(zip(parts, shapes)))
    seed = hp["seed"]
    out = head_dir(backbone, dataset_key(ident), hkey, tname, fold, seed if hp["seed_dir"] else None, out_root)

    store.check_labels_current()
    labels = store.labels()
    y_all, valid = encode_target(labels, target, cats)
    ranges = check_ranges(labels, target, cats, hp.get("ranges", "refuse"))  # range labels it would lose: asked for?
    dropped = int((~valid).sum())
    if not valid.any():
        raise FeatlabError(f"no row of {store.path.name} has a usable {target} label "
                           f"({', '.join(f'{v:,} {k}' for k, v in dropped_reasons(labels, target, valid).items())})")
    sp = split_rows(labels, valid, fold, hp["val_share"])
    tr, va, te = sp["train"], sp["val"], sp["test"]
    for rows in (tr, va, te):  # heads never learn from, or are scored on, inf/NaN
        for p in parts:
            once(("finite", p, _digest(rows)), lambda p=p, rows=rows: store.check_finite(p, rows))
    n_classes = get_scheme(cats).n if target == "bins" else (2 if target == "gender" else 1)
    if target != "age" and len(set(y_all[tr].tolist())) < 2:
        raise FeatlabError(f"the training rows hold a single class of {tname}; nothing to learn")
    if hp["verbose"]:
        print(f"[featlab] {backbone}/{dataset_key(ident)} tap {key} -> {tname}{'' if fold is None else f' fold {fold}'}: "
              f"train {len(tr)}, val {len(va)}, test {len(te)}; {dropped} rows without {target} dropped")

    rb = row_bytes(store, key)
    budget = float(hp["memory_mb"]) * (1 << 20)
    # in memory, Keras holds the rows IN_MEMORY_COPIES times at its peak (ours, its tensor, its dataset's):
    # rows go in memory only when all copies of the train and val rows fit the budget (bench/scale.py)
    stream = IN_MEMORY_COPIES * (len(tr) + len(va)) * rb > budget
    stream_val = IN_MEMORY_COPIES * len(va) * rb > budget / 2
    if fused and (stream or stream_val):
        # a fusion head cannot stream, and the budget cannot change its numbers (it trains alone, in memory):
        # over the budget it trains in memory when the machine has the room, and says so; else it stops
        need = IN_MEMORY_COPIES * (len(tr) + len(va)) * rb
        free = available_memory()
        if free is None or need > free * 0.8:
            raise FeatlabError(f"fusion head {key}: its train and val rows need {need >> 20} MiB in memory "
                               f"(x{IN_MEMORY_COPIES}: Keras' copies), over the {int(hp['memory_mb'])} MiB budget"
                               + ("" if free is None else f" and 80% of the {free >> 20} MiB this machine has free")
                               + " (fusion heads train in memory): raise --memory-mb, or fuse fewer or pooled taps")
        stream = stream_val = False
        if hp["verbose"]:
            print(f"[featlab] fusion head {key}: needs {need >> 20} MiB in memory, over the {int(hp['memory_mb'])} MiB "
                  f"budget; trained in memory ({free >> 20} MiB free; fusion heads cannot stream)")
    x_tr = None if stream or not keep_x else ([read(p, tr) for p in parts] if fused else read(key, tr))

    def train_x(i, p):
        if stream:
            return None  # read in blocks by feature_stats
        return read(p, tr) if x_tr is None else (x_tr[i] if fused else x_tr)

    # statistics walk the rows in slices: their float64 copies stay within a fraction of the budget
    sb = int(min(256 << 20, budget / 4))
    stats = [once(("stats", p, pool, _digest(tr)),
                  lambda i=i, p=p: feature_stats(store, p, tr, pool, x=train_x(i, p), budget_bytes=sb))
             for i, p in enumerate(parts)]
    n_features = sum(len(m) for m, _ in stats)
    input_dropout = hp["input_dropout"]
    if input_dropout is None:
        input_dropout = 0.5 if n_features >= 512 else 0.2
    transform = None
    if target == "age":
        a = y_all[tr].astype(np.float64)
        if hp["age_transform"] == "log1p":
            a = np.log1p(a)
        transform = {"kind": hp["age_transform"], "mean": float(a.mean()), "scale": float(a.std() or 1.0)}
    ordinal = hp["ordinal"]
    kind = (hp["age_head"] if target == "age" else ("coral" if ordinal else "softmax"))
    age_grid = None
    if kind == "expectation":
        # one class per year from 0 to the oldest training age, their values in target units
        g = np.arange(0.0, math.ceil(float(np.max(y_all[tr]))) + 1.0)
        g = np.log1p(g) if transform["kind"] == "log1p" else g
        age_grid = (g - transform["mean"]) / transform["scale"]
    y_tr = make_targets(target, ordinal, n_classes, y_all[tr], transform)
    if target == "bins" and hp["age_sigma"] > 0 and not ordinal:
        y_tr = soft_bin_labels(labels["age"].to_numpy()[tr], get_scheme(cats), hp["age_sigma"])
    y_va = make_targets(target, ordinal, n_classes, y_all[va], transform)
    cw = class_weights(y_all[tr], n_classes, hp["class_weight"]) if target != "age" else None
    w_tr = cw[y_all[tr]].astype(np.float32) if cw is not None else None
    metric_name = "mae_years" if target == "age" else "accuracy"
    mon_key = {"val_loss": "val_loss", "val_metric": "val_" + metric_name}[hp["monitor"]]
    return dict(
        key=key, parts=parts, fused=fused, tap_shape=[list(sh) for sh in shapes] if fused else shapes[0],
        part_ids=part_ids, pool=pool, backbone=backbone, ident=ident, hkey=hkey, out=out, target=target, cats=cats,
        tname=tname, fold=fold, sp=sp, tr=tr, va=va, te=te, labels=labels, y_all=y_all, valid=valid, dropped=dropped,
        n_classes=n_classes, names=class_names(target, cats), stream=stream, stream_val=stream_val, x_tr=x_tr,
        mean=[m for m, _ in stats] if fused else stats[0][0], std=[s for _, s in stats] if fused else stats[0][1],
        input_dropout=input_dropout, transform=transform, kind=kind, age_grid=age_grid, y_tr=y_tr, y_va=y_va,
        cw=cw, w_tr=w_tr, metric_name=metric_name, mon_key=mon_key, mon_mode="max" if mon_key == "val_accuracy" else "min",
        block_budget=sb, attrs=attrs, ranges=ranges,
    )


def _digest(rows) -> str:
    return hashlib.sha1(np.ascontiguousarray(rows, dtype=np.int64).tobytes()).hexdigest()


def make_optimizer(hp: dict):
    keras = _keras()
    if hp["optimizer"] == "sgd":
        return keras.optimizers.SGD(learning_rate=hp["lr"], momentum=0.9, nesterov=True)
    if hp["optimizer"] == "adamw":
        return keras.optimizers.AdamW(learning_rate=hp["lr"], weight_decay=hp["weight_decay"] or 1e-4)
    return keras.optimizers.Adam(learning_rate=hp["lr"])


def loss_and_metrics(plan: dict, hp: dict):
    """(loss, [metric]) of a head: its Keras loss, and accuracy or MAE in years named as in its history."""
    keras = _keras()
    kind, transform, age_grid = plan["kind"], plan["transform"], plan["age_grid"]
    if kind == "softmax":
        return (keras.losses.CategoricalCrossentropy(label_smoothing=hp["label_smoothing"]),
                [keras.metrics.CategoricalAccuracy(name="accuracy")])
    if kind == "coral":
        def accuracy(y_true, y_pred):
            t = keras.ops.sum(y_true, axis=-1)
            p = keras.ops.sum(keras.ops.cast(y_pred > 0.0, "float32"), axis=-1)
            return keras.ops.mean(keras.ops.cast(keras.ops.equal(t, p), "float32"))

        return keras.losses.BinaryCrossentropy(from_logits=True), [accuracy]
    tsc, tmean, tkind = transform["scale"], transform["mean"], transform["kind"]

    def to_years(v):
        v = v * tsc + tmean
        return keras.ops.expm1(v) if tkind == "log1p" else v

    if kind == "expectation":
        grid_t = keras.ops.convert_to_tensor(np.asarray(age_grid, dtype=np.float32))
        grid_y = keras.ops.convert_to_tensor(np.asarray(to_years_np(age_grid, transform), dtype=np.float32))
        sig = float(hp["age_sigma"])

        def expected(y_pred):
            # the expected age is taken in years (the mean of the distribution over ages), then put in
            # target units: with log1p, E[log(1 + age)] would be a geometric-type mean, not the mean age
            if tkind != "log1p":
                return keras.ops.sum(y_pred * grid_t, axis=-1)  # linear transform: the same expectation
            e_years = keras.ops.sum(y_pred * grid_y, axis=-1)
            return (keras.ops.log1p(keras.ops.maximum(e_years, 0.0)) - tmean) / tsc

        def expectation_loss(y_true, y_pred):
            # L1 on the expected age (target units), plus, with age_sigma, cross-entropy to a Gaussian
            # label distribution around the true age (DLDL-v2 style): keeps the distribution unimodal
            e = expected(y_pred)
            l1 = keras.ops.abs(e - y_true[:, 0])
            if sig <= 0:
                return l1
            yy = to_years(y_true)  # (N, 1) years
            q = keras.ops.exp(-keras.ops.square(grid_y[None, :] - yy) / (2.0 * sig * sig))
            q = q / keras.ops.sum(q, axis=-1, keepdims=True)
            ce = -keras.ops.sum(q * keras.ops.log(keras.ops.clip(y_pred, 1e-7, 1.0)), axis=-1)
            return l1 + ce

        def mae_years(y_true, y_pred):
            # per face: Keras averages these over every face of the epoch (a batch mean here would be averaged
            # over batches, the last short batch weighing as much as a full one)
            e = keras.ops.sum(y_pred * grid_y, axis=-1, keepdims=True)  # the expected age in years
            return keras.ops.abs(to_years(y_true) - e)[:, 0]

        return expectation_loss, [mae_years]
    loss = {"mae": keras.losses.MeanAbsoluteError(), "mse": keras.losses.MeanSquaredError(),
            "huber": keras.losses.Huber(delta=0.5)}[hp["age_loss"]]

    def mae_years(y_true, y_pred):  # per face, as above
        return keras.ops.abs(to_years(y_true) - to_years(y_pred))[:, 0]

    return loss, [mae_years]


def input_stats(plan: dict) -> tuple:
    """The head's input standardisation (mean, std), as ``standardisation.npz`` holds it."""
    if plan["fused"]:
        return np.concatenate(plan["mean"]), np.concatenate(plan["std"])
    return plan["mean"], plan["std"]


def probe_config(plan: dict, hp: dict) -> dict:
    """What of the config :func:`save_head` will write the baselines read (``baselines.PROBE_CONFIG``), known
    before the head is saved: a grid starts its probes while it saves its heads."""
    return {"tap": plan["key"], "target": plan["target"], "cats": int(plan["cats"]) if plan["cats"] is not None else None,
            "class_names": plan["names"], "target_name": plan["tname"], "fold": plan["fold"],
            "hyperparameters": {"pool": plan["pool"], "val_share": hp["val_share"]}}


def save_head(plan: dict, store: FeatureStore, model, h: dict, lrs: list, fit_seconds: float, t_start: float,
              hp: dict, training: dict | None = None) -> Path:
    """Write a trained head's folder (head.keras, config.json, standardisation.npz, history) from its plan,
    its model and its per-epoch history ``h`` (loss, val_loss, metric, val_metric)."""
    out, key, tr, va, te = plan["out"], plan["key"], plan["tr"], plan["va"], plan["te"]
    mon_key, mon_mode, lr, patience = plan["mon_key"], plan["mon_mode"], hp["lr"], hp["patience"]
    kind, age_grid, target, cats, transform = plan["kind"], plan["age_grid"], plan["target"], plan["cats"], plan["transform"]
    n_classes, attrs, pool, cw, labels = plan["n_classes"], plan["attrs"], plan["pool"], plan["cw"], plan["labels"]
    best_epoch = int(np.argmax(h[mon_key]) if mon_mode == "max" else np.argmin(h[mon_key])) + 1
    epochs_run = len(h["loss"])
    mean, std = input_stats(plan)

    out.mkdir(parents=True, exist_ok=True)
    for old in ("metrics.json", "confusion*.csv", "confusion*.png", "scatter.png", "subgroups*.csv", "predictions*.csv",
                "faces.csv", "baselines*"):
        for f in out.glob(old):  # a previous run's report must not outlive its head
            f.unlink()
    model.save(out / "head.keras")
    np.savez(out / "standardisation.npz", mean=mean, std=std)
    ident = plan["ident"]
    cfg = {
        "featlab_version": __version__,
        "kind": "head",
        "features": str(Path(store.path).resolve()),
        "features_model_sha256": attrs.get("model_sha256"),
        "feature_set": ident,
        "backbone": plan["backbone"],
        "dataset": ident["dataset"],
        "dataset_key": dataset_key(ident),
        "tap": key,
        "head_key": plan["hkey"],
        "tap_info": ((attrs.get("taps") or {}).get(key) if not plan["fused"]
                     else {p: (attrs.get("taps") or {}).get(p) for p in plan["parts"]}),
        "tap_shape": plan["tap_shape"],
        "fusion": ([{"tap": p, "tap_shape": sh, "feature_set": i}
                    for p, sh, i in zip(plan["parts"], plan["tap_shape"], plan["part_ids"])] if plan["fused"] else None),
        "join": attrs.get("join"),  # cross-file fusion: each part's file and feature set, faces dropped per file
        "target": target,
        "target_name": plan["tname"],
        "cats": int(cats) if cats is not None else None,
        "class_names": plan["names"],
        "n_outputs": (n_classes - 1 if kind == "coral" else len(age_grid) if kind == "expectation"
                      else 1 if target == "age" else n_classes),
        "age_grid": (age_grid.round(6).tolist() if age_grid is not None else None),
        "output": kind,
        "fold": plan["fold"],
        "split_note": plan["sp"]["note"],
        "hyperparameters": {
            "hidden": list(hp["hidden"]), "dropout": hp["dropout"], "input_dropout": plan["input_dropout"],
            "epochs": hp["epochs"], "batch_size": hp["batch_size"], "lr": lr, "optimizer": hp["optimizer"],
            "patience": patience, "class_weight": hp["class_weight"], "ordinal": hp["ordinal"], "pool": pool,
            "label_smoothing": hp["label_smoothing"],
            "age_sigma": hp["age_sigma"] if target == "bins" else None,
            "age_head": hp["age_head"] if target == "age" else None,
            "age_transform": hp["age_transform"] if target == "age" else None,
            "age_loss": hp["age_loss"] if target == "age" else None, "weight_decay": hp["weight_decay"],
            "val_share": hp["val_share"], "ranges": hp["ranges"], "early_stopping": f"{mon_key}, restore best weights",
            "reduce_lr": {"monitor": mon_key, "factor": 0.5, "patience": max(2, patience // 3), "min_lr": lr / 64},
        },
        "seed": hp["seed"],
        "memory_mb": hp["memory_mb"],
        "data_loading": ("streamed: a fresh permutation of all train rows every epoch, read in blocks of "
                         f"{plan['block_budget'] >> 20} MiB" if plan["stream"] else "train rows read in one go"),
        "counts": {"train": int(len(tr)), "val": int(len(va)), "test": int(len(te)),
                   "dropped_missing_target": plan["dropped"], "dropped": dropped_reasons(labels, target, plan["valid"]),
                   "rows_in_file": int(store.nrows)},
        "ranges": plan["ranges"],
        "class_counts_train": (np.bincount(plan["y_all"][tr], minlength=n_classes).tolist() if target != "age" else None),
        "class_weights": (cw.round(6).tolist() if cw is not None else None),
        "standardisation": {
            "fit_on": f"the {len(tr)} train rows" + (f", after global {pool} pooling" if pool else "")
                      + (", each tap on its own, concatenated in the order of the key" if plan["fused"] else ""),
            "where": ("head.keras (Normalization layer 'standardise') and standardisation.npz (mean, std)" if not plan["fused"]
                      else "head.keras (Normalization layers 'standardise0', 'standardise1', ... one per tap) and "
                           "standardisation.npz (mean, std of the concatenated features)"),
            "n_features": int(len(mean)),
            "constant_features": int((std == 1.0).sum()),
        },
        "target_transform": transform,
        "training": {"epochs_run": epochs_run, "best_epoch": best_epoch, "stopped_early": epochs_run < hp["epochs"],
                     "fit_seconds": round(fit_seconds, 2), "final_lr": lrs[-1] if lrs else lr,
                     "best_val_loss": float(min(h["val_loss"])), **(training or {})},
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    _write_history(out, h, lrs, cfg)
    cfg["training"]["total_seconds"] = round(time.perf_counter() - t_start, 2)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    if hp["verbose"]:
        print(f"[featlab] {out}: {epochs_run} epochs (best {best_epoch}), {time.perf_counter() - t_start:.1f} s")
    return out


def _write_history(out: Path, h: dict, lrs: list, cfg: dict) -> None:
    from ..scoring.plots import history_png

    keys = list(h)
    with open(out / "history.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", *keys, *(["learning_rate"] if lrs else [])])
        for i in range(len(h["loss"])):
            w.writerow([i + 1, *[h[k][i] for k in keys], *([lrs[i]] if lrs else [])])
    metric = "mae_years" if cfg["target"] == "age" else "accuracy"
    title = f"{cfg['backbone']} / {cfg['dataset']} / {cfg['head_key']} -> {cfg['target_name']}" + (
        f" (fold {cfg['fold']})" if cfg["fold"] is not None else "")
    history_png(h, out / "history.png", metric=metric, title=title, best_epoch=cfg["training"]["best_epoch"],
                max_epochs=cfg["hyperparameters"]["epochs"])
