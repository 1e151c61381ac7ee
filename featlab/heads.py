"""Lean Keras heads on one tap of a features file: age bins, age regression, gender.

:func:`train_head` trains one small head (standardisation -> optional hidden
layers with dropout -> output) on one tap, saves it with everything needed to
reproduce it, and evaluates it on the test split (:mod:`featlab.evaluate`).

Layout of what it writes::

    {results}/{backbone}/{dataset}/{tap-key}/{target-name}/[fold{K}/]
        head.keras          the model: input = the tap as stored (C, H, W) or (D,)
        config.json         features file + model_sha256, tap, target, every hyperparameter, seed,
                            counts, standardisation, target transform, training summary
        standardisation.npz mean/std of the (pooled, flattened) train features (also inside head.keras)
        history.csv/.png    loss and accuracy (or MAE in years) per epoch, train vs val
        metrics.json ...    the evaluation on the test split (see featlab.evaluate)

target-name is ``bins5``/``bins7``/``bins8``, ``age`` or ``gender``. The tap
key gets ``@avg``/``@max`` appended when the head pools a stored map itself.

TensorFlow/Keras are imported inside the functions that train or run a head,
never at import time.
"""

from __future__ import annotations

import csv
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np

from . import __version__, config
from .bins import get_scheme
from .errors import FeatlabError
from .keras_env import keras as _keras
from .store import FeatureStore

TARGETS = ("bins", "age", "gender")
GENDERS = ("f", "m")
CHUNK_ROWS = 4096



# ------------------------------------------------------------------ names and paths
def target_name(target: str, cats=None) -> str:
    """``bins`` + cats -> ``bins7``; ``age``; ``gender``."""
    if target not in TARGETS:
        raise FeatlabError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if target == "bins":
        if cats is None:
            raise FeatlabError("target 'bins' needs --cats 5, 7 or 8")
        return f"bins{get_scheme(cats).n}"
    return target


def head_key(key: str, pool: str | None, tap_shape) -> str:
    """The tap key a head is filed under: the stored key, plus ``@avg``/``@max`` when the head pools a map."""
    if pool and len(tap_shape) == 3 and "@" not in key:
        return f"{key}@{pool}"
    return key


def head_dir(backbone: str, dataset: str, key: str, tname: str, fold=None, out_root=None) -> Path:
    root = Path(out_root) if out_root is not None else config.results_dir()
    d = root / backbone / dataset / key / tname
    return d / f"fold{int(fold)}" if fold is not None and fold != "all" else d


# ------------------------------------------------------------------ targets and splits
def encode_target(labels, target: str, cats=None) -> tuple[np.ndarray, np.ndarray]:
    """(y, valid) for every row: bins -> int class, age -> float years, gender -> 0 (f) / 1 (m)."""
    if target == "bins":
        age = labels["age"].to_numpy(dtype=np.float64)
        valid = np.isfinite(age)
        y = np.full(len(age), -1, dtype=np.int64)
        y[valid] = get_scheme(cats).assign(age[valid])
        return y, valid
    if target == "age":
        age = labels["age"].to_numpy(dtype=np.float64)
        return age.astype(np.float32), np.isfinite(age)
    if target == "gender":
        g = labels["gender"].astype(str).str.lower().str[:1].to_numpy()
        y = np.where(g == "m", 1, np.where(g == "f", 0, -1)).astype(np.int64)
        return y, y >= 0
    raise FeatlabError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")


