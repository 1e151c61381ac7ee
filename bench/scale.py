"""Heads at R100 scale, from disk: a synthetic features file of R100 shapes (>= 5 GB), and what a streamed
head (and a grid of heads) costs on it: time per epoch against the raw read of the same bytes, bytes read
per epoch, peak memory at 10,000 and 100,000 rows and against ``--memory-mb``; and ``compare``'s wall time
with person-level paired bootstraps on 40,000 test faces and 10 taps.

The file: ``--rows`` rows (default 100,000) of one ``add_98``-shaped tap (512x7x7, float16: 50 KB a row,
5.0 GB), written through :class:`featlab.features.store.FeatureStore` (the layout and chunk shape an extraction
gives), with labels (age 1-80, gender, person groups of 1-3 faces, split 80/10/10 by person) from a fixed
seed. Age and gender are planted in a few channels so heads learn something. Files go to ``--data``
(default ``$FEATLAB_BENCH_DIR/scale``), outside the repository; ``--keep`` keeps them, otherwise they are
deleted at the end.

Cold and warm reads: without root the page cache cannot be dropped, but ``posix_fadvise(DONTNEED)`` on a file
this user wrote evicts its clean pages. Every "cold" figure is taken right after that call on the features
file; "warm" ones right after a full read of it. Like is compared with like: a cold epoch with a cold read.

Every measured run is a fresh subprocess (``--child``) that reports its own peak RSS (``ru_maxrss``) and the
bytes it read through :meth:`FeatureStore.read`, split into set-up reads (statistics, finiteness) and epoch
reads (training batches and validation).

Usage::

    python bench/scale.py                      # ~30-40 min on 2 shared cores; 5 GB of disk
    python bench/scale.py --rows 20000 --no-record
    python bench/scale.py --tiny               # seconds (plus TensorFlow's start): figures not meaningful
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

TAP = "add_98"
SHAPE = (512, 7, 7)


# ----------------------------------------------------------------------- the synthetic file
def build(path: Path, rows: int, seed: int = 0, shape=SHAPE, block: int = 2000) -> dict:
    """Write a features file of ``rows`` rows of tap ``add_98`` (``shape``, float16) with labels. The values
    are a seeded pool of 2,000 random rows, each output row one of them (cycled with a seeded offset)
    plus its own age and gender signal in channels 0-1: cheap to make, nothing compressible."""
    import numpy as np

    from featlab.features.store import FeatureStore, label_row

    rng = np.random.default_rng(seed)
    person = np.cumsum(rng.random(rows) < 0.5)  # runs of 1-3ish faces per person, in file order
    person -= person[0]
    pid_split = rng.random(int(person[-1]) + 1)
    split = np.where(pid_split[person] < 0.8, "train", np.where(pid_split[person] < 0.9, "val", "test"))
    age_p = rng.uniform(1, 80, int(person[-1]) + 1)
    gender_p = rng.random(int(person[-1]) + 1) < 0.5
    age = np.round(age_p[person] + rng.normal(0, 1, rows)).clip(1, 90)
    gender = gender_p[person]
    pool_n = min(2000, rows)
    pool = rng.standard_normal((pool_n, *shape), dtype=np.float32).astype(np.float16)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    identity = {"backbone": "synthetic-r100", "model_sha256": f"synthetic-seed{seed}",
                "preprocessing": {"synthetic": True}}
    t = time.perf_counter()
    with FeatureStore.open_for_append(path, identity) as s:
        s.set_attr("dataset", "scale")
        s.ensure_array(TAP, shape, dtype="float16", expected_rows=rows, tap=TAP)
        for lo in range(0, rows, block):
            hi = min(rows, lo + block)
            idx = (np.arange(lo, hi) * 7919 + seed) % pool_n
            x = pool[idx]
            z = ((age[lo:hi] - 40) / 20).astype(np.float16)
            x[:, 0] += z[:, None, None]
            x[:, 1] += np.where(gender[lo:hi], 1, -1).astype(np.float16)[:, None, None]
            labels = [label_row({"image_id": f"s{i:07d}", "path": f"synthetic/{i}.jpg", "age": float(age[i]),
                                 "gender": "m" if gender[i] else "f", "race": "", "split": split[i], "fold": None,
                                 "group": f"p{person[i]}"}) for i in range(lo, hi)]
            s.append({TAP: x}, labels)
    return {"rows": rows, "bytes": path.stat().st_size, "seconds": time.perf_counter() - t,
            "tap_bytes": rows * int(np.prod(shape)) * 2}


def evict(path: Path) -> None:
    """Drop ``path``'s pages from the page cache (no root needed for one's own file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd) if os.access(path, os.W_OK) else None
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def raw_read(path: Path, block: int = 16 << 20) -> float:
    """Seconds to read the whole file sequentially with os.read (the disk's, or the cache's, rate)."""
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(block)
        while f.readinto(buf):
            pass
    return time.perf_counter() - t


