"""Layer comparison: every evaluated tap of one (backbone, feature set, target), chosen on validation,
reported on test with intervals, paired tests and baselines.

Reads each ``{results}/{backbone}/{dataset-key}/{tap}/{target}/`` record (a single head, or the
summary of ``--seeds N`` / ``--fold all``: ``metrics.json`` with ``val`` and ``test`` sections and
``faces.csv``) and writes ``{results}/{backbone}/{dataset-key}/compare/{target}/layer_comparison.csv``
and ``.png``, taps in network order:

- the tap is **chosen on validation** (best val accuracy, or lowest val MAE); test figures are only
  reported;
- every row has its test figure with a 95 % bootstrap interval (``ci95_low``/``ci95_high``) that
  resamples **people** (the faces' ``group``: identity or face group; a face without one is its own
  unit), with the unit, the number of units and the design effect (cluster variance / face variance)
  beside it (``unit``, ``n_units``, ``design_effect``);
- per headline metric, the paired bootstrap difference to the chosen tap on the same test faces (people
  resampled; ``diff_vs_best`` and its interval), its p-value ``p_vs_best`` and the two one-sided
  equivalence test within a stated margin (``p_equivalence``; defaults 1 point of accuracy, 0.15 years of
  MAE, :data:`featlab.scoring.uncertainty.MARGINS`), each Benjamini-Hochberg adjusted **within its family**: the
  heads (single taps and fusions) are one family, the baselines another (``family``). ``verdict`` reads
  them: ``worse``/``better`` (the difference is resolved), ``worse, within margin``/``better, within
  margin`` (resolved and also shown within the margin), ``equivalent`` (only shown to lie within the
  margin) or ``inconclusive`` (neither: "not significant" is never "equal"); other metrics' columns carry
  their name as a prefix (``one_off_verdict``);
- baselines on the same faces: the linear probe of each tap (``reader = linear``), the majority
  class / median age, and the zero-shot net (dlib-age / dlib-gender) when it was scored;
- reference rows: every network trained from pixels on the same manifest (``featlab train-cnn``,
  ``reader = cnn KEY``, family ``references``), never chosen, each with its paired test against the chosen input.

``choice.json`` names the chosen tap, the best fusion on validation, the families, the margins, the unit
and every row's verdict.

Heads whose feature sets differ (another model file, manifest, alignment, flip, pooling or dtype), or that
scored different test faces (their ``faces.csv``), are never put in one comparison: :func:`compare` refuses
with one line saying what differs. Single ``--fold K`` heads (``foldK/``) are named, with the command that
writes the summary over every fold that a comparison reads.
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

from .. import config
from ..errors import FeatlabError
from ..features.featureio import fusion_parts, is_fusion
from ..data.labels import HEADLINE, LOWER_IS_BETTER, selection_metric, target_name
from ..paths import IDENTITY_KEYS, differences, zeroshot_dir
from ..features.store import parse_key
from ..progress import Bar
from ..scoring.uncertainty import (ALPHA, MARGINS, VERDICTS, adjust_within, design_effect, interval, paired_difference,
                          unit_of, verdict)


def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _read_faces(path: Path, split: str = "test"):
    import pandas as pd

    if not path.is_file():
        return None
    df = pd.read_csv(path, dtype={"image_id": str, "split": str, "group": str})
    return df[df["split"] == split]


def discover(results_root: Path) -> list[tuple[str, str]]:
    """(backbone, dataset) pairs that have results (not the zero-shot nets' folder, not staging folders)."""
    root = Path(results_root)
    if not root.is_dir():
        return []
    return [(b.name, d.name) for b in sorted(root.iterdir()) if b.is_dir() and b.name not in ("zeroshot", "compare")
            and not b.name.startswith(".") for d in sorted(b.iterdir()) if d.is_dir() and not d.name.startswith(".")]


def results_hint(root: Path) -> str:
    """What ``root`` holds, for a message: ``results exist for B/D, ...`` (or how to make some)."""
    have = [f"{b}/{d}" for b, d in discover(root)]
    if not have:
        return "no results at all yet (train heads with `featlab train-head`, or `featlab run SPEC`)"
    return (f"results exist for {', '.join(have)} (pass them as --backbone B --dataset D)")


def gather(backbone: str, dataset: str, target: str = "bins", cats=7, results_root=None) -> list[dict]:
    """One record per evaluated tap: key, val and test figures, their spread over seeds/folds, paths."""
    tname = target_name(target, cats)
    root = Path(results_root) if results_root is not None else config.results_dir()
    base = root / backbone / dataset
    if not base.is_dir():
        raise FeatlabError(f"no results for {backbone}/{dataset} under {root}; " + results_hint(root))
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
            "uncertainty": m["test"].get("uncertainty"),  # this featlab's record: intervals already over its groups
        })
    if not out:
        raise FeatlabError(_nothing_found(base, tname))
    first = out[0]
    for r in out[1:]:
        d = differences(first["identity"], r["identity"], IDENTITY_KEYS)
        if d:
            raise FeatlabError(f"heads {first['key']} and {r['key']} under {base} come from features made differently "
                               f"({', '.join(d)}): retrain one of them, they are never compared")
    for r in out:
        r["test_ids"] = scored_faces(Path(r["dir"]))
    same_faces(out, f"heads {{a}} and {{b}} under {base}", "train them again on one features file")
    return out