def split_rows(labels, valid: np.ndarray, fold=None, seed: int = 0, val_share: float = 0.1) -> dict:
    """Row indices (sorted) for train/val/test, only rows with a valid target.

    Without ``fold``: the manifest's split column; when it has no 'val' rows a
    seeded ``val_share`` of the train rows is held out. With ``fold=K``
    (Adience-style folds 0..4): test = fold K, train = the other folds, val = a
    seeded ``val_share`` of those.
    """
    split = labels["split"].astype(str).to_numpy()
    folds = labels["fold"].to_numpy(dtype=np.int64)
    note = "manifest split"
    if fold is not None:
        k = int(fold)
        have = sorted(set(folds[folds >= 0].tolist()))
        if not have:
            raise FeatlabError("this features file has no folds (fold is -1 for every row); leave out --fold")
        if k not in have:
            raise FeatlabError(f"fold {k} is not in this features file (it has folds {', '.join(map(str, have))})")
        test = np.flatnonzero(valid & (folds == k))
        pool = np.flatnonzero(valid & (folds >= 0) & (folds != k))
        train, val = _hold_out(pool, seed, val_share)
        note = f"fold {k} as test, the other folds as train, a seeded {val_share:.0%} of train as val"
    else:
        train = np.flatnonzero(valid & (split == "train"))
        val = np.flatnonzero(valid & (split == "val"))
        test = np.flatnonzero(valid & (split == "test"))
        if not len(train):
            if (folds >= 0).any():
                raise FeatlabError("this features file has no 'train' split but has folds: use --fold K or --fold all")
            raise FeatlabError("this features file has no rows with split 'train' (and no folds): "
                               "give the manifest a split column (train/val/test)")
        if not len(val):
            train, val = _hold_out(train, seed, val_share)
            note = f"manifest split; no 'val' rows, so a seeded {val_share:.0%} of train is val"
    if len(val) == 0:
        raise FeatlabError("no validation rows: too few training rows")
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test), "note": note}


def _hold_out(rows: np.ndarray, seed: int, share: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed + 7919)
    perm = rng.permutation(len(rows))
    n_val = max(1, int(round(share * len(rows)))) if len(rows) > 1 else 0
    return np.sort(rows[perm[n_val:]]), np.sort(rows[perm[:n_val]])


def class_weights(y: np.ndarray, n: int, mode) -> np.ndarray | None:
    """Per-class weights: ``True``/``"balanced"`` -> n_rows / (n_classes * count), ``"sqrt"`` -> its square
    root; normalised so that the mean weight over the rows is 1. ``False``/``None`` -> None."""
    if mode in (False, None, "none"):
        return None
    counts = np.bincount(y, minlength=n).astype(np.float64)
    w = np.where(counts > 0, len(y) / (n * np.maximum(counts, 1)), 0.0)
    if mode == "sqrt":
        w = np.sqrt(w)
    elif mode not in (True, "balanced"):
        raise FeatlabError(f"class_weight must be true, false, 'balanced' or 'sqrt', not {mode!r}")
    w /= (w[y].mean() if len(y) else 1.0)
    return w


# ------------------------------------------------------------------ reading features
def _pool_np(x: np.ndarray, pool: str | None) -> np.ndarray:
    if pool and x.ndim == 4:
        return x.mean(axis=(2, 3)) if pool == "avg" else x.max(axis=(2, 3))
    return x


def iter_row_chunks(rows: np.ndarray, chunk_rows: int = CHUNK_ROWS):
    """Split sorted row indices into groups that each fall within one file chunk [c*chunk, (c+1)*chunk)."""
    rows = np.asarray(rows, dtype=np.int64)
    if not len(rows):
        return
    cid = rows // chunk_rows
    bounds = np.flatnonzero(np.diff(cid)) + 1
    yield from np.split(rows, bounds)


