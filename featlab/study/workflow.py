"""Train, then score: the one place that chains :mod:`featlab.heads.train` (or :mod:`featlab.heads.grid`),
:mod:`featlab.report.evaluate` and the baselines, for one head, a grid of heads, several seeds, or the fold protocol.

:func:`train_head` is what ``featlab train-head``, experiment specs and the sweep call. With
``seeds=N`` it trains N heads (``seed{S}/`` folders) and writes a summary beside them: each figure's
mean and spread over seeds (training variance) next to a bootstrap interval over faces of the
per-face mean (test-sample variance). With ``fold="all"`` it runs every fold (``fold{K}/``) and
summarises the same way, the faces of all folds pooled. :func:`train_grid` does the same for every
(tap, target) head of a grid, trained together in one pass (:mod:`featlab.heads.grid`).
"""

from __future__ import annotations

import contextlib
import csv
import json
from pathlib import Path

import numpy as np

from .. import config
from ..errors import FeatlabError
from ..data.labels import HEADLINE, format_figure
from ..paths import dataset_key, feature_set
from ..progress import Bar
from ..staging import Stage, checkpoint, keep
from ..features.store import FeatureStore
from ..scoring.uncertainty import interval


def _train_and_record(features, layer, target, cats, *, fold, seed, seed_dir, baselines, out_root, verbose,
                      **hp) -> Path:
    from ..heads.train import fit_head

    d = fit_head(features, layer, target, cats, fold=fold, seed=seed, seed_dir=seed_dir, out_root=out_root,
                 verbose=verbose, **hp)
    _record(features, d, baselines, verbose, hp.get("memory_mb", 2048))
    return d


def _record(features, d: Path, baselines: bool, verbose, memory_mb, pool=None, job=None):
    """Score a saved head on val and test (metrics.json) and fit its baselines. With ``pool`` (a grid's
    :class:`featlab.heads.probepool.ProbePool`) the baselines are fitted in the pool: returns their future (``job``
    when they were submitted before, None without baselines), for :func:`featlab.heads.baselines.write_baselines`
    to write into ``d``; the head's folder is complete once that is done."""
    from ..heads.baselines import fit_baselines, head_stats
    from ..report.evaluate import record_head
    from ..heads.model import load_head

    model, cfg = load_head(d)
    target = cfg["target"]
    with FeatureStore.reading(features) as store:
        rec = record_head(model, cfg, store, d)
        if baselines and pool is not None and job is None:  # fitted in the pool while the next heads are scored
            job = pool.submit(store, cfg, memory_mb, head_stats(d))
        elif baselines and pool is None:
            fit_baselines(store, cfg, d, memory_mb)
    if verbose:
        t = rec.get("test") or {}
        v = rec.get("val") or {}
        figs = ", ".join(f"{m} {format_figure(m, t['metrics'][m], t['metrics'].get(m + '_ci95'))}"
                         for m in HEADLINE[target] if t)
        vf = ", ".join(f"{m} {format_figure(m, v['metrics'][m])}" for m in HEADLINE[target] if v)
        print(f"[featlab] {d}: val {vf}; test {figs or 'no test rows'}")
    return job if baselines else None


def folds_of(features) -> list[int]:
    """The folds of a features file (for ``--fold all``); one line when it has none."""
    with FeatureStore.reading(features) as store:
        folds = store.labels()["fold"].to_numpy()
    have = sorted(set(int(f) for f in folds if f >= 0))
    if not have:
        raise FeatlabError("--fold all: this features file has no folds (fold is -1 for every row)")
    return have


def train_head(features, layer, target, cats=None, *, fold=None, seed: int = 0, seeds: int = 1,
               baselines: bool = True, out_root=None, verbose=1, **hp) -> Path:
    """Train and score one head (or ``seeds`` heads, or every fold with ``fold="all"``); returns the
    folder holding its record (``metrics.json`` with ``val`` and ``test`` sections). The record is
    written beside the old one and swapped in only once complete (:mod:`featlab.staging`)."""
    with Stage(out_root if out_root is not None else config.results_dir()) as st, \
            FeatureStore.reading(features) as store:  # every step of the head reads through this one opening
        d = _train_head(store, layer, target, cats, fold=fold, seed=seed, seeds=seeds, baselines=baselines,
                        out_root=st.root, verbose=verbose, **hp)
        return st.install(d)


