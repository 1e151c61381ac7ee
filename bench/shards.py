"""Sharded extraction benchmark: write throughput per writer (1 vs 2 writers), and ``extract --shards``
end to end with the bytes its driver handles.

Two parts, both on this machine:

- **writers**: N processes (``--writers 1,2``) each write their own shard
  store of synthetic float16 rows the size of an R100 14x14 tap (512x14x14,
  200,704 bytes per face; ``--row-kb`` for others), ``--gb`` GB each, through
  ``FeatureStore.append`` (the finiteness check, taps, labels, one flush per
  ``--batch`` rows: what an extraction worker does per batch), then ``fsync``.
  All writers start together (a shared start time, after their imports).
  Figures: GB/s per writer (write to the page cache, and with its fsync) and
  the total GB/s of all writers over the wall time of the slowest.
- **extraction**: the same real UTKFace faces, backbone and taps, single
  process, then ``extract_sharded`` with 2 local processes (and with
  ``--ray``, 2 Ray tasks). The sets are checked to read back equal to the
  single file, bit for bit. The driver's bytes (arguments sent, reports and
  worker output received) are set beside the tap bytes the workers wrote.

Usage::

    python bench/shards.py                        # 2 GB per writer, 1 and 2 writers; 2,000 faces of dlib-age
    python bench/shards.py --gb 1 --n 2000 --ray --raw   # also 2 Ray tasks, and tofile writers as the bound
    python bench/shards.py --tiny                 # smoke run (tests/test_bench.py)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import _common as C  # noqa: E402


def writer(path: str, gb: float, row_kb: float, batch: int, start_at: float, raw: bool = False) -> dict:
    """One writer process: append ``gb`` GB of rows to its own store at ``path``, then fsync. ``raw``: the
    same bytes with ``ndarray.tofile`` into a plain file (the bound without HDF5 or featlab's checks)."""
    from featlab.features.store import FeatureStore, label_row

    shape = (512, 14, 14) if row_kb == 196 else (int(row_kb * 512),)
    row_bytes = int(np.prod(shape)) * 2
    n = max(batch, int(gb * 1e9 // row_bytes) // batch * batch)
    block = np.random.default_rng(0).standard_normal((batch, *shape), dtype=np.float32).astype(np.float16)
    if raw:
        time.sleep(max(0.0, start_at - time.time()))
        t0, c0 = time.time(), time.process_time()
        with open(path, "wb") as f:
            for _ in range(0, n, batch):
                block.tofile(f)
            t1, c1 = time.time(), time.process_time()
            os.fsync(f.fileno())
        return {"start": t0, "written": t1, "synced": time.time(), "bytes": n * row_bytes, "rows": n, "cpu": c1 - c0}
    labels = [label_row({"image_id": f"{i:016d}", "path": f"/data/{i}.jpg", "age": 30, "gender": "f", "race": "0",
                         "split": "train", "fold": -1}) for i in range(n)]
    store = FeatureStore.open_for_append(path, {"backbone": "bench"})
    store.ensure_array("t", shape, expected_rows=n)
    time.sleep(max(0.0, start_at - time.time()))
    t0, c0 = time.time(), time.process_time()
    for i in range(0, n, batch):
        store.append({"t": block}, labels[i : i + batch])
    t1, c1 = time.time(), time.process_time()
    store.close()
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    t2 = time.time()
    return {"start": t0, "written": t1, "synced": t2, "bytes": n * row_bytes, "rows": n, "cpu": c1 - c0}


def _one_writer_run(args, d: Path, w: int, raw: bool) -> list[float]:
    """w writers at once: [GB/s per writer, GB/s total, the same with fsync, GB total]."""
    for p in d.glob("w-*.h5"):
        p.unlink()
    start_at = time.time() + 4.0 + 0.5 * w  # after every writer's imports
    procs = [subprocess.Popen([sys.executable, __file__, "--writer", str(d / f"w-{i}.h5"), "--gb", str(args.gb),
                               "--row-kb", str(args.row_kb), "--batch", str(args.batch), "--start-at",
                               str(start_at), *(["--raw"] if raw else [])], stdout=subprocess.PIPE, text=True)
             for i in range(w)]
    res = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"writer failed ({p.returncode})")
        res.append(json.loads([x for x in out.splitlines() if x.startswith("RESULT ")][-1][7:]))
    for p in d.glob("w-*.h5"):
        p.unlink()
    t0 = min(r["start"] for r in res)
    total = sum(r["bytes"] for r in res) / 1e9
    per = float(np.mean([r["bytes"] / 1e9 / (r["written"] - r["start"]) for r in res]))
    per_sync = float(np.mean([r["bytes"] / 1e9 / (r["synced"] - r["start"]) for r in res]))
    wall = max(r["written"] for r in res) - t0
    wall_sync = max(r["synced"] for r in res) - t0
    cpu_per_gb = sum(r["cpu"] for r in res) / total  # CPU seconds of the writers (user+system) per GB written
    return [per, total / wall, per_sync, total / wall_sync, cpu_per_gb, total]


def part_writers(args) -> tuple[list[list], str]:
    d = C.workdir() / "shards-bench"
    d.mkdir(parents=True, exist_ok=True)
    configs = [(w, raw) for raw in ((False, True) if args.raw else (False,)) for w in args.writers]
    runs: dict = {c: [] for c in configs}
    loads = []
    for _ in range(args.repeat):  # interleaved, so that a burst of load on the machine hits every config
        for c in configs:
            loads.append(os.getloadavg()[0])
            runs[c].append(_one_writer_run(args, d, *c))

    def cell(vals):
        v = sorted(vals)
        med = float(np.median(v))
        return f"{med:.2f}" if len(v) == 1 else f"{med:.2f} ({v[0]:.2f}-{v[-1]:.2f})"

    rows = []
    for (w, raw), rs in runs.items():
        cols = list(zip(*rs))
        rows.append([f"{w} writer{'s' if w > 1 else ''}" + (" (raw tofile)" if raw else " (FeatureStore)"),
                     round(cols[5][0], 3), *[cell(c) for c in cols[:5]]])
    row_bytes = (512 * 14 * 14 * 2) if args.row_kb == 196 else int(args.row_kb * 512) * 2
    note = (f"Writers: {args.gb:g} GB each of {row_bytes:,}-byte float16 rows, {args.batch} rows per "
            f"FeatureStore.append (finiteness check, taps, labels, flush), own store each, on {C.workdir()}; "
            "GB/s per writer = its bytes over its own write time; total = all bytes over the slowest writer's "
            "wall time from the common start; '+fsync' columns include each writer's final fsync; 'CPU s per GB': "
            "the writers' own CPU time (user+system) per GB, the bound a free core puts on one writer. "
            f"Median (min-max) of {args.repeat} interleaved runs; 1-min load average at the runs' starts "
            f"{min(loads):.1f}-{max(loads):.1f} on {C.machine()['cores']} cores (other users).")
    return rows, note


def part_extraction(args) -> tuple[list[list], str]:
    from featlab.features.extract import extract
    from featlab.features.shards import extract_sharded
    from featlab.features.store import FeatureStore

    man = C.sub_manifest(args.n, args.manifest, name="shards")
    taps = args.taps.split(",")
    d = C.workdir() / "shards-bench"
    rows = []
    single = d / f"single-{args.n}.h5"
    single.unlink(missing_ok=True)
    t = time.perf_counter()
    rep = extract(man, taps, backbone=args.backbone, model=args.model, out=single, batch_size=args.batch,
                  progress=False)
    e2e = time.perf_counter() - t
    with FeatureStore.open_read(single) as s:
        row_bytes = sum(int(np.prod(s.array(k).shape[1:])) * s.array(k).atom.dtype.itemsize for k in s.keys())
    tap_bytes = rep.rows_added * row_bytes
    rows.append(["single process", rep.rows_total, round(e2e, 1), round(rep.rows_total / e2e, 1),
                 f"{tap_bytes:,} (writes them)", f"{tap_bytes:,}", "-"])
    kinds = [("2 local processes", None)]
    if args.ray:
        from featlab.features.cluster import RayPlan

        kinds.append(("2 Ray tasks", RayPlan(workers=2)))
    for name, plan in kinds:
        out = d / f"set-{args.n}-{'ray' if plan else 'local'}.h5"
        for p in [out, *sorted(out.with_name(out.name + ".shards").glob("*.h5"))]:
            p.unlink(missing_ok=True)
        t = time.perf_counter()
        r = extract_sharded(man, taps, 2, backbone=args.backbone, model=args.model, out=out, batch_size=args.batch,
                            ray=plan)
        e2e = time.perf_counter() - t
        with FeatureStore.open_read(out) as a, FeatureStore.open_read(single) as b:
            equal = a.labels().equals(b.labels()) and all(np.array_equal(a.read(k), b.read(k)) for k in taps)
        rows.append([name, r.rows_total, round(e2e, 1), round(r.rows_total / e2e, 1), f"{r.plan['driver_bytes']:,}",
                     f"{r.plan['tap_bytes']:,}", equal])
    note = (f"Extraction: {args.n:,} real UTKFace faces, {args.backbone} taps {args.taps}, batch {args.batch}, on "
            f"{C.machine()['cores']} cores shared by every writer (2 processes split them: one core each). "
            "'driver bytes' = what the process that starts the workers sends and receives (JSON/pickled "
            "arguments and reports, worker stdout/stderr); a single process writes every tap byte itself, and "
            "`--ray` without --shards streams every tap byte to its driver. 'equal' = the sharded set reads back "
            "bit for bit as the single file (labels and every tap).")
    return rows, note


def main(argv=None):
    ap = C.parser(__doc__)
    ap.add_argument("--gb", type=float, default=2.0, help="GB per writer [2]")
    ap.add_argument("--row-kb", type=float, default=196, help="KiB per row [196: R100 512x14x14 float16]")
    ap.add_argument("--batch", type=int, default=64, help="rows per append / images per batch [64]")
    ap.add_argument("--writers", default="1,2", help="writer counts to time [1,2]")
    ap.add_argument("--n", type=int, default=2000, help="real images for the extraction part [2000]; 0 skips it")
    ap.add_argument("--backbone", default="dlib-age")
    ap.add_argument("--model", default=None)
    ap.add_argument("--taps", default="res3,res4,res5")
    ap.add_argument("--ray", action="store_true", help="also 2 Ray tasks (a local runtime: its start-up included)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each writer count, interleaved [3]")
    ap.add_argument("--raw", action="store_true", help="also time ndarray.tofile writers (the bound without HDF5)")
    ap.add_argument("--writer", default=None, help=argparse_hidden())
    ap.add_argument("--start-at", type=float, default=0.0, help=argparse_hidden())
    args = ap.parse_args(argv)
    if args.writer:
        print("RESULT " + json.dumps(writer(args.writer, args.gb, args.row_kb, args.batch, args.start_at, args.raw)),
              flush=True)
        return
    C.tiny(args, gb=0.005, row_kb=16, n=16, batch=8, repeat=1)
    args.writers = [int(x) for x in str(args.writers).split(",")]
    load0 = C.load()
    wrows, wnote = part_writers(args)
    table = C.md_table(["writers", "GB total", "GB/s per writer", "GB/s total", "GB/s per writer +fsync",
                        "GB/s total +fsync", "CPU s per GB"], wrows)
    notes = [wnote]
    if args.n > 0:
        erows, enote = part_extraction(args)
        table += "\n\n" + C.md_table(["extraction", "faces", "e2e s", "faces/s", "driver bytes", "tap bytes written",
                                      "equal"], erows)
        notes.append(enote)
    print("\n" + table + "\n\n" + "\n\n".join(notes))
    C.record("Sharded extraction (extract --shards)", [sys.argv[0], *(argv if argv is not None else sys.argv[1:])],
             table, "\n\n".join(notes), load_before=load0, extra_versions=("ray",), enabled=not args.no_record)


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
