"""Where every head artifact goes, from what was computed: feature set, tap, target.

A **feature set** is identified by what changes the numbers in a features file: backbone, model file
(sha256), preprocessing, alignment, flip, the manifest (sha256) and, per tap, pooling and dtype.
:func:`feature_set` reads it from a file's attributes; heads record it in ``config.json``.

The preprocessing is a dict (geometry, colour, normalisation) whose ``name`` is the named way the chips
were cut (``template-5pt``, ``resize``, ``center-crop``: :data:`featlab.data.faces.PREPROCESSINGS`). Files and
heads from before it was named carry no ``name``; :func:`canonical_preprocessing` gives them the one
featlab used then (:func:`legacy_preprocessing`: the template, except ``resize`` for an
ArcFace network on pre-cropped images), so that every comparison of preprocessings is by name.

Results go to ``{results}/{backbone}/{dataset-key}/{head-key}/{target}/`` where

- ``dataset-key`` is the dataset name plus ``-align``, then ``-PREPROCESSING`` when the preprocessing is
  not the network's default (``utkface-resize`` for an ArcFace or dlib network's chips resized instead
  of warped onto its template), then ``-flip`` and ``-imported``, when they apply, so heads of
  differently prepared features never share a folder. The default preprocessing adds nothing: existing
  paths (``results/dlib-rec/utkface-dlib-rec/...``) stay as they were. Features files follow the same
  rule (:func:`featlab.features.extract.default_out`: ``features/BACKBONE/DATASET[-align][-PREPROCESSING][-flip].h5``);
- ``head-key`` is the tap key as stored (``res14``, ``res14@avg`` when pooled at extraction), plus
  ``~avg``/``~max`` when the head pools a map itself, plus ``.f32`` for a float32 tap; a fusion head's
  key joins its taps' keys with ``+``.

Networks trained from pixels go to :func:`cnn_dir` (dataset, manifest hash, architecture and size).
Zero-shot nets' scores go to :func:`zeroshot_dir` (feature set and manifest hash), the one rule both
their writer (:mod:`featlab.heads.zeroshot`) and :mod:`featlab.report.compare` use.
"""

from __future__ import annotations

from pathlib import Path

from . import config

IDENTITY_KEYS = ("backbone", "model_sha256", "preprocessing", "align", "flip", "manifest_sha256", "imported")
TAP_KEYS = ("pool", "dtype")
FUSION = "+"  # joins the taps of a fusion head's input: res12+res14+embedding

#: Geometries with a face template (which ``template-5pt`` warps onto); others only resize or centre-crop.
TEMPLATE_GEOMETRIES = ("dlib-chip", "arcface")


def default_preprocessing(kind: str) -> str:
    """A geometry's own preprocessing: its template when it has one, else ``resize``."""
    return "template-5pt" if kind in TEMPLATE_GEOMETRIES else "resize"


def legacy_preprocessing(kind: str | None, align: bool) -> str | None:
    """The preprocessing that featlab used before it was named and recorded (features files and heads
    from before): the template for dlib chips and aligned detections, ``resize`` for an ArcFace network
    on pre-cropped images and for plain geometries; None for no geometry (imported taps)."""
    if kind is None:
        return None
    if kind == "arcface":
        return "template-5pt" if align else "resize"
    return default_preprocessing(kind)


def canonical_preprocessing(pre, align: bool = False):
    """``pre`` (a preprocessing record) with its ``name``; a record from before names were recorded gets
    the one featlab used then. Anything without a geometry (imported taps, test stand-ins) is unchanged."""
    if isinstance(pre, str) and pre[:1] == "{":
        import json

        try:
            pre = json.loads(pre)
        except ValueError:
            return pre
    if not isinstance(pre, dict) or pre.get("name") or not isinstance(pre.get("geometry"), dict):
        return pre
    name = legacy_preprocessing(pre["geometry"].get("kind"), bool(align))
    return {"name": name, **pre} if name else pre


def preprocessing_name(pre, align: bool = False) -> str | None:
    """The named preprocessing of a record (see :func:`canonical_preprocessing`); None when it has none."""
    pre = canonical_preprocessing(pre, align)
    return pre.get("name") if isinstance(pre, dict) else None


def preprocessing_suffix(pre, align: bool = False) -> str:
    """``-NAME`` when a record's preprocessing is not its network's default, else ``''``."""
    pre = canonical_preprocessing(pre, align)
    if not isinstance(pre, dict) or not isinstance(pre.get("geometry"), dict):
        return ""
    name, kind = pre.get("name"), pre["geometry"].get("kind")
    if not name or not kind or name == default_preprocessing(kind):
        return ""
    return f"-{name}"


def describe_preprocessing(pre, align: bool = False) -> str | None:
    """One phrase for ``featlab info``: ``template-5pt (the network's default; dlib-chip 150x150, padding
    0.25)``; None for a record without a geometry (imported taps)."""
    canon = canonical_preprocessing(pre, align)
    if not isinstance(canon, dict) or not isinstance(canon.get("geometry"), dict):
        return None
    g = canon["geometry"]
    default = "the network's default" if not preprocessing_suffix(canon, align) else "not the network's default"
    legacy = "; not recorded by name: the one featlab used then" if not (isinstance(pre, dict) and pre.get("name")) \
        and not (isinstance(pre, str) and '"name"' in pre) else ""
    pad = f", padding {g['padding']:g}" if g.get("padding") else ""
    return f"{canon['name']} ({default}; {g.get('kind')} {g.get('size')}x{g.get('size')}{pad}{legacy})"