def feature_stats(store: FeatureStore, key: str, rows: np.ndarray, pool=None, x=None,
                  budget_bytes: int = 256 << 20) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std (float64 accumulation) of the pooled, flattened features over ``rows``, read in blocks of
    about ``budget_bytes`` (or from ``x`` when the rows are in memory already). Constant features get std 1."""
    s = s2 = None
    n = 0
    blocks = [x] if x is not None else (store.read(key, r) for r in _read_blocks(rows, store, key, budget_bytes))
    for b in blocks:
        b = _pool_np(b, pool).reshape(len(b), -1).astype(np.float64)
        if s is None:
            s, s2 = np.zeros(b.shape[1]), np.zeros(b.shape[1])
        s += b.sum(axis=0)
        s2 += (b * b).sum(axis=0)
        n += len(b)
    mean = s / n
    var = np.maximum(s2 / n - mean * mean, 0.0)
    std = np.sqrt(var)
    std[std < 1e-6 * max(1.0, float(np.abs(mean).max(initial=0.0)))] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)


def _read_blocks(rows, store, key, budget_bytes: int = 256 << 20):
    """Sorted row groups of at most ~budget_bytes each, aligned to file chunks (contiguous reads)."""
    arr = store.array(key)
    row_bytes = int(np.prod(arr.shape[1:])) * 4
    per = max(1, budget_bytes // max(1, row_bytes))
    rows = np.asarray(rows, dtype=np.int64)
    for i in range(0, len(rows), per):
        yield rows[i : i + per]


def _make_stream_class():
    keras = _keras()

    class ChunkStream(keras.utils.PyDataset):
        """Batches from contiguous chunks of file rows, chunk order shuffled per epoch, rows shuffled
        within a chunk; rows outside the split are skipped. Never indexes single rows in the file."""

        def __init__(self, store, key, rows, y, w, batch_size, shuffle, seed, chunk_rows=CHUNK_ROWS):
            super().__init__(workers=1, use_multiprocessing=False)
            self.arr = store.array(key)
            self.y, self.w = y, w
            self.bs = int(batch_size)
            self.shuffle = shuffle
            self.seed = int(seed)
            self.chunk_rows = int(chunk_rows)
            self.groups = list(iter_row_chunks(np.asarray(rows), self.chunk_rows))
            # position of each split row in y/w (rows sorted, y aligned with rows)
            self.offsets = np.cumsum([0] + [len(g) for g in self.groups])[:-1]
            self.nb = [math.ceil(len(g) / self.bs) for g in self.groups]
            self.epoch = 0
            self.reads = 0
            self._plan()
            self._cached = (None, None)

        def _plan(self):
            order = np.arange(len(self.groups))
            if self.shuffle:
                order = np.random.default_rng([self.seed, self.epoch]).permutation(order)
            self.plan = [(int(g), b) for g in order for b in range(self.nb[g])]

        def __len__(self):
            return len(self.plan)

        def _chunk(self, g):
            if self._cached[0] != g:
                rows = self.groups[g]
                lo = int(rows[0] // self.chunk_rows * self.chunk_rows)
                hi = min(self.arr.nrows, lo + self.chunk_rows)
                block = self.arr[lo:hi]  # one contiguous read
                self.reads += 1
                x = block[rows - lo].astype(np.float32)
                sel = np.arange(self.offsets[g], self.offsets[g] + len(rows))
                if self.shuffle:
                    perm = np.random.default_rng([self.seed, self.epoch, g]).permutation(len(rows))
                    x, sel = x[perm], sel[perm]
                self._cached = (g, (x, sel))
            return self._cached[1]

        def __getitem__(self, i):
            g, b = self.plan[i]
            x, sel = self._chunk(g)
            s = slice(b * self.bs, (b + 1) * self.bs)
            out = (x[s], self.y[sel[s]])
            if self.w is not None:
                out = out + (self.w[sel[s]],)
            return out

        def on_epoch_end(self):
            self.epoch += 1
            self._plan()

    return ChunkStream


# ------------------------------------------------------------------ model
def _custom_objects() -> dict:
    """Keras objects a saved head may need (registered once)."""
    keras = _keras()

    name = "featlab>CoralOutput"
    obj = keras.saving.get_registered_object(name)
    if obj is not None:
        return {name: obj, "CoralOutput": obj}

    @keras.saving.register_keras_serializable(package="featlab")
    class CoralOutput(keras.layers.Layer):
        """CORAL ordinal output: one shared weight vector and K-1 ordered thresholds.
        Returns K-1 logits of P(y > k)."""

        def __init__(self, thresholds: int, **kw):
            super().__init__(**kw)
            self.thresholds = int(thresholds)

        def build(self, input_shape):
            self.kernel = self.add_weight(shape=(int(input_shape[-1]), 1), initializer="glorot_uniform", name="kernel")
            init = np.linspace(1.0, -1.0, self.thresholds).astype("float32")
            self.bias = self.add_weight(shape=(self.thresholds,), name="bias",
                                        initializer=keras.initializers.Constant(init))

        def call(self, x):
            return keras.ops.matmul(x, self.kernel) + self.bias

        def get_config(self):
            return {**super().get_config(), "thresholds": self.thresholds}

    return {name: CoralOutput, "CoralOutput": CoralOutput}


def build_model(tap_shape, n_out: int, kind: str, mean, std, hidden=(256,), dropout=0.3, pool=None,
                input_dropout: float = 0.0, weight_decay: float = 0.0, age_grid=None):
    """kind: 'softmax' (n_out classes), 'coral' (n_out classes, n_out-1 logits), 'linear' (one unit) or
    'expectation' (a softmax over the ages in ``age_grid``: the prediction is its expected value)."""
    keras = _keras()
    from keras import layers

    reg = keras.regularizers.L2(weight_decay) if weight_decay else None
    inp = keras.Input(shape=tuple(int(d) for d in tap_shape), name="tap")
    x = inp
    if pool and len(tap_shape) == 3:
        x = (layers.GlobalAveragePooling2D if pool == "avg" else layers.GlobalMaxPooling2D)(
            data_format="channels_first", name=f"pool_{pool}")(x)
    if len(x.shape) > 2:
        x = layers.Flatten(name="flatten")(x)
    x = layers.Normalization(mean=np.asarray(mean), variance=np.asarray(std, dtype=np.float64) ** 2,
                             name="standardise")(x)
    if input_dropout:
        x = layers.Dropout(input_dropout, name="input_dropout")(x)
    for i, h in enumerate(hidden or ()):
        x = layers.Dense(int(h), activation="relu", kernel_regularizer=reg, name=f"hidden{i + 1}")(x)
        if dropout:
            x = layers.Dropout(dropout, name=f"dropout{i + 1}")(x)
    if kind == "softmax":
        out = layers.Dense(n_out, activation="softmax", kernel_regularizer=reg, name="output")(x)
    elif kind == "coral":
        out = _custom_objects()["CoralOutput"](n_out - 1, name="output")(x)
    elif kind == "expectation":
        out = layers.Dense(len(age_grid), activation="softmax", kernel_regularizer=reg, name="output")(x)
    else:
        out = layers.Dense(1, kernel_regularizer=reg, name="output")(x)
    return keras.Model(inp, out, name="featlab_head")


def load_head(head_dir: Path | str):
    """(model, config) of a saved head."""
    keras = _keras()

    head_dir = Path(head_dir)
    cfg_path, model_path = head_dir / "config.json", head_dir / "head.keras"
    if not cfg_path.is_file() or not model_path.is_file():
        raise FeatlabError(f"{head_dir} is not a trained head (needs head.keras and config.json); train one with `featlab train-head`")
    cfg = json.loads(cfg_path.read_text())
    try:
        model = keras.saving.load_model(model_path, custom_objects=_custom_objects(), compile=False)
    except Exception as e:  # noqa: BLE001
        raise FeatlabError(f"cannot load {model_path}: {e}") from None
    return model, cfg


def outputs_to_prediction(raw: np.ndarray, cfg: dict) -> dict:
    """Raw model outputs -> {'pred': class index or age in years, 'proba': class probabilities (classifiers)}."""
    raw = np.asarray(raw, dtype=np.float64)
    kind = cfg["output"]
    if kind in ("linear", "expectation"):
        t = cfg["target_transform"]
        v = raw @ np.asarray(cfg["age_grid"], dtype=np.float64) if kind == "expectation" else raw.reshape(-1)
        if t["kind"] == "log1p":
            age = np.expm1(v * t.get("scale", 1.0) + t.get("mean", 0.0))
        else:
            age = v * t["scale"] + t["mean"]
        return {"pred": np.clip(age, 0.0, None)}
    if kind == "coral":
        p_gt = 1.0 / (1.0 + np.exp(-raw))  # P(y > k), k = 0..K-2
        cum = np.concatenate([np.ones((len(raw), 1)), p_gt, np.zeros((len(raw), 1))], axis=1)
        proba = np.clip(cum[:, :-1] - cum[:, 1:], 0.0, None)
        proba /= np.maximum(proba.sum(axis=1, keepdims=True), 1e-12)
        return {"pred": (p_gt > 0.5).sum(axis=1).astype(np.int64), "proba": proba}
    return {"pred": raw.argmax(axis=1).astype(np.int64), "proba": raw}


def predict_rows(model, cfg: dict, store: FeatureStore, rows: np.ndarray) -> dict:
    """Predictions for ``rows`` of the head's tap, read in sorted contiguous blocks."""
    key = cfg["tap"]
    rows = np.asarray(rows, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    raws = []
    for block in _read_blocks(rows[order], store, key):
        x = store.read(key, block)
        for i in range(0, len(x), 2048):  # eager calls: no tf.function tracing per head
            raws.append(np.asarray(model(x[i : i + 2048], training=False)))
    raw = np.concatenate(raws) if raws else np.empty((0, max(1, cfg.get("n_outputs", 1))))
    inv = np.empty_like(order)
    inv[order] = np.arange(len(order))
    out = outputs_to_prediction(raw[inv] if len(raw) else raw, cfg)
    return out


# ------------------------------------------------------------------ training
def _setup_tf(seed: int):
    keras = _keras()
    import tensorflow as tf

    keras.utils.set_random_seed(int(seed))
    try:
        tf.config.experimental.enable_op_determinism()
    except Exception:  # noqa: BLE001
        pass
    return keras, tf


def soft_bin_labels(ages: np.ndarray, scheme, sigma: float) -> np.ndarray:
    """Bin targets that keep the age: a Gaussian of ``sigma`` years around each true age, integrated over
    each bin's interval (rows sum to 1). A 22-year-old then counts mostly for 15-20 and partly for 25-32."""
    from scipy.special import ndtr

    edges = np.asarray([*scheme.lower[1:]], dtype=np.float64)
    a = np.asarray(ages, dtype=np.float64)[:, None]
    cdf = ndtr((edges[None, :] - a) / float(sigma))
    cdf = np.concatenate([np.zeros((len(a), 1)), cdf, np.ones((len(a), 1))], axis=1)
    p = np.diff(cdf, axis=1)
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def to_years_np(v, transform: dict) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64) * transform["scale"] + transform["mean"]
    return np.expm1(v) if transform["kind"] == "log1p" else v


