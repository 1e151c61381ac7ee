"""The feature store: one HDF5 file per (backbone, dataset), written with PyTables.

Layout::

    /labels            Table, one row per extracted face (image_id, path, age, gender, race, split, fold)
    /skipped           Table of images that could not be used, with the reason
    /taps/<key>        EArray (rows, *shape), float16 by default, row-aligned with /labels
    root attributes    backbone, model_sha256, model_path, preprocessing, flip, align,
                       taps (JSON: key -> tap, shape, dtype, pool), featlab_version,
                       manifest_sha256, dataset, config

A tap key is the tap name, with ``@avg``/``@max`` (global pooling) or
``@avg2``/``@max3`` (pooling to a 2x2/3x3 grid) appended when pooled.

Crash safety: rows are appended tap arrays first, then labels, then one flush.
On open, any tap array longer than /labels (a crash between the two) is
truncated to it, and a tap array shorter than /labels (a tap being added to
an existing file) is reported by :meth:`FeatureStore.lagging` so that the
extractor fills it. Arrays and labels are therefore always the same length
after :meth:`FeatureStore.open_for_append`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from .errors import FeatlabError

PATH_BYTES = 1024
CHUNK_BYTES = 1 << 20  # target chunk size of the tap arrays (bench/storage.py measures others)
READ_BLOCK_BYTES = 4 << 20  # FeatureStore.read converts this much stored data at a time


def _last_line(e: BaseException) -> str:
    """The last non-empty line of an exception's message (HDF5 errors carry a whole C back trace)."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return lines[-1] if lines else type(e).__name__


def _tables():
    import tables

    warnings.filterwarnings("ignore", category=tables.NaturalNameWarning)
    return tables


def _label_description():
    tb = _tables()
    return {
        "image_id": tb.StringCol(16, pos=0),
        "path": tb.StringCol(PATH_BYTES, pos=1),
        "age": tb.Float32Col(pos=2, dflt=np.nan),
        "gender": tb.StringCol(1, pos=3),
        "race": tb.StringCol(16, pos=4),
        "split": tb.StringCol(8, pos=5),
        "fold": tb.Int8Col(pos=6, dflt=-1),
    }


def _skipped_description():
    tb = _tables()
    return {
        "image_id": tb.StringCol(16, pos=0),
        "path": tb.StringCol(PATH_BYTES, pos=1),
        "reason": tb.StringCol(256, pos=2),
    }


COMPRESSION = {
    # name -> (complib, complevel); "none" is the default: float16 activations
    # compress poorly (~10-25 %) and every codec costs write speed.
    "none": (None, 0),
    "lz4": ("blosc2:lz4", 1),
    "zstd": ("blosc2:zstd", 1),
    "blosclz": ("blosc2:blosclz", 1),
}


_NO_CHUNK_CACHE = {"chunk_cache_size": 0}


def _has_compressed_taps(h5) -> bool:
    return "/taps" in h5 and any(getattr(n, "filters", None) is not None and n.filters.complevel > 0
                                 for n in h5.list_nodes("/taps"))


def parse_key(key: str) -> tuple[str, str | None, int]:
    """``'add_98@avg2'`` -> (``'add_98'``, ``'avg'``, 2); ``'add_98'`` -> (``'add_98'``, None, 0)."""
    if "@" not in key:
        return key, None, 0
    tap, pool = key.split("@", 1)
    kind = pool.rstrip("0123456789")
    if kind not in ("avg", "max"):
        raise FeatlabError(f"unknown pooling {pool!r} in {key!r}: use @avg, @max, or @avgN/@maxN for an NxN grid")
    grid = int(pool[len(kind):] or 0)
    return tap, kind, grid


def pool_features(x: np.ndarray, kind: str | None, grid: int) -> np.ndarray:
    """Pool (N, C, H, W) maps globally (grid 0) or to a grid x grid map by adaptive pooling."""
    if kind is None or x.ndim != 4:
        return x
    n, c, h, w = x.shape
    red = np.mean if kind == "avg" else np.max
    if grid <= 0:
        return red(x, axis=(2, 3))
    out = np.empty((n, c, grid, grid), dtype=x.dtype)
    for i in range(grid):
        h0, h1 = (i * h) // grid, -(-((i + 1) * h) // grid)
        for j in range(grid):
            w0, w1 = (j * w) // grid, -(-((j + 1) * w) // grid)
            out[:, :, i, j] = red(x[:, :, h0:h1, w0:w1], axis=(2, 3))
    return out


def pooled_shape(shape: tuple[int, ...], kind: str | None, grid: int) -> tuple[int, ...]:
    if kind is None or len(shape) != 3:
        return tuple(shape)
    return (shape[0],) if grid <= 0 else (shape[0], grid, grid)


