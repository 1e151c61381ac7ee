"""The one place featlab imports TensorFlow and Keras.

Every module that trains or runs a head gets Keras from :func:`keras`; nothing
else in featlab imports TensorFlow, so the data commands never pay for it.
"""

from __future__ import annotations

import os


def keras():
    """Import Keras (and TensorFlow) quietly: TF 2.21 logs a harmless tf.data NodeDef error per fit and
    CPU-feature notices at import; Python exceptions still surface."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras as _k

    return _k
