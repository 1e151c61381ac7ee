"""The feature store: one HDF5 file per (backbone, dataset), written with PyTables.

Layout::

    /labels            Table, one row per extracted face (image_id, path, age, gender, race, split, fold,
                       group, age_low, age_high)
    /skipped           Table of images that could not be used, with the reason
    /warnings          Table of faces stored with a warning (no face found in the chip), with the reason
                       (files from before it get the table, empty, when reopened for append)
    /taps/<key>        EArray (rows, *shape), float16 by default, row-aligned with /labels
    root attributes    backbone, model_sha256, model_path, preprocessing, flip, align,
                       taps (JSON: key -> tap, shape, dtype, pool, nonfinite, checked_rows),
                       featlab_version, manifest, manifest_sha256, dataset, config

Labels follow the manifest: ``manifest_sha256`` is the hash of the manifest
the labels were last taken from. :meth:`FeatureStore.sync_labels` rewrites the
labels of stored rows from a (re-prepared) manifest by image id, without
touching the taps; :meth:`FeatureStore.check_labels_current` refuses a file
whose manifest changed since. Files from before ``group``/``age_low``/``age_high``
read with defaults ('' and the age) and get the columns when reopened for append.

Finite values only: :meth:`FeatureStore.append` and :meth:`FeatureStore.fill`
refuse a block holding inf or nan after the cast to the stored dtype (a
float16 overflow above 65,504, or a backbone's own nan) before writing any of
it, with one line naming the tap. Each tap's info records ``nonfinite`` (values
found) and ``checked_rows`` (rows counted, from row 0); rows of older files are
counted once when the file is reopened for append. :meth:`FeatureStore.check_finite`
is the check for readers (heads).

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

import contextlib

import glob
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np

from ..errors import DiskFull, FeatlabError, did_you_mean, disk_full, filled_up

PATH_BYTES = 1024
GROUP_BYTES = 64
CHUNK_BYTES = 1 << 20  # target chunk size of the tap arrays (bench/storage.py measures others)
READ_BLOCK_BYTES = 4 << 20  # FeatureStore.read converts this much stored data at a time


def _last_line(e: BaseException) -> str:
    """The last non-empty line of an exception's message (HDF5 errors carry a whole C back trace)."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return lines[-1] if lines else type(e).__name__


def _tables():
    import tables

    warnings.filterwarnings("ignore", category=tables.NaturalNameWarning)
    quiet_hdf5()
    return tables


def quiet_hdf5() -> None:
    """No HDF5 diagnostics on stderr from this thread (a full disk would print ~150 lines of C back trace
    before featlab's one line). HDF5 keeps this setting per thread, and PyTables sets it only in the thread
    that imports it; the back trace still travels in the exception (``HDF5ExtError``)."""
    import tables

    tables.silence_hdf5_messages(True)


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
        "group": tb.StringCol(GROUP_BYTES, pos=7),
        "age_low": tb.Float32Col(pos=8, dflt=np.nan),
        "age_high": tb.Float32Col(pos=9, dflt=np.nan),
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