def _train_head(features, layer, target, cats=None, *, fold=None, seed: int = 0, seeds: int = 1,
                baselines: bool = True, out_root=None, verbose=1, **hp) -> Path:
    seeds = int(seeds)
    if seeds < 1:
        raise FeatlabError(f"--seeds must be at least 1, not {seeds}")
    if fold == "all":
        dirs = [_train_head(features, layer, target, cats, fold=k, seed=seed, seeds=seeds, baselines=baselines,
                            out_root=out_root, verbose=verbose, **hp) for k in folds_of(features)]
        return summarise(dirs, "folds", dirs[0].parent)
    if seeds == 1:
        return _train_and_record(features, layer, target, cats, fold=fold, seed=seed, seed_dir=False,
                                 baselines=baselines, out_root=out_root, verbose=verbose, **hp)
    dirs = [_train_and_record(features, layer, target, cats, fold=fold, seed=s, seed_dir=True,
                              baselines=baselines and s == seed, out_root=out_root, verbose=verbose, **hp)
            for s in range(seed, seed + seeds)]
    return summarise(dirs, "seeds", dirs[0].parent, features)


def train_grid(features, layers, targets, *, fold=None, seed: int = 0, seeds: int = 1, baselines: bool = True,
               out_root=None, verbose=1, skip=(), finish=None, installed=None, **hp) -> list[Path]:
    """Train and score every (tap, target) head of ``layers`` x ``targets`` (``[(target, cats)]``): one
    :func:`featlab.heads.grid.fit_grid` per fold (every seed in its one pass: each tap read once), then each head scored on its own (``record_head``,
    baselines) and, with ``seeds`` > 1 or ``fold="all"``, summarised like :func:`train_head`. One head
    alone goes through :func:`train_head`. Returns the heads' record folders, layer-major.

    Each head's record is written beside the old one and swapped in as soon as it is complete
    (:mod:`featlab.staging`): an interruption keeps every record, old or new, whole. ``skip``: indices of
    heads trained with the others (the grid is the same, so are their partners' numbers) but neither
    scored nor installed: their finished records are kept as they are. ``finish(i, staged_folder)``
    runs on each complete record just before it is installed, ``installed(i, folder)`` just after."""
    from ..heads.grid import grid_heads

    skip = set(skip or ())
    n_new = len(set(range(len(grid_heads(layers, targets)))) - skip)
    with Stage(out_root if out_root is not None else config.results_dir()) as st:
        done: dict[int, Path] = {}

        def install(i: int, d: Path) -> None:
            if i in skip:
                return
            if finish is not None:
                finish(i, d)
            done[i] = st.install(d)
            keep("heads", f"{len(done)} of {n_new} new head records complete and installed (the others' earlier "
                          "records untouched)")
            if installed is not None:
                installed(i, done[i])

        with FeatureStore.reading(features) as store:  # the grid, its records and probes read through one opening
            staged = _train_grid(store, layers, targets, fold=fold, seed=seed, seeds=seeds, baselines=baselines,
                                 out_root=st.root, verbose=verbose, skip=skip, install=install, **hp)
        return [done.get(i) or st.final(d) for i, d in enumerate(staged)]


