"""Train, then score: the one place that chains :mod:`featlab.train` (or :mod:`featlab.grid`),
:mod:`featlab.evaluate` and the baselines, for one head, a grid of heads, several seeds, or the fold protocol.

:func:`train_head` is what ``featlab train-head``, experiment specs and the sweep call. With
``seeds=N`` it trains N heads (``seed{S}/`` folders) and writes a summary beside them: each figure's
mean and spread over seeds (training variance) next to a bootstrap interval over faces of the
per-face mean (test-sample variance). With ``fold="all"`` it runs every fold (``fold{K}/``) and
summarises the same way, the faces of all folds pooled. :func:`train_grid` does the same for every
(tap, target) head of a grid, trained together in one pass (:mod:`featlab.grid`).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from . import config
from .errors import FeatlabError
from .labels import HEADLINE, format_figure
from .paths import dataset_key, feature_set
from .store import FeatureStore
from .uncertainty import interval


def _train_and_record(features, layer, target, cats, *, fold, seed, seed_dir, baselines, out_root, verbose,
                      **hp) -> Path:
    from .train import fit_head

    d = fit_head(features, layer, target, cats, fold=fold, seed=seed, seed_dir=seed_dir, out_root=out_root,
                 verbose=verbose, **hp)
    _record(features, d, baselines, verbose, hp.get("memory_mb", 2048))
    return d


def _record(features, d: Path, baselines: bool, verbose, memory_mb) -> dict:
    """Score a saved head on val and test (metrics.json) and fit its baselines."""
    from .baselines import fit_baselines
    from .evaluate import record_head
    from .model import load_head

    model, cfg = load_head(d)
    target = cfg["target"]
    with FeatureStore.open_read(features) as store:
        rec = record_head(model, cfg, store, d)
        if baselines:
            fit_baselines(store, cfg, d, memory_mb)
    if verbose:
        t = rec.get("test") or {}
        v = rec.get("val") or {}
        figs = ", ".join(f"{m} {format_figure(m, t['metrics'][m], t['metrics'].get(m + '_ci95'))}"
                         for m in HEADLINE[target] if t)
        vf = ", ".join(f"{m} {format_figure(m, v['metrics'][m])}" for m in HEADLINE[target] if v)
        print(f"[featlab] {d}: val {vf}; test {figs or 'no test rows'}")
    return rec


def folds_of(features) -> list[int]:
    """The folds of a features file (for ``--fold all``); one line when it has none."""
    with FeatureStore.open_read(features) as store:
        folds = store.labels()["fold"].to_numpy()
    have = sorted(set(int(f) for f in folds if f >= 0))
    if not have:
        raise FeatlabError("--fold all: this features file has no folds (fold is -1 for every row)")
    return have


def train_head(features, layer, target, cats=None, *, fold=None, seed: int = 0, seeds: int = 1,
               baselines: bool = True, out_root=None, verbose=1, **hp) -> Path:
    """Train and score one head (or ``seeds`` heads, or every fold with ``fold="all"``); returns the
    folder holding its record (``metrics.json`` with ``val`` and ``test`` sections)."""
    seeds = int(seeds)
    if seeds < 1:
        raise FeatlabError(f"--seeds must be at least 1, not {seeds}")
    if fold == "all":
        dirs = [train_head(features, layer, target, cats, fold=k, seed=seed, seeds=seeds, baselines=baselines,
                           out_root=out_root, verbose=verbose, **hp) for k in folds_of(features)]
        return summarise(dirs, "folds", dirs[0].parent)
    if seeds == 1:
        return _train_and_record(features, layer, target, cats, fold=fold, seed=seed, seed_dir=False,
                                 baselines=baselines, out_root=out_root, verbose=verbose, **hp)
    dirs = [_train_and_record(features, layer, target, cats, fold=fold, seed=s, seed_dir=True,
                              baselines=baselines and s == seed, out_root=out_root, verbose=verbose, **hp)
            for s in range(seed, seed + seeds)]
    return summarise(dirs, "seeds", dirs[0].parent)


def train_grid(features, layers, targets, *, fold=None, seed: int = 0, seeds: int = 1, baselines: bool = True,
               out_root=None, verbose=1, **hp) -> list[Path]:
    """Train and score every (tap, target) head of ``layers`` x ``targets`` (``[(target, cats)]``): one
    :func:`featlab.grid.fit_grid` per seed and fold, then each head scored on its own (``record_head``,
    baselines) and, with ``seeds`` > 1 or ``fold="all"``, summarised like :func:`train_head`. One head
    alone goes through :func:`train_head`. Returns the heads' record folders, layer-major."""
    from .grid import fit_grid, grid_heads

    seeds = int(seeds)
    if seeds < 1:
        raise FeatlabError(f"--seeds must be at least 1, not {seeds}")
    heads = grid_heads(layers, targets)
    if len(heads) == 1:
        layer, t, c = heads[0]
        return [train_head(features, layer, t, c, fold=fold, seed=seed, seeds=seeds, baselines=baselines,
                           out_root=out_root, verbose=verbose, **hp)]
    if fold == "all":
        per_fold = [train_grid(features, layers, targets, fold=k, seed=seed, seeds=seeds, baselines=baselines,
                               out_root=out_root, verbose=verbose, **hp) for k in folds_of(features)]
        return [summarise([f[i] for f in per_fold], "folds", per_fold[0][i].parent) for i in range(len(heads))]
    per_seed = []
    for s in range(seed, seed + seeds):
        dirs = fit_grid(features, layers, targets, fold=fold, seed=s, seed_dir=seeds > 1, out_root=out_root,
                        verbose=verbose, **hp)
        for d in dirs:
            _record(features, d, baselines and s == seed, verbose, hp.get("memory_mb", 2048))
        per_seed.append(dirs)
    if seeds == 1:
        return per_seed[0]
    return [summarise([p[i] for p in per_seed], "seeds", per_seed[0][i].parent) for i in range(len(heads))]


