"""The heads stage: features -> trained heads, their baselines and the zero-shot nets' figures.

Takes a features file and one or more taps (or a fusion of taps), and gives small Keras 3 heads trained on
the train split with early stopping on validation, for 5/7/8 age groups, age in years and gender, each with
its fair opponents on the same faces: the majority class, a linear probe tuned on validation, and the
zero-shot dlib age and gender nets. TensorFlow is imported here and only here (and only when a head trains
or runs).

- :mod:`~featlab.heads.model`: a head's network, saving, loading and predicting.
- :mod:`~featlab.heads.train`: one head, trained on one tap or a fusion of taps.
- :mod:`~featlab.heads.grid`: many heads in one Keras fit, each as if trained alone.
- :mod:`~featlab.heads.baselines`, :mod:`~featlab.heads.probepool`: chance and linear probes (scikit-learn),
  fitted while the heads train.
- :mod:`~featlab.heads.zeroshot`: the dlib age and gender nets scored on the same faces.
- :mod:`~featlab.heads.keras_env`: importing Keras and TensorFlow quietly, once.
"""