def scored_faces(head_dir: Path) -> frozenset | None:
    """The image ids a record scored on test (its ``faces.csv``); None for a record without one."""
    faces = _read_faces(Path(head_dir) / "faces.csv")
    return None if faces is None else frozenset(faces["image_id"])


def same_faces(recs: list[dict], what: str, fix: str, name=lambda r: r["key"]) -> None:
    """Records are put side by side only when they scored the same test faces (``test_ids``, from
    :func:`scored_faces`; a record without faces.csv is not checked): else one line naming the first two that
    differ, ``what`` (with ``{a}`` and ``{b}``) saying where, the faces of each and how many they share."""
    have = [r for r in recs if r.get("test_ids") is not None]
    for r in have[1:]:
        a, b = have[0]["test_ids"], r["test_ids"]
        if a != b:
            raise FeatlabError(f"{what.format(a=name(have[0]), b=name(r))} scored different test faces ({len(a):,} and "
                               f"{len(b):,} faces, {len(a & b):,} of them shared): they are never put side by side; "
                               f"{fix}")


def _nothing_found(base: Path, tname: str) -> str:
    """Why no record was found under ``base``: single ``--fold K`` heads (``TAP/TARGET/foldK/``) are named, with
    the command that writes the summary over every fold that compare reads."""
    single = sorted(base.glob(f"*/{tname}/fold*/metrics.json"), key=lambda f: _natural(str(f)))
    if not single:
        return f"no evaluated heads for {tname} under {base} (looked for */{tname}/metrics.json)"
    taps: dict[str, list[str]] = {}
    for f in single:
        taps.setdefault(f.parent.parent.parent.name, []).append(f.parent.name)
    try:
        m = json.loads(single[0].read_text())
    except ValueError:
        m = {}
    features = (m.get("config") or {}).get("features") or "FEATURES.h5"
    tap = m.get("tap") or next(iter(taps))
    found = "; ".join(f"{t}: {', '.join(folds)}" for t, folds in taps.items())
    return (f"no evaluated heads for {tname} under {base}: only single-fold heads ({found}), and compare reads "
            f"the summary over every fold; write it with `featlab train-head -f {features} --layer {tap} "
            f"--target {tname} --fold all`" + (" (and so for each tap)" if len(taps) > 1 else ""))


def tap_positions(backbone: str, keys: list[str], features_files: list[str] = ()) -> dict[str, tuple]:
    """Sort key per tap key: (0, graph index) from the backbone's graph, else (1, position in a features
    file's taps attribute), else (2, natural name order); fusion heads (``a+b``) last, fewer taps first:
    (3, number of taps, natural order)."""
    pos: dict[str, tuple] = {k: (3, len(fusion_parts(k)), _natural(k)) for k in keys if is_fusion(k)}
    keys = [k for k in keys if k not in pos]
    try:
        from ..backbones.registry import Backbone

        index = {}
        for t in Backbone(backbone).taps:
            for name in (t.name, t.tensor, *t.aliases):
                index.setdefault(name, t.index)
        for k in keys:
            base = parse_key(k)[0]
            if base in index:
                pos[k] = (0, index[base], k)
    except FeatlabError:  # an unknown backbone or its model file missing: fall back; anything else is a bug
        pass
    missing = [k for k in keys if k not in pos]
    if missing:
        order: list[str] = []
        for f in dict.fromkeys(x for x in features_files if x):
            try:
                from ..features.store import FeatureStore

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
                     "metrics": r["metrics"], "metrics_std": r["metrics_std"], "kind": r["kind"],
                     "uncertainty": r.get("uncertainty")})
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
    rows += cnn_readers(recs, tname, results_root)
    return rows


