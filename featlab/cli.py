"""featlab's command line: one subcommand per pipeline step.

Heavy libraries are imported inside the commands that use them, so that
``featlab --help`` and the data commands start in well under a second;
TensorFlow is imported only by train-head, evaluate, predict and the
commands that chain them (run, demo, compare --sweep).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from .errors import FeatlabError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Probe frozen face-recognition networks for age and gender: prepare -> extract -> train-head -> evaluate -> compare.",
)
convert_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Convert third-party model files to ONNX.")
app.add_typer(convert_app, name="convert")


def _echo(msg: str = "") -> None:
    typer.echo(msg)


def _cfg(section: str, key: str, default=None):
    from . import config

    return config.get(section, key, default)


def _quieted(quiet: bool):
    """The step lines' printer: ``print``, or, with ``-q``, nothing (and no progress bars either)."""
    if not quiet:
        return print
    from .progress import set_quiet

    set_quiet(True)
    return lambda *a, **k: None


def _need(value, what: str, hint: str):
    if value in (None, "", []):
        raise FeatlabError(f"no {what} given: {hint}")
    return value


# Arguments are checked here, before any command imports a heavy library (TensorFlow above all), so that bad
# input costs a fraction of a second and prints one line.
def _positive(value, option: str, minimum: int = 1):
    if value is not None and value < minimum:
        raise FeatlabError(f"{option} must be at least {minimum}, not {value}")
    return value


def _fold_choice(fold: str | None, folds: str | None):
    """--fold K / --fold all / --folds all -> None, K (int) or 'all'."""
    if folds is not None:
        if folds.strip().lower() != "all":
            raise FeatlabError(f"--folds takes only 'all' (the 5-fold protocol), not {folds!r}; one fold is --fold K")
        if fold is not None:
            raise FeatlabError("give --fold K or --folds all, not both")
        return "all"
    if fold is None:
        return None
    if fold.strip().lower() == "all":
        return "all"
    try:
        k = int(fold)
    except ValueError:
        raise FeatlabError(f"--fold takes a fold number (e.g. --fold 0) or 'all', not {fold!r}") from None
    if k < 0:
        raise FeatlabError(f"--fold must be a fold number >= 0, not {k}")
    return k


def _check_head_dir(head: Path) -> None:
    """A trained head folder (or one holding per-fold heads), checked before TensorFlow is imported."""
    if (head / "config.json").is_file() and (head / "head.keras").is_file():
        return
    if (head / "config.json").is_file() or (head / "fold0").is_dir() or (head / "seed0").is_dir():
        return  # evaluate says what it is (a --folds all summary, per-fold heads)
    if not head.exists():
        from .errors import did_you_mean

        up = head.parent
        near = did_you_mean(str(head), [str(p) for p in up.iterdir() if p.is_dir()]) if up.is_dir() else ""
        raise FeatlabError(f"--head {head}: no such folder; {near}(heads are written under results/ by "
                           "`featlab train-head`)")
    raise FeatlabError(f"{head} is not a trained head (needs head.keras and config.json); train one with `featlab train-head`")


def _check_file(path: Optional[Path], what: str, hint: str) -> None:
    if path is not None and not Path(path).is_file():
        raise FeatlabError(f"{what} not found: {path} ({hint})")


# ------------------------------------------------------------------------------------ prepare
@app.command()
def prepare(
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="adapter name (see --list)"),
    root: Optional[Path] = typer.Option(None, "--root", help="dataset folder (or CSV file for --dataset csv)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="manifest CSV to write [features/manifests/DATASET.csv]"),
    list_: bool = typer.Option(False, "--list", help="list the dataset adapters and exit"),
    seed: int = typer.Option(0, help="seed of the train/val/test split (datasets without their own): 70/10/20 by a "
                             "seeded hash of each face's group (or image id), so other rows never move a face"),
    face_score_min: float = typer.Option(1.0, help="imdb/wiki: keep faces with face_score above this"),
    path_col: str = typer.Option("path", help="csv: column holding image paths"),
    age_col: str = typer.Option("age", help="csv: column holding ages"),
    gender_col: str = typer.Option("gender", help="csv: column holding genders"),
    race_col: Optional[str] = typer.Option(None, help="csv: column holding race labels"),
    split_col: Optional[str] = typer.Option(None, help="csv: column holding train/val/test (else a seeded split)"),
    group_col: Optional[str] = typer.Option(None, help="csv: column holding an identity (person, subject) the split must not divide"),
    group_by_face: bool = typer.Option(False, "--group-by-face", help="group faces by their dlib-rec embedding (complete linkage "
                                       "below 0.35: near-duplicates, same person and session) and split by group; reports the leaks"),
    show_skipped: int = typer.Option(10, help="how many skipped images to name"),
):
    """Turn a dataset on disk into a featlab manifest (one schema for every dataset)."""
    from .data.datasets import ADAPTERS
    from .data.manifest import write_manifest

    if list_:
        for a in ADAPTERS.values():
            _echo(f"{a.name:12s} {a.summary}")
        return
    dataset = _need(dataset, "--dataset", "pass --dataset NAME (see `featlab prepare --list`)")
    root = Path(_need(root or _cfg("data", dataset), "--root", f"pass --root DIR or set [data].{dataset} in featlab.toml"))
    opts = {"face_score_min": face_score_min, "path_col": path_col, "age_col": age_col, "gender_col": gender_col,
            "race_col": race_col, "split_col": split_col, "group_col": group_col}
    from .study.experiment import prepare_frame

    df, res = prepare_frame(dataset, root, {**opts, "group_by_face": group_by_face}, seed, hints="cli")
    from . import config
    from .data import skips

    out = out or config.features_dir() / "manifests" / f"{dataset}.csv"
    write_manifest(df, out)
    names = skips.write(skips.from_prepare(res), skips.prepare_list_path(out))
    _echo(f"wrote {out}: {len(df):,} rows from {root}")
    if "split" in df and (df["split"] != "").any():
        _echo("  split: " + ", ".join(f"{k} {v:,}" for k, v in df["split"].value_counts().items() if k))
    if (df["group"] != "").any():
        sizes = df.loc[df["group"] != "", "group"].value_counts()
        _echo(f"  groups: {len(sizes):,} (largest {int(sizes.iloc[0]):,} rows; {int(sizes[sizes > 1].sum()):,} rows "
              f"in groups of 2+; {int((df['group'] == '').sum()):,} rows without a group)")
    if res.face_groups is not None:
        res.face_groups.measure_written(out)  # the after-split counts come from the file as written
        for line in res.face_groups.lines():
            _echo("  " + line)
    if df["fold"].notna().any():
        _echo("  folds: " + ", ".join(f"{int(k)}: {v:,}" for k, v in df["fold"].value_counts().sort_index().items()))
    if ("split" in df and (df["split"] != "").any()) or df["fold"].notna().any():
        from .data.manifest import balance_lines

        for line in balance_lines(df):
            _echo("  " + line)
    kept = {r: n for r, n in res.counts.items() if r.startswith("kept without")}
    removed = {r: n for r, n in res.counts.items() if r not in kept}
    if removed:
        _echo(f"skipped or filtered: {sum(removed.values()):,}")
        for reason, n in sorted(removed.items(), key=lambda kv: -kv[1]):
            _echo(f"  {n:7,}  {reason}")
    for reason, n in sorted(kept.items(), key=lambda kv: -kv[1]):
        _echo(f"  {n:7,}  {reason}")
    for what, reason in res.skipped[:show_skipped]:
        _echo(f"  skipped {what}: {reason}")
    if len(res.skipped) > show_skipped:
        _echo(f"  ... and {len(res.skipped) - show_skipped:,} more")
    for _id, what, reason in res.label_skips[:show_skipped]:
        _echo(f"  {reason}: {what}")
    if len(res.label_skips) > show_skipped:
        _echo(f"  ... and {len(res.label_skips) - show_skipped:,} more kept without a label")
    _echo(f"every row left out or kept without a label, by name and reason: {names}")


