"""Cluster benchmark: ``extract --ray`` against a single-process run, and what one file at the end costs per GB.

Two parts, both on this machine:

- **extraction**: the same real UTKFace images, backbone, taps and batch size,
  through ``featlab.features.extract.extract`` in one process, then with
  ``cluster=RayPlan(workers=N)`` (a local Ray runtime that featlab starts and
  stops: its start-up is in ``e2e``, and the time to its first batch is
  shown). The two files are checked to be equal.
- **one file at the end**: synthetic float16 rows the size of an R100 14x14
  tap (512x14x14, 196 KiB per row; ``--row-kb`` for others), ``--gb`` of them:
  (a) appended by ``FeatureStore.append`` from memory (the write itself);
  (b) produced by a Ray actor pool and streamed back to the driver, which
  appends them through ``FeatureStore.append`` (what ``--ray`` does);
  (b') the same stream, not written (the transfer alone);
  (c) written as one shard store per worker, then merged into one file (the
  alternative; the merge alone is timed, after the shard writes).

Usage::

    python bench/cluster.py                         # 2,000 faces, dlib-age, 2 workers; 1 GB of R100-size rows
    python bench/cluster.py --n 8000 --workers 2 --gb 2
    # a multi-GPU cluster (run on the head node, with featlab[ray,gpu] on every node):
    python bench/cluster.py --address auto --workers 8 --gpus-per-worker 1 --backbone r100 --model glintr100.onnx \
        --taps add_98,stage4_unit1_conv1 --batch 256 --n 8000 --skip-single
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import _common as C  # noqa: E402


class _TimedPlan:
    """Wraps a RayPlan's blocks() to time the first and last committed batch."""

    def __init__(self, plan):
        self.plan, self.times, self.rows = plan, [], []

    def blocks(self, *a, **kw):
        for b in self.plan.blocks(*a, **kw):
            self.times.append(time.perf_counter())
            self.rows.append(b[3])
            yield b


def part_extraction(args) -> tuple[list[list], str]:
    from featlab.features.cluster import RayPlan
    from featlab.features.extract import extract
    from featlab.features.store import FeatureStore

    man = C.sub_manifest(args.n, args.manifest)
    taps = args.taps.split(",")
    rows, files = [], {}
    with tempfile.TemporaryDirectory(dir=C.workdir()) as tmp:
        if not args.skip_single:
            out = Path(tmp) / "single.h5"
            t = time.perf_counter()
            rep = extract(man, taps, backbone=args.backbone, model=args.model, out=out, batch_size=args.batch,
                          progress=False)
            e2e = time.perf_counter() - t
            loop = e2e - rep.setup_seconds
            rows.append(["single process", rep.provider, args.n, e2e, args.n / e2e, rep.setup_seconds, args.n / loop])
            files["single"] = out
            print(f"single process: {e2e:.1f} s, {args.n / e2e:.0f} img/s e2e", flush=True)
        out = Path(tmp) / "ray.h5"
        plan = _TimedPlan(RayPlan(address=args.address, workers=args.workers, gpus_per_worker=args.gpus_per_worker))
        t = time.perf_counter()
        rep = extract(man, taps, backbone=args.backbone, model=args.model, out=out, batch_size=args.batch,
                      progress=False, cluster=plan)
        e2e = time.perf_counter() - t
        first = plan.times[0] - t
        rows.append([f"--ray {args.address or ''} --workers {args.workers} --gpus-per-worker {args.gpus_per_worker:g}",
                     rep.provider, args.n, e2e, args.n / e2e, first, "-"])
        print(f"ray: {e2e:.1f} s ({first:.1f} s to the first batch), {args.n / e2e:.0f} img/s e2e", flush=True)
        same = ""
        if "single" in files:
            with FeatureStore.open_read(files["single"]) as a, FeatureStore.open_read(out) as b:
                ok = list(a.labels()["image_id"]) == list(b.labels()["image_id"]) and all(
                    np.allclose(a.read(k), b.read(k), rtol=1e-3, atol=1e-3) for k in a.keys())
            same = f" Files equal (ids in order, taps to float16 precision): {ok}."
    note = (f"{args.n} real UTKFace faces, {args.backbone} taps {args.taps}, batch {args.batch}. `s to 1st batch`: "
            f"single process: opening model, session and file; Ray: from the call to the first batch back in the "
            f"driver (Ray start-up, workers importing featlab and opening their sessions; with preserve_order the "
            f"first batch also waits for its own turn). `loop img/s`: single process after its set-up.{same}")
    return rows, note


