"""Layer comparison: gather every evaluated tap of one (backbone, dataset, target) and chart them.

Reads ``{results}/{backbone}/{dataset}/*/{target-name}/metrics.json`` (a single
head's evaluation, or the mean/std summary of ``--fold all``) and writes
``{results}/{backbone}/{dataset}/compare/{target-name}/layer_comparison.csv``
and ``layer_comparison.png``, taps in network order. :func:`sweep_plot` draws
one metric against tap depth (for ``--sweep``).

Network order comes from the backbone's graph when its model file can be
found; otherwise from the order of the ``taps`` attribute of the features file
each head was trained on, then by name (``res3`` before ``res10``).
No TensorFlow here.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from . import config
from .errors import FeatlabError
from .heads import target_name
from .store import parse_key

HEADLINE = {"bins": ("accuracy", "one_off"), "age": ("mae", "cs5"), "gender": ("accuracy",)}
EXTRA = {"bins": ("balanced_accuracy", "macro_f1", "mae_bin_centre"), "age": ("rmse", "cs10", "bias",
         "accuracy_bins8", "one_off_bins8", "accuracy_bins7", "accuracy_bins5"), "gender": ("balanced_accuracy",)}


def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def gather(backbone: str, dataset: str, target: str = "bins", cats=7, results_root=None) -> list[dict]:
    """One record per evaluated tap: key, metrics, metrics_std (fold summaries), n, paths."""
    tname = target_name(target, cats)
    root = Path(results_root) if results_root is not None else config.results_dir()
    base = root / backbone / dataset
    if not base.is_dir():
        raise FeatlabError(f"no results for {backbone}/{dataset} under {root} (train heads with `featlab train-head`)")
    out = []
    for d in sorted(base.iterdir()):
        f = d / tname / "metrics.json"
        if d.name == "compare" or not f.is_file():
            continue
        try:
            m = json.loads(f.read_text())
        except ValueError:
            raise FeatlabError(f"{f} is not valid JSON; evaluate that head again") from None
        n = m.get("n")
        if isinstance(n, dict):
            n = n.get("test_total")
        out.append({
            "key": d.name,
            "metrics": m.get("metrics", {}),
            "metrics_std": m.get("metrics_std") or {},
            "n": n,
            "kind": m.get("kind", "evaluation"),
            "dir": str(d / tname),
            "features": m.get("features") or (m.get("config") or {}).get("features"),
        })
    if not out:
        raise FeatlabError(f"no evaluated heads for {tname} under {base} (looked for */{tname}/metrics.json)")
    return out


def tap_positions(backbone: str, keys: list[str], features_files: list[str] = ()) -> dict[str, tuple]:
    """Sort key per tap key: (0, graph index) from the backbone's graph, else (1, position in a features
    file's taps attribute), else (2, natural name order)."""
    pos: dict[str, tuple] = {}
    try:
        from .backbones import Backbone

        index = {}
        for t in Backbone(backbone).taps:
            for name in (t.name, t.tensor, *t.aliases):
                index.setdefault(name, t.index)
        for k in keys:
            base = parse_key(k)[0]
            if base in index:
                pos[k] = (0, index[base], k)
    except Exception:  # noqa: BLE001 - model file missing, onnx missing, unknown backbone: fall back
        pass
    missing = [k for k in keys if k not in pos]
    if missing:
        order: list[str] = []
        for f in dict.fromkeys(x for x in features_files if x):
            try:
                from .store import FeatureStore

                with FeatureStore.open_read(f) as s:
                    for k, info in (s.attrs.get("taps") or {}).items():
                        for name in (k, parse_key(k)[0], (info or {}).get("tap")):
                            if name and name not in order:
                                order.append(name)
            except Exception:  # noqa: BLE001
                continue
        for k in missing:
            base = parse_key(k)[0]
            if k in order or base in order:
                pos[k] = (1, order.index(k if k in order else base), k)
            else:
                pos[k] = (2, 0, _natural(k))
    return pos


def _ordered(records: list[dict], backbone: str) -> list[dict]:
    pos = tap_positions(backbone, [r["key"] for r in records], [r["features"] for r in records])
    for r in records:
        r["position"] = pos[r["key"]][1] if pos[r["key"]][0] == 0 else None
        r["order_source"] = ("graph", "features file", "name")[pos[r["key"]][0]]
    return sorted(records, key=lambda r: (pos[r["key"]][0], pos[r["key"]][1], _natural(r["key"])))