# ------------------------------------------------------------------------------------ bins
@app.command()
def bins(manifest: Optional[Path] = typer.Option(None, "--manifest", "-m", help="also count a manifest's ages per bin")):
    """Print the age-bin schemes (5, 7, 8 groups) and, given a manifest, its counts per bin."""
    from .data.bins import SCHEMES

    df = None
    if manifest:
        from .data.manifest import read_manifest

        df = read_manifest(manifest)
    for key in ("5", "7", "8"):
        s = SCHEMES[key]
        _echo(f"--cats {key}")
        counts = None
        if df is not None:
            import numpy as np

            idx = s.assign(df["age"].to_numpy())
            counts = np.bincount(idx[idx >= 0], minlength=s.n)
        for i, (name, title) in enumerate(zip(s.names, s.titles)):
            lo = s.lower[i]
            hi = s.lower[i + 1] if i + 1 < s.n else None
            rng = f"[{lo:g}, {hi:g})" if hi is not None else f"[{lo:g}, inf)"
            line = f"  {i}  {name:>6s}  {title:14s} ages {rng}"
            if counts is not None:
                line += f"  {counts[i]:7,}"
            _echo(line)
    if df is not None:
        _echo(f"rows without age: {int(df['age'].isna().sum()):,} of {len(df):,}")


# ------------------------------------------------------------------------------------ peek
@app.command()
def peek(
    manifest: Optional[Path] = typer.Option(None, "--manifest", "-m", help="manifest CSV [featlab.toml paths.manifest]"),
    n: int = typer.Option(64, "--n", help="number of images"),
    out: Path = typer.Option(Path("sheet.png"), "--out", "-o", help="PNG file to write"),
    seed: int = typer.Option(0, help="seeds the random draw of images"),
):
    """Draw a contact sheet of random manifest images with their labels, to check data by eye."""
    from .data.manifest import read_manifest
    from .data.peek import draw_contact_sheet

    manifest = Path(_need(manifest or _cfg("paths", "manifest"), "--manifest", "pass --manifest M.csv"))
    df = read_manifest(manifest)
    p = draw_contact_sheet(df, out, n=n, seed=seed, title=manifest.name)
    _echo(f"wrote {p}")


# ------------------------------------------------------------------------------------ layers
@app.command()
def layers(
    backbone: str = typer.Option(None, "--backbone", "-b", help="backbone name [r100, or featlab.toml]"),
    model: Optional[str] = typer.Option(None, "--model", help="model file (ONNX; .dat for dlib-rec)"),
    all_: bool = typer.Option(True, "--all/--main", help="every tap, or only the named/aliased ones"),
    descriptor: Optional[Path] = typer.Option(None, "--descriptor", help="a backbone descriptor TOML (any ONNX network; see featlab.backbones.descriptor)"),
):
    """List every tap of a backbone with its shape and relative depth (0 = input, 1 = embedding)."""
    from .backbones.registry import REGISTRY, Backbone, provider_lines

    backbone = _descriptor_backbone(descriptor, backbone) or _cfg("extract", "backbone", "r100")
    bb = Backbone(backbone, model or _cfg("models", backbone))
    _echo(f"{backbone}: {bb.model_path}")
    for i, line in enumerate(provider_lines()):
        _echo(f"  {'runs on ' if i == 0 else ''}{line}")
    _echo(f"  sha256 {bb.sha256[:16]}…  input {bb.geometry.size}x{bb.geometry.size} {bb.spec.color.upper()}, "
          f"{bb.geometry.kind} geometry")
    _echo(f"  {'#':>4s}  {'tap':28s} {'shape':>12s}  depth")
    for t in bb.taps:
        if not all_ and not t.aliases and t.name == t.tensor:
            continue
        shape = "x".join(str(d) for d in t.shape)
        extra = f"  (= {', '.join(t.aliases)})" if t.aliases else ""
        note = f"  [{t.note}]" if t.note else ""
        _echo(f"  {t.index:4d}  {t.name:28s} {shape:>12s}  {t.depth:5.3f}{extra}{note}")
    _echo(f"{len(bb.taps)} taps; ask for one with `featlab extract --backbone {backbone} --layer NAME`")
    del REGISTRY


def _descriptor_backbone(descriptor: Optional[Path], backbone: Optional[str]) -> Optional[str]:
    """``--descriptor FILE``: register the backbone it describes and return its name (else ``backbone``)."""
    if descriptor is None:
        return backbone
    from .backbones.registry import register_descriptor

    return register_descriptor(descriptor, backbone)


