"""Storage benchmark: featlab's HDF5 feature store against ``ndarray.tofile`` / ``numpy.fromfile``.

The features are REAL: dlib-age taps (res3, res4, res5; float16) of the first
``--n`` real UTKFace images, extracted once and cached (``bench/_common.py``).
They are written the way ``extract`` writes them: batches of ``--batch`` rows,
``FeatureStore.append`` (every tap, then the labels row, then a flush) per
batch. The baseline writes the same tap bytes, batch by batch, with
``ndarray.tofile`` into one raw file per tap (no labels, no index, no flush).
MB/s counts tap bytes only (MB = 10^6 bytes).

Reads: ``array.read()`` (float16, as stored), ``FeatureStore.read`` (float32, what
the heads use) and ``FeatureStore.read(rows=train rows)`` (a 70 % sorted subset)
against ``numpy.fromfile``. Files were just written, so reads come from the page
cache on both sides (no cache dropping: other users share the machine).

Every compression option of ``featlab.features.store.COMPRESSION`` is measured (write MB/s,
read MB/s, size), and chunk sizes around the default.

Usage::

    python bench/storage.py            # 8,000 images, ~175 MB of taps (~1 min once the features are cached)
    python bench/storage.py --n 3000 --reps 5
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import _common as C  # noqa: E402

TAPS = ["res3", "res4", "res5"]


def load_real(path: Path, n: int):
    from featlab.features.store import FeatureStore

    with FeatureStore.open_read(path) as s:
        feats = {k: s.array(k)[:n] for k in TAPS}
        lab = s.h5.root.labels.read(0, n)
    labels = [tuple(r) for r in lab.tolist()]
    return feats, labels


def write_featlab(path: Path, feats, labels, batch: int, compression: str, chunk_bytes: int) -> float:
    from featlab.features.store import FeatureStore

    n = len(labels)
    t = time.perf_counter()
    with FeatureStore.open_for_append(path, {"backbone": "bench"}, compression) as s:
        for k, x in feats.items():
            s.ensure_array(k, x.shape[1:], compression=compression, expected_rows=n, chunk_bytes=chunk_bytes)
        for i in range(0, n, batch):
            s.append({k: x[i : i + batch] for k, x in feats.items()}, labels[i : i + batch])
    return time.perf_counter() - t


def write_tables_only(path: Path, feats, batch: int) -> float:
    """The HDF5 part alone: featlab's tap arrays (same file settings), EArray.append + flush per batch, no labels."""
    from featlab.features.store import FeatureStore

    n = len(next(iter(feats.values())))
    t = time.perf_counter()
    with FeatureStore.open_for_append(path, {"backbone": "bench"}, "none") as s:
        arrs = [(s.ensure_array(k, x.shape[1:], expected_rows=n), x) for k, x in feats.items()]
        for i in range(0, n, batch):
            for a, x in arrs:
                a.append(x[i : i + batch])
            s.h5.flush()
    return time.perf_counter() - t


def write_tofile(d: Path, feats, batch: int) -> float:
    n = len(next(iter(feats.values())))
    t = time.perf_counter()
    files = {k: open(d / f"{k}.bin", "wb") for k in feats}
    for i in range(0, n, batch):
        for k, x in feats.items():
            x[i : i + batch].tofile(files[k])
    for f in files.values():
        f.close()
    return time.perf_counter() - t


def read_featlab(path: Path, rows) -> tuple[float, float, float]:
    from featlab.features.store import FeatureStore

    with FeatureStore.open_read(path) as s:
        t = time.perf_counter()
        for k in TAPS:
            s.array(k).read()
        raw = time.perf_counter() - t
        t = time.perf_counter()
        for k in TAPS:
            s.read(k)
        f32 = time.perf_counter() - t
        t = time.perf_counter()
        for k in TAPS:
            s.read(k, rows)
        sub = time.perf_counter() - t
    return raw, f32, sub


def read_fromfile(d: Path, feats) -> float:
    t = time.perf_counter()
    for k, x in feats.items():
        np.fromfile(d / f"{k}.bin", dtype=np.float16).reshape(-1, *x.shape[1:])
    return time.perf_counter() - t