def summarise(dirs: list[Path], kind: str, root: Path) -> Path:
    """Write ``root/metrics.json`` and ``root/faces.csv`` over several heads' records: for ``seeds`` the
    per-face mean over seeds (same faces), for ``folds`` the faces of every fold together; each headline
    figure from those faces with its interval, plus mean and std of the per-head figures."""
    import pandas as pd

    recs = [json.loads((Path(d) / "metrics.json").read_text()) for d in dirs]
    target = recs[0]["target"]
    heads = HEADLINE[target]
    frames = []
    for i, d in enumerate(dirs):
        f = pd.read_csv(Path(d) / "faces.csv", dtype={"image_id": str, "split": str})
        f["member"] = i
        frames.append(f)
    faces = pd.concat(frames, ignore_index=True)
    if kind == "seeds":
        faces = faces.groupby(["image_id", "split"], sort=False, as_index=False)[list(heads)].mean()
    faces = faces[["image_id", "split", *heads]]
    out = {"kind": kind, "members": [str(Path(d).resolve()) for d in dirs], "target": target,
           "target_name": recs[0]["target_name"], "tap": recs[0]["tap"], "head_key": recs[0]["head_key"],
           "backbone": recs[0]["backbone"], "dataset": recs[0]["dataset"],
           "dataset_key": recs[0].get("dataset_key"), "feature_set": recs[0].get("feature_set"),
           "chosen_on": "val", "config": {k: v for k, v in recs[0]["config"].items()
                                          if k not in ("fold", "seed", "counts", "training")}}
    if kind == "seeds":
        out["seeds"] = [r.get("seed") for r in recs]
    else:
        out["folds"] = [r.get("fold") for r in recs]
    for split in ("val", "test"):
        per = [r[split]["metrics"] for r in recs if split in r]
        if not per:
            continue
        sub = faces[faces["split"] == split]
        figures, spread = {}, {}
        for m in heads:
            figures[m] = float(sub[m].mean())
            figures[f"{m}_ci95"] = interval(sub[m].to_numpy())
            vals = [p[m] for p in per if p.get(m) is not None]
            spread[m] = float(np.std(vals, ddof=1)) if len(vals) > 1 else None  # sample std over seeds/folds
            figures[f"{m}_mean_of_{kind}"] = float(np.mean(vals)) if vals else None
        out[split] = {"n": int(len(sub)), "metrics": figures, "metrics_std": spread,
                      "per_member": per, "spread_over": kind}
    faces.to_csv(root / "faces.csv", index=False)
    base = [Path(d) / "baselines_faces.csv" for d in dirs if (Path(d) / "baselines_faces.csv").is_file()]
    if base:
        b = pd.concat([pd.read_csv(p, dtype={"image_id": str, "split": str}) for p in base], ignore_index=True)
        b.to_csv(root / "baselines_faces.csv", index=False)
        bj = [json.loads((p.parent / "baselines.json").read_text()) for p in base]
        (root / "baselines.json").write_text(json.dumps(bj[0] if kind == "seeds" else {"per_fold": bj}, indent=2))
    (root / "metrics.json").write_text(json.dumps(out, indent=2))
    if kind == "folds":
        _write_members_csv(root / "folds.csv", out, recs, "fold")
    return root


def _write_members_csv(path: Path, summary: dict, recs: list[dict], label: str) -> None:
    names = sorted({k for r in recs for k, v in r.get("test", {}).get("metrics", {}).items()
                    if isinstance(v, (int, float))})
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([label, *names])
        for r in recs:
            w.writerow([r.get(label), *[r.get("test", {}).get("metrics", {}).get(n) for n in names]])


def sweep(target: str, cats, backbone=None, features=None, manifest=None, pool: str = "avg2", echo=print) -> dict:
    """Extract every residual-unit tap (pooled to a 2x2 grid by default), train and evaluate one head on each,
    and plot the metric against depth."""
    import re

    from .backbones import Backbone
    from .compare import compare, sweep_plot
    from .extract import extract

    if not manifest:
        manifest = config.get("paths", "manifest")
    if not manifest:
        raise FeatlabError("--sweep needs --manifest M.csv (or [paths].manifest in featlab.toml)")
    backbone = backbone or config.get("extract", "backbone", "r100")
    bb = Backbone(backbone, config.get("models", backbone))
    unit = re.compile(r"^(res\d+|stage\d+_unit\d+_out)$")
    taps = [t.name for t in bb.taps if unit.match(t.name)]
    if not taps:
        raise FeatlabError(f"{backbone} has no residual-unit taps to sweep")
    rep = extract(manifest, taps, backbone=backbone, model=config.get("models", backbone), out=features, pool=pool)
    keys = [f"{t}@{pool}" if pool else t for t in taps]
    for k, d in zip(keys, train_grid(rep.out, keys, [(target, cats)], verbose=0)):  # one pass: every tap at once
        echo(f"[sweep] {k}: {d}")
    from .store import FeatureStore

    with FeatureStore.open_read(rep.out) as s:
        dataset = dataset_key(feature_set(s.attrs))
    res = compare(backbone, dataset, target=target, cats=cats)
    res.setdefault("files", []).append(sweep_plot(backbone, dataset, target=target, cats=cats, taps=keys))
    return res