# ------------------------------------------------------------------------------------ extract
@app.command()
def extract(
    layer: List[str] = typer.Option(None, "--layer", "-l", help="tap name, alias or index; repeat for several; NAME@avg pools"),
    manifest: Optional[Path] = typer.Option(None, "--manifest", "-m", help="manifest CSV [featlab.toml paths.manifest]"),
    backbone: str = typer.Option(None, "--backbone", "-b", help="backbone [r100, or featlab.toml extract.backbone]"),
    model: Optional[str] = typer.Option(None, "--model", help="model file [featlab.toml models.BACKBONE, then the insightface packs]"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="HDF5 file [features/BACKBONE/DATASET.h5]"),
    align: bool = typer.Option(False, "--align", help="detect and align faces (in-the-wild images)"),
    preprocessing: Optional[str] = typer.Option(
        None, "--preprocessing", help="how each chip is cut: template-5pt (5-point warp onto the network's "
        "template), resize (whole crop resized, no landmarks) or center-crop [the network's own: template-5pt for "
        "dlib and ArcFace networks; featlab.toml extract.preprocessing]"),
    flip: bool = typer.Option(False, "--flip", help="store the mean of the face and its mirror image"),
    pool: Optional[str] = typer.Option(None, "--pool", help="pool every tap: avg, max, or avgN/maxN for an NxN grid"),
    dtype: str = typer.Option("float16", "--dtype", help="float16 or float32"),
    compression: str = typer.Option("none", "--compression", help="none, lz4, zstd, blosclz"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="images per backbone call [featlab.toml extract.batch_size, else the backbone's]"),
    workers: Optional[int] = typer.Option(None, "--workers", help="decode/align threads; with --ray: Ray workers, one backbone session each [2]"),
    limit: Optional[int] = typer.Option(None, "--limit", help="only the first N manifest rows"),
    ray: Optional[str] = typer.Option(None, "--ray", metavar="[ADDRESS]",
                                      help="run the batches on Ray: alone, a local runtime; with ADDRESS, join that cluster (needs featlab[ray]); with --shards, one Ray task writes each shard"),
    gpus_per_worker: float = typer.Option(0.0, "--gpus-per-worker", help="with --ray: GPUs per worker (0: CPU)"),
    shards: Optional[int] = typer.Option(None, "--shards", help="N writers, one shard file each (OUT.shards/), OUT their index: local processes, or Ray tasks with --ray"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    descriptor: Optional[Path] = typer.Option(None, "--descriptor", help="a backbone descriptor TOML (any ONNX network; see featlab.backbones.descriptor)"),
):
    """Run a frozen backbone over a manifest once, writing every requested tap to one HDF5 file (resumable)."""
    backbone = _descriptor_backbone(descriptor, backbone)
    cluster = None
    if ray is not None:
        from .features.cluster import RayPlan, require_ray

        require_ray()
        cluster = RayPlan(address=ray, workers=2 if workers is None else workers, gpus_per_worker=gpus_per_worker)
        workers = None  # the local decode/align workers keep their default (only used to add a tap to old rows)
    elif gpus_per_worker:
        raise FeatlabError("--gpus-per-worker needs --ray")
    from .features.extract import extract as run_extract

    manifest = Path(_need(manifest or _cfg("paths", "manifest"), "--manifest", "pass --manifest M.csv or set [paths].manifest in featlab.toml"))
    backbone = backbone or _cfg("extract", "backbone", "r100")
    if dtype not in ("float16", "float32"):
        raise FeatlabError("--dtype must be float16 or float32")
    from .features.store import COMPRESSION, parse_key

    if compression not in COMPRESSION:
        raise FeatlabError(f"--compression must be one of {', '.join(COMPRESSION)}")
    for key in list(layer or []) + ([f"TAP@{pool}"] if pool else []):
        parse_key(key)  # an unknown @pooling is one line before the backbone loads
    _positive(batch_size, "--batch-size")
    _positive(workers, "--workers")
    _positive(limit, "--limit")
    from .backbones.registry import get_spec
    from .data.faces import check_preprocessing

    preprocessing = preprocessing or _cfg("extract", "preprocessing")
    check_preprocessing(get_spec(backbone).geometry[0], preprocessing)  # one line before the backbone loads
    from .features.store import read_shard_index

    index = read_shard_index(out) if out else None
    if shards is None and index is not None:
        shards = int(index.get("count", 0))  # a sharded set goes on as one
    if shards is not None:
        from .features.shards import extract_sharded

        _positive(shards, "--shards")
        rep = extract_sharded(manifest, list(layer or []), shards, backbone=backbone, out=out, ray=cluster,
                              model=model or _cfg("models", backbone), align=align, flip=flip, pool=pool, dtype=dtype,
                              compression=compression, batch_size=batch_size, workers=None if cluster else workers,
                              limit=limit, preprocessing=preprocessing)
        _echo(f"{rep.out}: {rep.rows_total:,} faces ({rep.rows_added:,} new, {rep.skipped_added:,} skipped) in "
              f"{rep.seconds:.1f} s, {rep.images_per_s:,.0f} images/s, {rep.provider}, preprocessing "
              f"{rep.preprocessing}; the driver handled {rep.plan['driver_bytes']:,} bytes, the workers wrote "
              f"{rep.plan['tap_bytes']:,} bytes of taps")
    else:
        rep = run_extract(manifest, list(layer or []), backbone=backbone, model=model or _cfg("models", backbone),
                          out=out, align=align, flip=flip, pool=pool, dtype=dtype, compression=compression,
                          batch_size=batch_size, workers=workers, limit=limit, progress=not quiet, cluster=cluster,
                          preprocessing=preprocessing,
                          # with --ray the driver's own session only adds a tap to old rows: keep it off the workers' GPUs
                          providers=["CPUExecutionProvider"] if cluster else None)
        _echo(f"{rep.out}: {rep.rows_total:,} faces ({rep.rows_added:,} new, {rep.skipped_added:,} skipped) "
              f"in {rep.seconds:.1f} s, {rep.images_per_s:,.0f} images/s on {rep.provider}, preprocessing {rep.preprocessing}")
    for k, v in rep.filled.items():
        _echo(f"  added tap {k} for {v:,} existing rows")
    if rep.labels_resynced:
        _echo(f"  labels of {rep.labels_resynced:,} stored rows re-synced from the manifest (no backbone run)")
    if rep.rows_not_in_manifest:
        _echo(f"  {rep.rows_not_in_manifest:,} stored rows are no longer in the manifest: kept, out of every split "
              "(split '', fold -1)")
    for why, n in sorted(rep.skip_reasons.items(), key=lambda kv: -kv[1]):
        _echo(f"  skipped {n:,}: {why}")
    for path, why in rep.warnings:
        _echo(f"  warning {path}: {why}")
    from .data.skips import extract_list_path

    names = extract_list_path(rep.out)
    if names.is_file():
        _echo(f"  every image skipped or flagged, by name and reason: {names}")


@app.command("merge-shards")
def merge_shards(
    features: Path = typer.Argument(..., help="a sharded set's index (the --out of `extract --shards`)"),
    out: Path = typer.Argument(..., help="the one features file to write (must not exist)"),
):
    """Copy a sharded set into one ordinary features file (optional: every command reads the set as it is)."""
    from .features.shards import merge_shards as merge

    n = merge(features, out)
    _echo(f"{out}: {n:,} faces merged from {features}")


@app.command()
def info(features: Path = typer.Argument(..., help="features .h5 file")):
    """Summarise a features file: backbone, model hash, taps, rows, skipped images; and where extraction runs."""
    from .features.store import FeatureStore

    with FeatureStore.open_read(features) as s:
        a = s.attrs
        _echo(f"{features}: {s.nrows:,} faces, backbone {a.get('backbone')}, model sha256 {str(a.get('model_sha256'))[:16]}…")
        _echo(f"  dataset {a.get('dataset')}  flip {a.get('flip')}  align {a.get('align')}  featlab {a.get('featlab_version')}")
        from .paths import describe_preprocessing

        prep = describe_preprocessing(a.get("preprocessing"), bool(a.get("align")))
        if prep:
            _echo(f"  preprocessing {prep}")
        from .features.tapimport import describe_import

        for line in describe_import(a):
            _echo(line)
        if a.get("manifest"):
            try:
                s.check_labels_current()
                state = "labels current" if Path(a["manifest"]).is_file() else "file gone: labels as extracted"
            except FeatlabError:
                state = f"labels STALE: re-sync with `{s.resync_command()}`"
            _echo(f"  manifest {a['manifest']} ({state})")
        for k, t in s.tap_info().items():
            arr = s.array(k)
            if "nonfinite" in t and int(t.get("checked_rows", 0)) >= arr.nrows:
                finite = f"nonfinite {t['nonfinite']:,}"
            else:  # a file from before the check: counted when it is next extracted into
                finite = f"nonfinite ? ({arr.nrows - int(t.get('checked_rows', 0)):,} rows unchecked)"
            _echo(f"  tap {k:28s} {'x'.join(map(str, t['shape'])):>12s} {t['dtype']:8s} rows {arr.nrows:,}  {finite}")
        sk = s.skipped()
        if len(sk):
            _echo(f"  skipped {len(sk):,}:")
            for r, n in sk["reason"].value_counts().items():
                _echo(f"    {n:6,}  {r}")
        wn = s.warnings()
        if len(wn):
            _echo(f"  stored with a warning {len(wn):,}:")
            for r in wn.itertuples(index=False):
                _echo(f"    {r.path}: {r.reason}")
    from .backbones.registry import provider_lines

    for i, line in enumerate(provider_lines()):
        _echo(f"  {'extraction here runs on ' if i == 0 else ''}{line}")


@app.command("import")
def import_cmd(
    tapfiles: List[str] = typer.Argument(None, help="one array per tap: FILE (.npy, .npz, HDF5) or FILE:KEY (FILE.h5:/group/array)"),
    labels: Optional[Path] = typer.Option(None, "--labels", help="labels CSV in featlab's manifest schema (e.g. from `featlab prepare`)"),
    backbone: Optional[str] = typer.Option(None, "--backbone", "-b", help="name of the network that made the taps (heads are filed under it)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="features .h5 file to write (must not exist)"),
    name: List[str] = typer.Option(None, "--name", help="tap name, one per file in order [the file stems]"),
    layout: str = typer.Option("nchw", "--layout", help="nchw, or nhwc to transpose (rows, H, W, C) maps to featlab's CHW"),
    ids: Optional[str] = typer.Option(None, "--ids", help="per-row image_id or path: an array FILE[:KEY], a .txt, or FILE.csv:COLUMN "
                                      "(rows are then written in the labels' order)"),
    rows_in_manifest_order: bool = typer.Option(False, "--rows-in-manifest-order",
                                                help="without ids: row i of the tap files IS row i of --labels (you vouch for it; "
                                                     "without ids or this, import refuses)"),
    dtype: str = typer.Option("source", "--dtype", help="stored dtype: source (float16 stays float16, others float32), "
                                                       "float32 or float16"),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="dataset name heads are filed under [the labels file stem]"),
    source_id: Optional[str] = typer.Option(None, "--source-id", help="same text for imports made by one network: their heads may be evaluated on each other"),
    force: bool = typer.Option(False, "--force", help="replace --out if it exists"),
):
    """Import taps extracted elsewhere (.npy, .npz, HDF5) into a featlab features file, each row matched to its
    labels row by --ids (or ids stored beside the taps), or in order with --rows-in-manifest-order."""
    from .features.tapimport import check_options

    tapfiles = _need(list(tapfiles or []), "tap files", "featlab import TAPFILE... --labels LABELS.csv --backbone NAME --out FILE.h5")
    labels = _need(labels, "--labels", "pass --labels LABELS.csv (a featlab manifest)")
    backbone = _need(backbone, "--backbone", "pass --backbone NAME (the network that made the taps)")
    out = _need(out, "--out", "pass --out FILE.h5")
    check_options(tapfiles, name, layout, dtype)
    from .features.tapimport import import_taps

    rep = import_taps(tapfiles, labels, backbone, out, names=list(name or []), layout=layout, ids=ids, dtype=dtype,
                      dataset=dataset, source_id=source_id, overwrite=force, rows_in_manifest_order=rows_in_manifest_order)
    _echo(f"{rep.out}: {rep.rows:,} faces, backbone {backbone} (imported), in {rep.seconds:.1f} s")
    for k, shape in rep.taps.items():
        _echo(f"  tap {k:28s} {'x'.join(map(str, shape)):>12s} {rep.dtypes.get(k, dtype)}")


# ------------------------------------------------------------------------------------ heads
def head_targets(targets, cats, regression: bool = False) -> list[tuple[str, int | None]]:
    """CLI choices -> [(target, cats)]: every ``--cats`` value is a bin scheme, ``--regression`` is age,
    each ``--target`` (repeatable, or a comma list) is age, gender, ``bins8`` or ``bins`` (whose
    schemes are the ``--cats`` values). ``--cats 7``, ``--regression``, ``--target gender`` and
    ``--target bins --cats 7`` alone mean one head, as always."""
    from .study.recipes import head_target

    targets = [t.strip() for v in (targets or []) for t in str(v).split(",") if t.strip()]
    cats = list(cats or [])
    out: list[tuple[str, int | None]] = []
    for t in targets:
        if t == "bins":
            if not cats:
                raise FeatlabError("--target bins needs --cats 5, 7 or 8")
        elif t.startswith("bins") and t[4:].isdigit():
            out.append(head_target("bins", int(t[4:])))
        else:
            out.append(head_target(t, None))
    out += [head_target("bins", c) for c in cats]
    if regression:
        out.append(("age", None))
    if not out:
        head_target(None, None)  # raises: say what to predict
    return list(dict.fromkeys(out))


@app.command("train-head")
def train_head(
    cats: Optional[List[int]] = typer.Option(None, "--cats", help="age bins: 5, 7 or 8 groups; repeat for several"),
    regression: bool = typer.Option(False, "--regression", help="age in years"),
    target: Optional[List[str]] = typer.Option(None, "--target", help="bins, age or gender (or bins8); repeat or comma-separate for several"),
    layer: Optional[List[str]] = typer.Option(None, "--layer", "-l", help="tap key in the features file; repeat for several; a+b fuses taps into one head [featlab.toml head.layer]"),
    features: Optional[List[Path]] = typer.Option(None, "--features", "-f", help="features .h5 [featlab.toml head.features]; "
                                                   "repeat for cross-file fusion (--layer NET:TAP+NET:TAP, joined by image id)"),
    fold: Optional[str] = typer.Option(None, "--fold", help="Adience protocol: test fold K (train on the others)"),
    folds: Optional[str] = typer.Option(None, "--folds", help="'all' runs the 5-fold protocol"),
    hidden: Optional[str] = typer.Option(None, "--hidden", help="hidden layer sizes, e.g. 512,128; 0 for a linear head [64]"),
    dropout: Optional[float] = typer.Option(None, "--dropout", help="dropout after each hidden layer, in [0, 1) [0.5]"),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="epoch cap; early stopping on val usually ends sooner [60]"),
    lr: Optional[float] = typer.Option(None, "--lr", help="Adam learning rate [0.001]"),
    ordinal: Optional[bool] = typer.Option(None, "--ordinal/--softmax", help="bins: CORAL cumulative outputs or softmax"),
    seed: int = typer.Option(0, "--seed", help="seeds the initial weights, shuffling and dropout"),
    seeds: int = typer.Option(1, "--seeds", help="train N seeds (seed, seed+1, ...): their ensemble (mean prediction) is the head, the seeds' spread beside it"),
    memory_mb: Optional[float] = typer.Option(None, "--memory-mb", help="memory budget for features [featlab.toml head.memory_mb, 2048]"),
    ranges: str = typer.Option("refuse", "--ranges", help="range labels a target cannot place (Adience (15, 20) with --cats 5 "
                               "or 7; every range for --regression): refuse (stop, giving the count) or drop (train on the rest)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no per-head lines and no epoch progress"),
):
    """Train lean Keras heads on taps; score each on val (for choices) and test (to report), with baselines.
    Several --layer and targets train every (tap, target) head together in one pass (featlab.heads.grid)."""
    from .study.recipes import parse_hidden, run_head

    tgts = head_targets(target, cats, regression)
    fold_arg = _fold_choice(fold, folds)
    hidden = parse_hidden(hidden)  # checked (one line) and parsed once; None = the head's default
    _positive(epochs, "--epochs")
    if dropout is not None and not 0.0 <= dropout < 1.0:
        raise FeatlabError(f"--dropout must be in [0, 1), not {dropout}")
    if lr is not None and not 0.0 < lr < float("inf"):
        raise FeatlabError(f"--lr must be a positive number, not {lr}")
    if seeds < 1:
        raise FeatlabError(f"--seeds must be at least 1, not {seeds}")
    from .data.labels import RANGE_POLICIES

    if ranges not in RANGE_POLICIES:
        raise FeatlabError(f"--ranges must be {' or '.join(RANGE_POLICIES)}, not {ranges!r}")
    memory_mb = memory_mb if memory_mb is not None else _cfg("head", "memory_mb", 2048)
    try:
        memory_mb = float(memory_mb)
    except (TypeError, ValueError):
        memory_mb = -1.0
    if not memory_mb > 0:
        raise FeatlabError("--memory-mb (or [head] memory_mb) must be a positive number of MiB")
    if quiet:  # no per-head lines, and no epoch bars
        from .progress import set_quiet

        set_quiet(True)
    many = list(dict.fromkeys(features or []))
    from .features.join import is_cross

    if len(many) > 1 or any(is_cross(x) for x in layer or []):
        return _train_cross(many, list(dict.fromkeys(layer or [])), tgts, fold_arg, hidden, dropout, epochs, lr,
                            ordinal, seed, seeds, memory_mb, ranges, quiet)
    features = Path(_need(many[0] if many else (_cfg("head", "features") or _default_features()), "--features",
                          "pass --features FILE.h5 or set [head].features (or [paths].manifest and [extract].backbone) in featlab.toml"))
    layers = list(dict.fromkeys(layer or [])) or [
        _need(_cfg("head", "layer") or _only_tap(features), "--layer",
              f"pass --layer TAP or set [head].layer in featlab.toml (see `featlab info {features}`)")]
    opts = {k: v for k, v in dict(hidden=hidden, dropout=dropout, epochs=epochs, lr=lr, ordinal=ordinal).items() if v is not None}
    opts["ranges"] = ranges
    if len(layers) == 1 and len(tgts) == 1:
        out = run_head(features, layers[0], tgts[0][0], tgts[0][1], fold=fold_arg, seed=seed, seeds=seeds,
                       memory_mb=memory_mb, verbose=0 if quiet else 1, **opts)
        _echo(f"head written to {out}")
        return
    from .study.workflow import train_grid

    outs = train_grid(features, layers, tgts, fold=fold_arg, seed=seed, seeds=seeds, memory_mb=memory_mb,
                      verbose=0 if quiet else 1, **opts)
    for d in outs:
        _echo(f"head written to {d}")