def cnn_readers(recs: list[dict], tname: str, results_root) -> list[dict]:
    """Reference rows: every network trained from pixels on the heads' manifest (``featlab train-cnn``), with its
    record's val and test figures and per-face values. One trained on this manifest that scored other test faces
    (another split, other chips) stops the comparison with one line, as heads do."""
    from ..paths import cnn_records

    rows = []
    for d in cnn_records(recs[0]["identity"].get("manifest_sha256"), tname, results_root):
        m = json.loads((d / "metrics.json").read_text())
        if "test" not in m or "val" not in m:
            continue
        faces = _read_faces(d / "faces.csv")
        rows.append({"tap": m.get("head_key", d.parent.name), "reader": f"cnn {m.get('head_key', d.parent.name)}",
                     "rec": None, "dir": str(d), "faces": faces, "val": m["val"]["metrics"],
                     "metrics": m["test"]["metrics"], "metrics_std": {}, "kind": "reference",
                     "uncertainty": m["test"].get("uncertainty"),
                     "test_ids": None if faces is None else frozenset(faces["image_id"])})
    heads = [r for r in recs if r.get("test_ids") is not None][:1]
    same_faces(heads + rows, "the heads ({a}) and the network trained from pixels {b}",
               "train it again on the heads' manifest and split (featlab train-cnn -m MANIFEST)",
               name=lambda r: r.get("dir") or r["key"])
    return rows


def _with_groups(readers: list[dict]) -> None:
    """Give every reader's faces a ``group`` column: its own when its faces.csv has one, else the group the
    heads' faces.csv give the same image (baselines, older records); '' = the face is its own unit."""
    gmap: dict[str, str] = {}
    for x in readers:
        f = x["faces"]
        if f is not None and "group" in f:
            for iid, g in zip(f["image_id"], f["group"].astype(object).fillna("").astype(str)):
                if g:
                    gmap.setdefault(iid, g)
    for x in readers:
        f = x["faces"]
        if f is None:
            continue
        f = f.copy()
        own = f["group"].astype(object).fillna("").astype(str) if "group" in f else None
        mapped = f["image_id"].astype(str).map(lambda i: gmap.get(i, ""))
        f["group"] = own.where(own != "", mapped) if own is not None else mapped
        x["faces"] = f


def family_of(row: dict) -> str:
    """The multiple-testing family of a comparison row: the heads (single taps and fusions) against the
    chosen one are one family, the baselines (linear probes, majority, zero-shot) another."""
    if row["reader"] == "head":
        return "heads"
    return "references" if str(row["reader"]).startswith("cnn ") else "baselines"


def margins_for(metrics, margins: dict | None = None) -> dict:
    """Equivalence margin per headline metric (defaults :data:`featlab.scoring.uncertainty.MARGINS`)."""
    out = dict(MARGINS)
    out.update({k: float(v) for k, v in (margins or {}).items()})
    unknown = sorted(set(margins or {}) - set(MARGINS))
    if unknown:
        raise FeatlabError(f"unknown equivalence margin {', '.join(unknown)}; margins exist for {', '.join(MARGINS)}")
    return {m: out[m] for m in metrics}


def _col(m: str, sel: str, name: str) -> str:
    """Column name of a per-metric test figure: the selection metric's plain (``p_vs_best``), the others
    prefixed (``one_off_p_vs_best``)."""
    return name if m == sel else f"{m}_{name}"


