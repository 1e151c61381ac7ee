"""Tap import: features extracted elsewhere (another pipeline, a colleague, a cluster job) made into a
featlab features file.

Each tap comes from one array in a ``.npy``, ``.npz`` or HDF5 file (any file name; the kind is read
from the file's first bytes). ``FILE:KEY`` names the array inside a file holding several
(``feats.npz:add_98``, ``feats.h5:/group/array``); a file holding one array needs no key. The
array's first axis is the row (face) axis; rows are aligned with a labels CSV in featlab's manifest
schema: matched to its rows by ``image_id`` or ``path`` through an ids array (``--ids``, or an array
named ``image_id``/``image_ids``/``path``/``paths`` stored beside the tap in its .npz or HDF5 group:
:func:`carried_ids`), the rows then written in the labels' order; or, only when the user says so
(``--rows-in-manifest-order``), taken to be the labels' rows in order. Without either the import is
refused: rows in another order would otherwise get other faces' labels without a sound.

The result is an ordinary features file written through :class:`featlab.features.store.FeatureStore`
(labels and skipped tables, ``taps`` info, attributes backbone, dataset, manifest,
manifest_sha256, featlab_version, config) plus:

- ``imported``: true;
- ``imported_from``: JSON list, one entry per tap: tap, file, key, sha256, shape, dtype, layout;
- ``model_sha256``: ``"imported:" + sha256`` over the source files' hashes and keys (or over
  ``source_id`` when given), a value no model file's sha256 can take, so that heads trained on
  imported features are never applied to a featlab extraction (or to another import) by mistake.

Sources are copied in blocks (``.npy`` memory-mapped, ``.npz`` members streamed, HDF5 read by
slices), never loaded whole. Every check that can be made before writing is made first; the copy
goes to a temporary file beside the output, renamed at the end, so a failure (a non-finite value
found half-way, a value beyond float16's range, a full disk: one line each) leaves no file behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import FeatlabError, copy_disk_full, disk_full

BLOCK_BYTES = 32 << 20  # float32 bytes of all taps together copied per block
LAYOUTS = ("nchw", "nhwc")
DTYPES = ("source", "float32", "float16")  # "source": float16 stays float16, anything else is stored as float32
ID_TEXT_SUFFIXES = (".csv", ".tsv", ".txt")
ID_NAMES = ("image_id", "image_ids", "path", "paths")  # an ids array stored beside a tap under one of these names
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


# ------------------------------------------------------------------------------------ sources
def split_spec(spec: str) -> tuple[Path, str | None]:
    """``'a.h5:/g/x'`` -> (Path('a.h5'), '/g/x'); ``'a.npy'`` -> (Path('a.npy'), None).

    The file is the longest prefix that exists, so a file name holding ``:`` still works."""
    spec = str(spec)
    if Path(spec).is_file():
        return Path(spec), None
    cuts = [i for i, c in enumerate(spec) if c == ":"]
    for i in reversed(cuts):
        if Path(spec[:i]).is_file():
            return Path(spec[:i]), spec[i + 1 :] or None
    raise FeatlabError(f"file not found: {spec}")


def _file_part(spec: str) -> Path:
    try:
        return split_spec(spec)[0]
    except FeatlabError:  # reported when the file is opened
        return Path(spec)


def file_kind(path: Path) -> str:
    """'npy', 'npz' or 'hdf5', from the file's first bytes."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(_NPY_MAGIC):
        return "npy"
    if head.startswith(_ZIP_MAGIC):
        return "npz"
    if head == _HDF5_MAGIC:
        return "hdf5"
    import tables  # an HDF5 file may carry a user block before its signature

    if tables.is_hdf5_file(str(path)):
        return "hdf5"
    raise FeatlabError(f"{path} is neither a .npy, a .npz nor an HDF5 file")