def _make_targets(target: str, ordinal: bool, n_classes: int, y: np.ndarray, transform: dict | None):
    if target == "age":
        v = y.astype(np.float64)
        if transform["kind"] == "log1p":
            v = np.log1p(v)
        return ((v - transform["mean"]) / transform["scale"]).astype(np.float32).reshape(-1, 1)
    if ordinal:
        return (y[:, None] > np.arange(n_classes - 1)[None, :]).astype(np.float32)
    return np.eye(n_classes, dtype=np.float32)[y]


def train_head(features, layer, target, cats=None, *, out_root=None, fold=None, hidden=(64,), dropout=0.5,
               epochs=60, batch_size=128, lr=1e-3, optimizer="adam", patience=8, class_weight=False,
               ordinal=False, pool=None, seed=0, memory_budget_mb=2048, verbose=1,
               input_dropout: float | None = None, weight_decay: float = 0.0, label_smoothing: float = 0.0,
               age_head: str = "expectation", age_sigma: float | None = None, age_transform: str = "z",
               age_loss: str = "mae", monitor: str = "val_loss", val_share: float = 0.1,
               chunk_rows: int = CHUNK_ROWS, evaluate: bool = True) -> Path:
    """Train one head on tap ``layer`` of ``features`` for ``target`` and evaluate it on the test split.

    target: ``"bins"`` (with ``cats`` 5, 7 or 8), ``"age"`` (years) or ``"gender"``.
    fold: None (the manifest's train/val/test split), K (Adience-style: test on fold K, train on the
    others, val = a seeded ``val_share`` of those) or ``"all"`` (every fold, then mean and std).

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
    around the true age). Train rows are read at once when they fit ``memory_budget_mb`` (float32),
    otherwise streamed in contiguous chunks of ``chunk_rows`` file rows.

    Returns the head's folder (for ``fold="all"``: the folder holding fold0..fold4 and the mean/std summary).
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
              memory_budget_mb=float(memory_budget_mb), verbose=verbose, label_smoothing=float(label_smoothing),
              age_sigma=float(age_sigma), age_head=age_head, age_transform=age_transform, age_loss=age_loss,
              input_dropout=(None if input_dropout is None else float(input_dropout)),
              weight_decay=float(weight_decay), val_share=float(val_share), monitor=monitor,
              chunk_rows=int(chunk_rows), evaluate=evaluate)
    if fold == "all":
        return _train_all_folds(features, layer, target, cats, out_root, **kw)
    with FeatureStore.open_read(features) as store:
        return _train_one(store, layer, target, cats, tname, out_root, None if fold is None else int(fold), **kw)


def default_hyperparameters() -> dict:
    """train_head's keyword defaults (chosen by measurement on 8,000 UTKFace faces, dlib-age taps)."""
    import inspect

    return {k: p.default for k, p in inspect.signature(train_head).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and k not in ("out_root", "fold", "verbose", "evaluate")}


