"""Networks compared side by side on the same faces (``featlab compare --backbone A --backbone B``).

For one target, reads every evaluated head of each network (``{results}/{network}/{dataset-key}/*/{target}``,
as :func:`featlab.report.compare.gather` does) and the cross-file fusion heads of those networks
(``{results}/{A}+{B}/...``, :mod:`featlab.features.join`), and writes
``{results}/compare/{A}+{B}/{dataset-key of A}/{target}/``:

- ``network_comparison.csv``: one row per head: network, tap, **relative depth** (0 = input, 1 =
  embedding: the tap's ``depth`` in its features file; when the file records none, its rank among the
  file's taps in network order, index / (n - 1), and ``depth_source`` says so), the validation figure, the test
  figures with their 95 % intervals (people resampled), and whether it is its network's choice;
- ``network_tests.csv``: paired tests on the same test faces between the networks' inputs **chosen on
  validation** (each network its own choice, as ``featlab compare`` makes it) and the best cross-file
  fusion on validation: every pair, ``diff`` = second minus first with its paired bootstrap interval over
  face groups, ``p`` and the equivalence test within the margin, Benjamini-Hochberg adjusted over the
  pairs (one family per metric), and the verdict of the second against the first
  (better/worse, ``, within margin`` when the equivalence test passes too, equivalent, inconclusive);
- ``network_comparison.png``: the headline metrics against relative depth, one line per network with its
  intervals, its choice marked, fusion heads at the right;
- ``network_comparison.json``: the choices, the tests, the unit, the margins and the depth note.

Networks trained from pixels on the same manifest (``featlab train-cnn``) join as reference rows (network
``cnn``, right of depth 1) and as contenders in the paired tests; they are never a network's choice.

Networks of different manifests (``manifest_sha256``), or whose heads scored different test faces, are refused
with one line. No TensorFlow here.
"""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import numpy as np

from .. import config
from ..errors import FeatlabError
from ..features.featureio import is_fusion
from ..data.labels import HEADLINE, LOWER_IS_BETTER, selection_metric, target_name
from ..paths import FUSION
from .compare import _ordered, _read_faces, choose, gather, margins_for, same_faces
from ..scoring.format import format_diff, format_p
from ..scoring.uncertainty import ALPHA, adjust_within, paired_difference, unit_of, verdict


def _datasets_with(root: Path, backbone: str, tname: str) -> list[str]:
    base = root / backbone
    if not base.is_dir():
        return []
    return [d.name for d in sorted(base.iterdir()) if d.is_dir() and not d.name.startswith(".")
            and any((t / tname / "metrics.json").is_file() for t in d.iterdir() if t.is_dir())]


def resolve_dataset(root: Path, backbone: str, tname: str, dataset: str | None) -> str:
    if dataset:
        return dataset
    found = _datasets_with(root, backbone, tname)
    if len(found) == 1:
        return found[0]
    if not found:
        raise FeatlabError(f"no evaluated {tname} heads of network {backbone} under {root}")
    raise FeatlabError(f"network {backbone} has {tname} results for several feature sets ({', '.join(found)}): "
                       "give --dataset once per --backbone, in the same order")


def _depths(recs: list[dict], backbone: str) -> dict:
    """{key: (relative depth, source)} for the single taps of one network's records (fusions: none): the tap's
    ``depth`` in its features file (0 = input, 1 = embedding); where the file records none, the tap's rank
    among the file's taps in network order, index / (n - 1) (source ``rank``); a tap the file does not list
    (a moved file): its rank among the compared taps."""
    from ..features.store import FeatureStore, parse_key
    from .compare import tap_positions

    single = [r for r in recs if not is_fusion(r["key"])]
    recorded, rank = {}, {}
    for f in dict.fromkeys(r.get("features") for r in single if r.get("features")):
        try:
            with FeatureStore.open_read(f) as s:
                taps = s.attrs.get("taps") or {}
        except Exception:  # noqa: BLE001 - a moved features file: fall back to the rank
            continue
        pos = tap_positions(backbone, list(taps), [f])
        order = sorted(taps, key=lambda k: pos[k])
        for i, k in enumerate(order):
            for name in (k, parse_key(k)[0]):
                if (taps[k] or {}).get("depth") is not None:
                    recorded.setdefault(name, float(taps[k]["depth"]))
                rank.setdefault(name, i / (len(order) - 1) if len(order) > 1 else 1.0)
    out = {}
    n = len(single)
    for i, r in enumerate(single):
        base = r["key"].split("~")[0]
        base = base[:-4] if base.endswith(".f32") else base
        if base in recorded:
            out[r["key"]] = (recorded[base], "features file")
        elif base in rank:
            out[r["key"]] = (rank[base], "rank")
        else:
            out[r["key"]] = (i / (n - 1) if n > 1 else 1.0, "rank")
    return out


