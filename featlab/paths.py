"""Where every head artifact goes, from what was computed: feature set, tap, target.

A **feature set** is identified by what changes the numbers in a features file: backbone, model file
(sha256), preprocessing, alignment, flip, the manifest (sha256) and, per tap, pooling and dtype.
:func:`feature_set` reads it from a file's attributes; heads record it in ``config.json``.

Results go to ``{results}/{backbone}/{dataset-key}/{head-key}/{target}/`` where

- ``dataset-key`` is the dataset name plus ``-align``, ``-flip`` and ``-imported`` when they apply, so
  heads of differently prepared features never share a folder;
- ``head-key`` is the tap key as stored (``res14``, ``res14@avg`` when pooled at extraction), plus
  ``~avg``/``~max`` when the head pools a map itself, plus ``.f32`` for a float32 tap; a fusion head's
  key joins its taps' keys with ``+``.

Zero-shot nets' scores go to :func:`zeroshot_dir` (feature set and manifest hash), the one rule both
their writer (:mod:`featlab.zeroshot`) and :mod:`featlab.compare` use.
"""

from __future__ import annotations

from pathlib import Path

from . import config

IDENTITY_KEYS = ("backbone", "model_sha256", "preprocessing", "align", "flip", "manifest_sha256", "imported")
TAP_KEYS = ("pool", "dtype")
FUSION = "+"  # joins the taps of a fusion head's input: res12+res14+embedding


def feature_set(attrs: dict, key: str | None = None) -> dict:
    """The identity of a features file (and of one of its taps, with ``key``)."""
    out = {k: attrs.get(k) for k in IDENTITY_KEYS}
    out["align"] = bool(out["align"])
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
    """``utkface``, ``utkface-align``, ``utkface-align-flip``, ``utkface-imported`` ..."""
    return identity["dataset"] + "".join(f"-{k}" for k in ("align", "flip", "imported") if identity.get(k))


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
    :func:`featlab.compare.compare` looks for them: ``{results}/zeroshot/{backbone}/{dataset-key}/
    manifest-{sha256[:12]}/{target}``, ``identity`` being the heads' :func:`feature_set` (as in their
    ``config.json``). The rows scored come from that features file and its manifest, so a zero-shot
    record scored on another manifest (a re-prepared split) is never found beside the heads."""
    root = Path(results_root) if results_root is not None else config.results_dir()
    ident = {"dataset": "", **(identity or {})}
    sha = str(ident.get("manifest_sha256") or "unknown")
    return (root / "zeroshot" / str(ident.get("backbone") or "unknown") / dataset_key(ident)
            / f"manifest-{sha[:12]}" / tname)


def differences(a: dict, b: dict, keys=IDENTITY_KEYS + TAP_KEYS) -> list[str]:
    """What differs between two feature-set identities, as ``name (x vs y)`` phrases."""
    out = []
    for k in keys:
        if k in a and k in b and a[k] != b[k]:
            x, y = str(a[k]), str(b[k])
            if k.endswith("sha256"):
                x, y = x[:12] + "…", y[:12] + "…"
            out.append(f"{k} ({x} vs {y})")
    return out