def _train_grid(features, layers, targets, *, fold=None, seed: int = 0, seeds: int = 1, baselines: bool = True,
                out_root=None, verbose=1, skip=frozenset(), install=None, **hp) -> list[Path]:
    from ..heads.grid import fit_grid, grid_heads

    seeds = int(seeds)
    if seeds < 1:
        raise FeatlabError(f"--seeds must be at least 1, not {seeds}")
    heads = grid_heads(layers, targets)
    install = install or (lambda i, d: None)
    if len(heads) == 1:
        layer, t, c = heads[0]
        d = _train_head(features, layer, t, c, fold=fold, seed=seed, seeds=seeds, baselines=baselines,
                        out_root=out_root, verbose=verbose, **hp)
        install(0, d)
        return [d]
    if fold == "all":
        per_fold = [_train_grid(features, layers, targets, fold=k, seed=seed, seeds=seeds, baselines=baselines,
                                out_root=out_root, verbose=verbose, **hp) for k in folds_of(features)]
        dirs = []
        for i in range(len(heads)):
            dirs.append(summarise([f[i] for f in per_fold], "folds", per_fold[0][i].parent))
            install(i, dirs[-1])
        return dirs
    from ..heads.baselines import write_baselines
    from ..heads.probepool import ProbePool

    waiting: list = []  # (head, folder, baselines' future or None), in order; seeds == 1: installed once done

    def finish(i: int, d: Path, job) -> None:
        if job is not None:
            write_baselines(d, job.result())
        if seeds == 1:
            install(i, d)
        bar(1)

    def settle(block: bool) -> None:
        while waiting and (block or waiting[0][2] is None or waiting[0][2].done()):
            finish(*waiting.pop(0))

    # the heads' linear probes read, standardise and factor each tap once (ProbeCache) and are fitted in the
    # pool's threads from the moment the grid has trained, while this thread saves and scores the heads (not
    # while it trains: TensorFlow's threads slowed 2x beside one probe thread on 2 cores)
    memory_mb = hp.get("memory_mb", 2048)
    n_records = sum(1 for s in range(seeds) for i in range(len(heads)) if not (seeds == 1 and i in skip))
    # entered once the first grid has trained (the grid shows its own epochs before)
    bar = Bar(n_records, "score heads" + (", fit linear probes" if baselines else ""), "head", rate=False)
    with ProbePool() as pool, contextlib.ExitStack() as shown:
        try:
            early: dict = {}

            def trained(i, store, cfg, stats):  # the first seed's heads: the baselines do not depend on the seed
                if baselines and not (seeds == 1 and i in skip):
                    early[i] = pool.submit(store, cfg, memory_mb, stats, wait=False)

            # every seed in one pass of the grid: each group's taps read once for all seeds
            per_seed = fit_grid(features, layers, targets, fold=fold, seeds=list(range(seed, seed + seeds)),
                                seed_dir=seeds > 1, out_root=out_root, verbose=verbose, trained=trained, **hp)
            shown.enter_context(bar)
            for k, dirs in enumerate(per_seed):
                for i, d in enumerate(dirs):
                    if seeds == 1 and i in skip:
                        continue  # a finished record is kept as it is: no need to score its twin
                    checkpoint("record")
                    waiting.append((i, d, _record(features, d, baselines and k == 0, verbose, memory_mb, pool,
                                                  early.get(i) if k == 0 else None)))
                    settle(block=False)
            settle(block=True)
        except BaseException:
            # interrupted (or failed): the probes not yet started are dropped; the heads whose record is
            # complete, baselines included, are still installed, in order, until the first that is not
            pool.stop_queued()
            for _, _, job in waiting:
                if job is not None and not job.cancelled():
                    try:
                        job.result()
                    except BaseException:  # noqa: BLE001 - its own error; the first one is re-raised below
                        pass
            for i, d, job in waiting:
                if job is not None and (job.cancelled() or job.exception() is not None):
                    break
                finish(i, d, job)
            raise
    if seeds == 1:
        return per_seed[0]
    dirs = []
    for i in range(len(heads)):
        dirs.append(summarise([p[i] for p in per_seed], "seeds", per_seed[0][i].parent, features))
        install(i, dirs[-1])
    return dirs


ENSEMBLE_RULE = ("the mean of the seeds' predictions: class probabilities averaged, the class their argmax (bins, "
                 "gender); predicted ages averaged (age)")