def _fusion_networks(root: Path, networks: list[str], tname: str) -> list[tuple[str, str]]:
    """(folder, dataset) of the cross-file fusion results of two or more of ``networks``."""
    out = []
    if not root.is_dir():
        return out
    for b in sorted(root.iterdir()):
        parts = b.name.split(FUSION)
        if b.is_dir() and len(parts) > 1 and set(parts) <= set(networks):
            out += [(b.name, d) for d in _datasets_with(root, b.name, tname)]
    return out


def compare_networks(networks: list[str], datasets: list[str | None] | None = None, target: str = "bins", cats=7,
                     results_root=None, out_dir=None, margins: dict | None = None, labels: list[str] | None = None,
                     fusions: list[tuple[str, str]] | None = None) -> dict:
    """Write the cross-network comparison of ``networks`` (result folders: backbones) for one target (see the
    module doc). ``datasets``: one dataset key, or one per network [each network's only one]; a backbone may
    come twice with two datasets (SFace with two preprocessings). ``labels``: the networks' names in the
    table [the backbone; ``backbone/dataset`` when a backbone comes twice]. ``fusions``: the cross-file fusion
    results as (folder, dataset) [every ``A+B`` folder of these backbones]. Returns {'rows', 'tests', 'choices',
    'best_fusion', 'summary', 'files', 'csv', 'png', 'metrics', 'target_name', 'out_dir'}."""
    networks = list(networks)
    if len(networks) < 2:
        raise FeatlabError("a cross-network comparison needs two or more --backbone")
    datasets = list(datasets or [])
    if datasets and len(datasets) not in (1, len(networks)):
        raise FeatlabError(f"give --dataset once, or once per --backbone ({len(networks)}), not {len(datasets)} times")
    tname = target_name(target, cats)
    root = Path(results_root) if results_root is not None else config.results_dir()
    sel = selection_metric(target)
    headline = list(HEADLINE[target])
    margin = margins_for(headline, margins)
    entries = []
    for i, net in enumerate(networks):
        ds = datasets[i] if len(datasets) == len(networks) else (datasets[0] if datasets else None)
        entries.append((net, resolve_dataset(root, net, tname, ds)))
    if len(set(entries)) != len(entries):
        raise FeatlabError(f"network {next(e for e in entries if entries.count(e) > 1)[0]} given twice with the same "
                           "feature set")
    if labels is None:
        labels = [n if [e[0] for e in entries].count(n) == 1 else f"{n}/{d}" for n, d in entries]
    nets = []
    for (net, ds), lab in zip(entries, labels):
        recs = _ordered(gather(net, ds, target, cats, root), net)
        nets.append({"network": lab, "backbone": net, "dataset": ds, "recs": recs, "chosen": choose(recs, target)})
    shas = {n["network"]: n["recs"][0]["identity"].get("manifest_sha256") for n in nets}
    if len(set(shas.values())) > 1:
        what = ", ".join(f"{k}: {str(v)[:12]}…" for k, v in shas.items())
        raise FeatlabError(f"networks compared side by side must be of one manifest; these differ ({what})")
    fusion_recs = []
    for folder, ds in (_fusion_networks(root, networks, tname) if fusions is None else fusions):
        for r in gather(folder, ds, target, cats, root):
            if r["identity"].get("manifest_sha256") in (None, *shas.values()):
                fusion_recs.append({**r, "network": folder, "dataset": ds})
    same_faces([dict(n["recs"][0], network=n["network"]) for n in nets] + fusion_recs, "networks compared side by "
               "side must have scored the same faces; {a} and {b}", "give every network the same faces (one manifest, "
               "the same images extracted)", name=lambda r: f"{r['network']}:{r['key']}")
    best_fusion = choose(fusion_recs, target) if fusion_recs else None

    rows, faces = [], {}
    depth_sources = set()

    def add(network, ds, r, depth, source, chosen):
        f = _read_faces(Path(r["dir"]) / "faces.csv")
        name = f"{network}:{r['key']}" if not is_fusion(r["key"]) or FUSION not in network else r["key"]
        row = {"network": network, "dataset": ds, "tap": r["key"], "name": name, "depth": depth,
               "depth_source": source, "fusion": is_fusion(r["key"]), "chosen_in_network": chosen,
               f"val_{sel}": r["val"].get(sel), "n": r["n"], "head_dir": r["dir"]}
        if f is not None and "group" in f:
            row.update(unit_of(f["group"].astype(object).fillna("").astype(str).to_numpy(dtype=object)))
        for m in headline:
            row[m] = r["metrics"].get(m)
            ci = r["metrics"].get(f"{m}_ci95") or [None, None]
            row[f"{m}_ci95_low"], row[f"{m}_ci95_high"] = ci
        rows.append(row)
        faces[name] = f
        return row

    for n in nets:
        depth = _depths(n["recs"], n["backbone"])
        for r in n["recs"]:
            d, src = depth.get(r["key"], (None, "fusion"))
            if d is not None:
                depth_sources.add(src)
            add(n["network"], n["dataset"], r, d, src, r is n["chosen"])
    for r in fusion_recs:
        add(r["network"], r["dataset"], r, None, "cross-file fusion", r is best_fusion)

    from .compare import cnn_readers

    references = []  # networks trained from pixels on the same manifest: contenders, never chosen
    for c in cnn_readers(nets[0]["recs"], tname, root):
        references.append(add("cnn", "", {"key": c["tap"], "dir": c["dir"], "val": c["val"], "metrics": c["metrics"],
                                          "n": len(c["faces"]) if c["faces"] is not None else None},
                              None, "trained from pixels", False))

    def row_of(network, rec):
        return next(x for x in rows if x["network"] == network and x["tap"] == rec["key"])

    contenders = [row_of(n["network"], n["chosen"]) for n in nets]
    if best_fusion is not None:
        contenders.append(row_of(best_fusion["network"], best_fusion))
    contenders += references
    tests = []
    for a, b in itertools.combinations(contenders, 2):
        fa, fb = faces.get(a["name"]), faces.get(b["name"])
        t = {"first": a["name"], "second": b["name"], "n_paired": 0}
        if fa is not None and fb is not None:
            j = fa.merge(fb, on="image_id", suffixes=("_a", "_b"))
            t["n_paired"] = int(len(j))
            g = j["group_a"].astype(object).fillna("").astype(str).to_numpy(dtype=object) if "group_a" in j else None
            if g is not None:
                t.update(unit_of(g))
            for m in headline:
                if len(j) and f"{m}_a" in j and f"{m}_b" in j:
                    d = paired_difference(j[f"{m}_b"].to_numpy(), j[f"{m}_a"].to_numpy(), groups=g, margin=margin[m])
                    t[f"{m}_diff"] = d["diff"]
                    t[f"{m}_diff_ci95_low"], t[f"{m}_diff_ci95_high"] = d["ci95"]
                    t[f"{m}_p_raw"], t[f"{m}_p_equivalence_raw"] = d["p"], d["p_equivalence"]
        tests.append(t)
    for m in headline:
        fam = ["networks" if t.get(f"{m}_p_raw") is not None else None for t in tests]
        padj = adjust_within([t.get(f"{m}_p_raw") for t in tests], fam)
        eadj = adjust_within([t.get(f"{m}_p_equivalence_raw") for t in tests], fam)
        for t, pa, pe in zip(tests, padj, eadj):
            t[f"{m}_p"] = pa if np.isfinite(pa) else None
            t[f"{m}_p_equivalence"] = pe if np.isfinite(pe) else None
            t[f"{m}_margin"] = margin[m]
            t[f"{m}_verdict"] = (verdict(t.get(f"{m}_diff"), t[f"{m}_p"], t[f"{m}_p_equivalence"], m in LOWER_IS_BETTER)
                                 if t.get(f"{m}_diff") is not None else "no paired faces")

    out = (Path(out_dir) if out_dir is not None
           else root / "compare" / FUSION.join(n["network"].replace("/", "_") for n in nets) / nets[0]["dataset"] / tname)
    out.mkdir(parents=True, exist_ok=True)
    files = [_write_csv(out / "network_comparison.csv", rows), _write_csv(out / "network_tests.csv", tests)]
    depth_note = ("relative depth from each features file (0 = input, 1 = embedding)"
                  if depth_sources == {"features file"} else
                  "relative depth: the tap's rank among its features file's taps in network order, index / (n - 1) "
                  "(the file records no depth)" if depth_sources == {"rank"} else
                  "relative depth from the features file where it records one, else the tap's rank among its "
                  "features file's taps in network order, index / (n - 1)")
    units = {t.get("unit") for t in tests} | {r.get("unit") for r in rows}
    unit = "person" if "person" in units else "face"
    png = network_png(rows, headline, sel, out / "network_comparison.png",
                      title=f"{' vs '.join(labels)}: {tname}, test split; each network's input chosen on "
                            f"validation (filled); intervals resample {'people' if unit == 'person' else 'faces'}",
                      note=depth_note)
    files.append(png)
    summary = {
        "target": tname, "selection_metric": sel, "chosen_on": "val",
        "choices": {n["network"]: {"tap": n["chosen"]["key"], "backbone": n["backbone"], "dataset": n["dataset"],
                                   f"val_{sel}": n["chosen"]["val"].get(sel), sel: n["chosen"]["metrics"].get(sel),
                                   f"{sel}_ci95": n["chosen"]["metrics"].get(f"{sel}_ci95")} for n in nets},
        "best_fusion": ({"network": best_fusion["network"], "tap": best_fusion["key"],
                         f"val_{sel}": best_fusion["val"].get(sel), sel: best_fusion["metrics"].get(sel),
                         f"{sel}_ci95": best_fusion["metrics"].get(f"{sel}_ci95")} if best_fusion else None),
        "tests": tests, "unit": unit, "alpha": ALPHA, "margins": margin, "depth_note": depth_note,
        "manifest_sha256": next(iter(shas.values())),
        "correction": "Benjamini-Hochberg over the pairs (one family per metric), separately for the difference "
                      "and the equivalence tests",
        "verdict_rule": "the second against the first: worse/better: paired bootstrap p (BH) < alpha; equivalent: "
                        "two one-sided tests (BH) < alpha that the difference lies within +-margin; both: "
                        "worse/better, within margin; otherwise inconclusive",
    }
    (out / "network_comparison.json").write_text(json.dumps(summary, indent=2, default=str))
    files.append(out / "network_comparison.json")
    return {"rows": rows, "tests": tests, "choices": summary["choices"], "best_fusion": summary["best_fusion"],
            "summary": summary, "files": files, "csv": files[0], "png": png, "metrics": headline, "target_name": tname,
            "out_dir": out}


