"""The report stage: head records -> records on new data, comparisons, explanations.

Takes trained heads (and the features files, or images); gives a head's record on its own val and test
rows or on another file, head inputs side by side chosen on validation with verdicts, several networks
side by side, the similarity of their taps, predictions on new images and where in the face a head looks.

- :mod:`~featlab.report.evaluate`: a head's record (``metrics.json``, ``faces.csv``, confusion, scatter).
- :mod:`~featlab.report.compare`: head inputs side by side, chosen on validation, with verdicts.
- :mod:`~featlab.report.crossnet`: several networks side by side, by relative depth, with paired tests.
- :mod:`~featlab.report.similarity`: linear CKA between the taps of one or two features files.
- :mod:`~featlab.report.explain`: where in the face a head looks, and whether that is true, by the methods
  :mod:`~featlab.report.perturbation` (occlusion, RISE) and :mod:`~featlab.report.lrp` (layer-wise
  relevance propagation), checked by :mod:`~featlab.report.faithfulness` (deletion and insertion curves).
- :mod:`~featlab.report.predict`: heads run on new images (``featlab predict``).
- :mod:`~featlab.report.crosshead`: a head across networks run on each network's own features or images.

Figures, intervals and tests are computed in :mod:`featlab.scoring`.
"""