def _train_all_folds(features, layer, target, cats, out_root, **kw) -> Path:
    from .metrics import mean_std

    with FeatureStore.open_read(features) as store:
        folds = store.labels()["fold"].to_numpy()
    have = sorted(set(int(f) for f in folds if f >= 0))
    if not have:
        raise FeatlabError("--fold all: this features file has no folds (fold is -1 for every row)")
    dirs = [train_head(features, layer, target, cats, out_root=out_root, fold=k, **kw) for k in have]
    root = dirs[0].parent
    if not kw.get("evaluate", True):
        return root
    per = [json.loads((d / "metrics.json").read_text()) for d in dirs]
    mean, std = mean_std([p["metrics"] for p in per])
    summary = {
        "kind": "folds",
        "folds": have,
        "head_dirs": [str(d) for d in dirs],
        "target": per[0]["target"],
        "target_name": per[0]["target_name"],
        "tap": per[0]["tap"],
        "backbone": per[0]["backbone"],
        "dataset": per[0]["dataset"],
        "features": per[0]["features"],
        "n": {"test_per_fold": [p["n"] for p in per], "test_total": int(sum(p["n"] for p in per))},
        "metrics": mean,
        "metrics_std": std,
        "per_fold": {f"fold{k}": p["metrics"] for k, p in zip(have, per)},
        "config": {k: v for k, v in per[0]["config"].items() if k not in ("fold", "counts", "training")},
    }
    (root / "metrics.json").write_text(json.dumps(summary, indent=2))
    names = sorted({k for p in per for k, v in p["metrics"].items() if isinstance(v, (int, float))})
    with open(root / "folds.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["fold", *names])
        for k, p in zip(have, per):
            w.writerow([k, *[p["metrics"].get(n) for n in names]])
        w.writerow(["mean", *[mean.get(n) for n in names]])
        w.writerow(["std", *[std.get(n) for n in names]])
    return root


def _train_one(store: FeatureStore, layer, target, cats, tname, out_root, fold, *, hidden, dropout, epochs,
               batch_size, lr, optimizer, patience, class_weight, ordinal, pool, seed, memory_budget_mb, verbose,
               label_smoothing, age_sigma, age_head, age_transform, age_loss, input_dropout, weight_decay, val_share,
               monitor, chunk_rows, evaluate) -> Path:
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
    dataset = str(attrs.get("dataset", Path(store.path).stem))
    hkey = head_key(key, pool, tap_shape)
    out = head_dir(backbone, dataset, hkey, tname, fold, out_root)

    labels = store.labels()
    y_all, valid = encode_target(labels, target, cats)
    dropped = int((~valid).sum())
    sp = split_rows(labels, valid, fold, seed, val_share)
    tr, va, te = sp["train"], sp["val"], sp["test"]
    n_classes = get_scheme(cats).n if target == "bins" else (2 if target == "gender" else 1)
    names = list(get_scheme(cats).names) if target == "bins" else (list(GENDERS) if target == "gender" else [])
    if target != "age" and len(set(y_all[tr].tolist())) < 2:
        raise FeatlabError(f"the training rows hold a single class of {tname}; nothing to learn")
    if verbose:
        print(f"[featlab] {backbone}/{dataset} tap {key} -> {tname}{'' if fold is None else f' fold {fold}'}: "
              f"train {len(tr)}, val {len(va)}, test {len(te)}; {dropped} rows without {target} dropped")

    keras, tf = _setup_tf(seed)

    # ---- data
    row_bytes = int(np.prod(tap_shape)) * 4
    budget = float(memory_budget_mb) * (1 << 20)
    stream = len(tr) * row_bytes > budget
    stream_val = len(va) * row_bytes > budget
    x_tr = None if stream else store.read(key, tr)
    # a float32 block plus its two float64 copies stay within the budget
    mean, std = feature_stats(store, key, tr, pool, x=x_tr, budget_bytes=int(min(256 << 20, budget / 5)))
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
    y_tr = _make_targets(target, ordinal, n_classes, y_all[tr], transform)
    if target == "bins" and age_sigma > 0 and not ordinal:
        y_tr = soft_bin_labels(labels["age"].to_numpy()[tr], get_scheme(cats), age_sigma)
    y_va = _make_targets(target, ordinal, n_classes, y_all[va], transform)
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
    Stream = _make_stream_class() if (stream or stream_val) else None
    if stream:
        train_data = Stream(store, key, tr, y_tr, w_tr, batch_size, True, seed, chunk_rows)
        fit_kw = dict(x=train_data, shuffle=False)
    else:
        fit_kw = dict(x=x_tr, y=y_tr, sample_weight=w_tr, batch_size=batch_size, shuffle=True)
    if stream_val:
        val_data = Stream(store, key, va, y_va, None, max(batch_size, 1024), False, seed, chunk_rows)
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
    for old in ("metrics.json", "confusion*.csv", "confusion*.png", "scatter.png", "subgroups.csv", "predictions.csv"):
        for f in out.glob(old):  # a previous run's report must not outlive its head
            f.unlink()
    model.save(out / "head.keras")
    np.savez(out / "standardisation.npz", mean=mean, std=std)
    cfg = {
        "featlab_version": __version__,
        "kind": "head",
        "features": str(Path(store.path).resolve()),
        "features_model_sha256": attrs.get("model_sha256"),
        "backbone": backbone,
        "dataset": dataset,
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
        "memory_budget_mb": memory_budget_mb,
        "data_loading": (f"streamed in contiguous chunks of {chunk_rows} rows, shuffled chunk order" if stream
                         else "train rows read in one go"),
        "counts": {"train": int(len(tr)), "val": int(len(va)), "test": int(len(te)),
                   "dropped_missing_target": dropped, "rows_in_file": int(store.nrows)},
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
    if evaluate and len(te):
        from .evaluate import _evaluate

        _evaluate(model, cfg, store, "test", out, head_dir=out)
    elif evaluate and verbose:
        print(f"[featlab] no test rows in {store.path.name}: not evaluated (evaluate on a held-out features file "
              "with `featlab evaluate --features`)")
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
