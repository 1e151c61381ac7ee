"""The data stage: a dataset on disk -> a manifest with stable splits.

Takes a dataset folder (UTKFace, IMDB-WIKI, Adience, AAF, facial-age, ChaLearn or any CSV) and gives one
manifest schema (image id, path, age or age range, gender, race, split, fold, group), with splits that are
a function of each face's group key, and a named list of what was left out.

- :mod:`~featlab.data.datasets`: the adapters, one per dataset (``featlab prepare --list``).
- :mod:`~featlab.data.manifest`: the manifest's schema, its stable hashed splits and their balance.
- :mod:`~featlab.data.labels`: targets from labels (age groups, years, gender), validation held out by group.
- :mod:`~featlab.data.bins`: the 5/7/8 age-group schemes (Adience's 8 with their gaps).
- :mod:`~featlab.data.images`: reading image files (what counts as an image, and a bad one).
- :mod:`~featlab.data.faces`: finding, aligning and cropping faces into chips (dlib's detector, templates).
- :mod:`~featlab.data.peek`: a first look at a folder of faces.
- :mod:`~featlab.data.skips`: the rows and files left out, each with its reason.

The shipped 600-face UTKFace sample (``utkface-sample/``) is package data here. Grouping faces by what they
look like needs a backbone, so it lives a stage up (:mod:`featlab.features.facegroups`), called by the prepare step.
"""