def _write_csv(path: Path, rows: list[dict]) -> Path:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    return path


def network_png(rows: list[dict], metrics: list[str], sel: str, path, title: str = "", note: str = "") -> Path:
    """Each headline metric (a panel) against relative depth, a line per network with 95 % intervals; each
    network's choice filled; fusion heads (within a network, and cross-file) as points right of depth 1."""
    from ..scoring.plots import TAP_COLOURS, _figure, _legends_below, _save, metric_label

    fig = _figure(5.2 * len(metrics), 4.4)
    axes = [fig.add_subplot(1, len(metrics), i + 1) for i in range(len(metrics))]
    networks = list(dict.fromkeys(r["network"] for r in rows if FUSION not in r["network"]))
    fusions = [r for r in rows if r["depth"] is None]
    for ax, m in zip(axes, metrics):
        for i, net in enumerate(networks):
            c = TAP_COLOURS[i % len(TAP_COLOURS)]
            pts = sorted((r for r in rows if r["network"] == net and r["depth"] is not None and r.get(m) is not None),
                         key=lambda r: r["depth"])
            if not pts:
                continue
            x = np.array([r["depth"] for r in pts], dtype=float)
            y = np.array([r[m] for r in pts], dtype=float)
            lo = np.array([np.nan if r.get(f"{m}_ci95_low") is None else r[f"{m}_ci95_low"] for r in pts], dtype=float)
            hi = np.array([np.nan if r.get(f"{m}_ci95_high") is None else r[f"{m}_ci95_high"] for r in pts], dtype=float)
            ax.errorbar(x, y, yerr=[y - lo, hi - y], fmt="-o", color=c, label=net, mfc="white", capsize=3, zorder=2)
            for r in pts:
                if r["chosen_in_network"]:
                    ax.plot([r["depth"]], [r[m]], "o", color=c, ms=9, zorder=3)
        for k, r in enumerate(fusions):
            if r.get(m) is None:
                continue
            x = 1.08 + 0.04 * k
            c = "black" if FUSION in r["network"] else TAP_COLOURS[networks.index(r["network"]) % len(TAP_COLOURS)]
            err = None
            if r.get(f"{m}_ci95_low") is not None:
                err = [[r[m] - r[f"{m}_ci95_low"]], [r[f"{m}_ci95_high"] - r[m]]]
            ax.errorbar([x], [r[m]], yerr=err, fmt="D" if FUSION in r["network"] else "s", color=c,
                        mfc=c if r["chosen_in_network"] else "white", capsize=3,
                        label=(f"fusion {r['name']}" if FUSION in r["network"] else
                               f"trained from pixels: {r['tap']}" if r["network"] == "cnn" else None))
        lab, _ = metric_label(m)
        ax.set_xlabel("relative depth (0 = input, 1 = embedding); fusions right of 1")
        ax.set_ylabel(lab + (" (selection)" if m == sel else ""))
        ax.grid(alpha=0.3)
    if title or note:
        fig.suptitle("\n".join(x for x in (title, note) if x), fontsize=9)
    _legends_below(fig, axes[:1])
    return _save(fig, path)


