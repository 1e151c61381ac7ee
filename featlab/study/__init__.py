"""The study stage: a spec -> every step above, resumable.

Takes a TOML spec (dataset, one backbone or several networks, taps, heads) and gives the whole study:
prepare, extract, train every head with its baselines, score the zero-shot nets, compare the inputs chosen
on validation, and write ``report.md``. Each step is fingerprinted by what made it, so a re-run redoes only
what changed and an interrupted run resumes to the uninterrupted result.

- :mod:`~featlab.study.runner`: ``featlab run``: dispatches a spec of either kind.
- :mod:`~featlab.study.schema`: the spec's keys, types and defaults (the generated spec reference).
- :mod:`~featlab.study.experiment`: a study on one backbone, step by step.
- :mod:`~featlab.study.multinet`: several networks on the same faces, side by side and fused.
- :mod:`~featlab.study.workflow`: training and recording heads (one, a grid, seeds, folds) with baselines.
- :mod:`~featlab.study.recipes`: the glue between CLI options, specs and the head API (targets, names).
"""