def store_read(path: Path) -> tuple[float, int]:
    """Seconds to read every row of the tap in file order through the store (float16 -> float32), and bytes."""
    from featlab.features.store import FeatureStore

    t = time.perf_counter()
    with FeatureStore.open_read(path) as s:
        arr = s.array(TAP)
        per = max(1, (64 << 20) // (arr.rowsize or 1))
        for lo in range(0, arr.nrows, per):
            s.read(TAP, slice(lo, min(arr.nrows, lo + per)))
        n = arr.nrows * arr.rowsize
    return time.perf_counter() - t, n


# ----------------------------------------------------------------------- measured children
def _count_reads():
    """Wrap FeatureStore.read: stored bytes read, split into set-up (statistics, finiteness) and the rest."""
    import numpy as np

    from featlab.features.store import FeatureStore

    counts = {"setup": 0, "epochs": 0}
    orig = FeatureStore.read

    def read(self, key, rows=None, dtype=np.float32):
        arr = self.array(key)
        if rows is None:
            n = arr.nrows
        elif isinstance(rows, slice):
            n = len(range(*rows.indices(arr.nrows)))
        else:
            n = len(np.unique(np.asarray(rows)))
        names = {f.name for f in traceback.extract_stack(limit=12)}
        kind = "setup" if names & {"feature_stats", "count_nonfinite", "check_finite"} else "epochs"
        counts[kind] += int(n) * int(arr.rowsize)
        return orig(self, key, rows, dtype)

    FeatureStore.read = read
    return counts


def child(argv: list[str]) -> None:
    spec = json.loads(argv[0])
    kind = spec.pop("kind")
    counts = _count_reads()
    t = time.perf_counter()
    out: dict = {}
    if kind == "head":
        from featlab.heads.train import fit_head

        d = fit_head(spec.pop("features"), TAP, spec.pop("target"), spec.pop("cats", None), **spec)
        cfg = json.loads((d / "config.json").read_text())
        out = {"fit_seconds": cfg["training"]["fit_seconds"], "epochs": cfg["training"]["epochs_run"],
               "loading": cfg["data_loading"], "counts": cfg["counts"]}
    elif kind == "grid":
        from featlab.heads.grid import fit_grid

        dirs = fit_grid(spec.pop("features"), [TAP], [("age", None), ("gender", None), ("bins", 7)], **spec)
        cfgs = [json.loads((d / "config.json").read_text()) for d in dirs]
        g = cfgs[0]["training"].get("grid") or {}
        out = {"fit_seconds": g.get("fit_seconds_all_heads", sum(c["training"]["fit_seconds"] for c in cfgs)),
               "epochs": g.get("epochs_run_all_heads", max(c["training"]["epochs_run"] for c in cfgs)),
               "counts": cfgs[0]["counts"], "grid": {k: g.get(k) for k in ("groups", "streamed", "traces")}}
    elif kind == "baseline":
        import featlab.heads.train  # noqa: F401
        import tensorflow  # noqa: F401
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print("RESULT " + json.dumps({**out, "read_bytes": counts, "wall": time.perf_counter() - t,
                                  "rss_mib": round(me, 1)}), flush=True)


def run_child(spec: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(C.ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TF_CPP_MIN_LOG_LEVEL="3")
    p = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                       env=env, cwd=C.ROOT)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if p.returncode or line is None:
        raise SystemExit(f"child {spec.get('kind')} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def load() -> str:
    return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())


# ----------------------------------------------------------------------- compare on an IMDB-sized test split
def compare_records(root: Path, faces: int, taps: int, seed: int = 0) -> None:
    """Head records as `featlab train-head` leaves them, for ``taps`` taps of one synthetic feature set:
    metrics.json (val and test sections, the test figures' intervals and unit as this featlab scores them),
    faces.csv (per-face absolute error and CS@5 of ``faces`` test faces and a tenth as many val faces, people
    of 1-3 faces) and baselines_faces.csv/baselines.json (each tap's linear probe, the median age)."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    n_val = max(10, faces // 10)
    n = faces + n_val
    person = np.cumsum(rng.random(n) < 0.6)
    ids = np.array([f"s{i:07d}" for i in range(n)])
    split = np.array(["test"] * faces + ["val"] * n_val)
    group = np.array([f"p{p}" for p in person])
    age = rng.uniform(1, 80, person[-1] + 1)[person]
    ident = {"backbone": "synthetic-r100", "model_sha256": "synthetic", "dataset": "scale", "imported": False,
             "align": False, "flip": False, "preprocessing": {"synthetic": True}, "manifest_sha256": "x"}
    base = root / "synthetic-r100" / "scale"

    def errors(scale):
        e = np.abs(rng.normal(0, scale, n) + rng.normal(0, scale / 2, person[-1] + 1)[person])
        return e, (e <= 5).astype(float)

    median = np.median(age)
    for k in range(taps):
        d = base / f"stage{k + 1:02d}" / "age"
        d.mkdir(parents=True, exist_ok=True)
        mae, cs5 = errors(6.0 + 0.2 * k)
        df = pd.DataFrame({"image_id": ids, "split": split, "group": group, "mae": mae, "cs5": cs5})
        df.to_csv(d / "faces.csv", index=False)
        t, v = df[df.split == "test"], df[df.split == "val"]
        test = {"mae": float(t.mae.mean()), "cs5": float(t.cs5.mean()),
                "mae_ci95": [float(t.mae.mean()) - 0.1, float(t.mae.mean()) + 0.1],
                "cs5_ci95": [float(t.cs5.mean()) - 0.01, float(t.cs5.mean()) + 0.01]}
        m = {"kind": "head", "feature_set": {**ident, "tap": f"stage{k + 1:02d}", "pool": None, "dtype": "float16"},
             "val": {"n": len(v), "metrics": {"mae": float(v.mae.mean()), "cs5": float(v.cs5.mean())}},
             "test": {"n": len(t), "metrics": test,
                      "uncertainty": {"unit": "person", "n_units": int(t.group.nunique()),
                                      "design_effect": {"mae": 1.1, "cs5": 1.1}}}}
        (d / "metrics.json").write_text(json.dumps(m))
        lin_mae, lin_cs5 = errors(8.0)
        maj = np.abs(age - median)
        b = pd.concat([pd.DataFrame({"image_id": ids, "split": split, "baseline": "linear", "mae": lin_mae,
                                     "cs5": lin_cs5}),
                       pd.DataFrame({"image_id": ids, "split": split, "baseline": "majority", "mae": maj,
                                     "cs5": (maj <= 5).astype(float)})])
        b.to_csv(d / "baselines_faces.csv", index=False)
        (d / "baselines.json").write_text(json.dumps({"linear": {"settings": {}}, "majority": {"settings": {}}}))


def time_compare(root: Path) -> tuple[float, dict]:
    """Seconds of :func:`featlab.report.compare.compare` on the records under ``root``, and its summary."""
    from featlab.report.compare import compare

    t = time.perf_counter()
    r = compare("synthetic-r100", "scale", "age", None, results_root=root)
    return time.perf_counter() - t, r


# ----------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--small-rows", type=int, default=10_000)
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--budget-mb", type=float, default=1024)
    ap.add_argument("--compare-faces", type=int, default=40_000)
    ap.add_argument("--compare-taps", type=int, default=10)
    ap.add_argument("--stages", default="build,read,head,grid,memory,compare")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--child", nargs=1)
    args = ap.parse_args()
    if args.child:
        return child(args.child)
    tiny = C.tiny(args, rows=600, small_rows=300, epochs=1, budget_mb=4, compare_faces=600, compare_taps=3)
    data = args.data or (C.workdir() / "scale")
    data.mkdir(parents=True, exist_ok=True)
    big, small = data / f"scale-{args.rows}.h5", data / f"scale-{args.small_rows}.h5"
    stages = set(args.stages.split(","))
    rows_out: list[tuple] = []
    notes: list[str] = []
    hp = dict(epochs=args.epochs, patience=args.epochs + 1, batch_size=256, verbose=0, seed=0)

    def add(what, figure, detail=""):
        rows_out.append((what, figure, detail))
        print(f"[scale] {what}: {figure} {detail}", flush=True)

    try:
        if "build" in stages or not big.exists():
            b = build(big, args.rows)
            add(f"build {args.rows:,} rows", f"{b['bytes'] / 1e9:.2f} GB", f"{b['seconds']:.0f} s ({load()})")
        if not small.exists():
            build(small, args.small_rows)
        if "read" in stages:
            evict(big)
            t = raw_read(big)
            add("raw sequential read, cold (os.read 16 MiB)", f"{big.stat().st_size / t / 1e9:.2f} GB/s", f"{t:.1f} s ({load()})")
            t = raw_read(big)
            add("raw sequential read, warm", f"{big.stat().st_size / t / 1e9:.2f} GB/s", f"{t:.1f} s ({load()})")
            evict(big)
            t, n = store_read(big)
            add("store.read in file order, cold (to float32)", f"{n / t / 1e9:.2f} GB/s", f"{t:.1f} s ({load()})")
            t, n = store_read(big)
            add("store.read in file order, warm", f"{n / t / 1e9:.2f} GB/s", f"{t:.1f} s ({load()})")
        if "head" in stages:
            evict(big)
            r = run_child({"kind": "head", "features": str(big), "target": "age", "memory_mb": args.budget_mb,
                           "out_root": str(data / "heads"), **hp})
            ep = r["fit_seconds"] / r["epochs"]
            n = r["read_bytes"]["epochs"] / r["epochs"]
            add(f"train-head age streamed, --memory-mb {args.budget_mb:g}, cold start",
                f"{ep:.1f} s/epoch", f"{n / 1e9:.2f} GB read/epoch = {n / ep / 1e9:.2f} GB/s; "
                f"RSS {r['rss_mib']:.0f} MiB ({load()})")
            rb = 512 * 7 * 7 * 4
            r2 = run_child({"kind": "head", "features": str(small), "target": "age",
                            "memory_mb": 4 * args.small_rows * rb / 2**20, "out_root": str(data / "heads-mem"), **hp})
            ep2 = r2["fit_seconds"] / r2["epochs"]
            rows2 = r2["counts"]["train"] + r2["counts"]["val"]
            rows1 = r["counts"]["train"] + r["counts"]["val"]
            add(f"compute bound: in-memory epoch on {args.small_rows:,} rows", f"{rows2 / ep2:,.0f} rows/s",
                f"{ep2:.1f} s/epoch -> {rows1 / (rows2 / ep2):.1f} s for {rows1:,} rows ({load()})")
            notes.append(f"streamed epoch / compute bound: {(rows1 / (rows2 / ep2)) / ep:.2f}")
        if "grid" in stages:
            r = run_child({"kind": "grid", "features": str(big), "memory_mb": args.budget_mb,
                           "out_root": str(data / "grid"), **hp})
            tap = (r["counts"]["train"] + r["counts"]["val"]) * 512 * 7 * 7 * 2
            per = r["read_bytes"]["epochs"] / r["epochs"]
            add("grid age+gender+bins7 on one tap, bytes read per epoch", f"{per / tap:.2f} passes",
                f"{per / 1e9:.2f} GB/epoch, one pass (train+val rows) = {tap / 1e9:.2f} GB; "
                f"{r['fit_seconds'] / r['epochs']:.1f} s/epoch ({load()})")
        if "memory" in stages:
            sizes = ((small, args.small_rows, (256, args.budget_mb, 4 * args.budget_mb)), (big, args.rows, (256, args.budget_mb)))
            if tiny:
                sizes = ((small, args.small_rows, (args.budget_mb,)), (big, args.rows, (args.budget_mb,)))
            for path, n, budgets in sizes:
                for mb in budgets:
                    r = run_child({"kind": "head", "features": str(path), "target": "age", "memory_mb": mb,
                                   "out_root": str(data / "mem"), **{**hp, "epochs": 1}})
                    add(f"peak RSS, head age, {n:,} rows, --memory-mb {mb:g}", f"{r['rss_mib']:,.0f} MiB",
                        f"{'streamed' if r['loading'].startswith('streamed') else 'in memory'} ({load()})")
            r = run_child({"kind": "baseline"})
            add("peak RSS, baseline (TensorFlow + featlab.heads.train imported)", f"{r['rss_mib']:,.0f} MiB")
        if "compare" in stages:
            root = data / "compare"
            compare_records(root, args.compare_faces, args.compare_taps)
            t, r = time_compare(root)
            n_rows = len(r["rows"])
            add(f"compare, {args.compare_faces:,} test faces, {args.compare_taps} taps (person bootstraps)",
                f"{t:.1f} s", f"{n_rows} rows, {n_rows - 1} paired differences x 2 metrics ({load()})")
    finally:
        if not args.keep:
            for f in (big, small):
                f.unlink(missing_ok=True)
    print()
    print("| measure | figure | detail |")
    print("|---|---|---|")
    for what, fig, detail in rows_out:
        print(f"| {what} | {fig} | {detail} |")
    for n in notes:
        print(f"- {n}")


if __name__ == "__main__":
    main()
