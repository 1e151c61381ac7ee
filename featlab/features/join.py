"""Cross-file fusion: a head that reads taps of several features files of one manifest, joined by image id.

A cross-file head input names each part ``NETWORK:TAP`` and joins the parts with ``+``
(``dlib-rec:res12+sface:conv_13_relu``). ``NETWORK`` is a file's :func:`network_label`: its backbone, or
``BACKBONE-PREPROCESSING`` when two of the files given share a backbone (SFace as ``template-5pt`` and as
``resize``).

:func:`join_features` writes the parts' taps, row-aligned, into one ordinary features file (so training,
scoring, baselines and compare need nothing new)::

    {features}/joined/{A}+{B}/{dataset-key}/{key}.h5

- rows are the faces present in every file, joined by ``image_id``, in the first file's order; a face
  missing from one file (an image one network skipped) is dropped from all, and the count per file is
  recorded (root attribute ``join``, copied into each head's ``config.json``), never misaligned;
- files of different manifests (``manifest_sha256``), or that put one face in different splits, folds or
  groups, are refused with one line;
- the joined file's backbone is ``A+B`` (the network labels), so its heads go to
  ``{results}/{A}+{B}/{dataset-key}/{key}/{target}/``; its dataset key is the parts' common dataset key,
  or theirs joined by ``+`` when they differ (another preprocessing, alignment or flip);
- it is rebuilt when a source file changed (size, modification time, rows), otherwise reused.

No TensorFlow here.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from .. import config
from ..errors import FeatlabError
from ..paths import FUSION, dataset_key, feature_set
from .store import FeatureStore

SEP = ":"  # NETWORK:TAP
BLOCK_ROWS = 1024


def split_part(part: str) -> tuple[str | None, str]:
    """``'dlib-rec:res12'`` -> (``'dlib-rec'``, ``'res12'``); ``'res12'`` -> (None, ``'res12'``)."""
    if SEP not in part:
        return None, part
    net, tap = part.split(SEP, 1)
    if not net or not tap or SEP in tap:
        raise FeatlabError(f"head input part {part!r}: write NETWORK:TAP, e.g. dlib-rec:res12")
    return net, tap


def is_cross(layer: str) -> bool:
    """Whether a head input names a network in any part (``NETWORK:TAP``)."""
    return any(SEP in p for p in str(layer).split(FUSION))


def network_label(attrs: dict, shared: bool = False) -> str:
    """A file's name in cross-file keys: its backbone, plus ``-PREPROCESSING`` when ``shared`` (another file
    given has the same backbone)."""
    bb = str(attrs.get("backbone") or "unknown")
    pre = attrs.get("preprocessing")
    return f"{bb}-{pre}" if shared and pre not in (None, "") else bb


def labels_of(files) -> dict[str, Path]:
    """{network label: file} for the files of one cross-file head (one line when two cannot be told apart)."""
    metas = []
    for f in files:
        with FeatureStore.open_read(f) as s:
            metas.append((Path(f), s.attrs))
    counts: dict[str, int] = {}
    for _, a in metas:
        counts[str(a.get("backbone"))] = counts.get(str(a.get("backbone")), 0) + 1
    out: dict[str, Path] = {}
    for f, a in metas:
        lab = network_label(a, counts[str(a.get("backbone"))] > 1)
        if lab in out:
            raise FeatlabError(f"{out[lab]} and {f} are both {lab!r} (same backbone and preprocessing): give one "
                               "features file per network")
        out[lab] = f
    return out


def _fingerprint(files: dict[str, Path], parts) -> str:
    src = []
    for lab, f in files.items():
        st = Path(f).stat()
        src.append([lab, str(Path(f).resolve()), st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps([src, parts]).encode()).hexdigest()[:16]


def joined_path(labels: list[str], dkey: str, key: str, root=None) -> Path:
    base = Path(root) if root is not None else config.features_dir() / "joined"
    return base / FUSION.join(labels) / dkey / f"{key.replace('/', '_')}.h5"


def join_features(files, layer: str, root=None, echo=None, labels: dict | None = None) -> tuple[Path, str]:
    """(joined features file, key in it) for the cross-file head input ``layer`` over ``files``
    (see the module doc). ``root``: the folder for joined files [``{features}/joined``]. ``labels``:
    {network name: file} to use instead of :func:`labels_of` (a spec's own network names)."""
    if labels is not None:
        nets = {str(k): Path(v) for k, v in labels.items()}
    else:
        files = list(dict.fromkeys(Path(f) for f in files))
        if len(files) < 2:
            raise FeatlabError(f"{layer}: NETWORK:TAP parts fuse taps of several features files; give each with --features")
        nets = labels_of(files)
    parts = []
    for p in str(layer).split(FUSION):
        net, tap = split_part(p)
        if net is None:
            raise FeatlabError(f"{layer}: with several features files name each part's network, NETWORK:TAP "
                               f"(networks: {', '.join(nets)})")
        if net not in nets:
            raise FeatlabError(f"{layer}: no features file of network {net!r} given (networks: {', '.join(nets)})")
        parts.append((net, tap))
    if len(set(parts)) != len(parts):
        raise FeatlabError(f"{layer}: name each NETWORK:TAP once")
    used = list(dict.fromkeys(n for n, _ in parts))
    if len(used) < 2:
        raise FeatlabError(f"{layer}: a cross-file head fuses taps of two or more networks; for taps of one file "
                           "use TAP+TAP with that file alone")
    stores = {n: FeatureStore.open_read(nets[n]) for n in used}
    try:
        return _join(stores, parts, root, echo)
    finally:
        for s in stores.values():
            s.close()


def _join(stores: dict[str, FeatureStore], parts, root, echo) -> tuple[Path, str]:
    nets = list(stores)
    attrs = {n: s.attrs for n, s in stores.items()}
    shas = {n: a.get("manifest_sha256") for n, a in attrs.items()}
    if None in shas.values() or len(set(shas.values())) > 1:
        what = ", ".join(f"{n}: {str(v)[:12] + '…' if v else 'none recorded'}" for n, v in shas.items())
        raise FeatlabError(f"cross-file fusion needs features of one manifest; these differ ({what})")
    resolved = []
    for n, tap in parts:
        k = stores[n].resolve_key(tap)
        if k is None:
            stores[n].array(tap)  # one line naming the taps it has
        resolved.append((n, k))
    key = FUSION.join(f"{n}{SEP}{k}" for n, k in resolved)
    for s in stores.values():
        s.check_labels_current()
    labels = {n: s.labels() for n, s in stores.items()}
    for n, df in labels.items():
        dup = df["image_id"][df["image_id"].duplicated()]
        if len(dup):
            raise FeatlabError(f"{stores[n].path}: image id {dup.iloc[0]} is stored twice; cross-file fusion joins by id")
    first = labels[nets[0]]
    common = set(first["image_id"])
    for n in nets[1:]:
        common &= set(labels[n]["image_id"])
    if not common:
        raise FeatlabError(f"{', '.join(str(s.path) for s in stores.values())} share no face (image id)")
    rows = {}
    for n, df in labels.items():
        pos = dict(zip(df["image_id"], range(len(df))))
        rows[n] = np.array([pos[i] for i in first["image_id"] if i in common], dtype=np.int64)
    base = first.iloc[rows[nets[0]]].reset_index(drop=True)
    for n in nets[1:]:
        other = labels[n].iloc[rows[n]].reset_index(drop=True)
        for col in ("split", "fold", "group"):
            bad = np.flatnonzero(base[col].astype(str).to_numpy() != other[col].astype(str).to_numpy())
            if len(bad):
                i = int(bad[0])
                raise FeatlabError(
                    f"{stores[nets[0]].path} and {stores[n].path} put {len(bad):,} faces in different {col}s "
                    f"(first: image {base['image_id'][i]}, {base[col][i]!r} vs {other[col][i]!r}); "
                    "extract both from one manifest")
    dropped = {n: int(len(df) - len(common)) for n, df in labels.items()}
    dkeys = [dataset_key(feature_set(attrs[n])) for n in nets]
    dkey = dkeys[0] if len(set(dkeys)) == 1 else FUSION.join(dkeys)
    src = {n: stores[n].path for n in nets}
    fp = _fingerprint(src, [list(p) for p in resolved])
    path = joined_path(nets, dkey, key, root)
    if path.is_file():
        try:
            with FeatureStore.open_read(path) as j:
                if (j.attrs.get("join") or {}).get("fingerprint") == fp and all(
                        j.array(f"{n}{SEP}{k}").nrows == j.nrows for n, k in resolved):
                    return path, key
        except FeatlabError:
            pass
    part_sets = []
    for n, k in resolved:
        fs = feature_set(attrs[n], k)
        fs["dataset_key"] = dataset_key(fs)
        part_sets.append({"network": n, "file": str(Path(stores[n].path).resolve()), "tap": k, "key": f"{n}{SEP}{k}",
                          "rows_in_file": int(stores[n].nrows), "feature_set": fs})
    join = {"fingerprint": fp, "rows": int(len(common)), "dropped": dropped,
            "dropped_note": "faces missing from another file (an image that network skipped), dropped from all",
            "parts": part_sets}
    ident = {
        "backbone": FUSION.join(nets),
        # the networks' feature sets (files, not taps): every joined file of these networks is one feature set
        "model_sha256": hashlib.sha256(json.dumps([feature_set(attrs[n]) for n in nets], sort_keys=True,
                                                  default=str).encode()).hexdigest(),
        "preprocessing": FUSION.join(str(attrs[n].get("preprocessing") or "default") for n in nets),
        "flip": False, "align": False,
    }
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    out = FeatureStore.open_for_append(tmp, ident)
    try:
        a0 = attrs[nets[0]]
        out.set_attr("manifest", a0.get("manifest") or "")
        out.set_attr("manifest_sha256", shas[nets[0]])
        out.set_attr("dataset", dkey)
        out.set_attr("imported", False)
        out.set_attr("join", json.loads(json.dumps(join, default=lambda o: o.item() if hasattr(o, "item") else str(o))))
        src_info = {}
        for n, k in resolved:
            info = stores[n].tap_info().get(k) or {}
            arr = stores[n].array(k)
            out.ensure_array(f"{n}{SEP}{k}", tuple(int(d) for d in arr.shape[1:]), dtype=info.get("dtype", "float16"),
                             expected_rows=len(common), tap=f"{n}{SEP}{info.get('tap') or k}")
            src_info[f"{n}{SEP}{k}"] = info
        table = stores[nets[0]].h5.root.labels
        r0 = rows[nets[0]]
        for i in range(0, len(r0), BLOCK_ROWS):
            feats = {}
            for n, k in resolved:
                arr = stores[n].array(k)
                feats[f"{n}{SEP}{k}"] = stores[n].read(k, rows[n][i:i + BLOCK_ROWS], dtype=arr.atom.dtype)
            out.append(feats, table.read_coordinates(r0[i:i + BLOCK_ROWS]).tolist())
        info = out.tap_info()
        for k, si in src_info.items():  # relative depth and source, kept per part
            for f in ("depth", "tensor", "aliases"):
                if f in si:
                    info[k][f] = si[f]
            info[k]["source"] = next(p for p in part_sets if p["key"] == k)["file"]
        out.set_attr("taps", info)
    finally:
        out.close()
    os.replace(tmp, path)
    if echo:
        echo(f"[join] {path}: {len(common):,} faces" + "".join(f"; {d:,} of {n} dropped" for n, d in dropped.items() if d))
    return path, key
