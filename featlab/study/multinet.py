"""Studies of several networks on the same faces: a spec with ``[[networks]]`` instead of ``[backbone]``::

    [[networks]]
    name = "dlib-rec"
    taps = ["res10", "res12", "res14", "embedding"]
    [[networks]]
    name = "sface"
    preprocessing = "template-5pt"
    taps = [...]
    [[networks]]
    name = "sface"
    preprocessing = "resize"
    taps = [...]
    cross_fusion = "best"   # (top level) fuse each network's input chosen on validation, per target
    similarity = true       # (top level) the linear CKA map between the first two networks' taps
    fusion = ["dlib-rec:res12+sface-resize:conv_13_relu"]   # any further NETWORK:TAP fusion heads

A network's **name** is its backbone, or ``BACKBONE-PREPROCESSING`` when the spec lists its backbone more
than once; it names the network in the side-by-side table and in ``NETWORK:TAP`` fusion keys.

:func:`run_networks` prepares the manifest once, then per network: extracts its taps into
``features/{backbone}/{spec name}[-{preprocessing}].h5`` (``[extract]`` settings apply to all; a network's
``preprocessing`` is named in the path only when it is not the backbone's default, as in
:func:`featlab.features.extract.default_out`), trains every head, scores the
zero-shot nets, compares its taps and writes its own ``results/{backbone}/{dataset-key}/report.md``. Then:
the spec's cross-file ``fusion`` heads and, with ``cross_fusion = "best"``, per target the fusion of the
inputs the networks chose on validation (every combination of two or more networks; joined by image id,
:mod:`featlab.features.join`; results under ``results/{A}+{B}/...``), the cross-network comparison per target
(:mod:`featlab.report.crossnet`: ``results/compare/{A}+{B}/{dataset-key}/{target}/``, the best cross
fusion chosen on validation), the CKA map with ``similarity = true``, and one report,
``results/compare/{A}+{B}/{dataset-key}/report.md``, with the side-by-side tables and charts.

Every step resumes as ``featlab run`` does: extraction appends, heads are fingerprinted and staged
(:mod:`featlab.staging`), a joined file is rebuilt only when a source changed, the CKA map is kept while
its inputs are unchanged.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path

from .. import config
from ..errors import FeatlabError
from ..features.featureio import fusion_parts
from ..data.labels import target_name
from ..paths import FUSION, dataset_key, feature_set


def network_names(nets: list[dict]) -> list[str]:
    """Each ``[[networks]]`` entry's name: its backbone, or ``BACKBONE-PREPROCESSING`` when the backbone comes
    more than once."""
    names = [str(n["name"]) for n in nets]
    return [f"{n['name']}-{n['preprocessing']}" if names.count(str(n["name"])) > 1 else str(n["name"]) for n in nets]


def split_fusions(spec: dict, names: list[str], keys: dict[str, list[str]]) -> tuple[dict[str, list[str]], list[str]]:
    """The spec's ``fusion`` items as ({network: [within-network fusion keys]}, [cross-file keys]); each part
    ``NETWORK:TAP`` names an extracted tap (one line otherwise)."""
    from ..features.join import split_part

    within: dict[str, list[str]] = {n: [] for n in names}
    cross: list[str] = []
    for item in spec.get("fusion") or []:
        parts = fusion_parts(str(item).replace(" ", ""))
        split = []
        for p in parts:
            net, tap = split_part(p)
            if net is None:
                raise FeatlabError(f"spec {spec['name']}: fusion {item!r}: with [[networks]] name each part "
                                   f"NETWORK:TAP (networks: {', '.join(names)})")
            if net not in names:
                raise FeatlabError(f"spec {spec['name']}: fusion {item!r}: no network {net!r} (networks: {', '.join(names)})")
            if tap not in keys[net]:
                raise FeatlabError(f"spec {spec['name']}: fusion {item!r}: {net} does not extract {tap!r} "
                                   f"(it extracts {', '.join(keys[net])})")
            split.append((net, tap))
        if len(parts) < 2:
            raise FeatlabError(f"spec {spec['name']}: fusion {item!r} must join two or more taps")
        nets = list(dict.fromkeys(n for n, _ in split))
        if len(nets) == 1:
            k = FUSION.join(t for _, t in split)
            if k not in within[nets[0]]:
                within[nets[0]].append(k)
        else:
            k = FUSION.join(f"{n}:{t}" for n, t in split)
            if k not in cross:
                cross.append(k)
    return within, cross


def _features_out(spec: dict, net: dict, ex: dict) -> Path:
    from ..features.extract import default_out

    return default_out(net["name"], spec["name"], bool(ex.get("align", False)), bool(ex.get("flip", False)),
                       preprocessing=net.get("preprocessing"))


def run_networks(spec: dict, force: bool = False, echo=print) -> Path:
    """Run a spec with ``[[networks]]`` (see the module doc); returns the cross-network report's path."""
    from ..backbones.registry import Backbone
    from .experiment import (_check_ranges, _check_targets, _heads, _heads_step, _zero_shot_step, cnn_step, extract_lines,
                             spec_manifest_step, write_report)
    from ..features.extract import extract, resolve_keys
    from ..report.compare import compare
    from ..staging import keep
    from ..features.store import FeatureStore

    nets, ex = [dict(n) for n in spec["networks"]], spec.get("extract", {})
    names = network_names(nets)
    # fail fast, before any work: every model file, then the data
    bbs = [Backbone(n["name"], n.get("model") or config.get("models", n["name"]), n.get("preprocessing")) for n in nets]
    taps = {name: list(n.get("taps") or bb.spec.default_taps) for name, n, bb in zip(names, nets, bbs)}
    keys = {name: list(resolve_keys(bb, taps[name], ex.get("pool"))) for name, bb in zip(names, bbs)}
    within, cross_keys = split_fusions(spec, names, keys)
    manifest = spec_manifest_step(spec, force, echo)
    heads = _heads(spec)
    _check_targets(spec, manifest, heads)
    _check_ranges(manifest, heads)
    seed = int(spec.get("seed", 0))
    margins = (spec.get("compare") or {}).get("margins")
    targets = {target_name(h["target"], h["cats"]): h for h in heads}

    reps, dkeys = {}, {}
    for name, n in zip(names, nets):
        t0 = time.perf_counter()
        kw = {"preprocessing": n["preprocessing"]} if n.get("preprocessing") else {}
        rep = extract(manifest, taps[name], backbone=n["name"], model=n.get("model") or config.get("models", n["name"]),
                      out=_features_out(spec, n, ex), align=bool(ex.get("align", False)), flip=bool(ex.get("flip", False)),
                      pool=ex.get("pool"), dtype=ex.get("dtype", "float16"), compression=ex.get("compression", "none"),
                      batch_size=ex.get("batch_size"), progress=bool(spec.get("progress", True)), **kw)
        echo(f"[extract] {name}: {rep.out}: {rep.rows_total:,} faces ({rep.rows_added:,} new) in "
             f"{time.perf_counter() - t0:.0f} s")
        extract_lines(rep.out, echo)
        reps[name] = rep
        with FeatureStore.open_read(rep.out) as s:
            dkeys[name] = dataset_key(feature_set(s.attrs))
        keep(f"features {name}", f"{rep.out} ({rep.rows_total:,} faces)")
    where = {}
    for name, n in zip(names, nets):  # two networks' heads never share a results folder
        other = where.setdefault((n["name"], dkeys[name]), name)
        if other != name:
            raise FeatlabError(f"spec {spec['name']}: networks {other} and {name} would file their heads together under "
                               f"results/{n['name']}/{dkeys[name]}/ (the same backbone, preprocessing and "
                               "alignment): list each feature set once")

    cnn_step(spec, manifest, heads, force, echo)  # the reference row every network's comparison shows
    comparisons, per_results = {}, {}
    for name, n in zip(names, nets):
        nkeys = keys[name] + within[name]
        results = _heads_step(reps[name].out, nkeys, heads, seed, force, echo)
        if spec.get("zero_shot", True):
            _zero_shot_step(reps[name].out, heads, echo)
        comparisons[name] = {tname: compare(n["name"], dkeys[name], target=h["target"], cats=h["cats"], margins=margins)
                             for tname, h in targets.items()}
        write_report({**spec, "name": f"{spec['name']} ({name})"}, n["name"], dkeys[name], reps[name], nkeys, heads,
                     results, comparisons[name], echo, manifest=manifest)
        per_results[name] = results

    files = {name: reps[name].out for name in names}
    fusions: dict[str, list[tuple[str, str]]] = {t: [] for t in targets}
    fusion_results = {}

    def fuse(key: str, hs: list[dict]) -> None:
        from ..features.join import join_features, split_part

        used = list(dict.fromkeys(split_part(p)[0] for p in fusion_parts(key)))
        path, jkey = join_features(None, key, labels={u: files[u] for u in used},
                                   echo=echo)
        with FeatureStore.open_read(path) as s:
            a = s.attrs
        folder = (str(a["backbone"]), dataset_key(feature_set(a)))
        fusion_results.update(_heads_step(path, [jkey], hs, seed, force, echo))
        for h in hs:
            lst = fusions[target_name(h["target"], h["cats"])]
            if folder not in lst:
                lst.append(folder)

    for key in cross_keys:
        fuse(key, heads)
    best = {}
    if spec.get("cross_fusion", "none") == "best":
        for tname, h in targets.items():
            chosen = {name: _store_key(comparisons[name][tname]) for name in names}
            for r in range(2, len(names) + 1):
                for combo in itertools.combinations(names, r):
                    key = FUSION.join(f"{name}:{p}" for name in combo for p in fusion_parts(chosen[name]))
                    fuse(key, [h])
            best[tname] = chosen

    from ..report.crossnet import compare_networks

    side = {tname: compare_networks([n["name"] for n in nets], [dkeys[name] for name in names], h["target"], h["cats"],
                                    margins=margins, labels=names, fusions=fusions[tname])
            for tname, h in targets.items()}
    cka = _similarity_step(spec, names, files, force, echo) if spec.get("similarity") else None
    return write_networks_report(spec, names, nets, reps, dkeys, side, cka, best, echo)