def ensemble_predictions(dirs: list[Path], store, rows: np.ndarray) -> tuple[dict, list[dict]]:
    """(the ensemble's prediction, each seed head's) on ``rows`` of the open features file: the mean of the
    seeds' predicted probabilities (class: their argmax) or predicted ages (:data:`ENSEMBLE_RULE`)."""
    from ..heads.model import load_head, predict_rows

    per = []
    for d in dirs:
        model, cfg = load_head(d)
        per.append(predict_rows(model, cfg, store, rows))
    if "proba" in per[0]:
        proba = np.mean([p["proba"] for p in per], axis=0)
        return {"pred": proba.argmax(axis=1).astype(np.int64), "proba": proba}, per
    return {"pred": np.mean([p["pred"] for p in per], axis=0)}, per


def _ensemble(dirs: list[Path], store, root: Path, out: dict) -> dict:
    """Score the seeds' ensemble on the val and test rows of their records and write its files into ``root``
    (``faces.csv``, confusion or scatter, subgroups, predictions) as a head's; returns the scored sections."""
    from ..data.labels import encode_target, split_rows
    from ..scoring.scores import score_predictions, write_scored

    cfg = json.loads((Path(dirs[0]) / "config.json").read_text())
    labels = store.labels()
    y_all, valid = encode_target(labels, cfg["target"], cfg.get("cats"))
    sp = split_rows(labels, valid, cfg.get("fold"), float(cfg.get("hyperparameters", {}).get("val_share", 0.1)))

    def score(split):
        rows = sp[split]
        if not len(rows):
            return None
        pred, per = ensemble_predictions(dirs, store, rows)
        if split == "val":  # the val figure of the ensemble of the first n seeds, n = 1..N: how many are enough
            out["ensemble_val_curve"] = _prefix_curve(cfg["target"], y_all[rows], per)
        return score_predictions(cfg["target"], cfg.get("cats"), y_all[rows], pred, labels.iloc[rows],
                                 cfg.get("class_names"))

    sections, _ = write_scored(root, cfg, score, cfg.get("head_key", cfg["tap"]) + f" (ensemble of {len(dirs)} seeds)")
    return sections


def _prefix_curve(target: str, y: np.ndarray, per: list[dict]) -> list[dict]:
    """[{n, figure}] for the ensembles of the first n seeds: val accuracy (bins, gender) or MAE (age)."""
    from ..data.labels import selection_metric

    m = selection_metric(target)
    out = []
    for n in range(1, len(per) + 1):
        if "proba" in per[0]:
            v = float((np.mean([p["proba"] for p in per[:n]], axis=0).argmax(axis=1) == y).mean())
        else:
            v = float(np.abs(np.mean([p["pred"] for p in per[:n]], axis=0) - y).mean())
        out.append({"n": n, m: v})
    return out