class FeatureStore:
    """An open feature file. Use :meth:`open_for_append` (extract) or :meth:`open_read` (heads)."""

    committed: dict[str, int] = {}  # resolved path -> rows after its last whole append (for a refused write's line)

    def __init__(self, h5, path: Path):
        self.h5 = h5
        self.path = Path(path)
        self._labels_read = None  # the decoded labels of a file open for reading (see labels())

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    @contextlib.contextmanager
    def reading(cls, features):
        """``with FeatureStore.reading(features) as store``: ``features`` as it is when it is an open store
        (left open: its opener closes it), else the file at that path opened for reading and closed after;
        so that one head's, or one grid's, whole data path reads through one opening of the file."""
        if isinstance(features, FeatureStore):
            yield features
            return
        with cls.open_read(features) as store:
            yield store

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
            if SHARD_INDEX_ATTR in h5.root._v_attrs._v_attrnamesuser:  # the index of a sharded set
                index_attrs = FeatureStore(h5, path).attrs
                h5.close()
                return ShardedStore(path, index_attrs[SHARD_INDEX_ATTR], index_attrs)
            h5.close()
            if "/labels_old" in h5:
                raise FeatlabError(f"{path}: an upgrade of its labels table was interrupted; "
                                   "run `featlab extract` on it again to finish it")
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
                try:
                    h5 = tb.open_file(str(path), mode="a", **(_NO_CHUNK_CACHE if raw else {}))
                except Exception as e:  # noqa: BLE001
                    cut = _uncut(path, e)
                    if cut is None:
                        raise
                    h5 = tb.open_file(str(path), mode="a", **(_NO_CHUNK_CACHE if raw else {}))
                    if "/labels" in h5 and (h5.root.labels.col("image_id") == b"").any():
                        h5.close()  # rows recorded but never written: not a file cut after whole batches
                        os.truncate(path, cut)
                        raise FeatlabError("labels recorded but never written") from None
                if raw and _has_compressed_taps(h5):
                    h5.close()
                    h5 = tb.open_file(str(path), mode="a")
            except Exception as e:  # noqa: BLE001
                raise FeatlabError(
                    f"cannot reopen {path} to resume ({_last_line(e)}); the file is damaged: move it aside and extract again"
                ) from None
            for m in _cut_markers(path):
                m.unlink(missing_ok=True)
            store = cls(h5, path)
            FeatureStore.committed[str(path.resolve())] = int(store.nrows) if "/labels" in h5 else 0
            try:
                if "/labels" not in h5 and SHARD_INDEX_ATTR in h5.root._v_attrs._v_attrnamesuser:
                    n = store.attrs[SHARD_INDEX_ATTR].get("count")
                    raise FeatlabError(f"{path} is the index of a sharded set of {n} shards: extract into it with "
                                       f"--shards {n}, or choose another --out")
                store._check_identity(identity)
                store._repair()
            except BaseException:
                h5.close()
                raise
            return store
        h5 = tb.open_file(str(path), mode="w", title="featlab features", **(_NO_CHUNK_CACHE if raw else {}))
        h5.create_table("/", "labels", _label_description(), "faces, row-aligned with /taps/*")
        h5.create_table("/", "skipped", _skipped_description(), "images not used, with the reason")
        h5.create_table("/", "warnings", _skipped_description(), "faces stored with a warning, with the reason")
        h5.create_group("/", "taps", "intermediate activations")
        for k, v in identity.items():
            h5.root._v_attrs[k] = json.dumps(v) if isinstance(v, (dict, list)) else v
        h5.root._v_attrs["taps"] = json.dumps({})
        h5.flush()
        FeatureStore.committed[str(path.resolve())] = 0
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
            if k == "preprocessing":  # by name; a file from before names were recorded gets the one used then
                from ..paths import canonical_preprocessing

                a_have = attrs["align"] if "align" in attrs else identity.get("align", False)
                if isinstance(a_have, np.generic):
                    a_have = a_have.item()
                x = canonical_preprocessing(have, bool(a_have))
                y = canonical_preprocessing(v, bool(identity.get("align", False)))
                if x != y:
                    nx, ny = (p.get("name") if isinstance(p, dict) else None for p in (x, y))
                    shown = (nx, ny) if nx != ny else (have, want)
                    raise FeatlabError(
                        f"{self.path} was extracted with a different preprocessing ({shown[0]}, now {shown[1]}); "
                        "features from different settings never mix: use another --out (or the same --preprocessing)"
                    )
                continue
            if have != want:
                what = "a different model file" if k == "model_sha256" else f"a different {k}"
                raise FeatlabError(
                    f"{self.path} was extracted with {what} ({k}={have!r}, now {want!r}); "
                    "features from different settings never mix: use another --out"
                )

    def _repair(self) -> None:
        self._upgrade_labels()
        if "/warnings" not in self.h5:  # a file from before warnings were recorded
            self.h5.create_table("/", "warnings", _skipped_description(), "faces stored with a warning, with the reason")
        n = self.nrows
        for key in self.keys():
            arr = self.array(key)
            if arr.nrows > n:
                arr.truncate(n)
        self.h5.flush()
        self._count_unchecked()

    def _upgrade_labels(self) -> None:
        """Give a labels table from before ``group``/``age_low``/``age_high`` those columns (defaults: '' and
        the age). The new table is written beside the old one and swapped in; an interrupted swap is undone
        and redone here."""
        h5 = self.h5
        if "/labels" not in h5 and "/labels_old" in h5:  # killed between the two renames
            h5.rename_node("/labels_old", "labels")
        for leftover in ("/labels_new", "/labels_old"):
            if leftover in h5:
                h5.remove_node(leftover)
        table = h5.root.labels
        if set(table.colnames) >= set(_label_description()):
            return
        old = table.read()
        new = h5.create_table("/", "labels_new", _label_description(), table.title, expectedrows=max(1, len(old)))
        rows = np.zeros(len(old), dtype=new.dtype)
        for c in old.dtype.names:
            if c in rows.dtype.names:
                rows[c] = old[c]
        defaults = _label_defaults(old)
        for c, v in defaults.items():
            rows[c] = v
        new.append(rows)
        h5.flush()
        h5.rename_node("/labels", "labels_old")
        h5.rename_node("/labels_new", "labels")
        h5.remove_node("/labels_old")
        h5.flush()

    def close(self) -> None:
        if self.h5.isopen:
            try:
                self.h5.flush()
            finally:  # a flush refused (a full disk) still closes the file: what was flushed before stays whole
                if self.h5.isopen:
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
            raise self.missing_tap(key)
        return self.h5.get_node("/taps", found)

    def missing_tap(self, key: str, where: str = "") -> FeatlabError:
        """The one line for a tap this file lacks: the nearest stored names, and the command that adds the tap
        to this file, filled in with what the file records (manifest, backbone, model file, preprocessing,
        alignment, mirroring), ready to paste."""
        have = self.keys()
        return FeatlabError(f"{self.path}{where} has no tap {key!r} (it has: {', '.join(have) or 'none'}); "
                            f"{did_you_mean(key, have)}"
                            f"to add it to this file: {self.extract_command(key)}")

    def extract_command(self, layer: str) -> str:
        """``featlab extract`` that adds ``layer`` to this file, with the options it was made with."""
        import shlex

        a = self.attrs
        pre = a.get("preprocessing")
        args = ["featlab", "extract"]
        if a.get("manifest"):
            args += ["-m", str(a["manifest"])]
        if a.get("backbone"):
            args += ["-b", str(a["backbone"])]
        if a.get("model_path"):
            args += ["--model", str(a["model_path"])]
        if isinstance(pre, dict) and pre.get("name"):
            args += ["--preprocessing", str(pre["name"])]
        if a.get("align"):
            args.append("--align")
        if a.get("flip"):
            args.append("--flip")
        args += ["--layer", layer, "-o", str(self.path)]
        return " ".join(shlex.quote(x) for x in args)

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
                     aliases: tuple[str, ...] = (), chunk_bytes: int = CHUNK_BYTES, depth: float | None = None):
        tb = _tables()
        if self.resolve_key(key) is not None:
            arr = self.array(key)
            if tuple(arr.shape[1:]) != tuple(shape):
                raise FeatlabError(f"{self.path}: tap {key} has shape {tuple(arr.shape[1:])}, the backbone now gives {tuple(shape)}")
            if arr.nrows or str(arr.atom.dtype) == dtype:
                self._record_depth(arr._v_name, depth)
                return arr
            # an empty array of the other dtype (a float16 run stopped by an overflow at its first batch): redo it
            key = arr._v_name
            self.h5.remove_node(arr)
            info = self.tap_info()
            info.pop(key, None)
            self.set_attr("taps", info)
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
                     "pool": (f"{kind}{grid or ''}" if kind else None), "compression": compression,
                     "nonfinite": 0, "checked_rows": 0}
        if depth is not None and depth == depth:  # not NaN
            info[key]["depth"] = float(depth)
        self.set_attr("taps", info)
        return arr

    def _record_depth(self, key: str, depth: float | None) -> None:
        """The tap's relative depth (0 = input, 1 = embedding), for a file made before featlab recorded it."""
        info = self.tap_info()
        if depth is None or depth != depth or key not in info or "depth" in info[key]:
            return
        info[key]["depth"] = float(depth)
        self.set_attr("taps", info)

    def _checked(self, features: dict[str, np.ndarray], first_row: int, ids=None) -> dict[str, np.ndarray]:
        """``features`` (rows ``first_row``...) cast to the stored dtypes, after checking that every value is
        finite. A block with inf or nan raises (one line naming the tap and the image) before anything is
        written. ``ids``: image ids of the rows, when they are not in /labels yet."""
        out = {}
        for key, x in features.items():
            arr = self._node(key)
            with np.errstate(over="ignore"):  # an overflow is found below, and said in one line
                y = x.astype(arr.atom.dtype, copy=False)
            bad = _nonfinite_mask(y)
            if bad is not None:
                raise FeatlabError(self._nonfinite_message(key, x, y, bad, first_row, ids))
            out[key] = y
        return out

    def _nonfinite_message(self, key, x, y, bad, first_row: int, ids=None) -> str:
        per_row = bad.reshape(len(bad), -1).sum(axis=1)
        i = int(np.flatnonzero(per_row)[0])
        image = ids[i] if ids is not None else self._image_id(first_row + i)
        image = image.decode() if isinstance(image, bytes) else str(image)
        what = f"{int(per_row.sum()):,} values in {int(np.count_nonzero(per_row))} of {len(y)} faces, first image " \
               f"{image} (row {first_row + i})"
        came_finite = x.dtype != y.dtype and bool(np.isfinite(x).all())
        in_graph_cast = x.dtype == y.dtype == np.float16
        nan = bool(np.isnan(y).any())
        if came_finite or (in_graph_cast and not nan):
            big = f", largest |x| {float(np.abs(x).max()):,.0f}" if came_finite else ""
            return (f"{self.path}: tap {key} overflows float16 ({what}: |x| > 65,504{big}); nothing of this batch "
                    f"was stored (earlier rows are fine): extract this tap with `--dtype float32`"
                    + (" into a new --out (this file stores it as float16)" if self._node(key).nrows else ""))
        return (f"{self.path}: the backbone gives non-finite values (nan/inf) in tap {key} ({what}); nothing of "
                "this batch was stored: check the model file and its preprocessing")

    def _image_id(self, row: int) -> str:
        t = self.h5.root.labels
        if 0 <= row < t.nrows:
            return t.cols.image_id[row].decode()
        return "?"

    def _record_checked(self, keys) -> None:
        info = self.tap_info()
        for key in keys:
            name = self._node(key)._v_name
            if name in info:
                info[name]["checked_rows"] = int(self._node(key).nrows)
                info[name].setdefault("nonfinite", 0)
        self.set_attr("taps", info)

    def append(self, features: dict[str, np.ndarray], labels: list[tuple], skipped: list[tuple] = (),
               warned: list[tuple] = ()) -> None:
        """Append one block: tap rows first, then labels, then skipped and warnings (rows of
        ``(image_id, path, reason)`` bytes); then flush."""
        quiet_hdf5()  # the writer may be a thread of its own (featlab.features.extract's committer)
        n = len(labels)
        for key, x in (features.items() if n else ()):
            if len(x) != n:
                raise ValueError(f"tap {key}: {len(x)} rows for {n} labels")
        if n:
            features = self._checked(features, self.nrows, ids=[r[0] for r in labels])
        before = self._lengths()
        try:
            if n:
                for key, y in features.items():
                    self._node(key).append(y)
                self._record_checked(features)
                table = self.h5.root.labels
                try:  # one structured array converts faster than PyTables does a list of tuples
                    rows = np.array(labels, dtype=table.dtype)
                except (TypeError, ValueError):
                    rows = labels
                table.append(rows)
            if skipped:
                self.h5.root.skipped.append(list(skipped))
            if warned:
                self.h5.root.warnings.append(list(warned))
            self.h5.flush()
            FeatureStore.committed[str(self.path.resolve())] = int(self.nrows)
        except BaseException:
            self._roll_back(before)
            raise

    def _lengths(self) -> dict:
        """What :meth:`_roll_back` restores: every array's and table's row count, and the taps attribute."""
        nodes = {key: self._node(key) for key in self.keys()}
        nodes.update(labels=self.h5.root.labels, skipped=self.h5.root.skipped)
        if "/warnings" in self.h5:
            nodes["warnings"] = self.h5.root.warnings
        return {"rows": {k: (node, int(node.nrows)) for k, node in nodes.items()},
                "taps": self.h5.root._v_attrs["taps"] if "taps" in self.h5.root._v_attrs else None}

    def _roll_back(self, before: dict) -> None:
        """After a write that failed half-way (a full disk): cut every array and table back to its length
        before it, so that the file records only whole blocks when it is closed (best effort: the disk may
        refuse this too, and the next open for append cuts the taps to the labels anyway)."""
        try:
            for node, n in before["rows"].values():
                node.truncate(n)  # also when PyTables' count did not move: HDF5 extends a dataset before it writes
            if before["taps"] is not None:
                self.h5.root._v_attrs["taps"] = before["taps"]
        except Exception:  # noqa: BLE001 - the write's own error is the one to report
            pass

    def fill(self, key: str, x: np.ndarray) -> None:
        """Append rows to a lagging tap array (one being added to an existing file)."""
        quiet_hdf5()
        arr = self.array(key)
        if arr.nrows + len(x) > self.nrows:
            raise ValueError("fill past the labels")
        y = self._checked({key: x}, arr.nrows)[key]
        arr.append(y)
        self._record_checked([key])
        self.h5.flush()

    # ---- reading -------------------------------------------------------------------------
    def labels(self):
        """The labels table as a DataFrame (strings decoded; age NaN, fold -1 when unknown). A file open
        for reading decodes its table once (each call gets its own copy)."""
        import pandas as pd

        if self._labels_read is not None:
            return self._labels_read.copy()
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
        for c, v in _label_defaults(t).items():  # a file from before these columns
            t = _with_column(t, c, v)
        df["group"] = [x.decode("utf-8", "replace") for x in t["group"]]
        df["age_low"] = t["age_low"].astype(np.float64)
        df["age_high"] = t["age_high"].astype(np.float64)
        if self.h5.mode == "r":  # nothing can change it while it is open
            self._labels_read = df.copy()
        return df

    def sync_labels(self, manifest_df) -> tuple[int, int]:
        """Rewrite the labels of stored rows from ``manifest_df`` (by image id), taps untouched.

        Rows whose image is no longer in the manifest are kept but left out of
        every split: split '' and fold -1. Returns (rows changed, rows not in
        the manifest). Only changed rows are written; run it again after a crash."""
        table = self.h5.root.labels
        n = table.nrows
        if n == 0:
            return 0, 0
        have = table.read()
        ids = [x.decode() for x in have["image_id"]]
        by_id = {}
        for r in manifest_df.to_dict("records"):
            by_id.setdefault(str(r["image_id"]), r)
        want = have.copy()
        gone = 0
        for i, image_id in enumerate(ids):
            r = by_id.get(image_id)
            if r is None:
                gone += 1
                want["split"][i] = b""
                want["fold"][i] = -1
            else:
                want[i] = label_row(r)
        raw = (n, have.dtype.itemsize)
        a, b = (np.frombuffer(x.tobytes(), np.uint8).reshape(raw) for x in (have, want))
        changed = np.flatnonzero((a != b).any(axis=1))
        if len(changed):
            table.modify_coordinates(changed, want[changed])
            self.h5.flush()
        return int(len(changed)), gone

    def check_labels_current(self) -> None:
        """Refuse (one line) a file whose manifest changed since its labels were taken from it.

        Nothing is refused when the manifest file is gone (a copied features
        file) or the file records no manifest hash."""
        from ..data.manifest import file_sha256

        a = self.attrs
        manifest, sha = a.get("manifest"), a.get("manifest_sha256")
        if not manifest or not sha or not Path(manifest).is_file():
            return
        if file_sha256(manifest) != sha:
            raise FeatlabError(
                f"{self.path}: labels are stale (manifest {manifest} changed since extraction): "
                f"run `{self.resync_command()}` again to re-sync"
            )

    def resync_command(self) -> str:
        """The `featlab extract` command that re-syncs this file's labels (adds no tap, runs no backbone
        for the rows it has)."""
        a = self.attrs
        parts = ["featlab extract", f"-m {a.get('manifest')}", f"-b {a.get('backbone')}"]
        model = a.get("model_path")
        if model:
            parts.append(f"--model {model}")
        parts += [f"-l {k}" for k in self.keys()]
        parts += [flag for flag in ("--align", "--flip") if a.get(flag[2:]) in (True, 1)]
        parts.append(f"-o {self.path}")
        return " ".join(parts)

    # ---- finiteness ----------------------------------------------------------------------
    def count_nonfinite(self, key: str, rows=None) -> tuple[int, int | None]:
        """(inf/nan values in tap ``key`` over ``rows`` (all, a slice or an index array), first row holding one
        or None). Read block-wise (~4 MiB at a time) in the stored dtype."""
        arr = self.array(key)
        block = max(1, READ_BLOCK_BYTES // max(1, int(np.prod(arr.shape[1:])) * arr.atom.dtype.itemsize))
        if rows is None:
            rows = slice(0, arr.nrows)
        if isinstance(rows, slice) and rows.indices(arr.nrows)[2] == 1:
            lo, hi, _ = rows.indices(arr.nrows)
            blocks = ((np.arange(i, min(hi, i + block)), slice(i, min(hi, i + block))) for i in range(lo, hi, block))
        else:
            idx = np.arange(arr.nrows)[rows] if isinstance(rows, slice) else np.unique(np.asarray(rows, np.int64))
            blocks = ((idx[i : i + block], idx[i : i + block]) for i in range(0, len(idx), block))
        count, first = 0, None
        for where, sel in blocks:
            if len(where) == 0:
                continue
            x = arr[sel] if isinstance(sel, slice) else self.read(key, sel, dtype=arr.atom.dtype)
            bad = _nonfinite_mask(x)
            if bad is None:
                continue
            per_row = bad.reshape(len(bad), -1).sum(axis=1)
            count += int(per_row.sum())
            if first is None:
                first = int(where[np.flatnonzero(per_row)[0]])
        return count, first

    def check_finite(self, key: str, rows=None, scan: bool = False) -> None:
        """Refuse (one line naming the tap and the first bad row) when tap ``key`` holds inf or nan in ``rows``.

        Rows that extraction counted when it wrote them (the tap's ``checked_rows``,
        with ``nonfinite`` 0) are not read again unless ``scan``; others are read
        block-wise."""
        arr = self.array(key)
        info = self.tap_info().get(arr._v_name, {})
        if rows is None:
            need = arr.nrows
        elif isinstance(rows, slice):
            lo, hi, _ = rows.indices(arr.nrows)
            need = hi if hi > lo else 0
        else:
            rows = np.asarray(rows, dtype=np.int64)
            need = int(rows.max()) + 1 if len(rows) else 0
        if not scan and info.get("nonfinite") == 0 and int(info.get("checked_rows", 0)) >= need:
            return
        count, first = self.count_nonfinite(key, rows)
        if count:
            raise FeatlabError(
                f"{self.path}: tap {key} holds {count:,} non-finite values (inf/nan), first in row {first} "
                f"(image {self._image_id(first)}); heads refuse them: extract this tap again with "
                "`--dtype float32` into a new --out"
            )

    def _count_unchecked(self) -> None:
        """Count non-finite values in rows no check has seen (files from before the check), record the
        counts, and refuse to go on appending to a file that holds some."""
        info = self.tap_info()
        bad = []
        for key in self.keys():
            arr = self._node(key)
            t = info.get(key)
            if t is None:
                continue
            n = int(arr.nrows)
            done = min(int(t.get("checked_rows", 0)), n)
            if done == n and "nonfinite" in t:
                t["checked_rows"] = done
                continue
            count, first = self.count_nonfinite(key, slice(done, n))
            t["nonfinite"] = int(t.get("nonfinite", 0)) + count
            t["checked_rows"] = n
            if count:
                bad.append((key, count, first))
        self.set_attr("taps", info)
        self.h5.flush()
        if bad:
            key, count, first = bad[0]
            raise FeatlabError(
                f"{self.path} already holds {count:,} non-finite values (inf/nan) in tap {key}, first in row {first} "
                f"(image {self._image_id(first)}): move it aside and extract again (`--dtype float32` for a float16 overflow)"
            )

    def skipped(self):
        return self._reasons("skipped")

    def warnings(self):
        """Faces stored with a warning: image_id, path, reason (none in a file from before warnings)."""
        return self._reasons("warnings")

    def _reasons(self, table: str):
        import pandas as pd

        if f"/{table}" not in self.h5:
            return pd.DataFrame({"image_id": [], "path": [], "reason": []}, dtype=object)
        t = self.h5.get_node(f"/{table}").read()
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

        def conv(values, dest=None):  # stored rows -> dtype (float16 -> float32 is exact; NumPy 2's SIMD cast
            # is 1.3-2x the float16 lookup table it replaced, measured in bench/scale.py)
            if dest is None:
                return values.astype(dtype, copy=False)
            dest[...] = values
            return dest

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


def _missing(v) -> bool:
    if v is None:
        return True
    try:
        return bool(v != v) or str(v) in ("<NA>", "")  # NaN, pandas NA
    except (TypeError, ValueError):
        return True


_SCAN_ITEMS = 1 << 16  # values per step of the finiteness scan: its temporaries stay in the L2 cache


def _has_nonfinite(x: np.ndarray) -> bool:
    """Whether ``x`` holds inf or nan: float16 by its bits (exponent all ones), in cache-sized steps
    (~3 ms for a 32-row batch of a 401 KB tap, 5x NumPy's isfinite on float16)."""
    flat = np.ascontiguousarray(x).reshape(-1)
    if flat.dtype == np.float16:
        u, buf = flat.view(np.uint16), np.empty(min(len(flat), _SCAN_ITEMS), np.uint16)
        for i in range(0, len(u), _SCAN_ITEMS):
            part = u[i : i + _SCAN_ITEMS]
            b = np.bitwise_and(part, 0x7C00, out=buf[: len(part)])
            if b.max() == 0x7C00:
                return True
        return False
    return any(not np.isfinite(flat[i : i + _SCAN_ITEMS]).all() for i in range(0, len(flat), _SCAN_ITEMS))


def _nonfinite_mask(x: np.ndarray) -> np.ndarray | None:
    """Where ``x`` holds inf or nan; None when nowhere."""
    if not _has_nonfinite(x):
        return None
    if x.dtype == np.float16:
        return (x.view(np.uint16) & 0x7C00) == 0x7C00
    return ~np.isfinite(x)


def _label_defaults(t: np.ndarray) -> dict:
    """Values of the label columns a table from an older featlab lacks: group '', age range = the age."""
    names = t.dtype.names
    out = {}
    if "group" not in names:
        out["group"] = np.zeros(len(t), dtype=f"S{GROUP_BYTES}")
    for c in ("age_low", "age_high"):
        if c not in names:
            out[c] = t["age"].astype(np.float32)
    return out


def _with_column(t: np.ndarray, name: str, values: np.ndarray) -> np.ndarray:
    import numpy.lib.recfunctions as rfn

    return rfn.append_fields(t, name, values, usemask=False)


def _age(v) -> np.float32:
    return np.float32(np.nan if _missing(v) else float(v))


def label_row(r) -> tuple:
    """A /labels row from a manifest record (a pandas row or dict). ``group``, ``age_low`` and ``age_high``
    may be absent (manifests from before them): '' and the age."""
    path = str(r["path"]).encode("utf-8")
    if len(path) > PATH_BYTES:
        raise FeatlabError(f"path longer than {PATH_BYTES} bytes: {r['path'][:80]}...")
    group = r.get("group")
    group = b"" if _missing(group) else str(group).encode("utf-8")
    if len(group) > GROUP_BYTES:
        raise FeatlabError(f"group longer than {GROUP_BYTES} bytes in the manifest: {group[:80]!r}...")
    age = _age(r["age"])
    low, high = r.get("age_low"), r.get("age_high")
    return (
        str(r["image_id"]).encode(),
        path,
        age,
        (str(r["gender"] or "")[:1]).encode(),
        str(r["race"] or "").encode()[:16],
        str(r["split"] or "").encode()[:8],
        np.int8(-1 if _missing(r["fold"]) else int(r["fold"])),
        group,
        age if _missing(low) else _age(low),
        age if _missing(high) else _age(high),
    )


# ---- sharded sets ------------------------------------------------------------------------------
# A sharded extraction (``featlab extract --shards N`` or ``--ray``) writes N ordinary stores, each over a
# contiguous slice of the manifest's rows, to ``FILE.shards/shard-IIII-of-NNNN.h5``, and then FILE itself as a
# small HDF5 *index*: no /labels, no taps; root attributes hold the set's identity and ``featlab_shards``
# (JSON: the shards in order, each one's manifest row range, rows and skipped images stored, its identity and the
# sha256 of its image ids). :meth:`FeatureStore.open_read` gives a :class:`ShardedStore` for such a file: the
# shards read as one store, rows in shard order (= manifest order = a single-process run's order).
SHARD_INDEX_ATTR = "featlab_shards"
IDENTITY_KEYS = ("backbone", "model_sha256", "preprocessing", "flip", "align")


_TRUNCATED = re.compile(r"truncated file: eof = (\d+),.*stored_eof = (\d+)")


def _cut_markers(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f".{glob.escape(path.name)}.cut-*"))


