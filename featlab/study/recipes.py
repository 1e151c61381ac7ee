"""Recipes: the small glue between CLI options, experiment specs and the head API.

Turns ``--cats/--regression/--target`` into one (target, cats) pair, names
targets the way results folders do, and formats one-line summaries of an
evaluation's metrics.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import FeatlabError, did_you_mean
from ..data.labels import HEADLINE, TARGETS, format_figure



def head_target(target: str | None, cats: int | None, regression: bool = False) -> tuple[str, int | None]:
    """CLI choices -> (target, cats). ``--cats 7`` alone means 7 age bins."""
    if regression:
        if target not in (None, "age", "regression"):
            raise FeatlabError("--regression and --target disagree")
        return "age", None
    if target in ("regression",):
        target = "age"
    if target is None:
        if cats is None:
            raise FeatlabError("say what to predict: --cats 5|7|8, --regression, or --target gender")
        target = "bins"
    if target not in TARGETS:
        raise FeatlabError(f"unknown target {target!r}: {did_you_mean(target, TARGETS)}use bins (with --cats), age or gender")
    if target == "bins":
        if cats is None:
            raise FeatlabError("--target bins needs --cats 5, 7 or 8")
        from ..data.bins import get_scheme

        get_scheme(cats)
        return "bins", int(cats)
    return target, None


def parse_hidden(text) -> tuple[int, ...] | None:
    """'auto' -> None (the head's default); '0' or '' -> () linear; '512,128' -> (512, 128)."""
    if text is None or (isinstance(text, str) and text.strip().lower() == "auto"):
        return None
    if isinstance(text, (list, tuple)):
        return tuple(int(x) for x in text if int(x) > 0)
    parts = [p for p in str(text).replace(" ", "").split(",") if p]
    try:
        return tuple(int(p) for p in parts if int(p) > 0)
    except ValueError:
        raise FeatlabError(f"--hidden takes sizes like 512,128 (or 0 for a linear head), not {text!r}") from None


def run_head(features, layer: str, target: str, cats: int | None, fold=None, seed: int = 0, verbose: int = 1, **opts) -> Path:
    from .workflow import train_head

    if "hidden" in opts:
        h = parse_hidden(opts.pop("hidden"))
        if h is not None:
            opts["hidden"] = h
    return Path(train_head(features, layer, target, cats, fold=fold, seed=seed, verbose=verbose, **opts))


def headline(m: dict, split: str = "test") -> dict:
    """The few figures that matter in a metrics.json, by target: ``{name: (value, [low, high] or None)}``
    (a head's record has ``val``/``test`` sections; an evaluation has ``metrics``)."""
    figures = (m.get(split) or {}).get("metrics") or m.get("metrics", m)
    pick = HEADLINE.get(m.get("target"), ("accuracy", "one_off", "mae"))
    return {k: (figures[k], figures.get(f"{k}_ci95")) for k in pick if isinstance(figures.get(k), (int, float))}


def summary_line(m: dict) -> str:
    parts = [f"{k} {format_figure(k, v, ci)}" for k, (v, ci) in headline(m).items()]
    n = m.get("n") if "n" in m else (m.get("test") or {}).get("n")
    where = f" ({m['head_dir']})" if m.get("head_dir") else ""
    count = f" on {n:,} faces" if isinstance(n, int) else ""
    return f"{m.get('target_name', m.get('target', '?'))}: " + ", ".join(parts) + count + where


def parse_margins(items) -> dict[str, float]:
    """``["accuracy=0.02", "mae=0.25"]`` -> ``{"accuracy": 0.02, "mae": 0.25}`` (one line on anything else)."""
    from ..scoring.uncertainty import MARGINS

    out = {}
    for item in items:
        name, _, value = str(item).partition("=")
        name = name.strip()
        try:
            v = float(value)
        except ValueError:
            v = float("nan")
        if name not in MARGINS or not v > 0:
            raise FeatlabError(f"--margin takes METRIC=VALUE with METRIC one of {', '.join(MARGINS)} and VALUE > 0 "
                               f"(a share for accuracy, years for mae), not {item!r}")
        out[name] = v
    return out


def compare_cmd(target: str, cats: int | None, backbone=None, dataset=None, sweep=False, features=None, manifest=None,
                margins=None) -> dict:
    from .. import config
    from ..report.compare import compare, discover, results_hint

    if sweep:
        from .workflow import sweep as run_sweep

        return run_sweep(target, cats, backbone=backbone, features=features, manifest=manifest)
    if not (backbone and dataset):
        found = discover(config.results_dir())
        if len(found) == 1 and not (backbone or dataset):
            backbone, dataset = found[0]
        else:
            matching = [f for f in found if (backbone in (None, f[0])) and (dataset in (None, f[1]))]
            if not matching:
                asked = " and ".join(f"{o} {v}" for o, v in (("--backbone", backbone), ("--dataset", dataset)) if v)
                raise FeatlabError(f"no results for {asked or 'any backbone and dataset'} under {config.results_dir()}; "
                                   + results_hint(config.results_dir()))
            if len(matching) != 1:
                have = ", ".join(f"{b}/{d}" for b, d in matching)
                raise FeatlabError(f"say which results to compare with --backbone and --dataset (found: {have})")
            backbone, dataset = matching[0]
    return compare(backbone, dataset, target=target, cats=cats, margins=margins)