def _train_cross(files, layers, tgts, fold_arg, hidden, dropout, epochs, lr, ordinal, seed, seeds, memory_mb, ranges,
                 quiet):
    """train-head over several features files: each --layer NET:TAP+NET:TAP is joined by image id
    (featlab.features.join) into its own features file, whose heads go to results/NET+NET/..."""
    from .features.join import is_cross, join_features
    from .study.workflow import train_grid

    for f in files:
        _check_file(f, "features file", "make it with `featlab extract`")
    if not layers:
        raise FeatlabError("with several --features give --layer NET:TAP+NET:TAP (e.g. dlib-rec:res12+sface:conv_13_relu)")
    plain = [x for x in layers if not is_cross(x)]
    if plain:
        raise FeatlabError(f"--layer {plain[0]}: with several --features files name each part's network, NET:TAP+NET:TAP")
    if len(files) < 2:
        raise FeatlabError(f"--layer {layers[0]}: NET:TAP parts fuse taps of several files; give each with --features")
    opts = {k: v for k, v in dict(hidden=hidden, dropout=dropout, epochs=epochs, lr=lr, ordinal=ordinal).items() if v is not None}
    opts["ranges"] = ranges
    joined = [join_features(files, x, echo=None if quiet else _echo) for x in layers]  # every refusal before training
    for path, key in joined:
        for d in train_grid(path, [key], tgts, fold=fold_arg, seed=seed, seeds=seeds, memory_mb=memory_mb,
                            verbose=0 if quiet else 1, **opts):
            _echo(f"head written to {d}")