def _write_local(path: Path, feats: np.ndarray, batch: int, labels) -> float:
    from featlab.features.store import FeatureStore

    t = time.perf_counter()
    with FeatureStore.open_for_append(path, {"backbone": "bench"}) as s:
        s.ensure_array("t", feats.shape[1:], expected_rows=len(feats))
        for i in range(0, len(feats), batch):
            s.append({"t": feats[i : i + batch]}, labels[i : i + batch])
    return time.perf_counter() - t


class _Producer:
    """Ray actor: rows of a fixed random pool (no compute, so only the transfer is timed)."""

    def __init__(self, shape):
        self.pool = np.random.default_rng(0).standard_normal((64, *shape), dtype=np.float32).astype(np.float16)

    def __call__(self, b):
        r = np.asarray(b["row"])
        return {"row": r, "t": self.pool[r % len(self.pool)]}


def part_transfer(args) -> tuple[list[list], str]:
    import logging

    import ray
    import ray.data

    from featlab.features.store import FeatureStore, label_row

    shape = (512, 14, 14) if args.row_kb == 196 else (int(args.row_kb * 512),)
    row_bytes = int(np.prod(shape)) * 2
    n = max(args.batch, int(args.gb * 1e9 // row_bytes))
    gb = n * row_bytes / 1e9
    pool = np.random.default_rng(0).standard_normal((64, *shape), dtype=np.float32).astype(np.float16)
    feats = pool[np.arange(n) % 64]
    labels = [label_row({"image_id": f"{i:016d}", "path": f"/data/{i}.jpg", "age": 30, "gender": "f", "race": "0",
                         "split": "train", "fold": -1}) for i in range(n)]
    out_rows = []
    with tempfile.TemporaryDirectory(dir=C.workdir()) as tmp:
        tmp = Path(tmp)
        t_local = _write_local(tmp / "local.h5", feats, args.batch, labels)
        out_rows.append(["(a) FeatureStore.append from memory (the write itself)", gb, t_local / gb, gb / t_local, "-"])
        (tmp / "local.h5").unlink()

        started = not ray.is_initialized()
        if started:
            ray.init(address=args.address, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False,
                     **({} if args.address else {"num_cpus": C.machine()["cores"], "object_store_memory": 512 << 20}))
        try:
            ctx = ray.data.DataContext.get_current()
            ctx.execution_options.preserve_order = True
            ctx.enable_progress_bars = False

            def stream():
                ds = ray.data.from_items([{"row": i} for i in range(n)], override_num_blocks=-(-n // args.batch))
                ds = ds.map_batches(_Producer, fn_constructor_kwargs={"shape": shape}, batch_size=args.batch,
                                    batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=args.workers),
                                    num_cpus=0.5)
                return ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2)

            def timed(consume):
                """(seconds to the first block, seconds per GB after it) of one pass of the stream."""
                t, first, done = time.perf_counter(), None, 0
                for b in stream():
                    consume(b)
                    if first is None:
                        first, done0 = time.perf_counter(), len(b["row"])
                    done += len(b["row"])
                assert done == n
                return first - t, (time.perf_counter() - first) / max(1e-12, (done - done0) * row_bytes / 1e9)

            up_t, per_gb_t = timed(lambda b: None)
            with FeatureStore.open_for_append(tmp / "ray.h5", {"backbone": "bench"}) as s:
                s.ensure_array("t", shape, expected_rows=n)
                up_w, per_gb_w = timed(lambda b: s.append({"t": b["t"]}, labels[int(b["row"][0]) : int(b["row"][-1]) + 1]))
                assert s.nrows == n
        finally:
            if started:
                ray.shutdown()
        out_rows.append([f"(b) Ray actor pool ({args.workers}) -> driver -> FeatureStore.append (--ray)", gb,
                         per_gb_w, 1 / per_gb_w, up_w])
        out_rows.append(["(b') the same stream, not written (transfer alone)", gb, per_gb_t, 1 / per_gb_t, up_t])
        (tmp / "ray.h5").unlink()

        half = n // 2
        t_shards = (_write_local(tmp / "s0.h5", feats[:half], args.batch, labels[:half])
                    + _write_local(tmp / "s1.h5", feats[half:], args.batch, labels[half:]))
        t = time.perf_counter()
        with FeatureStore.open_for_append(tmp / "merged.h5", {"backbone": "bench"}) as m:
            m.ensure_array("t", shape, expected_rows=n)
            for sp in ("s0.h5", "s1.h5"):
                with FeatureStore.open_read(tmp / sp) as s:
                    lab = s.h5.root.labels.read()
                    arr = s.array("t")
                    step = max(args.batch, (64 << 20) // row_bytes)
                    for i in range(0, arr.nrows, step):
                        m.append({"t": arr[i : i + step]}, lab[i : i + step])
            assert m.nrows == n
        t_merge = time.perf_counter() - t
        out_rows.append(["(c) shard stores, written (2 shards, as (a))", gb, t_shards / gb, gb / t_shards, "-"])
        out_rows.append(["(c) ... then merged into one file (the merge alone)", gb, t_merge / gb, gb / t_merge, "-"])
    note = (f"{n:,} synthetic float16 rows of {row_bytes / 1024:.0f} KiB ({'x'.join(map(str, shape))}, an R100 14x14 "
            f"tap) = {gb:.2f} GB, {args.batch} rows per block/append; files on local disk (page cache). Ray rows: s per GB "
            f"after the first block (the pipeline's start-up is the last column). Streaming "
            f"writes each byte once, in the driver, while the workers compute; shard+merge writes it twice and "
            f"reads it once, and the merge waits for the last shard.")
    return out_rows, note


def main(argv=None):
    ap = C.parser(__doc__)
    ap.add_argument("--n", type=int, default=2000, help="real images [2000]")
    ap.add_argument("--backbone", default="dlib-age")
    ap.add_argument("--model", default=None)
    ap.add_argument("--taps", default="res3,res4,res5")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--gpus-per-worker", type=float, default=0.0)
    ap.add_argument("--address", default=None, help="join this Ray cluster [a local runtime]")
    ap.add_argument("--skip-single", action="store_true", help="no single-process run (on a cluster)")
    ap.add_argument("--gb", type=float, default=1.0, help="GB of synthetic rows for the one-file part [1]; 0 skips it")
    ap.add_argument("--row-kb", type=float, default=196, help="KiB per synthetic row [196: R100 512x14x14 float16]")
    ap.add_argument("--transfer-batch", type=int, default=32, help="rows per block in the one-file part [32]")
    args = ap.parse_args(argv)
    C.tiny(args, n=16, workers=1, gb=0.01, row_kb=16)
    load0 = C.load()
    rows, note = part_extraction(args)
    table = C.md_table(["run", "provider", "images", "e2e s", "e2e img/s", "s to 1st batch", "loop img/s"], rows)
    notes = [note]
    if args.gb > 0:
        args.batch = args.transfer_batch
        trows, tnote = part_transfer(args)
        table += "\n\n" + C.md_table(["one file at the end", "GB", "s per GB", "GB/s", "s to first block"], trows)
        notes.append(tnote)
    print("\n" + table + "\n\n" + "\n\n".join(notes))
    C.record("Cluster (extract --ray)", [sys.argv[0], *(argv if argv is not None else sys.argv[1:])], table,
             "\n\n".join(notes), load_before=load0, extra_versions=("ray", "pyarrow"), enabled=not args.no_record)


if __name__ == "__main__":
    main()