class _Source:
    """One array opened for reading rows in blocks, in order."""

    kind = "?"

    def __init__(self, path: Path, key: str | None):
        self.path, self.key = path, key
        self.shape: tuple[int, ...] = ()
        self.dtype = np.dtype("float32")

    @property
    def where(self) -> str:
        return f"{self.path}:{self.key}" if self.key else str(self.path)

    @property
    def nrows(self) -> int:
        return int(self.shape[0])

    def rows(self, lo: int, hi: int) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _NpySource(_Source):
    kind = "npy"

    def __init__(self, path, key):
        super().__init__(path, None)
        if key:
            raise FeatlabError(f"{path} is a .npy file holding one array: drop ':{key}'")
        try:
            self.arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as e:  # object arrays cannot be mapped: they are pickles
            raise FeatlabError(f"{path}: not an array of numbers ({e})") from None
        self.shape, self.dtype = tuple(self.arr.shape), self.arr.dtype

    def rows(self, lo, hi):
        return np.asarray(self.arr[lo:hi])

    def close(self):
        self.arr = None  # the map closes with its last view (blocks handed out may still be in use)


class _NpzSource(_Source):
    """A member of a .npz (stored or deflated), read sequentially: zip members cannot be mapped."""

    kind = "npz"

    def __init__(self, path, key):
        super().__init__(path, key)
        self.zf = zipfile.ZipFile(path)
        members = [n[:-4] for n in self.zf.namelist() if n.endswith(".npy")]
        if key is None:
            if len(members) != 1:
                self.zf.close()
                raise FeatlabError(f"{path} holds {len(members)} arrays ({', '.join(members[:8]) or 'none'}): "
                                   f"name one as {path}:KEY")
            key = members[0]
        elif key not in members:
            self.zf.close()
            raise FeatlabError(f"{path} has no array {key!r} (it has: {', '.join(members[:8]) or 'none'})")
        self.key = key
        self.f = self.zf.open(key + ".npy")
        fmt = np.lib.format
        try:
            version = fmt.read_magic(self.f)
            reader = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, fortran, dtype = reader(self.f)
        except ValueError as e:
            self.close()
            raise FeatlabError(f"{self.where}: not a readable array ({e})") from None
        if dtype.hasobject:
            self.close()
            raise FeatlabError(f"{self.where}: not an array of numbers (dtype {dtype})")
        if fortran and len(shape) > 1:
            self.close()
            raise FeatlabError(f"{self.where} is stored in Fortran order, which cannot be read by rows: "
                               "save it C-ordered (np.ascontiguousarray) or as .npy")
        self.shape, self.dtype = tuple(shape), dtype
        self.row_items = int(np.prod(shape[1:], dtype=np.int64))
        self.pos = 0

    def rows(self, lo, hi):
        if lo != self.pos:
            raise ValueError(".npz members are read in order")
        n = (hi - lo) * self.row_items
        buf = self.f.read(n * self.dtype.itemsize)
        if len(buf) != n * self.dtype.itemsize:
            raise FeatlabError(f"{self.where} is truncated: rows {lo}..{hi - 1} are missing")
        self.pos = hi
        return np.frombuffer(buf, dtype=self.dtype).reshape((hi - lo, *self.shape[1:]))

    def close(self):
        if getattr(self, "f", None) is not None:
            self.f.close()
        self.zf.close()


class _HDF5Source(_Source):
    """An array of an HDF5 file (PyTables Array, CArray or EArray, or an h5py dataset), read by slices."""

    kind = "hdf5"

    def __init__(self, path, key):
        from .store import _tables

        tb = _tables()
        super().__init__(path, key)
        try:
            self.h5 = tb.open_file(str(path), mode="r")
        except Exception as e:  # noqa: BLE001
            raise FeatlabError(f"cannot read HDF5 file {path}: {e}") from None
        try:
            arrays = [n for n in self.h5.walk_nodes("/") if isinstance(n, tb.Array)]
            if key is None:
                if len(arrays) != 1:
                    have = ", ".join(n._v_pathname for n in arrays[:8]) or "none"
                    raise FeatlabError(f"{path} holds {len(arrays)} arrays ({have}): name one as {path}:/PATH")
                node = arrays[0]
            else:
                try:
                    node = self.h5.get_node("/" + key.lstrip("/"))
                except tb.NoSuchNodeError:
                    have = ", ".join(n._v_pathname for n in arrays[:8]) or "none"
                    raise FeatlabError(f"{path} has no array {key!r} (arrays: {have})") from None
                if not isinstance(node, tb.Array):
                    raise FeatlabError(f"{path}:{key} is a {type(node).__name__}, not an array")
            self.node, self.key = node, node._v_pathname
            self.shape, self.dtype = tuple(int(d) for d in node.shape), np.dtype(node.atom.dtype)
        except BaseException:
            self.h5.close()
            raise

    def rows(self, lo, hi):
        return np.asarray(self.node[lo:hi])

    def close(self):
        self.h5.close()