@app.command("train-cnn")
def train_cnn(
    manifest: Optional[Path] = typer.Option(None, "--manifest", "-m", help="manifest CSV (featlab prepare) [featlab.toml paths.manifest]"),
    cats: Optional[List[int]] = typer.Option(None, "--cats", help="age bins: 5, 7 or 8 groups; repeat for several"),
    regression: bool = typer.Option(False, "--regression", help="age in years"),
    target: Optional[List[str]] = typer.Option(None, "--target", help="bins, age or gender (or bins8); repeat or comma-separate"),
    arch: str = typer.Option("levi-hassner", "--arch", help="levi-hassner (Levi & Hassner 2015) or a keras.applications "
                             "architecture (MobileNetV2, VGG16, ...), built with weights=None"),
    size: int = typer.Option(227, "--size", help="crop side in pixels (the paper's 227; chips are cut at 256/227 of it)"),
    weights: Optional[Path] = typer.Option(None, "--weights", help="keras.applications weights file without the top, "
                                           "on disk (nothing is downloaded)"),
    epochs: int = typer.Option(60, "--epochs", help="epoch cap; early stopping on val usually ends sooner"),
    batch_size: int = typer.Option(64, "--batch-size", help="faces per training step"),
    lr: float = typer.Option(1e-3, "--lr", help="Adam learning rate (halved when val loss stalls)"),
    patience: int = typer.Option(8, "--patience", help="epochs without a better val loss before stopping"),
    seed: int = typer.Option(0, "--seed", help="seeds the initial weights, shuffling, crops, mirrors and dropout"),
    fold: Optional[str] = typer.Option(None, "--fold", help="Adience protocol: test fold K (train on the others)"),
    folds: Optional[str] = typer.Option(None, "--folds", help="'all' trains one CNN per fold and their summary"),
    predict: str = typer.Option("center", "--predict", help="center (the centre crop) or 10crop (mean over 4 corners "
                                "and the centre, each mirrored)"),
    chips_from: str = typer.Option("dlib-rec", "--chips-from", help="the backbone whose chips (geometry, "
                                   "preprocessing) the CNN trains on"),
    preprocessing: Optional[str] = typer.Option(None, "--preprocessing", help="template-5pt, resize or center-crop "
                                                "[the backbone's own]"),
    align: bool = typer.Option(False, "--align", help="detect and align each face first (in-the-wild photos)"),
    ranges: str = typer.Option("refuse", "--ranges", help="range labels a target cannot place: refuse or drop"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress lines"),
):
    """Train a network from pixels on a manifest's own split (the seed papers' reference systems), recorded like a
    head: compare puts it beside the heads on the same test faces; explain shows where it looks."""
    from .heads.cnntrain import check_cnn_options

    tgts = head_targets(target, cats, regression)
    fold_arg = _fold_choice(fold, folds)
    manifest = Path(_need(manifest or _cfg("paths", "manifest"), "--manifest",
                          "pass --manifest M.csv or set [paths].manifest in featlab.toml"))
    _check_file(manifest, "manifest", "write one with `featlab prepare`")
    for t, c in tgts:
        check_cnn_options(t, c, arch, size, weights, predict, epochs, batch_size, lr, patience, ranges)
    from .backbones.registry import get_spec
    from .data.faces import check_preprocessing

    check_preprocessing(get_spec(chips_from).geometry[0], preprocessing)
    say = _quieted(quiet)
    from .study.workflow import train_cnn as run_cnn

    for t, c in tgts:
        d = run_cnn(manifest, t, c, arch=arch, size=size, weights=weights, epochs=epochs, batch_size=batch_size, lr=lr,
                    patience=patience, seed=seed, fold=fold_arg, prediction=predict, backbone=chips_from,
                    preprocessing=preprocessing, align=align, ranges=ranges, verbose=0 if quiet else 1)
        say(f"cnn written to {d}")
        if quiet:
            _echo(str(d))


def _default_features():
    """features/{backbone}/{dataset}.h5 from featlab.toml's manifest and backbone, if that file exists."""
    manifest, backbone = _cfg("paths", "manifest"), _cfg("extract", "backbone")
    if not (manifest and backbone):
        return None
    from .features.extract import default_out
    from .data.manifest import dataset_name

    p = default_out(backbone, dataset_name(manifest), bool(_cfg("extract", "align", False)), bool(_cfg("extract", "flip", False)),
                    _cfg("extract", "preprocessing"))
    return p if p.is_file() else None


def _only_tap(features: Path):
    from .features.store import FeatureStore

    with FeatureStore.open_read(features) as s:
        keys = s.keys()
    return keys[0] if len(keys) == 1 else None


@app.command()
def evaluate(
    head: Path = typer.Option(..., "--head", help="head folder (results/.../TARGET)"),
    features: Optional[List[Path]] = typer.Option(None, "--features", "-f", help="another features file of the same backbone "
                                                  "and tap; for a head across networks one per network (repeat -f)"),
    split: Optional[str] = typer.Option(None, "--split", help="test, val, train or all [test; all rows of another file]"),
):
    """Score a trained head (figures with 95 % intervals, confusion matrices, subgroups) into HEAD/eval/...;
    the head's own record is never changed. A head across networks takes one features file per network."""
    from .report.evaluate import SPLITS, evaluate_head

    _check_head_dir(head)
    features = list(dict.fromkeys(features or [])) or None
    for f in features or []:
        _check_file(f, "features file", "make it with `featlab extract`")
    if split is not None and split not in SPLITS:
        raise FeatlabError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    from .study.recipes import summary_line

    m = evaluate_head(head, features=features, split=split)
    _echo(summary_line(m) + f" -> {m['out_dir']}")


@app.command()
def compare(
    cats: Optional[int] = typer.Option(None, "--cats", help="age-bin heads with 5, 7 or 8 groups [7 without --target or --regression]"),
    target: Optional[str] = typer.Option(None, "--target", help="bins, age or gender"),
    regression: bool = typer.Option(False, "--regression", help="age heads in years (same as --target age)"),
    backbone: Optional[List[str]] = typer.Option(None, "--backbone", "-b", help="backbone of the results [the only one under "
                                                 "results/]; repeat to compare networks side by side on one manifest"),
    dataset: Optional[List[str]] = typer.Option(None, "--dataset", "-d", help="dataset (feature set) of the results, e.g. "
                                                "utkface-sample [the only one]; with several --backbone: once, or once per backbone"),
    features: Optional[Path] = typer.Option(None, "--features", "-f", help="with --sweep: the features file to extend"),
    manifest: Optional[Path] = typer.Option(None, "--manifest", "-m", help="with --sweep: the manifest"),
    sweep: bool = typer.Option(False, "--sweep", help="extract, train and evaluate every residual-unit tap, then plot against depth"),
    margin: List[str] = typer.Option(None, "--margin", help="equivalence margin METRIC=VALUE, e.g. accuracy=0.02 "
                                     "or mae=0.25 (defaults: 0.01 for accuracy, 1-off and CS@5; 0.15 years for MAE)"),
):
    """Gather every evaluated tap of one backbone and dataset into a comparison table and a chart (each tap's test figure with its 95 % interval)."""
    from .study.recipes import compare_cmd, head_target, parse_margins

    margins = parse_margins(margin or [])
    tgt, cats = head_target(target, cats or (None if (target or regression) else 7), regression)
    backbones, datasets = list(backbone or []), list(dataset or [])
    if len(backbones) > 1:
        if sweep:
            raise FeatlabError("--sweep takes one --backbone")
        from .report.crossnet import compare_networks, network_table

        res = compare_networks(backbones, datasets, tgt, cats, margins=margins)
        _echo("chosen on validation: " + ", ".join(f"{n} {c['tap']}" for n, c in res["choices"].items())
              + (f"; best cross-file fusion {res['best_fusion']['tap']}" if res["best_fusion"] else ""))
        for line in network_table(res):
            _echo(line)
        for p in res["files"]:
            _echo(f"wrote {p}")
        return
    if len(datasets) > 1:
        raise FeatlabError("give one --dataset for one --backbone")
    res = compare_cmd(tgt, cats, backbone=backbones[0] if backbones else None, dataset=datasets[0] if datasets else None,
                      sweep=sweep, features=features, manifest=manifest, margins=margins)
    from .study.experiment import comparison_table, uncertainty_line

    _echo(f"chosen on validation: {res['chosen']}. {uncertainty_line({'': res})}")
    for line in comparison_table(res):
        _echo(line)
    for p in res.get("files", []):
        _echo(f"wrote {p}")


# ------------------------------------------------------------------------------------ similarity
@app.command()
def similarity(
    features: List[Path] = typer.Argument(..., help="one features file (its taps against each other) or two of one manifest"),
    layer: List[str] = typer.Option(None, "--layer", "-l", help="tap key to include; repeat [every tap of each file]"),
    pool: str = typer.Option("none", "--pool", help="maps (C,H,W): none (flatten: the whole map) or avg (global average)"),
    block: int = typer.Option(1000, "--block", help="faces per chunk of the computation (memory ~ block x block per tap; the estimate does not change)"),
    seed: int = typer.Option(0, "--seed", help="seed of the people's assignment to jackknife blocks (the standard error only)"),
    split: str = typer.Option("all", "--split", help="faces of this split of the first file: all, train, val or test"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="folder for cka.csv/png [results/BACKBONE/DATASET/similarity/...]"),
):
    """Linear CKA (unbiased HSIC on all faces) between every pair of taps of one or two features files, with its heatmap."""
    from .report.similarity import MIN_BLOCK, SPLITS

    if len(features) > 2:
        raise FeatlabError(f"give one or two features files, not {len(features)}")
    for f in features:
        _check_file(f, "features file", "make it with `featlab extract`")
    if pool not in ("none", "avg"):
        raise FeatlabError(f"--pool must be none or avg, not {pool!r}")
    if split not in SPLITS:
        raise FeatlabError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    _positive(block, "--block", MIN_BLOCK)
    from .report.similarity import similarity as run_similarity

    res = run_similarity(features, layers=list(layer or []), pool=None if pool == "none" else pool, block=block,
                         seed=seed, split=split, out=out, echo=_echo)
    rows, cols = res["labels"]
    width = max(len(c) for c in cols) + 2
    _echo(f"linear CKA on {res['n']:,} faces, {res['blocks']} blocks, {res['seconds']:.1f} s "
          "(± jackknife standard error over blocks of people)")
    _echo(" " * max(len(r) for r in rows) + "".join(c.rjust(width + 6) for c in cols))
    for name, row, se in zip(rows, res["cka"], res["se"]):
        _echo(name.ljust(max(len(r) for r in rows)) + "".join(f"{v:.3f} ± {s:.3f}".rjust(width + 6) for v, s in zip(row, se)))
    for p in res["files"]:
        _echo(f"wrote {p}")


# ------------------------------------------------------------------------------------ run / demo / predict
@app.command()
def run(
    spec: Path = typer.Argument(..., help="experiment spec (TOML)"),
    set_: List[str] = typer.Option(None, "--set", help="override a spec value: section.key=value"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress and no step lines: only the results table and the report path "
                               "(and errors)"),
    force: bool = typer.Option(False, "--force", help="prepare the manifest again and retrain every head and its "
                               "baselines even when current; extraction is not redone (it only adds missing faces "
                               "and taps, and refuses a file made differently: delete the file to extract anew)"),
):
    """Run an experiment spec: prepare -> extract -> train-head -> evaluate -> compare, skipping finished steps."""
    from .study.runner import run_study

    report = run_study(spec, overrides=list(set_ or []), force=force, echo=_quieted(quiet))
    _echo(f"report: {report}")


@app.command("spec-doc")
def spec_doc():
    """Print the reference of experiment specs (every section and key, generated from the schema): docs/spec.md."""
    from .study.schema import spec_reference

    typer.echo(spec_reference(), nl=False)


@app.command()
def demo(
    out: Path = typer.Option(Path("."), "--out", help="where features/ and results/ go"),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="dlib-rec (default when available) or dlib-age"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress and no step lines: only the results table and the report path "
                               "(and errors)"),
):
    """The whole pipeline offline on the UTKFace sample shipped inside featlab (a few minutes on 2 cores)."""
    from .study.experiment import run_demo

    report = run_demo(out, backbone=backbone, echo=_quieted(quiet))
    _echo(f"report: {report}")