def mark_cut(path: Path | str) -> None:
    """Note that ``path`` was cut short by a refused write (over the file size limit, or a filesystem that
    cannot extend it sparsely): HDF5 closed it recording an end it could not reach. An empty file
    ``.NAME.cut-SIZE`` beside it lets :meth:`FeatureStore.open_for_append` restore that end (:func:`_uncut`)."""
    path = Path(path)
    try:
        with open(path.with_name(f".{path.name}.cut-{path.stat().st_size}"), "w"):
            pass
    except OSError:
        pass


def _uncut(path: Path, e: BaseException) -> bool:
    """Give a file cut short by a refused write (:func:`mark_cut`: only then, never a file truncated some
    other way) back the end HDF5 recorded, as a hole of zeros, as a full filesystem that extends files
    sparsely leaves it. The space up to that end was allocated but never written: blocks of the batch that
    failed, which the reopened store cuts away (only whole batches are kept). Returns the size it had (None
    when it is not such a file)."""
    m = _TRUNCATED.search(str(e))
    size = path.stat().st_size
    if m is None or int(m.group(1)) != size or int(m.group(2)) <= size:
        return None
    if path.with_name(f".{path.name}.cut-{size}") not in _cut_markers(path):
        return None
    os.truncate(path, int(m.group(2)))
    return size