_READERS = {"npy": _NpySource, "npz": _NpzSource, "hdf5": _HDF5Source}


def open_source(spec: str) -> _Source:
    """Open the array named by ``spec`` (``FILE`` or ``FILE:KEY``) for block reads."""
    path, key = split_spec(spec)
    return _READERS[file_kind(path)](path, key)


# ------------------------------------------------------------------------------------ labels and ids
def carried_ids(src: _Source) -> str | None:
    """``FILE:KEY`` of an ids array the tap's own file carries beside it (a member of the same .npz, an
    array in the same HDF5 group) named one of :data:`ID_NAMES`; None when it carries none."""
    if src.kind == "npz":
        members = {n[:-4] for n in src.zf.namelist() if n.endswith(".npy")}
        name = next((m for m in ID_NAMES if m in members and m != src.key), None)
        return None if name is None else f"{src.path}:{name}"
    if src.kind == "hdf5":
        from .store import _tables

        parent = src.node._v_parent
        for m in ID_NAMES:
            child = parent._v_children.get(m)
            if child is not None and child is not src.node and isinstance(child, _tables().Array):
                return f"{src.path}:{child._v_pathname}"
    return None


def read_ids(spec: str) -> list[str]:
    """Row identifiers (image ids or paths), one per tap row: a 1-D array (.npy/.npz/HDF5, ``FILE:KEY``),
    a text file with one per line, or a CSV column (``FILE.csv:COLUMN``, or a CSV of one column)."""
    path, key = split_spec(spec)
    if path.suffix.lower() in ID_TEXT_SUFFIXES:
        if path.suffix.lower() == ".txt" and key is None:
            return [line.strip() for line in path.read_text().splitlines() if line.strip()]
        import pandas as pd

        df = pd.read_csv(path, dtype=str, keep_default_na=False, sep="\t" if path.suffix.lower() == ".tsv" else ",")
        if key is None:
            if df.shape[1] != 1:
                raise FeatlabError(f"--ids {path} has {df.shape[1]} columns: name one as {path}:COLUMN")
            key = df.columns[0]
        if key not in df.columns:
            raise FeatlabError(f"--ids {path} has no column {key!r} (it has: {', '.join(df.columns[:12])})")
        return [str(v) for v in df[key]]
    src = _READERS[file_kind(path)](path, key)
    try:
        if len(src.shape) != 1 and not (len(src.shape) == 2 and src.shape[1] == 1):
            raise FeatlabError(f"--ids {src.where} has shape {src.shape}: one id per row is needed")
        if src.dtype.hasobject or src.dtype.kind not in "SUiu":
            raise FeatlabError(f"--ids {src.where} holds {src.dtype} values, not ids (strings or integers)")
        vals = src.rows(0, src.nrows).reshape(-1)
    finally:
        src.close()
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in vals.tolist()]


