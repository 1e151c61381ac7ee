"""Networks trained from pixels, the seed papers' reference systems: build them, crop their input, predict.

Takes chips (uint8 RGB, the side :func:`featlab.features.pixels.full_side` gives for the crop size) and an
architecture; gives a Keras model whose input is a ``size`` x ``size`` crop and whose output is a head's
(softmax over the bins or genders, the expected-age softmax, a linear age) so that
:func:`featlab.heads.model.outputs_to_prediction` reads it like any head.

- ``levi-hassner`` (default): Levi & Hassner (2015), "AdienceNet" in Lapuschkin et al. (2017): conv 96 7x7
  stride 4, max-pool 3/2, LRN; conv 256 5x5, max-pool 3/2, LRN; conv 384 3x3, max-pool 3/2; two fully connected
  layers of 512 with dropout 0.5; the output. (LRN as in Caffe: 5 channels, alpha 1e-4, beta 0.75, k 1.)
- any ``keras.applications`` architecture (:data:`APPLICATIONS`: MobileNetV2, VGG16, ...), built with
  ``weights=None`` and without its top, global average pooling, dropout 0.5, the output; or with its weights
  read from a file the user has (``--weights FILE``). Nothing is downloaded.

Every network starts with the per-channel standardisation of the train chips (``standardise``).
Training crops are random ``size`` crops of the chip, mirrored with probability 1/2 (the paper's); prediction
is from the centre crop, or the mean output over 10 crops (4 corners and the centre, each mirrored).
Keras comes from :mod:`featlab.heads.keras_env` inside the functions, never at import time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import FeatlabError, did_you_mean
from .keras_env import keras as _keras

DEFAULT_ARCH = "levi-hassner"
PREDICTIONS = ("center", "10crop")
#: keras.applications' architectures (Keras 3); a test checks each is there
APPLICATIONS = ("ConvNeXtBase", "ConvNeXtLarge", "ConvNeXtSmall", "ConvNeXtTiny", "ConvNeXtXLarge", "DenseNet121",
                "DenseNet169", "DenseNet201", "EfficientNetB0", "EfficientNetB1", "EfficientNetB2", "EfficientNetB3",
                "EfficientNetB4", "EfficientNetB5", "EfficientNetB6", "EfficientNetB7", "EfficientNetV2B0",
                "EfficientNetV2B1", "EfficientNetV2B2", "EfficientNetV2B3", "EfficientNetV2L", "EfficientNetV2M",
                "EfficientNetV2S", "InceptionResNetV2", "InceptionV3", "MobileNet", "MobileNetV2", "MobileNetV3Large",
                "MobileNetV3Small", "NASNetLarge", "NASNetMobile", "ResNet101", "ResNet101V2", "ResNet152",
                "ResNet152V2", "ResNet50", "ResNet50V2", "VGG16", "VGG19", "Xception")
LRN = {"size": 5, "alpha": 1e-4, "beta": 0.75, "k": 1.0}


def check_arch(arch: str) -> str:
    """The architecture's canonical name (``levi-hassner`` or a keras.applications name); one line if unknown."""
    a = str(arch or DEFAULT_ARCH)
    if a.lower().replace("_", "-") in ("levi-hassner", "adiencenet", "lh"):
        return DEFAULT_ARCH
    by_lower = {n.lower(): n for n in APPLICATIONS}
    if a.lower() in by_lower:
        return by_lower[a.lower()]
    names = [DEFAULT_ARCH, *APPLICATIONS]
    raise FeatlabError(f"unknown --arch {arch!r}; {did_you_mean(a, names)}choose {DEFAULT_ARCH} or a keras.applications "
                       f"architecture ({', '.join(APPLICATIONS[:3])}, MobileNetV2, VGG16, ...)")


def check_weights(weights, arch: str) -> Path | None:
    """The weights file, checked before TensorFlow loads: None (random initial weights) or an existing file."""
    if weights in (None, "", "none", "None"):
        return None
    if arch == DEFAULT_ARCH:
        raise FeatlabError("--weights applies to keras.applications architectures; levi-hassner trains from scratch")
    p = Path(str(weights)).expanduser()
    if str(weights).lower() == "imagenet" or not p.is_file():
        cache = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"
        raise FeatlabError(f"--weights {weights}: no such file (looked at {p.resolve() if str(weights).lower() != 'imagenet' else cache}); "
                           f"featlab downloads nothing: put a {arch} weights file without its top (e.g. keras' "
                           f"*_notop.h5) on disk and pass --weights PATH, or train from scratch without --weights")
    return p



def custom_objects() -> dict:
    """Keras objects a saved CNN may need (the LRN layer, registered once; the heads' own)."""
    from .model import custom_objects as head_objects

    keras = _keras()
    name = "featlab>LocalResponseNormalization"
    obj = keras.saving.get_registered_object(name)
    if obj is None:
        @keras.saving.register_keras_serializable(package="featlab")
        class LocalResponseNormalization(keras.layers.Layer):
            """Caffe's across-channel LRN (channels last): x / (k + alpha / size * sum of x^2 over size channels)^beta."""

            def __init__(self, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0, **kw):
                super().__init__(**kw)
                self.size, self.alpha, self.beta, self.k = int(size), float(alpha), float(beta), float(k)

            def call(self, x):
                ops = keras.ops
                r = self.size // 2
                sq = ops.pad(ops.square(x), [[0, 0], [0, 0], [0, 0], [r, r]])
                c = x.shape[-1]
                s = sum(sq[..., i : i + c] for i in range(self.size))
                return x / ops.power(self.k + (self.alpha / self.size) * s, self.beta)

            def get_config(self):
                return {**super().get_config(), "size": self.size, "alpha": self.alpha, "beta": self.beta, "k": self.k}

        obj = LocalResponseNormalization
    return {**head_objects(), name: obj, "LocalResponseNormalization": obj}


