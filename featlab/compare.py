"""Layer comparison: every evaluated tap of one (backbone, feature set, target), chosen on validation,
reported on test with intervals, paired tests and baselines.

Reads each ``{results}/{backbone}/{dataset-key}/{tap}/{target}/`` record (a single head, or the
summary of ``--seeds N`` / ``--fold all``: ``metrics.json`` with ``val`` and ``test`` sections and
``faces.csv``) and writes ``{results}/{backbone}/{dataset-key}/compare/{target}/layer_comparison.csv``
and ``.png``, taps in network order:

- the tap is **chosen on validation** (best val accuracy, or lowest val MAE); test figures are only
  reported;
- every row has its test figure with a 95 % bootstrap interval (``ci95_low``/``ci95_high``), the
  paired bootstrap difference to the chosen tap on the same test faces (``diff_vs_best``, its
  interval) and ``p_vs_best``, Benjamini-Hochberg adjusted over all rows; ``indistinguishable`` marks
  rows whose adjusted p is >= 0.05: no winner among those;
- baselines on the same faces: the linear probe of each tap (``reader = linear``), the majority
  class / median age, and the zero-shot net (dlib-age / dlib-gender) when it was scored.

Heads whose feature sets differ (another model file, manifest, alignment, flip, pooling or dtype) are
never put in one comparison: :func:`compare` refuses with one line saying what differs.
Network order comes from the backbone's graph when its model file can be found; otherwise from the
order of the ``taps`` attribute of the features file each head was trained on, then by name.
No TensorFlow here.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np

from . import config
from .errors import FeatlabError
from .featureio import fusion_parts, is_fusion
from .labels import HEADLINE, LOWER_IS_BETTER, selection_metric, target_name
from .paths import IDENTITY_KEYS, differences, zeroshot_dir
from .store import parse_key
from .uncertainty import adjust, interval, paired_difference

ALPHA = 0.05


def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _read_faces(path: Path, split: str = "test"):
    import pandas as pd

    if not path.is_file():
        return None
    df = pd.read_csv(path, dtype={"image_id": str, "split": str})
    return df[df["split"] == split]


def gather(backbone: str, dataset: str, target: str = "bins", cats=7, results_root=None) -> list[dict]:
    """One record per evaluated tap: key, val and test figures, their spread over seeds/folds, paths."""
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
            raise FeatlabError(f"{f} is not valid JSON; train that head again") from None
        if "test" not in m or "val" not in m:
            raise FeatlabError(f"{f} has no val and test sections (made by an older featlab): train that head again")
        out.append({
            "key": d.name,
            "val": m["val"]["metrics"],
            "metrics": m["test"]["metrics"],
            "metrics_std": m["test"].get("metrics_std") or {},
            "n": m["test"]["n"],
            "kind": m.get("kind", "head"),
            "dir": str(d / tname),
            "identity": m.get("feature_set") or {},
            "features": (m.get("config") or {}).get("features"),
        })
    if not out:
        raise FeatlabError(f"no evaluated heads for {tname} under {base} (looked for */{tname}/metrics.json)")
    first = out[0]
    for r in out[1:]:
        d = differences(first["identity"], r["identity"], IDENTITY_KEYS)
        if d:
            raise FeatlabError(f"heads {first['key']} and {r['key']} under {base} come from features made differently "
                               f"({', '.join(d)}): retrain one of them, they are never compared")
    return out


def tap_positions(backbone: str, keys: list[str], features_files: list[str] = ()) -> dict[str, tuple]:
    """Sort key per tap key: (0, graph index) from the backbone's graph, else (1, position in a features
    file's taps attribute), else (2, natural name order); fusion heads (``a+b``) last, fewer taps first:
    (3, number of taps, natural order)."""
    pos: dict[str, tuple] = {k: (3, len(fusion_parts(k)), _natural(k)) for k in keys if is_fusion(k)}
    keys = [k for k in keys if k not in pos]
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
        r["order_source"] = ("graph", "features file", "name", "fusion")[pos[r["key"]][0]]
    return sorted(records, key=lambda r: (pos[r["key"]][0], pos[r["key"]][1], _natural(r["key"])))


def _out_dir(backbone, dataset, tname, results_root, out_dir) -> Path:
    if out_dir is not None:
        return Path(out_dir)
    root = Path(results_root) if results_root is not None else config.results_dir()
    return root / backbone / dataset / "compare" / tname


def _better(m: str, a: float, b: float) -> bool:
    return a < b if m in LOWER_IS_BETTER else a > b


def choose(recs: list[dict], target: str) -> dict:
    """The record with the best validation figure (accuracy, or MAE for age); ties go to the earlier tap."""
    m = selection_metric(target)
    best = None
    for r in recs:
        v = r["val"].get(m)
        if v is not None and (best is None or _better(m, v, best["val"][m])):
            best = r
    if best is None:
        raise FeatlabError(f"no head has a validation {m}")
    return best


def _readers(recs: list[dict], target: str, results_root, dataset: str, tname: str) -> list[dict]:
    """Rows of the comparison: each tap's head, each tap's linear probe, the majority baseline (once), the
    zero-shot net (when scored); each with its per-face test values."""
    import pandas as pd

    rows = []
    majority = None
    for r in recs:
        faces = _read_faces(Path(r["dir"]) / "faces.csv")
        rows.append({"tap": r["key"], "reader": "head", "rec": r, "faces": faces, "val": r["val"],
                     "metrics": r["metrics"], "metrics_std": r["metrics_std"], "kind": r["kind"]})
        bf = Path(r["dir"]) / "baselines_faces.csv"
        if bf.is_file():
            b = pd.read_csv(bf, dtype={"image_id": str, "split": str})
            bj = json.loads((Path(r["dir"]) / "baselines.json").read_text())
            for name in ("linear", "majority"):
                sub = b[(b["baseline"] == name) & (b["split"] == "test")]
                if not len(sub) or (name == "majority" and majority is not None):
                    continue
                val = b[(b["baseline"] == name) & (b["split"] == "val")]
                row = {"tap": r["key"] if name == "linear" else "", "reader": name, "rec": r, "faces": sub,
                       "val": {m: float(val[m].mean()) for m in HEADLINE[target]} if len(val) else {},
                       "metrics": {m: float(sub[m].mean()) for m in HEADLINE[target]}, "metrics_std": {},
                       "kind": "baseline", "settings": (bj.get(name) or {}).get("settings")}
                rows.append(row)
                if name == "majority":
                    majority = row
    zf = zeroshot_dir(recs[0]["identity"], tname, results_root) / "faces.csv"  # same feature set and manifest only
    if zf.is_file():
        z = _read_faces(zf)
        zj = json.loads((zf.parent / "metrics.json").read_text())
        val = _read_faces(zf, "val")
        rows.append({"tap": "", "reader": f"zero-shot {zj.get('net')}", "rec": None, "faces": z,
                     "val": {m: float(val[m].mean()) for m in HEADLINE[target]} if val is not None and len(val) else {},
                     "metrics": {m: float(z[m].mean()) for m in HEADLINE[target]}, "metrics_std": {},
                     "kind": "baseline"})
    return rows


def compare(backbone: str, dataset: str, target: str = "bins", cats=7, results_root=None, out_dir=None) -> dict:
    """Write layer_comparison.csv/.png (see the module doc). Returns {'csv', 'png', 'files', 'taps',
    'metrics', 'rows', 'chosen'}; rows as in the CSV, taps in network order."""
    from .plots import comparison_png

    tname = target_name(target, cats)
    recs = _ordered(gather(backbone, dataset, target, cats, results_root), backbone)
    chosen = choose(recs, target)
    sel = selection_metric(target)
    headline = list(HEADLINE[target])
    readers = _readers(recs, target, results_root, dataset, tname)
    best_faces = next(x["faces"] for x in readers if x["reader"] == "head" and x["rec"] is chosen)
    out = _out_dir(backbone, dataset, tname, results_root, out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for x in readers:
        r = x["rec"]
        row = {"tap": x["tap"], "reader": x["reader"], "position": r["position"] if r and x["reader"] != "majority" else "",
               "kind": x["kind"], "chosen_on": "val", "chosen": bool(x["reader"] == "head" and r is chosen),
               f"val_{sel}": x["val"].get(sel)}
        faces = x["faces"]
        row["n"] = int(len(faces)) if faces is not None else None
        for m in headline:
            row[m] = x["metrics"].get(m)
            ci = x["metrics"].get(f"{m}_ci95") or (
                interval(faces[m].to_numpy()) if faces is not None and len(faces) else None)
            lo, hi = (ci or [None, None])
            if m == sel:
                row["ci95_low"], row["ci95_high"] = lo, hi
            else:
                row[f"{m}_ci95_low"], row[f"{m}_ci95_high"] = lo, hi
            if x["metrics_std"].get(m) is not None:
                row[f"{m}_std_over_{x['kind']}"] = x["metrics_std"][m]
        diff, p = None, None
        if faces is not None and best_faces is not None and not row["chosen"]:
            j = best_faces.merge(faces, on="image_id", suffixes=("_best", ""))
            if len(j):
                d = paired_difference(j[sel].to_numpy(), j[f"{sel}_best"].to_numpy())
                diff, p = d["diff"], d["p"]
                row["diff_ci95_low"], row["diff_ci95_high"] = d["ci95"]
                row["n_paired"] = int(len(j))
        row["diff_vs_best"] = diff if not row["chosen"] else 0.0
        row["p_raw"] = p
        row["head_dir"] = r["dir"] if r else ""
        rows.append(row)
    padj = adjust([np.nan if row["p_raw"] is None else row["p_raw"] for row in rows])
    for row, pa in zip(rows, padj):
        row["p_vs_best"] = None if row["chosen"] or not np.isfinite(pa) else pa
        row["indistinguishable"] = bool(row["chosen"] or (row["p_vs_best"] is not None and row["p_vs_best"] >= ALPHA))
    fields = list(dict.fromkeys(k for row in rows for k in row))
    csv_path = out / "layer_comparison.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})
    taps = [r["key"] for r in recs]
    seeds = " (mean over seeds/folds)" if any(r["metrics_std"] for r in recs) else ""
    png = comparison_png(rows, taps, headline, out / "layer_comparison.png",
                         title=f"{backbone} on {dataset}: {tname}, test split{seeds}; "
                               f"tap chosen on validation: {chosen['key']}")
    fusions = [r for r in recs if is_fusion(r["key"]) and r["val"].get(sel) is not None]
    summary = {"chosen": chosen["key"], "chosen_on": "val", "selection_metric": sel,
               "best_fusion": choose(fusions, target)["key"] if fusions else None,
               "indistinguishable_from_chosen": [row["tap"] for row in rows if row["reader"] == "head"
                                                 and row["indistinguishable"] and not row["chosen"]],
               "alpha": ALPHA, "correction": "Benjamini-Hochberg over every row"}
    (out / "choice.json").write_text(json.dumps(summary, indent=2))
    return {"csv": csv_path, "png": png, "files": [csv_path, png], "taps": taps, "metrics": headline, "rows": rows,
            "chosen": chosen["key"], "summary": summary}


def sweep_plot(backbone: str, dataset: str, target: str = "bins", cats=7, metric: str | None = None,
               results_root=None, out_dir=None, taps: list[str] | None = None, reference: float | None = None,
               reference_label: str = "") -> Path:
    """``metric`` (default: accuracy, or MAE for age) on test against tap depth, with 95 % intervals, the
    tap chosen on validation marked; writes ``sweep_{metric}.png`` and ``.csv`` next to the comparison."""
    from .plots import sweep_png

    tname = target_name(target, cats)
    metric = metric or selection_metric(target)
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
    chosen = choose(recs, target)["key"]
    have_pos = all(r["position"] is not None for r in recs)
    depths = [r["position"] if have_pos else i for i, r in enumerate(recs)]
    out = _out_dir(backbone, dataset, tname, results_root, out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"sweep_{metric}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["tap", "depth", f"val_{metric}", metric, "ci95_low", "ci95_high", "n", "chosen_on_val"])
        for r, d in zip(recs, depths):
            ci = r["metrics"].get(f"{metric}_ci95") or [None, None]
            w.writerow([r["key"], d, r["val"].get(metric), r["metrics"].get(metric), ci[0], ci[1], r["n"],
                        r["key"] == chosen])
    return sweep_png(depths, [r["key"] for r in recs], [r["metrics"].get(metric) for r in recs],
                     out / f"sweep_{metric}.png", metric,
                     title=f"{backbone} on {dataset}: {tname} {metric} by tap depth (test; chosen on val: {chosen})",
                     reference=reference, reference_label=reference_label,
                     intervals=[r["metrics"].get(f"{metric}_ci95") for r in recs],
                     chosen=[r["key"] == chosen for r in recs])
