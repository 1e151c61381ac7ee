"""featlab: probe frozen face-recognition networks for age and gender.

The package is a pipeline: ``prepare`` (dataset adapters -> one manifest),
``extract`` (frozen ONNX backbone -> intermediate taps in HDF5),
``train-head`` (small Keras heads on one tap) and ``evaluate``/``compare``.
Importing it is cheap: heavy libraries (TensorFlow, onnxruntime, PyTables)
are imported only by the commands that need them.
"""

__version__ = "0.1.0"
