"""The report stage: scoring heads, intervals and tests, comparisons, figures and explanations.

- :mod:`~featlab.report.uncertainty`: bootstrap intervals over people, paired and equivalence tests, BH.
- :mod:`~featlab.report.metrics`: the figures themselves (numpy only).
- :mod:`~featlab.report.evaluate`: a head's record (``metrics.json``, ``faces.csv``, confusion, scatter).
- :mod:`~featlab.report.compare`: head inputs side by side, chosen on validation, with verdicts.
- :mod:`~featlab.report.plots`, :mod:`~featlab.report.heatmaps`: the figures.
- :mod:`~featlab.report.explain`: where in the face a head looks, and whether that is true.

The old flat names (``featlab.compare``, ``featlab.evaluate``, ...) stay importable for a release.
"""