def match_ids(df, ids: list[str], manifest_path: Path) -> np.ndarray:
    """Manifest row numbers of ``ids``, matched by image_id, else by path (absolute, relative to the
    manifest's folder, or the file name when file names are unique in the manifest). Each id gets a row of
    its own: two ids landing on one row (``/a/img1.jpg`` and ``/b/img1.jpg`` by file name) are refused in
    one line naming the first such rows."""
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise FeatlabError(f"--ids holds {dup!r} more than once")
    base = manifest_path.resolve().parent
    paths = [os.path.normpath(p) for p in df["path"]]
    names = [Path(p).name for p in paths]
    ways = [("image_id", list(df["image_id"]), lambda s: s),
            ("path", paths, lambda s: os.path.normpath(s if os.path.isabs(s) else str(base / s)))]
    if len(set(names)) == len(names):
        ways.append(("file name", names, lambda s: Path(s).name))
    best = collided = None
    for what, keys, norm in ways:
        lut = {k: i for i, k in enumerate(keys)}
        rows = [lut.get(norm(s), -1) for s in ids]
        missing = sum(r < 0 for r in rows)
        if not missing:
            shared = _shared_rows(rows, ids)
            if not shared:
                return np.asarray(rows, dtype=np.int64)
            collided = collided or (what, shared)
        elif best is None or missing < best[1]:
            best = (what, missing, ids[rows.index(-1)])
    if collided is not None:
        what, shared = collided
        shown = "; ".join(f"{' and '.join(repr(i) for i in names[:3])}{' and more' if len(names) > 3 else ''} -> "
                          f"image_id {df['image_id'].iloc[row]} ({df['path'].iloc[row]})" for row, names in shared[:3])
        raise FeatlabError(f"{sum(len(n) for _, n in shared):,} ids land on {len(shared):,} row(s) of {manifest_path} "
                           f"shared with another id (matched by {what}): {shown}{'; ...' if len(shared) > 3 else ''}; "
                           "give ids that name one face each (its image_id, or its path as the labels hold it)")
    raise FeatlabError(f"{best[1]:,} of {len(ids):,} ids match no row of {manifest_path} by image_id or path "
                       f"(e.g. {best[2]!r}, looked up by {best[0]})")


def _shared_rows(rows: list[int], ids: list[str]) -> list[tuple[int, list[str]]]:
    """(row, the ids matched to it) for every row matched by more than one id, in the order of the ids."""
    by_row: dict[int, list[str]] = {}
    for r, i in zip(rows, ids):
        by_row.setdefault(r, []).append(i)
    return [(r, names) for r, names in by_row.items() if len(names) > 1]


# ------------------------------------------------------------------------------------ import
@dataclass
class ImportReport:
    out: Path
    rows: int = 0
    taps: dict = field(default_factory=dict)  # tap -> stored shape
    model_sha256: str = ""
    seconds: float = 0.0
    dtypes: dict = field(default_factory=dict)  # tap -> stored dtype


def check_options(tapfiles, names, layout: str, dtype: str) -> list[str]:
    """Check the cheap arguments; returns the tap names (``names`` or the file stems)."""
    if not tapfiles:
        raise FeatlabError("no tap files given: featlab import TAPFILE... --labels LABELS.csv --backbone NAME --out FILE.h5")
    if layout not in LAYOUTS:
        raise FeatlabError(f"--layout must be {' or '.join(LAYOUTS)}, not {layout!r}")
    if dtype not in DTYPES:
        raise FeatlabError(f"--dtype must be {', '.join(DTYPES[:-1])} or {DTYPES[-1]}, not {dtype!r}")
    names = list(names or [])
    if names and len(names) != len(tapfiles):
        raise FeatlabError(f"{len(names)} --name for {len(tapfiles)} tap files: give one per file, in order")
    if not names:
        names = [_file_part(str(t)).stem for t in tapfiles]
    for n in names:
        if not n or "/" in n or n.startswith(".") or n != n.strip():
            raise FeatlabError(f"{n!r} is not a usable tap name: pass --name")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise FeatlabError(f"two taps would be named {dup!r}: pass --name for each file")
    return names