def compare(backbone: str, dataset: str, target: str = "bins", cats=7, results_root=None, out_dir=None,
            margins: dict | None = None) -> dict:
    """Write layer_comparison.csv/.png and choice.json (see the module doc). Returns {'csv', 'png', 'files',
    'taps', 'metrics', 'rows', 'chosen', 'summary'}; rows as in the CSV, taps in network order."""
    tname = target_name(target, cats)
    recs = _ordered(gather(backbone, dataset, target, cats, results_root), backbone)
    chosen = choose(recs, target)
    sel = selection_metric(target)
    headline = list(HEADLINE[target])
    margin = margins_for(headline, margins)
    readers = _readers(recs, target, results_root, dataset, tname)
    _with_groups(readers)
    best_faces = next(x["faces"] for x in readers if x["reader"] == "head" and x["rec"] is chosen)
    out = _out_dir(backbone, dataset, tname, results_root, out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    bar = Bar(len(readers), f"compare {tname}: paired tests against the chosen input", "input", rate=False)
    with bar:
        for x in readers:
            rows.append(_compared_row(x, chosen, sel, headline, margin, best_faces))
            bar(1)
    return _finish_compare(rows, headline, sel, recs, chosen, out, tname, backbone, dataset, target, cats, margin)


def _compared_row(x, chosen, sel, headline, margin, best_faces) -> dict:
    """One reader's row: its test figures with intervals over people, and its paired test against the chosen
    input on the same faces."""
    r = x["rec"]
    row = {"tap": x["tap"], "reader": x["reader"], "position": r["position"] if r and x["reader"] != "majority" else "",
           "kind": x["kind"], "family": family_of(x), "chosen_on": "val",
           "chosen": bool(x["reader"] == "head" and r is chosen), f"val_{sel}": x["val"].get(sel)}
    faces = x["faces"]
    have = faces is not None and len(faces) > 0
    row["n"] = int(len(faces)) if faces is not None else None
    if have:
        row.update(unit_of(faces["group"].to_numpy(dtype=object)))
    for m in headline:
        row[m] = x["metrics"].get(m)
        stored = x.get("uncertainty") or {}
        if stored.get("unit") and x["metrics"].get(f"{m}_ci95"):
            # a head record of this featlab: its interval and design effect were computed from these very
            # faces and groups (same seed) when it was scored; not bootstrapped a second time
            ci = x["metrics"][f"{m}_ci95"]
            row[_col(m, sel, "design_effect")] = (stored.get("design_effect") or {}).get(m)
        elif have and m in faces:
            g = faces["group"].to_numpy(dtype=object)
            ci = interval(faces[m].to_numpy(), groups=g)
            row[_col(m, sel, "design_effect")] = design_effect(faces[m].to_numpy(), g)
        else:  # no per-face values: the record's own interval
            ci = x["metrics"].get(f"{m}_ci95")
        lo, hi = (ci or [None, None])
        if m == sel:
            row["ci95_low"], row["ci95_high"] = lo, hi
        else:
            row[f"{m}_ci95_low"], row[f"{m}_ci95_high"] = lo, hi
        if x["metrics_std"].get(m) is not None:
            row[f"{m}_std_over_{'seeds' if x['kind'] == 'ensemble' else x['kind']}"] = x["metrics_std"][m]
    j = None
    if have and best_faces is not None and not row["chosen"]:
        j = best_faces.merge(faces.drop(columns=["group"]), on="image_id", suffixes=("_best", ""))
        row["n_paired"] = int(len(j))
    for m in headline:
        c = lambda name: _col(m, sel, name)  # noqa: E731
        row[c("diff_vs_best")] = 0.0 if row["chosen"] else None
        row[c("p_raw")] = row[c("p_equivalence_raw")] = None
        if j is not None and len(j) and m in j and f"{m}_best" in j:
            d = paired_difference(j[m].to_numpy(), j[f"{m}_best"].to_numpy(),
                                  groups=j["group"].to_numpy(dtype=object), margin=margin[m])
            row[c("diff_vs_best")], row[c("p_raw")] = d["diff"], d["p"]
            row[c("diff_ci95_low")], row[c("diff_ci95_high")] = d["ci95"]
            row[c("p_equivalence_raw")] = d["p_equivalence"]
    row["head_dir"] = r["dir"] if r else x.get("dir", "")
    return row

def _finish_compare(rows, headline, sel, recs, chosen, out, tname, backbone, dataset, target, cats, margin) -> dict:
    """The BH families and verdicts over the rows, then layer_comparison.csv/.png and choice.json."""
    from ..scoring.plots import comparison_png

    families = [None if row["chosen"] else row["family"] for row in rows]
    for m in headline:
        c = lambda name: _col(m, sel, name)  # noqa: E731
        padj = adjust_within([row[c("p_raw")] for row in rows], families)
        eadj = adjust_within([row[c("p_equivalence_raw")] for row in rows], families)
        for row, pa, pe in zip(rows, padj, eadj):
            row[c("p_vs_best")] = None if row["chosen"] or not np.isfinite(pa) else pa
            row[c("p_equivalence")] = None if row["chosen"] or not np.isfinite(pe) else pe
            row[c("margin")] = margin[m]
            row[c("verdict")] = "chosen" if row["chosen"] else verdict(
                row[c("diff_vs_best")], row[c("p_vs_best")], row[c("p_equivalence")], m in LOWER_IS_BETTER)
    fields = list(dict.fromkeys(k for row in rows for k in row))
    csv_path = out / "layer_comparison.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})
    taps = [r["key"] for r in recs]
    seeds = (" (ensembles of seeds)" if any(r["kind"] == "ensemble" for r in recs) else
             " (mean over seeds/folds)" if any(r["metrics_std"] for r in recs) else "")
    units = {row.get("unit") for row in rows if row.get("unit")}
    unit = "person" if "person" in units else "face"
    png = comparison_png(rows, taps, headline, out / "layer_comparison.png",
                         title=f"{backbone} on {dataset}: {tname}, test split{seeds}; "
                               f"tap chosen on validation: {chosen['key']}; intervals resample "
                               + ("people (face groups, identities)" if unit == "person" else "faces"))
    fusions = [r for r in recs if is_fusion(r["key"]) and r["val"].get(sel) is not None]
    chosen_row = next(row for row in rows if row["chosen"])

    def name(row):  # `res12` for a head, `res12 linear`, `majority`, `zero-shot dlib-age` for the baselines
        if row["reader"] == "head" or str(row["reader"]).startswith("cnn "):
            return row["tap"] if row["reader"] == "head" else row["reader"]
        return f"{row['tap']} {row['reader']}".strip()

    summary = {"chosen": chosen["key"], "chosen_on": "val", "selection_metric": sel,
               "best_fusion": choose(fusions, target)["key"] if fusions else None,
               "verdicts": {v: [name(row) for row in rows if row["verdict"] == v and not row["chosen"]]
                            for v in VERDICTS[1:]},
               "unit": chosen_row.get("unit", "face"), "n_units": chosen_row.get("n_units"),
               "design_effect": chosen_row.get("design_effect"),
               "alpha": ALPHA, "margins": margin,
               "families": {f: [name(row) for row in rows if row["family"] == f and not row["chosen"]]
                            for f in ("heads", "baselines", "references")},
               "correction": "Benjamini-Hochberg within each family (heads vs the chosen head; baselines vs the "
                             "chosen head; networks trained from pixels vs the chosen head), separately for the "
                             "difference and the equivalence tests",
               "verdict_rule": "worse/better: paired bootstrap p (BH) < alpha; equivalent: two one-sided tests "
                               "(BH) < alpha that the difference lies within +-margin; both: worse/better, within "
                               "margin; otherwise inconclusive"}
    (out / "choice.json").write_text(json.dumps(summary, indent=2))
    return {"csv": csv_path, "png": png, "files": [csv_path, png], "taps": taps, "metrics": headline, "rows": rows,
            "chosen": chosen["key"], "summary": summary}


def sweep_plot(backbone: str, dataset: str, target: str = "bins", cats=7, metric: str | None = None,
               results_root=None, out_dir=None, taps: list[str] | None = None, reference: float | None = None,
               reference_label: str = "") -> Path:
    """``metric`` (default: accuracy, or MAE for age) on test against tap depth, with 95 % intervals, the
    tap chosen on validation marked; writes ``sweep_{metric}.png`` and ``.csv`` next to the comparison."""
    from ..scoring.plots import sweep_png

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
