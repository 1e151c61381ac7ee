"""The scoring stage: predictions -> figures with intervals over people, tests, and their plots.

Takes true labels, predictions and the faces' groups (identities, face groups); gives every headline figure
with its 95 % interval (a bootstrap over the independent unit), paired and equivalence tests with their
verdicts, and the figures. Everything that scores (heads, linear probes, zero-shot nets, comparisons,
explanations) scores here, numpy only (no TensorFlow).

- :mod:`~featlab.scoring.metrics`: the figures themselves (accuracy, 1-off, MAE, CS, confusion, subgroups).
- :mod:`~featlab.scoring.uncertainty`: cluster-bootstrap intervals, paired differences, TOST, BH families.
- :mod:`~featlab.scoring.scores`: a scored split (figures, intervals, per-face values) and its files.
- :mod:`~featlab.scoring.format`: how a p-value and a paired difference are written.
- :mod:`~featlab.scoring.plots`, :mod:`~featlab.scoring.heatmaps`: the figures.
"""