def _checked_block(x: np.ndarray, name: str, src: _Source, lo: int, out_dtype: np.dtype,
                   rows: np.ndarray | None = None) -> np.ndarray:
    """Refuse non-finite values and values the stored dtype cannot hold; one line naming the row (of the
    source: ``rows`` gives each block row's source row when they were reordered, else ``lo`` + i)."""
    def where(i: int) -> int:
        return int(rows[i]) if rows is not None else lo + i

    if x.dtype.kind == "f":
        bad = ~np.isfinite(x)
        if bad.any():
            idx = np.argwhere(bad)[0]
            raise FeatlabError(f"tap {name}: non-finite value {x[tuple(idx)]} at row {where(int(idx[0])):,} "
                               f"of {src.where}; nothing written")
    if x.size and (x.dtype.itemsize > out_dtype.itemsize or x.dtype.kind != "f"):
        limit = float(np.finfo(out_dtype).max)
        hi = max(float(x.max()), -float(x.min()))
        if hi > limit:
            flat = np.abs(x.astype(np.float64, copy=False)).reshape(len(x), -1).max(axis=1)
            row = where(int(np.argmax(flat > limit)))
            hint = " (import with --dtype float32)" if out_dtype == np.float16 else ""
            raise FeatlabError(f"tap {name}: value {hi:.6g} at row {row:,} of {src.where} is beyond "
                               f"{out_dtype.name}'s range ({limit:,.0f}){hint}; nothing written")
    return x


