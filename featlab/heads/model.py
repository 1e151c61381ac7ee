"""The Keras head: build it, load it, turn its outputs into predictions.

Keras comes from :mod:`featlab.heads.keras_env` inside the functions, never at import time.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import FeatlabError
from ..features.featureio import read_blocks, read_input
from .keras_env import keras as _keras
from ..data.labels import to_years_np
from ..features.store import FeatureStore


def custom_objects() -> dict:
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


def _is_shape_list(tap_shape) -> bool:
    return len(tap_shape) > 0 and isinstance(tap_shape[0], (list, tuple))


def build_model(tap_shape, n_out: int, kind: str, mean, std, hidden=(256,), dropout=0.3, pool=None,
                input_dropout: float = 0.0, weight_decay: float = 0.0, age_grid=None, name: str = "featlab_head"):
    """kind: 'softmax' (n_out classes), 'coral' (n_out classes, n_out-1 logits), 'linear' (one unit) or
    'expectation' (a softmax over the ages in ``age_grid``: the prediction is its expected value).

    A fusion head (several taps): ``tap_shape`` is a list of shapes and ``mean``/``std`` lists of the
    same length; each tap gets its own input (``tap0``, ``tap1``, ...), pooling, flattening and
    standardisation (``standardise0``, ...), then they are concatenated before the dropout and dense layers."""
    keras = _keras()
    fused = _is_shape_list(tap_shape)
    shapes = list(tap_shape) if fused else [tap_shape]
    inputs = [keras.Input(shape=tuple(int(d) for d in sh), name=f"tap{i if fused else ''}") for i, sh in enumerate(shapes)]
    x = standardised_input(inputs, mean if fused else [mean], std if fused else [std], pool, fused)
    if input_dropout:
        x = keras.layers.Dropout(input_dropout, name="input_dropout")(x)
    out = head_layers(x, n_out, kind, hidden, dropout, weight_decay, age_grid)
    return keras.Model(inputs if fused else inputs[0], out, name=name)


def standardised_input(inputs, means, stds, pool=None, fused=None, prefix: str = ""):
    """The head's input: each tap's tensor in ``inputs`` globally pooled (``pool``, maps only),
    flattened and standardised (``standardise{i}``, fixed mean and std), concatenated (``fuse``) when
    there are several (``fused``: name the layers by tap index even for one). ``prefix`` goes before
    every layer name."""
    keras = _keras()
    layers = keras.layers
    fused = len(inputs) > 1 if fused is None else fused
    branches = []
    for i, (inp, m, sd) in enumerate(zip(inputs, means, stds)):
        sfx = str(i) if fused else ""
        x = inp
        if pool and len(x.shape) == 4:
            x = (layers.GlobalAveragePooling2D if pool == "avg" else layers.GlobalMaxPooling2D)(
                data_format="channels_first", name=f"{prefix}pool_{pool}{sfx}")(x)
        if len(x.shape) > 2:
            x = layers.Flatten(name=f"{prefix}flatten{sfx}")(x)
        x = layers.Normalization(mean=np.asarray(m), variance=np.asarray(sd, dtype=np.float64) ** 2,
                                 name=f"{prefix}standardise{sfx}")(x)
        branches.append(x)
    return layers.Concatenate(name=f"{prefix}fuse")(branches) if fused else branches[0]


def head_layers(x, n_out: int, kind: str, hidden=(256,), dropout=0.3, weight_decay: float = 0.0, age_grid=None,
                prefix: str = "", first: int = 0):
    """The dense layers after the (dropped-out) input: ``hidden[first:]`` as ``hidden{k}`` + ``dropout{k}``
    (k counted from 1 over all of ``hidden``; ``first``: how many hidden layers ``x`` has already been
    through, their dropout included), then the output layer for ``kind`` (``output``). ``prefix`` goes
    before every layer name."""
    keras = _keras()
    layers = keras.layers
    reg = keras.regularizers.L2(weight_decay) if weight_decay else None
    for i, h in enumerate(hidden or ()):
        if i < first:
            continue
        x = layers.Dense(int(h), activation="relu", kernel_regularizer=reg, name=f"{prefix}hidden{i + 1}")(x)
        if dropout:
            x = layers.Dropout(dropout, name=f"{prefix}dropout{i + 1}")(x)
    if kind == "softmax":
        return layers.Dense(n_out, activation="softmax", kernel_regularizer=reg, name=f"{prefix}output")(x)
    if kind == "coral":
        return custom_objects()["CoralOutput"](n_out - 1, name=f"{prefix}output")(x)
    if kind == "expectation":
        return layers.Dense(len(age_grid), activation="softmax", kernel_regularizer=reg, name=f"{prefix}output")(x)
    return layers.Dense(1, kernel_regularizer=reg, name=f"{prefix}output")(x)


def load_head(head_dir: Path | str):
    """(model, config) of a saved head."""
    head_dir = Path(head_dir)
    cfg_path, model_path = head_dir / "config.json", head_dir / "head.keras"
    if not cfg_path.is_file() or not model_path.is_file():
        raise FeatlabError(f"{head_dir} is not a trained head (needs head.keras and config.json); train one with `featlab train-head`")
    keras = _keras()
    cfg = json.loads(cfg_path.read_text())
    try:
        model = keras.saving.load_model(model_path, custom_objects=custom_objects(), compile=False)
    except Exception as e:  # noqa: BLE001
        raise FeatlabError(f"cannot load {model_path}: {e}") from None
    return model, cfg


def outputs_to_prediction(raw: np.ndarray, cfg: dict) -> dict:
    """Raw model outputs -> {'pred': class index or age in years, 'proba': class probabilities (classifiers)}."""
    raw = np.asarray(raw, dtype=np.float64)
    kind = cfg["output"]
    if kind in ("linear", "expectation"):
        t = cfg["target_transform"]
        if kind == "expectation":  # the expected age in years: each grid class turned into years first
            age = raw @ to_years_np(cfg["age_grid"], t)
        else:
            age = to_years_np(raw.reshape(-1), t)
        return {"pred": np.clip(age, 0.0, None)}
    if kind == "coral":
        p_gt = 1.0 / (1.0 + np.exp(-raw))  # P(y > k), k = 0..K-2
        cum = np.concatenate([np.ones((len(raw), 1)), p_gt, np.zeros((len(raw), 1))], axis=1)
        proba = np.clip(cum[:, :-1] - cum[:, 1:], 0.0, None)
        proba /= np.maximum(proba.sum(axis=1, keepdims=True), 1e-12)
        return {"pred": (p_gt > 0.5).sum(axis=1).astype(np.int64), "proba": proba}
    return {"pred": raw.argmax(axis=1).astype(np.int64), "proba": raw}


def predict_rows(model, cfg: dict, store: FeatureStore, rows: np.ndarray) -> dict:
    """Predictions for ``rows`` of the head's tap (or taps, for a fusion head), read in sorted contiguous blocks."""
    key = cfg["tap"]
    rows = np.asarray(rows, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    raws = []
    for block in read_blocks(rows[order], store, key):
        x = read_input(store, key, block)  # a list of arrays for a fusion head
        n = len(x[0]) if isinstance(x, list) else len(x)
        for i in range(0, n, 2048):  # eager calls: no tf.function tracing per head
            xb = [a[i : i + 2048] for a in x] if isinstance(x, list) else x[i : i + 2048]
            raws.append(np.asarray(model(xb, training=False)))
    raw = np.concatenate(raws) if raws else np.empty((0, max(1, cfg.get("n_outputs", 1))))
    inv = np.empty_like(order)
    inv[order] = np.arange(len(order))
    out = outputs_to_prediction(raw[inv] if len(raw) else raw, cfg)
    return out


def backbone_for(cfgs: list[dict], model: str | None):
    """(backbone, flip, align) that made the features of heads ``cfgs`` (their records' ``config``), with
    ``model`` as its file when given; refuses heads of several backbones, model files or feature sets, a
    model file other than the one recorded, and a backbone that now prepares images differently."""
    from ..backbones.registry import Backbone
    from ..paths import canonical_preprocessing

    names = {c["backbone"] for c in cfgs}
    shas = {c.get("features_model_sha256") for c in cfgs}
    if len(names) > 1 or len(shas) > 1:
        raise FeatlabError("the heads were trained on different backbones or model files; predict with one backbone at a time")
    cfg = cfgs[0]
    def prepared(c):  # the preprocessing by name (heads from before names were recorded: the one used then)
        fs = c.get("feature_set") or {}
        return {"align": fs.get("align"), "flip": fs.get("flip"),
                "preprocessing": canonical_preprocessing(fs.get("preprocessing"), bool(fs.get("align")))}

    sets = {json.dumps(prepared(c), sort_keys=True) for c in cfgs}
    if len(sets) > 1:
        raise FeatlabError("the heads' features were prepared differently (align, flip or preprocessing): "
                           "predict with heads of one feature set at a time")
    ident = cfg.get("feature_set") or {}
    recorded = prepared(cfg)["preprocessing"]
    flip = bool(ident.get("flip", False))
    model_path = model
    feats = Path(cfg.get("features", ""))
    if feats.is_file() and not model_path:
        with FeatureStore.open_read(feats) as s:
            model_path = s.attrs.get("model_path")
    if model_path and not Path(model_path).is_file():
        model_path = None
    # chips are cut with the heads' recorded preprocessing (None: a record without one, the network's own)
    bb = Backbone(cfg["backbone"], model_path, recorded.get("name") if isinstance(recorded, dict) else None)
    want = cfg.get("features_model_sha256")
    if want and bb.sha256 != want:
        raise FeatlabError(f"the model file {bb.model_path} (sha256 {bb.sha256[:12]}…) is not the one the heads were "
                           f"trained on (sha256 {want[:12]}…); pass the right file with --model")
    if ident.get("preprocessing") and bb.preprocessing() != recorded:
        raise FeatlabError(f"{cfg['backbone']} now prepares images differently from the heads' training features "
                           f"({bb.preprocessing()} vs {recorded})")
    return bb, flip, bool(ident.get("align", False))