@app.command()
def predict(
    images: List[Path] = typer.Argument(..., help="image files or folders"),
    head: List[Path] = typer.Option(..., "--head", help="trained head folder; repeat for several"),
    annotate: Optional[Path] = typer.Option(None, "--annotate", help="write annotated copies here"),
    model: Optional[List[str]] = typer.Option(None, "--model", help="backbone model file, if not the one recorded in the "
                                              "head; for a head across networks NETWORK=FILE, repeat per network"),
    detect: bool = typer.Option(False, "--detect",
                                help="align every face with the backbone's own geometry (as extract --align) even "
                                     "for heads trained on face crops [faces are cut like the heads' training crops]"),
):
    """Find every face of each image and run the backbone and the heads on it; one line per face.

    Each face is cut out the way the heads' training chips were made (an image that is such a crop is read
    whole; a group photo gives one chip per face). An image without a face, or a file that is not an image,
    is skipped by name. Exit status: 0 when every image gave at least one face; 1 when any was skipped
    beside images that were read; 2 on bad input (one line, before any model loads), which includes files
    none of which is an image.
    """
    from .report.predict import check_images, expand_images, predict_paths

    for h in head:
        _check_head_dir(h)
    images = check_images(expand_images(images))
    from .report.crosshead import parse_models

    records = predict_paths(images, head, annotate=annotate, model=parse_models(model), detect=True if detect else None,
                            echo=_echo)
    skipped = [r for r in records if "error" in r]
    if skipped:
        _echo(f"{len(skipped)} of {len({r['path'] for r in records})} images skipped")
        raise typer.Exit(1)