def imported_model_sha256(sources: list[dict], source_id: str | None = None) -> str:
    """``'imported:'`` + sha256 over the sources' hashes and keys (or over ``source_id``): never a model file's hash."""
    if source_id:
        text = f"source-id:{source_id}"
    else:
        text = "\n".join(f"{s['sha256']}:{s['key'] or ''}" for s in sources)
    return "imported:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def import_taps(tapfiles: list[str], labels: str | Path, backbone: str, out: str | Path, *, names=None,
                layout: str = "nchw", ids: str | None = None, dtype: str = "source", dataset: str | None = None,
                source_id: str | None = None, overwrite: bool = False, block_bytes: int | None = None,
                rows_in_manifest_order: bool = False) -> ImportReport:
    """Import one array per tap file into a new features file ``out`` (see the module docstring).

    ``tapfiles``: ``FILE`` or ``FILE:KEY`` each; ``names``: tap names (default: the file stems);
    ``layout``: ``"nhwc"`` transposes 3-D maps (rows, H, W, C) to featlab's (rows, C, H, W);
    ``ids``: per-row image ids or paths (see :func:`read_ids`) matching each tap row to its labels row;
    without it, ids the tap files carry (:func:`carried_ids`); the rows are written in the labels' order
    (a subset of the labels keeps their order). ``rows_in_manifest_order``: no ids, the user states that
    row i is the labels' row i; without ids and without it the import is refused (one line).
    ``dtype``: stored float32 or float16; ``"source"`` (the default) keeps each tap's own dtype: a float16
    source is stored as float16 (half the bytes of float32), every other source as float32.
    ``dataset``: the dataset name heads are filed under (default: the labels file's stem).
    """
    from .. import __version__
    from ..data.manifest import dataset_name, file_sha256, read_manifest

    t0 = time.perf_counter()
    names = check_options(tapfiles, names, layout, dtype)
    if not backbone or not str(backbone).strip() or "/" in str(backbone):
        raise FeatlabError("--backbone NAME is needed (the name heads trained on these taps are filed under)")
    out, labels = Path(out), Path(labels)
    if out.exists() and not overwrite:
        raise FeatlabError(f"{out} exists: choose another --out (or --force to replace it)")

    sources: list[_Source] = []
    spooled: list[Path] = []  # temporary copies of sources that cannot be read in any order
    try:
        for spec in tapfiles:
            sources.append(open_source(str(spec)))
        for name, src in zip(names, sources):
            if src.dtype.kind not in "iuf" or src.dtype.hasobject:
                raise FeatlabError(f"tap {name}: {src.where} holds {src.dtype} values, not numbers")
            if len(src.shape) < 2:
                raise FeatlabError(f"tap {name}: {src.where} has shape {src.shape}: need (rows, features...)")
            if layout == "nhwc" and len(src.shape) not in (2, 4):
                raise FeatlabError(f"tap {name}: --layout nhwc needs (rows, H, W, C) maps, {src.where} has shape {src.shape}")
        stored = {name: stored_dtype(src.dtype, dtype) for name, src in zip(names, sources)}
        counts = {name: src.nrows for name, src in zip(names, sources)}
        if len(set(counts.values())) > 1:
            have = ", ".join(f"{n} {c:,}" for n, c in counts.items())
            raise FeatlabError(f"the tap files disagree on the number of rows ({have})")
        n = sources[0].nrows
        if n == 0:
            raise FeatlabError(f"{sources[0].where} has no rows")

        df = read_manifest(labels)
        id_from = ids
        if not ids:
            carried = sorted({c for c in (carried_ids(src) for src in sources) if c})
            lists = [read_ids(c) for c in carried]
            if any(x != lists[0] for x in lists[1:]):
                raise FeatlabError(f"the tap files carry different ids ({', '.join(carried)}): pass --ids")
            id_from = carried[0] if carried else None
        if id_from and rows_in_manifest_order:
            raise FeatlabError(f"ids are given ({id_from}): leave out --rows-in-manifest-order, the ids match the rows")
        order = None  # the source row of each output row, when matching the ids reorders them
        if id_from:
            id_list = read_ids(id_from)
            if len(id_list) != n:
                raise FeatlabError(f"--ids {id_from} has {len(id_list):,} ids for {n:,} tap rows")
            mrows = match_ids(df, id_list, labels)
            perm = np.argsort(mrows, kind="stable")  # written in the labels' order, as an extraction would be
            df = df.iloc[mrows[perm]].reset_index(drop=True)
            if (perm != np.arange(n)).any():
                order = perm
            row_order = f"matched to the labels by the ids in {id_from}, written in the labels' order"
        elif not rows_in_manifest_order:
            raise FeatlabError(f"no ids for the {n:,} tap rows: nothing says which row of {labels.name} each one is "
                               "(rows in another order would get other faces' labels); pass --ids FILE (an image_id "
                               "or path per row), or --rows-in-manifest-order if row i is the labels' row i")
        elif len(df) != n:
            raise FeatlabError(f"the tap files have {n:,} rows but {labels} has {len(df):,}: rows must align "
                               "(or pass --ids to match them by image_id or path)")
        else:
            row_order = "the labels' rows in order, as stated by --rows-in-manifest-order (not checked)"
        from .store import FeatureStore, label_row

        label_rows = [label_row(r) for r in df.to_dict("records")]

        info = []
        for name, src in zip(names, sources):
            info.append({"tap": name, "file": str(src.path.resolve()), "key": src.key, "sha256": file_sha256(src.path),
                         "shape": list(src.shape), "dtype": src.dtype.name, "layout": layout})
        model_sha = imported_model_sha256(info, source_id)
        shapes = {}
        for name, src in zip(names, sources):
            s = tuple(src.shape[1:])
            shapes[name] = (s[2], s[0], s[1]) if layout == "nhwc" and len(s) == 3 else s

        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part")
        os.close(fd)
        tmp = Path(tmp_name)
        written = 0
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the output is an ordinary file
        try:
            identity = {"backbone": str(backbone), "model_sha256": model_sha,
                        "preprocessing": {"imported": True, "layout": layout}}
            with FeatureStore.open_for_append(tmp, identity) as store:
                store.set_attr("imported", True)
                store.set_attr("imported_from", info)
                store.set_attr("featlab_version", __version__)
                store.set_attr("dataset", dataset or dataset_name(labels))
                store.set_attr("manifest", str(labels.resolve()))
                store.set_attr("manifest_sha256", file_sha256(labels))
                store.set_attr("config", {"tapfiles": [str(t) for t in tapfiles], "labels": str(labels),
                                          "backbone": backbone, "names": names, "layout": layout, "ids": ids,
                                          "ids_from": id_from, "row_order": row_order,
                                          "dtype": dtype, "stored_dtypes": stored, "source_id": source_id})
                for name, src in zip(names, sources):
                    store.ensure_array(name, shapes[name], dtype=stored[name], expected_rows=n, tap=name, tensor=src.key)
                row_bytes = sum(int(np.prod(s, dtype=np.int64)) * 4 for s in shapes.values())
                block = max(1, int(block_bytes or BLOCK_BYTES) // max(1, row_bytes))
                if order is not None:  # rows taken in the labels' order: random access to every source
                    spools = [_random_access(src, out.parent, spooled, block) for src in sources]
                for lo in range(0, n, block):
                    hi = min(n, lo + block)
                    feats = {}
                    for i, (name, src) in enumerate(zip(names, sources)):
                        if order is None:
                            x = _checked_block(src.rows(lo, hi), name, src, lo, np.dtype(stored[name]))
                        else:
                            x = _checked_block(_take(spools[i], order[lo:hi]), name, src, lo, np.dtype(stored[name]),
                                               order[lo:hi])
                        if layout == "nhwc" and x.ndim == 4:
                            x = x.transpose(0, 3, 1, 2)
                        feats[name] = np.ascontiguousarray(x, dtype=stored[name])
                    store.append(feats, label_rows[lo:hi])
                    written = hi
            os.replace(tmp, out)
        except BaseException as e:
            full = copy_disk_full(e, out, tmp, after=f" after {written:,} of {n:,} rows")
            if full is None:
                raise
            raise full from None
    finally:
        for src in sources:
            src.close()
        spools = None
        for f in spooled:
            f.unlink(missing_ok=True)
    return ImportReport(out=out, rows=n, taps=shapes, model_sha256=model_sha, seconds=time.perf_counter() - t0,
                        dtypes=stored)


def stored_dtype(source: np.dtype, dtype: str) -> str:
    """The dtype a tap is stored in: ``dtype``, or for ``"source"`` float16 for a float16 source, else float32."""
    if dtype != "source":
        return dtype
    return "float16" if np.dtype(source) == np.float16 else "float32"


def _random_access(src: _Source, folder: Path, spooled: list[Path], block: int):
    """An array of ``src`` that can be indexed by any rows: a .npy's own memory map; other sources are
    first copied, in order and in blocks, into a temporary .npy beside the output (deleted at the end)."""
    if src.kind == "npy":
        return src.arr
    fd, name = tempfile.mkstemp(dir=folder, prefix=".import-", suffix=".npy")
    os.close(fd)
    spooled.append(Path(name))
    arr = np.lib.format.open_memmap(name, mode="w+", dtype=src.dtype, shape=src.shape)
    _reserve(name)
    for lo in range(0, src.nrows, block):
        hi = min(src.nrows, lo + block)
        arr[lo:hi] = src.rows(lo, hi)
    arr.flush()
    return arr


def _reserve(name: str) -> None:
    """Allocate a memory-mapped file's blocks now: a full disk is then an error here (ENOSPC), not a SIGBUS
    that kills the process when a page of the map is first written. A filesystem that cannot preallocate
    is left as it is."""
    with open(name, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as e:
            if disk_full(e) is not None:
                raise
        except AttributeError:  # no posix_fallocate on this platform
            pass


def _take(arr, rows: np.ndarray) -> np.ndarray:
    """``arr[rows]`` for rows in any order (read in increasing order, then put back in the asked order)."""
    pos = np.argsort(rows, kind="stable")
    x = np.asarray(arr[rows[pos]])
    out = np.empty_like(x)
    out[pos] = x
    return out


def describe_import(attrs: dict) -> list[str]:
    """Lines for `featlab info` about an imported file (empty for a featlab extraction)."""
    if not attrs.get("imported"):
        return []
    src = attrs.get("imported_from") or []
    if isinstance(src, str):
        src = json.loads(src)
    lines = [f"  imported (not extracted by featlab) from {len(src)} file(s):"]
    order = (attrs.get("config") or {}).get("row_order") if isinstance(attrs.get("config"), dict) else None
    if order:
        lines.append(f"    rows: {order}")
    for s in src:
        where = s["file"] + (f":{s['key']}" if s.get("key") else "")
        lines.append(f"    {s['tap']} <- {where}  {'x'.join(map(str, s['shape']))} {s['dtype']} {s.get('layout', '')}"
                     f"  sha256 {s['sha256'][:16]}…")
    return lines