def stored_rows(path: Path | str) -> int | None:
    """Rows of the features file ``path`` as they are on disk (its labels table); None when it cannot be read."""
    tb = _tables()
    try:
        with tb.open_file(str(path), mode="r") as h5:
            return int(h5.root.labels.nrows) if "/labels" in h5 else None
    except Exception:  # noqa: BLE001 - a file that cannot be read has no rows to report
        return None


def full_store_error(e: BaseException, path: Path | str | None = None) -> DiskFull:
    """The one line of an extraction whose write was refused for lack of space (``e``, see
    :func:`featlab.errors.disk_full`): the file, what filled up and the faces it keeps (whole batches,
    counted on disk), which the same command resumes from."""
    what, name = disk_full(e) or ("no space left on device", None)
    path = name or path
    if path is None:
        return DiskFull(f"{what} while writing the features file; its whole batches are kept")
    n = stored_rows(path)
    if n is None and Path(path).is_file():  # closed short of the end HDF5 recorded: say so for the resume
        mark_cut(path)
        n = FeatureStore.committed.get(str(Path(path).resolve()))
    kept = f"{n:,} faces kept, whole" if n is not None else "its whole batches are kept"
    return DiskFull(f"{path}: {filled_up(what, path)}; {kept}")


def shard_dir(out: Path | str) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".shards")