def build_cnn(arch: str, size: int, n_out: int, kind: str, mean, std, age_grid=None, weights: Path | None = None):
    """The network (see the module doc); ``mean``/``std``: per-channel statistics of the train chips (0..255)."""
    from .model import head_layers

    keras = _keras()
    layers = keras.layers
    inp = keras.Input(shape=(int(size), int(size), 3), name="image")
    x = layers.Normalization(mean=np.asarray(mean, dtype=np.float64), variance=np.asarray(std, dtype=np.float64) ** 2,
                             name="standardise")(inp)
    if arch == DEFAULT_ARCH:
        lrn = custom_objects()["LocalResponseNormalization"]
        x = layers.Conv2D(96, 7, strides=4, padding="valid", activation="relu", name="conv1")(x)
        x = layers.MaxPooling2D(3, strides=2, name="pool1")(x)
        x = lrn(**LRN, name="norm1")(x)
        x = layers.Conv2D(256, 5, padding="same", activation="relu", name="conv2")(x)
        x = layers.MaxPooling2D(3, strides=2, name="pool2")(x)
        x = lrn(**LRN, name="norm2")(x)
        x = layers.Conv2D(384, 3, padding="same", activation="relu", name="conv3")(x)
        x = layers.MaxPooling2D(3, strides=2, name="pool5")(x)
        x = layers.Flatten(name="flatten")(x)
        out = head_layers(x, n_out, kind, hidden=(512, 512), dropout=0.5, age_grid=age_grid)
        return keras.Model(inp, out, name="levi_hassner")
    app = getattr(keras.applications, arch)
    try:
        base = app(include_top=False, weights=None, input_shape=(int(size), int(size), 3), pooling="avg")
    except ValueError as e:
        raise FeatlabError(f"{arch} cannot be built at --size {size}: {str(e).splitlines()[0]}") from None
    if weights is not None:
        try:
            base.load_weights(str(weights))
        except Exception as e:  # noqa: BLE001
            raise FeatlabError(f"--weights {weights}: not {arch}'s weights without its top ({str(e).splitlines()[0][:160]})") from None
    x = base(x)
    x = layers.Dropout(0.5, name="dropout")(x)
    out = head_layers(x, n_out, kind, hidden=(), age_grid=age_grid)
    return keras.Model(inp, out, name=arch.lower())


def load_cnn(cnn_dir):
    """(model, config) of a trained CNN folder."""
    cnn_dir = Path(cnn_dir)
    cfg_path, model_path = cnn_dir / "config.json", cnn_dir / "cnn.keras"
    if not cfg_path.is_file() or not model_path.is_file():
        raise FeatlabError(f"{cnn_dir} is not a trained CNN (needs cnn.keras and config.json); train one with "
                           "`featlab train-cnn`")
    keras = _keras()
    try:
        model = keras.saving.load_model(model_path, custom_objects=custom_objects(), compile=False)
    except Exception as e:  # noqa: BLE001
        raise FeatlabError(f"cannot load {model_path}: {e}") from None
    return model, json.loads(cfg_path.read_text())


def is_cnn(cfg: dict) -> bool:
    return (cfg or {}).get("kind") == "cnn"


# ------------------------------------------------------------------------------------ crops
def crop_offsets(n: int, full: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random training crops: (top, left, mirror) per chip."""
    span = full - size + 1
    return rng.integers(0, span, n), rng.integers(0, span, n), rng.random(n) < 0.5


def train_crops(chips: np.ndarray, size: int, top, left, mirror) -> np.ndarray:
    out = np.empty((len(chips), size, size, 3), dtype=np.float32)
    for i, c in enumerate(chips):
        a = c[top[i] : top[i] + size, left[i] : left[i] + size]
        out[i] = a[:, ::-1] if mirror[i] else a
    return out


def center_crops(chips: np.ndarray, size: int) -> np.ndarray:
    full = chips.shape[1]
    o = (full - size) // 2
    return np.asarray(chips[:, o : o + size, o : o + size], dtype=np.float32)


def ten_crops(chips: np.ndarray, size: int) -> list[np.ndarray]:
    """The 10 views of each chip: 4 corners and the centre, and each of them mirrored."""
    full = chips.shape[1]
    e, o = full - size, (full - size) // 2
    views = []
    for t, l in ((0, 0), (0, e), (e, 0), (e, e), (o, o)):
        v = np.asarray(chips[:, t : t + size, l : l + size], dtype=np.float32)
        views += [v, np.ascontiguousarray(v[:, :, ::-1])]
    return views


def predict_raw(model, chips: np.ndarray, size: int, prediction: str = "center", batch: int = 256) -> np.ndarray:
    """Raw outputs of the network for uint8 chips (N, full, full, 3): the centre crop's, or the mean over 10 crops."""
    outs = []
    for a in range(0, len(chips), batch):
        c = np.asarray(chips[a : a + batch])
        views = [center_crops(c, size)] if prediction == "center" else ten_crops(c, size)
        outs.append(np.mean([np.asarray(model(v, training=False), dtype=np.float64) for v in views], axis=0))
    return np.concatenate(outs) if outs else np.empty((0, int(model.output_shape[-1])))