@app.command()
def explain(
    images: Optional[List[Path]] = typer.Argument(None, help="image files or folders (or use --features for the dataset view)"),
    head: List[Path] = typer.Option(None, "--head", help="trained head folder; repeat for several heads of one backbone"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="folder for the figures and explain_summary.json"),
    method: List[str] = typer.Option(None, "--method", help="occlusion (default), rise or lrp (layer-wise relevance propagation, per pixel); repeat for several"),
    rule: str = typer.Option("epsilon-plus-flat", "--rule", help="lrp: epsilon, alpha2beta1 (alpha-beta on convolutions) or epsilon-plus-flat (flat first layer, z+ convolutions, epsilon dense)"),
    epsilon: float = typer.Option(1e-6, "--epsilon", help="lrp: the epsilon rule's epsilon"),
    patch: int = typer.Option(16, "--patch", help="occlusion: patch side in chip pixels"),
    stride: int = typer.Option(8, "--stride", help="occlusion: stride in chip pixels"),
    masks: int = typer.Option(1000, "--masks", help="rise: number of random masks"),
    baseline: str = typer.Option("mean", "--baseline", help="what removed pixels become in the maps: mean (chip colour) or blur; the faithfulness curves use the other"),
    cell: int = typer.Option(16, "--cell", help="deletion/insertion curves: cell side in chip pixels"),
    steps: int = typer.Option(16, "--steps", help="deletion/insertion curves: points after the first"),
    batch: int = typer.Option(64, "--batch", help="masked chips per backbone call"),
    seed: int = typer.Option(0, "--seed", help="seeds RISE masks, the random deletion order and the face sample"),
    features: Optional[Path] = typer.Option(None, "--features", "-f", help="dataset view: the heads' features file"),
    n: int = typer.Option(200, "--n", help="dataset view: number of faces"),
    split: str = typer.Option("test", "--split", help="dataset view: which split's faces"),
    groups: Optional[int] = typer.Option(None, "--groups", help="dataset view, age heads: 5, 7 or 8 age groups [the head's, else 5]"),
    compare: Optional[str] = typer.Option(None, "--compare", help="dataset view: every trained head of this target (age, bins7, gender...) of the features file's backbone, shallow to deep"),
    model: Optional[List[str]] = typer.Option(None, "--model", help="backbone model file, if not the one recorded in the "
                                              "head; for a head across networks NETWORK=FILE, repeat per network"),
    detect: Optional[bool] = typer.Option(None, "--detect/--no-detect",
                                          help="find and align the face [as the heads' training features were made]"),
):
    """Signed heatmaps (occlusion, RISE, LRP) of where heads find their evidence, with deletion and insertion curves vs
    random order (cells replaced by the other perturbation than the map's) and 95 % intervals over faces."""
    from .report.explain import Settings, check_head_dirs, check_methods

    settings = Settings(patch=patch, stride=stride, masks=masks, baseline=baseline, cell=cell, steps=steps,
                        batch=batch, seed=seed, rule=rule, epsilon=epsilon).check()
    methods = check_methods(method)
    from .report.crosshead import parse_models

    model = parse_models(model)
    out = Path(_need(out, "--out", "pass --out DIR for the figures"))
    if compare is not None:
        if features is None:
            raise FeatlabError("--compare needs --features FILE.h5 (the dataset view)")
        if head:
            raise FeatlabError("give --head DIR... or --compare TARGET, not both")
        from .report.explain import compare_heads

        head = compare_heads(features, compare)
        _echo("heads: " + ", ".join(str(h) for h in head))
    heads = check_head_dirs(head)
    if groups is not None:
        from .data.bins import get_scheme

        get_scheme(groups)
    if features is not None:
        if images:
            raise FeatlabError("give images or --features (the dataset view), not both")
        from .report.explain import explain_dataset

        explain_dataset(heads, features, n, out, methods, settings, model=model, groups=groups, split=split, echo=_echo)
        return
    if not images:
        raise FeatlabError("no images given: pass image files or folders, or --features FILE.h5 for the dataset view")
    from .report.explain import explain_images

    explain_images(images, heads, out, methods, settings, model=model, align=detect, echo=_echo)