def _store_key(comp: dict) -> str:
    """The stored tap key (or fusion key) of a comparison's chosen head, from its record's metrics.json (a
    head's, or a seed ensemble's or folds summary's, whose folder has no config.json of its own)."""
    row = next(r for r in comp["rows"] if r.get("chosen"))
    d = Path(row["head_dir"])
    m = json.loads((d / "metrics.json").read_text()) if (d / "metrics.json").is_file() else {}
    return m.get("tap") or json.loads((d / "config.json").read_text())["tap"]


def compare_root(names: list[str], dkey: str) -> Path:
    return config.results_dir() / "compare" / FUSION.join(names) / dkey


def _similarity_step(spec: dict, names: list[str], files: dict, force: bool, echo) -> dict:
    """The CKA map between every tap of the first two networks (kept while their files are unchanged)."""
    from .experiment import _fingerprint, _is_current, _mark
    from ..report.similarity import similarity

    a, b = names[:2]
    from ..features.store import FeatureStore

    with FeatureStore.open_read(files[a]) as s:
        dkey = dataset_key(feature_set(s.attrs))
    out = compare_root(names, dkey) / "similarity" / f"{a}+{b}"
    inputs = {"files": [[str(Path(files[x]).resolve()), Path(files[x]).stat().st_size, Path(files[x]).stat().st_mtime_ns]
                        for x in (a, b)], "seed": int(spec.get("seed", 0))}
    fp = _fingerprint(inputs)
    if not force and _is_current(out, fp, "cka.png"):
        echo(f"[similarity] {out} is current")
    else:
        res = similarity([files[a], files[b]], seed=int(spec.get("seed", 0)), out=out)
        _mark(out, fp, inputs)
        echo(f"[similarity] linear CKA {a} vs {b}: {res['n']:,} faces, {res['seconds']:.0f} s -> {out}")
    cfg = json.loads((out / "config.json").read_text())
    return {"dir": out, "png": out / "cka.png", "faces": cfg["faces"], "blocks": cfg["blocks"], "pair": (a, b)}


