"""The features stage: a manifest and a backbone -> an HDF5 features file.

Takes a manifest and a backbone, and gives one features file (HDF5, PyTables) holding any set of taps per
face with its labels, written in one resumable pass (locally, in shards on several GPUs, or on a Ray
cluster) and recorded with everything that made it (model file, preprocessing, alignment, flip, pooling,
dtype), so that features made differently are never mixed.

- :mod:`~featlab.features.extract`: the pass over the faces (decode, align, run, pool, append, resume).
- :mod:`~featlab.features.store`: the features file (taps, labels, warnings, attributes; append and read).
- :mod:`~featlab.features.featureio`: reading a tap's rows for training (batches, statistics, fusions).
- :mod:`~featlab.features.shards`, :mod:`~featlab.features.cluster`: the same pass split over GPUs or a
  Ray cluster, merged into one file equal to a local run.
- :mod:`~featlab.features.tapimport`: taps made elsewhere (NumPy, HDF5) imported under the same checks.
- :mod:`~featlab.features.join`: the files of several networks joined by image id (cross-network inputs).
- :mod:`~featlab.features.facegroups`: faces grouped by their embedding (near-duplicates, the same person
  in one session), so that a split never divides them; the prepare step calls it.
"""
