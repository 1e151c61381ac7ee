"""Study: run an experiment spec of either kind, the one entry of ``featlab run``.

A spec with one ``[backbone]`` runs through :func:`featlab.study.experiment.run_spec`; a spec with
``[[networks]]`` (several networks on the same faces) through :func:`featlab.study.multinet.run_networks`,
which builds on the single-network steps. Dispatching here keeps that dependency one-way
(multinet -> experiment).
"""

from __future__ import annotations

from pathlib import Path


def run_study(path, overrides: list[str] = (), force: bool = False, echo=print) -> Path:
    """Run the spec at ``path`` (with ``--set`` overrides); returns its report's path."""
    from .experiment import load_spec, run_spec

    spec = load_spec(path, overrides)
    if spec.get("networks"):
        from .multinet import run_networks

        return run_networks(spec, force=force, echo=echo)
    return run_spec(spec, force=force, echo=echo)