def write_networks_report(spec, names, nets, reps, dkeys, side, cka, best, echo) -> Path:
    """``results/compare/{A}+{B}/{dataset-key}/report.md``: per target, the networks side by side (table and
    chart), the paired tests between their choices and the best cross fusion, then the CKA map."""
    from ..data.labels import format_figure
    from ..report.crossnet import network_table

    root = compare_root(names, dkeys[names[0]])
    root.mkdir(parents=True, exist_ok=True)
    out = root / "report.md"
    lines = [f"# {spec['name']}: {' vs '.join(names)} on the same faces", "",
             f"- spec: `{spec['_path']}`"]
    for name, n in zip(names, nets):
        rep = reps[name]
        own = config.results_dir() / n["name"] / dkeys[name] / "report.md"
        lines.append(f"- {name}: `{rep.out}` ({rep.rows_total:,} faces"
                     + (f", preprocessing `{n['preprocessing']}`" if n.get("preprocessing") else "")
                     + f"); its own report: `{own}`")
    first = next(iter(side.values()))["summary"]
    lines += ["- every network's input is **chosen on the validation split** (its own choice); the test split "
              "is only reported.",
              f"- Intervals: 95 % bootstrap over {'people (face groups)' if first['unit'] == 'person' else 'faces'}; "
              "paired tests between the networks' choices (and the best cross fusion) on the same test faces, "
              "Benjamini-Hochberg over the pairs; margins "
              + ", ".join(f"{m} {v}" for m, v in first["margins"].items()) + ".", ""]
    for tname, res in side.items():
        s = res["summary"]
        sel = s["selection_metric"]
        lines += [f"## {tname}", "", "Chosen on validation: " + ", ".join(
            f"{n} `{c['tap']}` (test {format_figure(sel, c[sel], c.get(f'{sel}_ci95'))})" for n, c in s["choices"].items())
            + ".", ""]
        if s["best_fusion"]:
            bf = s["best_fusion"]
            lines += [f"Best cross-network fusion on validation: `{bf['tap']}` (test "
                      f"{format_figure(sel, bf[sel], bf.get(f'{sel}_ci95'))}).", ""]
        lines += network_table(res)
        lines += ["", f"![{tname} networks side by side]({Path(res['png']).resolve().relative_to(root.resolve())})", ""]
    if cka is not None:
        a, b = cka["pair"]
        lines += ["## Representation similarity", "",
                  f"Linear CKA (unbiased HSIC over all {cka['faces']:,} faces) between every tap of {a} (rows) and "
                  f"{b} (columns); ± a delete-one-block jackknife standard error over {cka['blocks']} blocks of "
                  "whole people.", "",
                  f"![CKA {a} vs {b}]({Path(cka['png']).resolve().relative_to(root.resolve())})", ""]
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, out)
    echo(f"[report] {out}")
    return out