def _out_dir(backbone, dataset, tname, results_root, out_dir) -> Path:
    if out_dir is not None:
        return Path(out_dir)
    root = Path(results_root) if results_root is not None else config.results_dir()
    return root / backbone / dataset / "compare" / tname


def compare(backbone: str, dataset: str, target: str = "bins", cats=7, results_root=None, out_dir=None) -> dict:
    """Write layer_comparison.csv/.png for every evaluated tap; returns {'csv', 'png', 'files', 'taps', 'metrics',
    'rows'} (taps in network order; rows as in the CSV)."""
    from .plots import comparison_png

    tname = target_name(target, cats)
    recs = _ordered(gather(backbone, dataset, target, cats, results_root), backbone)
    headline = list(HEADLINE[target])
    extra = [m for m in EXTRA[target] if any(m in r["metrics"] for r in recs)]
    out = _out_dir(backbone, dataset, tname, results_root, out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for r in recs:
        row = {"tap": r["key"], "position": r["position"], "n": r["n"], "kind": r["kind"]}
        for m in headline + extra:
            row[m] = r["metrics"].get(m)
            if r["metrics_std"]:
                row[f"{m}_std"] = r["metrics_std"].get(m)
        row["head_dir"] = r["dir"]
        rows.append(row)
    fields = list(dict.fromkeys(k for row in rows for k in row))
    csv_path = out / "layer_comparison.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})
    taps = [r["key"] for r in recs]
    values = {m: [r["metrics"].get(m) for r in recs] for m in headline}
    errors = None
    if any(r["metrics_std"] for r in recs):
        errors = {m: [r["metrics_std"].get(m) for r in recs] for m in headline}
    folds = " (mean ± std over folds)" if errors else ""
    png = comparison_png(taps, values, out / "layer_comparison.png",
                         title=f"{backbone} on {dataset}: {tname} heads per tap, test split{folds}", errors=errors)
    return {"csv": csv_path, "png": png, "files": [csv_path, png], "taps": taps, "metrics": headline, "rows": rows}


def sweep_plot(backbone: str, dataset: str, target: str = "bins", cats=7, metric: str | None = None,
               results_root=None, out_dir=None, taps: list[str] | None = None, reference: float | None = None,
               reference_label: str = "") -> Path:
    """``metric`` (default: accuracy, or MAE for age) against tap depth for every evaluated tap (or only
    ``taps``); writes ``sweep_{metric}.png`` and ``sweep_{metric}.csv`` next to the layer comparison.
    Depth is the graph position when the backbone's graph is available for every tap, else the rank in
    network order. ``reference`` draws a horizontal line (e.g. the backbone's zero-shot figure)."""
    from .plots import sweep_png

    tname = target_name(target, cats)
    metric = metric or ("mae" if target == "age" else "accuracy")
    recs = gather(backbone, dataset, target, cats, results_root)
    if taps is not None:
        want = set(taps)
        missing = [t for t in taps if t not in {r["key"] for r in recs}]
        if missing:
            raise FeatlabError(f"no evaluated {tname} head for tap(s) {', '.join(missing)} under {backbone}/{dataset}")
        recs = [r for r in recs if r["key"] in want]
    recs = _ordered(recs, backbone)
    if not any(metric in r["metrics"] for r in recs):
        raise FeatlabError(f"no head for {tname} reports {metric!r}")
    have_pos = all(r["position"] is not None for r in recs)
    depths = [r["position"] if have_pos else i for i, r in enumerate(recs)]
    out = _out_dir(backbone, dataset, tname, results_root, out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"sweep_{metric}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["tap", "depth", metric, "n"])
        for r, d in zip(recs, depths):
            w.writerow([r["key"], d, r["metrics"].get(metric), r["n"]])
    return sweep_png(depths, [r["key"] for r in recs], [r["metrics"].get(metric) for r in recs],
                     out / f"sweep_{metric}.png", metric,
                     title=f"{backbone} on {dataset}: {tname} {metric} by tap depth",
                     reference=reference, reference_label=reference_label)