@convert_app.command("dlib")
def convert_dlib_cmd(dat: Path = typer.Argument(..., help="dlib .dat network"), out: Path = typer.Argument(..., help="ONNX file to write")):
    """Convert dlib's face-recognition ResNet (.dat) to ONNX with one named node per dlib layer."""
    _check_file(dat, "dlib network file", "pass dlib's .dat network, e.g. dlib_face_recognition_resnet_model_v1.dat")
    from .backbones.dlibnet import convert_dlib

    p = convert_dlib(dat, out)
    _echo(f"wrote {p}")


@app.callback(invoke_without_command=True)
def _root(ctx: typer.Context, version: bool = typer.Option(False, "--version", help="print the version and exit")):
    if version:
        from . import __version__

        _echo(f"featlab {__version__}")
        raise typer.Exit()
    if ctx.invoked_subcommand is None:
        _echo(ctx.get_help())


def _full_summaries(*typers: typer.Typer) -> None:
    """Each command's summary in ``featlab --help`` is its docstring's whole first paragraph (click would cut
    it to one line with "...")."""
    import inspect

    for t in typers:
        for info in t.registered_commands:
            doc = info.help or (info.callback.__doc__ if info.callback else None)
            if info.short_help is None and doc:
                info.short_help = " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())


_full_summaries(app, convert_app)


def _optional_values(argv: list[str]) -> list[str]:
    """``--ray`` takes an optional ADDRESS (click has no optional option values): alone, it means ``local``."""
    out = list(argv)
    for i, a in enumerate(out):
        if a == "--":
            break
        if a == "--ray" and (i + 1 == len(out) or out[i + 1].startswith("-")):
            out.insert(i + 1, "local")
            break
    return out


def interrupted_line(argv: list[str]) -> str:
    """The one line of a Ctrl-C: what the command keeps (noted by the steps as they finish,
    :func:`featlab.staging.keep`) and the command that resumes it. A forced ``run`` resumes without
    ``--force``: the heads it finished are kept, the records it had not replaced yet are marked superseded."""
    import shlex

    from .staging import kept

    args = [a for a in argv if not (argv[:1] == ["run"] and a == "--force")]
    what = "; ".join(kept()) or "every finished result whole (a record is only replaced by a complete one)"
    return f"featlab: interrupted; kept {what}; resume: featlab {shlex.join(args)}"


def full_line(argv: list[str], e: BaseException) -> str | None:
    """The one line of a write refused for lack of space (:func:`featlab.errors.disk_full`), None for any other
    error: the file, what filled up, what is kept and the command to run once space is freed. A
    :class:`featlab.errors.DiskFull` says the file and what it keeps itself; any other such error (a head's
    record, a report, a plot) names its file and what the command noted as kept (:func:`featlab.staging.kept`)."""
    import shlex

    from .errors import DiskFull, disk_full, filled_up
    from .staging import STAGING, kept

    args = [a for a in argv if not (argv[:1] == ["run"] and a == "--force")]
    if isinstance(e, DiskFull):
        then = "resume" if e.resumes else "run again"
        return f"featlab: {e.message}; free space, then {then}: featlab {shlex.join(args)}"
    full = disk_full(e)
    if full is None:
        return None
    what, name = full
    where = f" writing {name}" if name else ""
    if name and STAGING in Path(name).parts:  # a record being staged: name the results folder it was going to
        parts = Path(name).parts
        where = f" writing a record under {Path(*parts[: parts.index(STAGING)])}"
    have = "; ".join(kept())
    then = f"kept {have}; free space, then resume" if have else "free space, then run again"
    return f"featlab: {filled_up(what, name)}{where}; {then}: featlab {shlex.join(args)}"


def _from_interrupt(e: BaseException) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; a FeatlabError becomes one red line on stderr and exit status 2."""
    argv = _optional_values(sys.argv[1:] if argv is None else argv)
    from .staging import reset

    reset()
    try:
        app(args=argv, prog_name="featlab")  # standalone: usage errors print and exit 2
    except FeatlabError as e:
        typer.secho(full_line(argv, e) or f"featlab: {e}", err=True, fg="red")
        return 2
    except KeyboardInterrupt:
        typer.secho(interrupted_line(argv), err=True)
        return 130
    except SystemExit as e:  # click's standalone mode exits; hand the status back to the caller
        if e.code == 130 and _from_interrupt(e):  # typer turns Ctrl-C into a silent exit 130
            typer.secho(interrupted_line(argv), err=True)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception as e:  # noqa: BLE001 - a full disk anywhere (results, reports) is one line too
        line = full_line(argv, e)
        if line is None:
            raise
        typer.secho(line, err=True, fg="red")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