def shard_path(out: Path | str, i: int, n: int) -> Path:
    return shard_dir(out) / f"shard-{i:03d}-of-{n:03d}.h5"


def shard_bounds(n_rows: int, n: int) -> list[tuple[int, int]]:
    """Contiguous row ranges of ``n`` shards over ``n_rows`` rows, as even as can be (deterministic)."""
    cuts = [(i * n_rows) // n for i in range(n + 1)]
    return [(cuts[i], cuts[i + 1]) for i in range(n)]


def read_shard_index(path: Path | str) -> dict | None:
    """The ``featlab_shards`` record of a shard index file; None when ``path`` is not one (or does not exist)."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return None
    tb = _tables()
    try:
        with tb.open_file(str(path), mode="r") as h5:
            if "/labels" in h5 or SHARD_INDEX_ATTR not in h5.root._v_attrs._v_attrnamesuser:
                return None
            return json.loads(str(h5.root._v_attrs[SHARD_INDEX_ATTR]))
    except (OSError, ValueError, tb.HDF5ExtError):
        return None


def _identity_of(attrs: dict) -> dict:
    return {k: attrs.get(k) for k in IDENTITY_KEYS if k in attrs}


def _ids_sha256(ids) -> str:
    import hashlib

    h = hashlib.sha256()
    for x in ids:
        h.update(x if isinstance(x, bytes) else str(x).encode())
        h.update(b"\n")
    return h.hexdigest()


def write_shard_index(out: Path | str, shards: list[Path], bounds: list[tuple[int, int]], extra: dict | None = None) -> dict:
    """Write (atomically) the index of a finished sharded set; reads only the shards' attributes and image ids.

    Every shard must exist and have the identity of the first; a mismatch is refused in one line."""
    out = Path(out)
    tb = _tables()
    entries, identity, attrs0 = [], None, None
    for i, (p, (lo, hi)) in enumerate(zip(shards, bounds)):
        if not Path(p).is_file():
            raise FeatlabError(f"shard {p} is missing: rerun the same extract command to make it")
        with FeatureStore.open_read(p) as s:
            a = s.attrs
            ident = _identity_of(a)
            if identity is None:
                identity, attrs0 = ident, a
            elif ident != identity:
                k = next(k for k in IDENTITY_KEYS if ident.get(k) != identity.get(k))
                raise FeatlabError(f"shard {p} was extracted with a different {k} than {shards[0].name}: "
                                   "features from different settings never mix; extract into a new --out")
            entries.append({"file": Path(p).name, "rows": [int(lo), int(hi)], "stored": int(s.nrows),
                            "skipped": int(s.h5.root.skipped.nrows),
                            "ids_sha256": _ids_sha256(s.h5.root.labels.col("image_id")),
                            "bytes": int(Path(p).stat().st_size)})
    record = {"version": 1, "count": len(shards), "dir": shard_dir(out).name, "shards": entries, **(extra or {})}
    tmp = out.with_name(out.name + ".index-tmp")
    with tb.open_file(str(tmp), mode="w", title="featlab features (sharded: index)") as h5:
        a = h5.root._v_attrs
        for k, v in attrs0.items():
            if k in ("taps", "config"):
                continue
            a[k] = json.dumps(v) if isinstance(v, (dict, list)) else v
        a[SHARD_INDEX_ATTR] = json.dumps(record)
    os.replace(tmp, out)
    return record


class _ShardedArray:
    """One tap of a :class:`ShardedStore`, read like a PyTables array (``nrows``, ``shape``, ``atom``, slices)."""

    def __init__(self, parts: list, offsets: np.ndarray):
        self.parts, self.offsets = parts, offsets
        self.atom = parts[0].atom
        self._v_name = parts[0]._v_name
        self.nrows = int(offsets[-1])
        self.shape = (self.nrows, *parts[0].shape[1:])
        self.dtype = self.atom.dtype

    def __len__(self) -> int:
        return self.nrows

    def __getitem__(self, sel):
        if isinstance(sel, (int, np.integer)):
            i = int(sel) + (self.nrows if sel < 0 else 0)
            s = int(np.searchsorted(self.offsets, i, side="right")) - 1
            return self.parts[s][i - int(self.offsets[s])]
        if not isinstance(sel, slice):
            raise TypeError("a sharded tap takes an int or a slice (use FeatureStore.read for row lists)")
        lo, hi, step = sel.indices(self.nrows)
        out = []
        for s, part in enumerate(self.parts):
            a, b = int(self.offsets[s]), int(self.offsets[s + 1])
            x, y = max(lo, a), min(hi, b)
            if x < y:
                out.append(part[x - a : y - a])
        x = np.concatenate(out) if out else np.empty((0, *self.shape[1:]), dtype=self.atom.dtype)
        return x[::step] if step != 1 else x


class ShardedStore(FeatureStore):
    """A finished sharded set (see :func:`write_shard_index`), read as one store.

    Opening checks every shard against the index: present, the set's identity,
    the rows and image ids recorded when the set was finished, the same taps.
    Reads go to the shards by row range; nothing is copied or merged."""

    def __init__(self, path: Path, record: dict, index_attrs: dict):
        self.path = Path(path)
        self.h5 = None
        self.record = record
        self._index_attrs = index_attrs
        self._labels_read = None
        self.stores: list[FeatureStore] = []
        folder = self.path.with_name(record.get("dir") or shard_dir(self.path).name)
        try:
            for e in record["shards"]:
                p = folder / e["file"]
                if not p.is_file():
                    raise FeatlabError(f"{self.path}: shard {p} is missing (a sharded set reads only whole)")
                s = FeatureStore.open_read(p)
                self.stores.append(s)
                self._check_shard(s, e)
            keys = self.stores[0].keys()
            for s in self.stores[1:]:
                if sorted(s.keys()) != sorted(keys):
                    raise FeatlabError(f"{self.path}: shard {s.path.name} holds taps {sorted(s.keys())}, "
                                       f"{self.stores[0].path.name} {sorted(keys)}: rerun the extract command to finish it")
        except BaseException:
            self.close()
            raise
        self.offsets = np.cumsum([0] + [s.nrows for s in self.stores]).astype(np.int64)

    def _check_shard(self, s: FeatureStore, e: dict) -> None:
        want, have = _identity_of(self._index_attrs), _identity_of(s.attrs)
        for k in IDENTITY_KEYS:
            if k in want and have.get(k) != want[k]:
                what = "a different model file" if k == "model_sha256" else f"a different {k}"
                raise FeatlabError(f"{self.path}: shard {s.path.name} was extracted with {what} than the set "
                                   f"({k}={have.get(k)!r}, the index says {want[k]!r}); features from different "
                                   "settings never mix")
        if s.nrows != int(e["stored"]) or _ids_sha256(s.h5.root.labels.col("image_id")) != e["ids_sha256"]:
            raise FeatlabError(f"{self.path}: shard {s.path.name} changed since the set was indexed "
                               f"({s.nrows:,} rows, the index says {int(e['stored']):,}): rerun the extract command "
                               "that made it to re-index")

    # ---- metadata
    @property
    def attrs(self) -> dict:
        out = dict(self.stores[0].attrs)
        out.update({k: v for k, v in self._index_attrs.items() if k != SHARD_INDEX_ATTR})
        out["taps"] = self.tap_info()
        out["shards"] = len(self.stores)
        return out

    def set_attr(self, key: str, value) -> None:
        raise FeatlabError(f"{self.path} is a sharded set, read-only here: extract into it with the same command")

    def tap_info(self) -> dict:
        infos = [s.tap_info() for s in self.stores]
        out = {}
        for k, t in infos[0].items():
            t = dict(t)
            checked, nonfinite = 0, 0
            for s, i in zip(self.stores, infos):
                u = i.get(k, {})
                nonfinite += int(u.get("nonfinite", 0) or 0)
                c = int(u.get("checked_rows", 0))
                checked += min(c, s.nrows)
                if c < s.nrows:  # checked_rows counts from row 0: the prefix stops at the first gap
                    break
            t["checked_rows"], t["nonfinite"] = checked, nonfinite
            out[k] = t
        return out

    def keys(self) -> list[str]:
        return self.stores[0].keys()

    def resolve_key(self, key: str) -> str | None:
        return self.stores[0].resolve_key(key)

    def array(self, key: str):
        found = self.stores[0].array(key)._v_name  # the one-line error for a missing tap
        return _ShardedArray([s.h5.get_node("/taps", found) for s in self.stores], self.offsets)

    _node = array

    @property
    def nrows(self) -> int:
        return int(self.offsets[-1])

    def lagging(self) -> dict[str, int]:
        return {}

    def done_ids(self) -> set[str]:
        out: set[str] = set()
        for s in self.stores:
            out |= s.done_ids()
        return out

    def _image_id(self, row: int) -> str:
        if not 0 <= row < self.nrows:
            return "?"
        s = int(np.searchsorted(self.offsets, row, side="right")) - 1
        return self.stores[s]._image_id(row - int(self.offsets[s]))

    # ---- reading
    def labels(self):
        import pandas as pd

        if self._labels_read is None:
            self._labels_read = pd.concat([s.labels() for s in self.stores], ignore_index=True)
        return self._labels_read.copy()

    def skipped(self):
        import pandas as pd

        df = pd.concat([s.skipped() for s in self.stores], ignore_index=True)
        return df.drop_duplicates("image_id", keep="last").reset_index(drop=True)

    def warnings(self):
        import pandas as pd

        df = pd.concat([s.warnings() for s in self.stores], ignore_index=True)
        return df.drop_duplicates("image_id", keep="last").reset_index(drop=True)

    def _split_rows(self, rows):
        """(shard, local rows, output positions) for global ``rows`` (a slice or an index array)."""
        if rows is None:
            rows = slice(0, self.nrows)
        if isinstance(rows, slice):
            lo, hi, step = rows.indices(self.nrows)
            if step == 1:
                for s in range(len(self.stores)):
                    a, b = int(self.offsets[s]), int(self.offsets[s + 1])
                    x, y = max(lo, a), min(hi, b)
                    if x < y:
                        yield s, slice(x - a, y - a), slice(x - lo, y - lo)
                return
            rows = np.arange(lo, hi, step)
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.nrows):
            raise IndexError(f"row {int(rows.max() if rows.max() >= self.nrows else rows.min())} out of range "
                             f"({self.nrows} rows)")
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        for s in np.unique(which):
            pos = np.flatnonzero(which == s)
            yield int(s), rows[pos] - int(self.offsets[s]), pos

    def read(self, key: str, rows=None, dtype=np.float32) -> np.ndarray:
        arr = self.array(key)
        n = arr.nrows if rows is None else (len(range(*rows.indices(arr.nrows))) if isinstance(rows, slice) else len(rows))
        out = np.empty((n, *arr.shape[1:]), dtype=dtype)
        for s, local, pos in self._split_rows(rows):
            out[pos] = self.stores[s].read(key, local, dtype=dtype)
        return out

    def count_nonfinite(self, key: str, rows=None) -> tuple[int, int | None]:
        count, first = 0, None
        for s, local, pos in self._split_rows(rows):
            c, f = self.stores[s].count_nonfinite(key, local)
            count += c
            if f is not None and first is None:
                first = f + int(self.offsets[s])
        return count, first

    def check_finite(self, key: str, rows=None, scan: bool = False) -> None:
        for s, local, pos in self._split_rows(rows):
            self.stores[s].check_finite(key, local, scan=scan)

    def sync_labels(self, manifest_df):
        raise FeatlabError(f"{self.path} is a sharded set: re-sync its labels with `{self.resync_command()}`")

    def close(self) -> None:
        for s in self.stores:
            s.close()