def feature_set(attrs: dict, key: str | None = None) -> dict:
    """The identity of a features file (and of one of its taps, with ``key``)."""
    out = {k: attrs.get(k) for k in IDENTITY_KEYS}
    out["align"] = bool(out["align"])
    out["preprocessing"] = canonical_preprocessing(out["preprocessing"], out["align"])
    out["flip"] = bool(out["flip"])
    out["imported"] = bool(out["imported"])
    out["dataset"] = str(attrs.get("dataset") or "")
    if key is not None:
        info = (attrs.get("taps") or {}).get(key) or {}
        out["tap"] = key
        out["pool"] = info.get("pool")
        out["dtype"] = info.get("dtype", "float16")
    return out


def dataset_key(identity: dict) -> str:
    """``utkface``, ``utkface-align``, ``utkface-resize``, ``utkface-align-center-crop-flip``,
    ``utkface-imported`` ... (see the module doc)."""
    align = bool(identity.get("align"))
    return (identity["dataset"] + ("-align" if align else "")
            + preprocessing_suffix(identity.get("preprocessing"), align)
            + "".join(f"-{k}" for k in ("flip", "imported") if identity.get(k)))


def head_key(key: str, pool: str | None, tap_shape, dtype: str = "float16") -> str:
    """The tap key a head is filed under (see the module doc)."""
    k = key
    if pool and len(tap_shape) == 3:
        k += f"~{pool}"
    if dtype == "float32":
        k += ".f32"
    return k


def input_key(key: str, pool: str | None, attrs: dict, shapes: dict) -> str:
    """The head key of a head input ``key`` (a tap, or taps joined by ``+``: each part's
    :func:`head_key`, joined the same way); ``shapes``: each part's tap shape."""
    return FUSION.join(head_key(p, pool, shapes[p], feature_set(attrs, p)["dtype"]) for p in key.split(FUSION))


def head_dir(backbone: str, dkey: str, hkey: str, tname: str, fold=None, seed=None, out_root=None) -> Path:
    root = Path(out_root) if out_root is not None else config.results_dir()
    d = root / backbone / dkey / hkey / tname
    if fold is not None and fold != "all":
        d = d / f"fold{int(fold)}"
    if seed is not None:
        d = d / f"seed{int(seed)}"
    return d


def zeroshot_dir(identity: dict, tname: str, results_root=None) -> Path:
    """Where a zero-shot net's scores on the val and test faces of a feature set are filed, and where
    :func:`featlab.report.compare.compare` looks for them: ``{results}/zeroshot/{backbone}/{dataset-key}/
    manifest-{sha256[:12]}/{target}``, ``identity`` being the heads' :func:`feature_set` (as in their
    ``config.json``). The rows scored come from that features file and its manifest, so a zero-shot
    record scored on another manifest (a re-prepared split) is never found beside the heads."""
    root = Path(results_root) if results_root is not None else config.results_dir()
    ident = {"dataset": "", **(identity or {})}
    sha = str(ident.get("manifest_sha256") or "unknown")
    return (root / "zeroshot" / str(ident.get("backbone") or "unknown") / dataset_key(ident)
            / f"manifest-{sha[:12]}" / tname)


def cnn_dir(dataset: str, manifest_sha: str, key: str, tname: str, fold=None, out_root=None) -> Path:
    """Where a network trained from pixels on a manifest is filed (:mod:`featlab.heads.cnntrain`), and where
    :mod:`featlab.report.compare` looks for it beside heads of the same manifest: ``{results}/cnn/{dataset}/
    manifest-{sha256[:12]}/{key}/{target}[/fold{K}]``."""
    root = Path(out_root) if out_root is not None else config.results_dir()
    d = root / "cnn" / str(dataset) / f"manifest-{str(manifest_sha)[:12]}" / key / tname
    return d / f"fold{int(fold)}" if fold is not None else d


def cnn_records(manifest_sha: str | None, tname: str, results_root=None, fold=None) -> list[Path]:
    """The folders of every CNN trained on the manifest with sha256 ``manifest_sha`` for target ``tname``."""
    if not manifest_sha:
        return []
    root = Path(results_root) if results_root is not None else config.results_dir()
    sub = f"{tname}/fold{int(fold)}" if fold is not None else tname
    return sorted(p.parent for p in root.glob(f"cnn/*/manifest-{str(manifest_sha)[:12]}/*/{sub}/metrics.json"))


def differences(a: dict, b: dict, keys=IDENTITY_KEYS + TAP_KEYS) -> list[str]:
    """What differs between two feature-set identities, as ``name (x vs y)`` phrases."""
    out = []
    for k in keys:
        if k == "preprocessing" and k in a and k in b:
            x = canonical_preprocessing(a[k], bool(a.get("align")))
            y = canonical_preprocessing(b[k], bool(b.get("align")))
            if x != y:
                nx, ny = (p.get("name") if isinstance(p, dict) else None for p in (x, y))
                out.append(f"{k} ({nx} vs {ny})" if nx != ny else f"{k} ({x} vs {y})")
            continue
        if k in a and k in b and a[k] != b[k]:
            x, y = str(a[k]), str(b[k])
            if k.endswith("sha256"):
                x, y = x[:12] + "…", y[:12] + "…"
            out.append(f"{k} ({x} vs {y})")
    return out