def network_table(res: dict) -> list[str]:
    """Markdown: one row per head of every network (relative depth, val figure, test figures [95 % CI]),
    each network's choice in bold; then the paired tests between the choices."""
    from ..data.labels import format_figure

    ms, sel = res["metrics"], res["summary"]["selection_metric"]
    head = ["network", "input", "depth", f"val {sel}", *[f"test {m} [95 % CI]" for m in ms]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in res["rows"]:
        cells = [r["network"], f"`{r['tap']}`" + (" (chosen)" if r["chosen_in_network"] else ""),
                 "" if r["depth"] is None else f"{r['depth']:.2f}",
                 "" if r.get(f"val_{sel}") is None else format_figure(sel, r[f"val_{sel}"])]
        for m in ms:
            lo, hi = r.get(f"{m}_ci95_low"), r.get(f"{m}_ci95_high")
            cells.append("" if r.get(m) is None else format_figure(m, r[m], [lo, hi] if lo is not None else None))
        if r["chosen_in_network"]:
            cells = [f"**{c}**" if c else c for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Paired tests on the same test faces (second minus first; {'people' if res['summary']['unit'] == 'person' else 'faces'} resampled; "
                  "BH over the pairs):", "",
              "| first | second | faces | " + " | ".join(f"{m} diff [95 % CI] | p (BH) | p equiv. (BH) | verdict"
                                                          for m in ms) + " |",
              "|" + "---|" * (3 + 4 * len(ms))]
    for t in res["tests"]:
        cells = [f"`{t['first']}`", f"`{t['second']}`", f"{t['n_paired']:,}"]
        for m in ms:
            d = t.get(f"{m}_diff")
            cells += ["" if d is None else format_diff(m, d, t.get(f"{m}_diff_ci95_low"), t.get(f"{m}_diff_ci95_high")),
                      format_p(t.get(f"{m}_p")), format_p(t.get(f"{m}_p_equivalence")), t.get(f"{m}_verdict", "")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Depth: {res['summary']['depth_note']}."]
    return lines
