"""The report stage: scoring heads, intervals and tests, comparisons, figures and explanations.

- :mod:`~featlab.report.uncertainty`: bootstrap intervals over people, paired and equivalence tests, BH.
- :mod:`~featlab.report.metrics`: the figures themselves (numpy only).
- :mod:`~featlab.report.evaluate`: a head's record (``metrics.json``, ``faces.csv``, confusion, scatter).
- :mod:`~featlab.report.compare`: head inputs side by side, chosen on validation, with verdicts.
- :mod:`~featlab.report.plots`, :mod:`~featlab.report.heatmaps`: the figures.
- :mod:`~featlab.report.crossnet`: several networks side by side, by relative depth, with paired tests.
- :mod:`~featlab.report.similarity`: linear CKA between the taps of one or two features files.
- :mod:`~featlab.report.explain`, :mod:`~featlab.report.lrp`: where in the face a head looks (occlusion,
  RISE, layer-wise relevance propagation), and whether that is true.
- :mod:`~featlab.report.format`: how a p-value and a paired difference are written.
"""