def main(argv=None):
    from featlab.features.store import CHUNK_BYTES, COMPRESSION

    ap = C.parser(__doc__)
    ap.add_argument("--n", type=int, default=8000, help="real images (rows) [8000]")
    ap.add_argument("--batch", type=int, default=128, help="rows per append, as extract's batch [128]")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions, best kept [3]")
    ap.add_argument("--chunks", default="65536,262144,1048576,4194304", help="chunk sizes (bytes) to try, no compression")
    args = ap.parse_args(argv)
    tiny = C.tiny(args, n=64, reps=1, chunks="65536")
    load0 = C.load()

    src = C.real_features("dlib-age", args.n if tiny else max(args.n, 8000), TAPS, source=args.manifest)
    feats, labels = load_real(src, args.n)
    nbytes = sum(x.nbytes for x in feats.values())
    print(f"real dlib-age features: {args.n} rows, taps {', '.join(f'{k} {x.shape[1:]}' for k, x in feats.items())}, "
          f"{nbytes / 1e6:.1f} MB float16 ({nbytes / args.n / 1024:.1f} KiB/row)")
    rows = np.sort(np.random.default_rng(0).choice(args.n, int(0.7 * args.n), replace=False))

    variants = [(c, CHUNK_BYTES) for c in COMPRESSION] + [("none", int(b)) for b in args.chunks.split(",")
                                                          if int(b) != CHUNK_BYTES]
    res = {v: {"w": [], "r": [], "r32": [], "rsub": [], "size": 0} for v in variants}
    base = {"w": [], "r": [], "tables": []}
    with tempfile.TemporaryDirectory(dir=C.workdir()) as tmp:
        tmp = Path(tmp)
        for rep in range(args.reps):
            d = tmp / f"raw{rep}"
            d.mkdir()
            base["w"].append(write_tofile(d, feats, args.batch))
            base["r"].append(read_fromfile(d, feats))
            for f in d.iterdir():
                f.unlink()
            p = tmp / f"tables-{rep}.h5"
            base["tables"].append(write_tables_only(p, feats, args.batch))
            p.unlink()
            for v in variants:
                comp, cb = v
                p = tmp / f"{comp}-{cb}-{rep}.h5"
                res[v]["w"].append(write_featlab(p, feats, labels, args.batch, comp, cb))
                raw, f32, sub = read_featlab(p, rows)
                res[v]["r"].append(raw)
                res[v]["r32"].append(f32)
                res[v]["rsub"].append(sub)
                res[v]["size"] = p.stat().st_size
                p.unlink()
            print(f"rep {rep + 1}: tofile {nbytes / min(base['w']) / 1e6:,.0f} MB/s; featlab default "
                  f"{nbytes / min(res[('none', CHUNK_BYTES)]['w']) / 1e6:,.0f} MB/s", flush=True)

    bw, br = nbytes / min(base["w"]) / 1e6, nbytes / min(base["r"]) / 1e6
    tw = nbytes / min(base["tables"]) / 1e6
    table_rows = [["ndarray.tofile / fromfile (baseline)", "-", bw, br, "-", "-", nbytes / 1e6, 1.0, 1.0, 1.0],
                  ["PyTables tap arrays only (no labels; HDF5 ceiling)", f"{CHUNK_BYTES // 1024} KiB", tw, "-", "-", "-",
                   "-", tw / bw, "-", "-"]]
    for (comp, cb), r in res.items():
        w = nbytes / min(r["w"]) / 1e6
        rd = nbytes / min(r["r"]) / 1e6
        table_rows.append([f"featlab {comp}" + (" (default)" if (comp, cb) == ("none", CHUNK_BYTES) else ""),
                           f"{cb // 1024} KiB", w, rd, nbytes / min(r["r32"]) / 1e6,
                           0.7 * nbytes / min(r["rsub"]) / 1e6, r["size"] / 1e6, w / bw, rd / br,
                           r["size"] / nbytes])
    header = ["writer", "chunk", "write MB/s", "read MB/s (float16)", "read MB/s (float32, store.read)",
              "read MB/s (70% rows)", "file MB", "write / tofile", "read / fromfile", "size / raw"]
    table = C.md_table(header, table_rows)
    print("\n" + table)
    notes = (f"{args.n} rows of real dlib-age features ({', '.join(f'{k} {x.shape[1:]}' for k, x in feats.items())}), "
             f"{nbytes / 1e6:.1f} MB of float16 taps, appended {args.batch} rows at a time with a flush each; the "
             f"featlab file also holds the labels table (~1 KB per row, the path column is 1,024 bytes). "
             f"Reads from the page cache. Best of {args.reps}.")
    C.record("Storage", [sys.argv[0], *(argv if argv is not None else sys.argv[1:])], table, notes, load_before=load0,
             extra_versions=("blosc2",), enabled=not args.no_record)


if __name__ == "__main__":
    main()