def summarise(dirs: list[Path], kind: str, root: Path, store=None) -> Path:
    """Write ``root/metrics.json`` and ``root/faces.csv`` over several heads' records: for ``seeds`` with the
    open features file ``store``, the seeds' **ensemble** (:func:`ensemble_predictions`) scored like a head (its
    figures, intervals, faces.csv and confusion; ``kind: ensemble``), the seeds' spread beside it; for ``seeds``
    without it the per-face mean over seeds (same faces); for ``folds`` the faces of every fold together; each
    headline figure from those faces with its interval, plus mean and std of the per-head figures."""
    import pandas as pd

    from ..scoring.scores import uncertainty_note

    recs = [json.loads((Path(d) / "metrics.json").read_text()) for d in dirs]
    target = recs[0]["target"]
    heads = HEADLINE[target]
    frames = []
    for i, d in enumerate(dirs):
        f = pd.read_csv(Path(d) / "faces.csv", dtype={"image_id": str, "split": str, "group": str})
        f["member"] = i
        frames.append(f)
    faces = pd.concat(frames, ignore_index=True)
    if "group" not in faces:  # records from before faces.csv carried the group: every face its own unit
        faces["group"] = ""
    faces["group"] = faces["group"].astype(object).fillna("").astype(str)
    if kind == "seeds":
        faces = faces.groupby(["image_id", "split", "group"], sort=False, as_index=False)[list(heads)].mean()
    faces = faces[["image_id", "split", "group", *heads]]
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
    scored = None
    if kind == "seeds" and store is not None:
        with FeatureStore.reading(store) as st:
            scored = _ensemble(dirs, st, root, out)
        out["kind"] = "ensemble"
        out["ensemble"] = {"members": len(dirs), "rule": ENSEMBLE_RULE,
                           "note": "val and test figures, intervals and faces.csv are the ensemble's; metrics_std is "
                                   "the spread of the single seeds' figures, *_mean_of_seeds their mean"}
    for split in ("val", "test"):
        per = [r[split]["metrics"] for r in recs if split in r]
        if not per:
            continue
        sub = faces[faces["split"] == split]
        groups = sub["group"].to_numpy(dtype=object)
        figures, spread = {}, {}
        for m in heads:
            if scored is not None:
                figures[m] = scored[split]["metrics"][m]
                figures[f"{m}_ci95"] = scored[split]["metrics"][f"{m}_ci95"]
            else:
                figures[m] = float(sub[m].mean())
                figures[f"{m}_ci95"] = interval(sub[m].to_numpy(), groups=groups)
            vals = [p[m] for p in per if p.get(m) is not None]
            spread[m] = float(np.std(vals, ddof=1)) if len(vals) > 1 else None  # sample std over seeds/folds
            figures[f"{m}_mean_of_{kind}"] = float(np.mean(vals)) if vals else None
        if scored is not None:
            s = scored[split]
            out[split] = {"n": s["n"], "metrics": {**s["metrics"], **figures}, "metrics_std": spread,
                          "uncertainty": s["uncertainty"], "report": s["report"], "per_member": per,
                          "spread_over": kind}
            continue
        out[split] = {"n": int(len(sub)), "metrics": figures, "metrics_std": spread,
                      "uncertainty": uncertainty_note({m: sub[m].to_numpy() for m in heads}, groups, heads),
                      "per_member": per, "spread_over": kind}
    if scored is None:
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


def train_cnn(manifest, target: str, cats=None, *, fold=None, out_root=None, **kw) -> Path:
    """:func:`featlab.heads.cnntrain.train_cnn`, and with ``fold="all"`` the Adience protocol: one CNN per fold of
    the manifest (``fold{K}/``, each resumable), then their summary beside them (every fold's test faces
    together, as ``--fold all`` heads), which compare reads."""
    from ..heads.cnntrain import train_cnn as fit

    if fold != "all":
        return fit(manifest, target, cats, fold=fold, out_root=out_root, **kw)
    from ..data.manifest import read_manifest

    folds = sorted({int(f) for f in read_manifest(manifest)["fold"].dropna() if int(f) >= 0})
    if not folds:
        raise FeatlabError(f"--fold all: {Path(manifest).name} has no folds (its fold column is empty)")
    dirs = [fit(manifest, target, cats, fold=k, out_root=out_root, **kw) for k in folds]
    return summarise(dirs, "folds", dirs[0].parent)


def sweep(target: str, cats, backbone=None, features=None, manifest=None, pool: str = "avg2", echo=print) -> dict:
    """Extract every residual-unit tap (pooled to a 2x2 grid by default), train and evaluate one head on each,
    and plot the metric against depth."""
    import re

    from ..backbones.registry import Backbone
    from ..report.compare import compare, sweep_plot
    from ..features.extract import extract

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
    from ..features.store import FeatureStore

    with FeatureStore.open_read(rep.out) as s:
        dataset = dataset_key(feature_set(s.attrs))
    res = compare(backbone, dataset, target=target, cats=cats)
    res.setdefault("files", []).append(sweep_plot(backbone, dataset, target=target, cats=cats, taps=keys))
    return res