class FeatureStore:
    """An open feature file. Use :meth:`open_for_append` (extract) or :meth:`open_read` (heads)."""

    def __init__(self, h5, path: Path):
        self.h5 = h5
        self.path = Path(path)

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def open_read(cls, path: Path | str) -> "FeatureStore":
        path = Path(path)
        if not path.is_file():
            raise FeatlabError(f"features file not found: {path} (make it with `featlab extract`)")
        tb = _tables()
        try:
            h5 = tb.open_file(str(path), mode="r")
        except Exception as e:  # noqa: BLE001
            raise FeatlabError(f"cannot read features file {path}: {_last_line(e)}") from None
        if "/labels" not in h5:
            h5.close()
            raise FeatlabError(f"{path} is not a featlab features file (no /labels table)")
        return cls(h5, path)

    @classmethod
    def open_for_append(cls, path: Path | str, identity: dict, compression: str | None = None) -> "FeatureStore":
        """Create the file, or reopen it after checking that ``identity`` matches.

        ``identity`` holds what must never mix within one file: backbone,
        model_sha256, preprocessing, flip, align. A mismatch is refused.

        ``compression``: what new tap arrays will use. While every tap array of
        the file is uncompressed, HDF5's chunk cache is turned off: appended rows
        then go straight from the array to the file instead of through a cache
        copy (about 1.6x the write speed; measured in bench/storage.py). Compressed
        arrays keep the cache, which holds partly filled chunks between appends.
        """
        tb = _tables()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        raw = COMPRESSION.get(compression or "none", (None, 0))[0] is None
        if path.exists() and path.stat().st_size > 0:
            try:
                h5 = tb.open_file(str(path), mode="a", **(_NO_CHUNK_CACHE if raw else {}))
                if raw and _has_compressed_taps(h5):
                    h5.close()
                    h5 = tb.open_file(str(path), mode="a")
            except Exception as e:  # noqa: BLE001
                raise FeatlabError(
                    f"cannot reopen {path} to resume ({_last_line(e)}); the file is damaged: move it aside and extract again"
                ) from None
            store = cls(h5, path)
            try:
                store._check_identity(identity)
                store._repair()
            except BaseException:
                h5.close()
                raise
            return store
        h5 = tb.open_file(str(path), mode="w", title="featlab features", **(_NO_CHUNK_CACHE if raw else {}))
        h5.create_table("/", "labels", _label_description(), "faces, row-aligned with /taps/*")
        h5.create_table("/", "skipped", _skipped_description(), "images not used, with the reason")
        h5.create_group("/", "taps", "intermediate activations")
        for k, v in identity.items():
            h5.root._v_attrs[k] = json.dumps(v) if isinstance(v, (dict, list)) else v
        h5.root._v_attrs["taps"] = json.dumps({})
        h5.flush()
        return cls(h5, path)

    def _check_identity(self, identity: dict) -> None:
        attrs = self.h5.root._v_attrs
        for k, v in identity.items():
            if k not in attrs:
                continue
            have = attrs[k]
            want = json.dumps(v) if isinstance(v, (dict, list)) else v
            if isinstance(have, np.generic):
                have = have.item()
            if have != want:
                what = "a different model file" if k == "model_sha256" else f"a different {k}"
                raise FeatlabError(
                    f"{self.path} was extracted with {what} ({k}={have!r}, now {want!r}); "
                    "features from different settings never mix: use another --out"
                )

    def _repair(self) -> None:
        n = self.nrows
        for key in self.keys():
            arr = self.array(key)
            if arr.nrows > n:
                arr.truncate(n)
        self.h5.flush()

    def close(self) -> None:
        if self.h5.isopen:
            self.h5.flush()
            self.h5.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- metadata ------------------------------------------------------------------------
    @property
    def attrs(self) -> dict:
        out = {}
        a = self.h5.root._v_attrs
        for k in a._v_attrnamesuser:
            v = a[k]
            if isinstance(v, np.generic):
                v = v.item()
            if isinstance(v, str) and v[:1] in "{[":
                try:
                    v = json.loads(v)
                except ValueError:
                    pass
            out[k] = v
        return out

    def set_attr(self, key: str, value) -> None:
        self.h5.root._v_attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value

    def tap_info(self) -> dict:
        return self.attrs.get("taps", {}) or {}

    def keys(self) -> list[str]:
        return [n._v_name for n in self.h5.list_nodes("/taps")]

    def resolve_key(self, key: str) -> str | None:
        """The stored key for ``key``: itself, or the key stored for another name of the same tap and pooling
        (``add_98`` and ``stage4_unit3_out`` are one tensor on an IResNet-100)."""
        if key in self.keys():
            return key
        name, kind, grid = parse_key(key)
        pool = f"{kind}{grid or ''}" if kind else None
        for k, t in self.tap_info().items():
            names = {t.get("tap"), parse_key(k)[0], *(t.get("aliases") or [])}
            if name in names and t.get("pool") == pool and k in self.keys():
                return k
        return None

    def _node(self, key: str):
        """The array stored under exactly ``key`` (fast path of :meth:`array`, for appends)."""
        try:
            return self.h5.get_node("/taps", key)
        except _tables().NoSuchNodeError:
            return self.array(key)

    def array(self, key: str):
        found = self.resolve_key(key)
        if found is None:
            have = ", ".join(self.keys()) or "none"
            raise FeatlabError(f"{self.path} has no tap {key!r} (it has: {have}); extract it with `featlab extract --layer {key}`")
        return self.h5.get_node("/taps", found)

    @property
    def nrows(self) -> int:
        return self.h5.root.labels.nrows

    def lagging(self) -> dict[str, int]:
        """Tap keys whose arrays are shorter than /labels, with their current length."""
        n = self.nrows
        return {k: self.array(k).nrows for k in self.keys() if self.array(k).nrows < n}

    def done_ids(self) -> set[str]:
        ids = set(x.decode() for x in self.h5.root.labels.col("image_id"))
        ids.update(x.decode() for x in self.h5.root.skipped.col("image_id"))
        return ids

    # ---- writing -------------------------------------------------------------------------
    def ensure_array(self, key: str, shape: tuple[int, ...], dtype: str = "float16", compression: str = "none",
                     expected_rows: int = 10000, tap: str | None = None, tensor: str | None = None,
                     aliases: tuple[str, ...] = (), chunk_bytes: int = CHUNK_BYTES):
        tb = _tables()
        if self.resolve_key(key) is not None:
            arr = self.array(key)
            if tuple(arr.shape[1:]) != tuple(shape):
                raise FeatlabError(f"{self.path}: tap {key} has shape {tuple(arr.shape[1:])}, the backbone now gives {tuple(shape)}")
            return arr
        complib, level = COMPRESSION[compression]
        filters = tb.Filters(complevel=level, complib=complib, shuffle=False) if complib else None
        atom = tb.Float16Atom() if dtype == "float16" else tb.Float32Atom()
        row_bytes = int(np.prod(shape)) * (2 if dtype == "float16" else 4)
        # chunks of at most ~chunk_bytes (1 MiB), at least one row: contiguous row ranges read fast. A power
        # of two rows, so that batches of 32/64/128/256 rows fill whole chunks (no partly written chunk to
        # revisit at the next append: ~10 % faster appends, bench/storage.py)
        fit = max(1, min(1024, int(chunk_bytes) // max(1, row_bytes)))
        rows_per_chunk = 1 << (fit.bit_length() - 1)
        arr = self.h5.create_earray("/taps", key, atom=atom, shape=(0, *shape), filters=filters,
                                    chunkshape=(rows_per_chunk, *shape), expectedrows=expected_rows)
        info = self.tap_info()
        t, kind, grid = parse_key(key)
        info[key] = {"tap": tap or t, "tensor": tensor, "aliases": sorted(set(aliases) - {key}), "shape": list(shape), "dtype": dtype,
                     "pool": (f"{kind}{grid or ''}" if kind else None), "compression": compression}
        self.set_attr("taps", info)
        return arr

    def append(self, features: dict[str, np.ndarray], labels: list[tuple], skipped: list[tuple] = ()) -> None:
        """Append one block: tap rows first, then labels, then skipped; then flush."""
        n = len(labels)
        for key, x in (features.items() if n else ()):
            if len(x) != n:
                raise ValueError(f"tap {key}: {len(x)} rows for {n} labels")
            arr = self._node(key)
            arr.append(x.astype(arr.atom.dtype, copy=False))
        if n:
            table = self.h5.root.labels
            try:  # one structured array converts faster than PyTables does a list of tuples
                rows = np.array(labels, dtype=table.dtype)
            except (TypeError, ValueError):
                rows = labels
            table.append(rows)
        if skipped:
            self.h5.root.skipped.append(list(skipped))
        self.h5.flush()

    def fill(self, key: str, x: np.ndarray) -> None:
        """Append rows to a lagging tap array (one being added to an existing file)."""
        arr = self.array(key)
        if arr.nrows + len(x) > self.nrows:
            raise ValueError("fill past the labels")
        arr.append(x.astype(arr.atom.dtype, copy=False))
        self.h5.flush()

    # ---- reading -------------------------------------------------------------------------
    def labels(self):
        """The labels table as a DataFrame (strings decoded; age NaN, fold -1 when unknown)."""
        import pandas as pd

        t = self.h5.root.labels.read()
        df = pd.DataFrame({
            "image_id": [x.decode() for x in t["image_id"]],
            "path": [x.decode("utf-8", "replace") for x in t["path"]],
            "age": t["age"].astype(np.float64),
            "gender": [x.decode() for x in t["gender"]],
            "race": [x.decode() for x in t["race"]],
            "split": [x.decode() for x in t["split"]],
            "fold": t["fold"].astype(np.int64),
        })
        return df

    def skipped(self):
        import pandas as pd

        t = self.h5.root.skipped.read()
        df = pd.DataFrame({
            "image_id": [x.decode() for x in t["image_id"]],
            "path": [x.decode("utf-8", "replace") for x in t["path"]],
            "reason": [x.decode("utf-8", "replace") for x in t["reason"]],
        })
        return df.drop_duplicates("image_id", keep="last").reset_index(drop=True)

    def read(self, key: str, rows=None, dtype=np.float32) -> np.ndarray:
        """Read tap rows: all, a slice, or an index array (in any order; sorted internally).

        Rows are read ~4 MiB at a time into the output, converted on the way, so
        no full-size float16 temporary is made. For an index array, a stretch of
        the file where at least a quarter of the rows are wanted is read whole and
        the rows taken from it; sparser ones are read as contiguous runs
        (PyTables fancy indexing is slow, slices are fast).
        """
        arr = self.array(key)
        shape = tuple(arr.shape[1:])
        block = max(1, READ_BLOCK_BYTES // max(1, int(np.prod(shape)) * arr.atom.dtype.itemsize))
        lut = _f16_lut() if arr.atom.dtype == np.float16 and np.dtype(dtype) == np.float32 else None

        def conv(values, dest=None):  # stored rows -> dtype (float16 -> float32 by table: exact, ~2x NumPy's cast)
            if lut is None:
                if dest is None:
                    return values.astype(dtype, copy=False)
                dest[...] = values
                return dest
            return np.take(lut, values.view(np.uint16), out=dest)

        if rows is None:
            rows = slice(0, arr.nrows)
        if isinstance(rows, slice):
            lo, hi, step = rows.indices(arr.nrows)
            if step != 1:
                return arr[rows].astype(dtype, copy=False)
            out = np.empty((max(0, hi - lo), *shape), dtype=dtype)
            for i in range(lo, hi, block):
                j = min(hi, i + block)
                conv(arr[i:j], out[i - lo : j - lo])
            return out
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return np.empty((0, *shape), dtype=dtype)
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        in_order = bool((order == np.arange(len(order))).all())
        out = np.empty((len(rows), *shape), dtype=dtype)

        def put(a: int, b: int, values) -> None:  # output positions a:b of the sorted rows
            if in_order:
                conv(values, out[a:b])
            else:
                out[order[a:b]] = conv(values)

        i = 0
        while i < len(srt):
            lo = int(srt[i])
            j = int(np.searchsorted(srt, lo + block, side="left"))
            hi = int(srt[j - 1]) + 1
            if 4 * (j - i) >= hi - lo:  # dense stretch: one read, then take the rows
                put(i, j, arr[lo:hi][srt[i:j] - lo])
            else:  # sparse: contiguous runs
                breaks = np.flatnonzero(np.diff(srt[i:j]) != 1) + 1 + i
                a = i
                for b in [*breaks.tolist(), j]:
                    put(a, b, arr[int(srt[a]) : int(srt[b - 1]) + 1])
                    a = b
            i = j
        return out


_LUT = []


def _f16_lut() -> np.ndarray:
    """float32 value of every float16 bit pattern (256 KiB; fits in L2)."""
    if not _LUT:
        _LUT.append(np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32))
    return _LUT[0]


def _missing(v) -> bool:
    if v is None:
        return True
    try:
        return bool(v != v) or str(v) in ("<NA>", "")  # NaN, pandas NA
    except (TypeError, ValueError):
        return True


def label_row(r) -> tuple:
    """A /labels row from a manifest record (a pandas row or dict)."""
    path = str(r["path"]).encode("utf-8")
    if len(path) > PATH_BYTES:
        raise FeatlabError(f"path longer than {PATH_BYTES} bytes: {r['path'][:80]}...")
    return (
        str(r["image_id"]).encode(),
        path,
        np.float32(np.nan if _missing(r["age"]) else float(r["age"])),
        (str(r["gender"] or "")[:1]).encode(),
        str(r["race"] or "").encode()[:16],
        str(r["split"] or "").encode()[:8],
        np.int8(-1 if _missing(r["fold"]) else int(r["fold"])),
    )
