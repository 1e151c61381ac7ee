"""Sharded extraction: N writers, one shard file each, read back as one store. No single writer, no merge.

``featlab extract ... --shards N`` (local processes: one per GPU, or per group
of cores) and ``featlab extract ... --ray [ADDRESS] --shards N`` (one Ray task
per shard) cut the manifest's rows (after ``--limit``, each image id once) into
N contiguous, even ranges (:func:`featlab.features.store.shard_bounds`). Worker ``i``
runs the ordinary :func:`featlab.features.extract.extract` over its range into
``OUT.shards/shard-00i-of-00N.h5``, an ordinary features file with the same
identity attributes (backbone, model sha256, preprocessing, flip, align): same
write path, same resume, same refusals. Once every shard is done, the driver
writes ``OUT`` as a small index (:func:`featlab.features.store.write_shard_index`:
shards in order, row ranges, rows stored, sha256 of each shard's image ids,
identity), and :meth:`featlab.features.store.FeatureStore.open_read` reads the set as
one store, rows in manifest order: the same rows, labels, skipped images and
tap values as a single-process run.

The driver never touches tap bytes: it sends each worker a few hundred bytes
of arguments and gets back a small report (``ExtractReport.plan['driver_bytes']``
counts both ways, and ``tap_bytes`` what the workers wrote).

Resume is per shard: a rerun of the same command reopens each shard where it
stopped (whole batches; :mod:`featlab.features.store`) and does only its missing rows.
A rerun that would move an already stored image to another shard (a different
``--limit``, or a manifest with rows added or removed before it) is refused in
one line, as is a set made with another shard count or another identity.

Local workers are plain child interpreters (``python -c``), each pinned to its
share of the cores (``sched_setaffinity``; :func:`featlab.features.extract.plan_workers`
then plans within it) and, when GPUs are visible, to one GPU
(``CUDA_VISIBLE_DEVICES``, round robin). Ray workers need the manifest, images,
model file and ``OUT``'s folder on a filesystem every node sees.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import DiskFull, FeatlabError, copy_disk_full

TEST_KILL_SHARD = "FEATLAB_TEST_KILL_SHARD"  # test hook: only this shard's worker gets FEATLAB_TEST_KILL_AFTER_ROWS
_REPORT_TAG = "FEATLAB-SHARD-REPORT "
_FULL_EXIT = 3  # a worker's exit status when its shard's disk filled up (its one line on stderr)


def _rows_and_bounds(manifest: Path, limit: int | None, n: int):
    from ..data.manifest import read_manifest
    from .store import shard_bounds

    df = read_manifest(manifest)
    if limit:
        df = df.iloc[: int(limit)]
    df = df.drop_duplicates("image_id")
    return df, shard_bounds(len(df), n)


def _check_existing(out: Path, n: int, df, bounds) -> None:
    """Refuse (one line) to extract N shards into OUT when what is there cannot continue as N shards."""
    from .store import FeatureStore, read_shard_index, shard_dir, shard_path

    if out.is_file() and out.stat().st_size > 0:
        rec = read_shard_index(out)
        if rec is None:
            raise FeatlabError(f"{out} is a single-file features store: extract into it without --shards, "
                               "or choose another --out for a sharded set")
        if int(rec.get("count", 0)) != n:
            raise FeatlabError(f"{out} is a sharded set of {rec.get('count')} shards, not {n}: "
                               f"rerun with --shards {rec.get('count')}, or choose another --out")
    folder = shard_dir(out)
    if folder.is_dir():
        other = sorted(p.name for p in folder.glob("shard-*-of-*.h5") if not p.name.endswith(f"-of-{n:03d}.h5"))
        if other:
            raise FeatlabError(f"{folder} holds shards of another count ({other[0]}): rerun with that --shards, "
                               "or choose another --out")
    owner = None
    for i in range(n):
        p = shard_path(out, i, n)
        if not p.is_file():
            continue
        if owner is None:
            ids = df["image_id"].astype(str).tolist()
            owner = {x: j for j, (lo, hi) in enumerate(bounds) for x in ids[lo:hi]}
        try:
            with FeatureStore.open_read(p) as s:
                done = s.done_ids()
        except FeatlabError:
            continue  # a damaged shard: its own reopen (open_for_append) says what to do
        for x in done:
            j = owner.get(x)
            if j is not None and j != i:
                raise FeatlabError(f"image {x} is stored in {p.name} but now falls in shard {j}: the manifest's rows "
                                   "(or --limit) changed since these shards were cut; rerun with the same manifest "
                                   "and --limit, or extract into a new --out")


def _gpu_list() -> list[str]:
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if vis is not None:
        return [x for x in vis.split(",") if x.strip() and x.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(x for x in out.splitlines() if x.startswith("GPU "))]


def _core_share(i: int, n: int) -> list[int] | None:
    """The cores worker ``i`` of ``n`` is pinned to (an even share of this process's), or None to share all."""
    try:
        cores = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None
    if len(cores) < n:
        return None
    return cores[(i * len(cores)) // n : ((i + 1) * len(cores)) // n]


def run_shard(job: dict) -> dict:
    """One worker: extract one shard (``job``: the arguments of :func:`featlab.features.extract.extract` plus ``out``
    and ``rows``); returns a small report (never tap bytes)."""
    from .extract import extract
    from .store import FeatureStore

    kw = dict(job)
    rep = extract(**kw)
    with FeatureStore.open_read(rep.out) as s:
        row_bytes = sum(int(np.prod(s.array(k).shape[1:])) * s.array(k).atom.dtype.itemsize for k in s.keys())
    filled = sum(rep.filled.values())
    return {"out": str(rep.out), "rows_before": rep.rows_before, "rows_added": rep.rows_added,
            "rows_total": rep.rows_total, "skipped_added": rep.skipped_added, "filled": rep.filled,
            "skip_reasons": rep.skip_reasons, "warnings": rep.warnings, "seconds": rep.seconds, "setup_seconds": rep.setup_seconds,
            "provider": rep.provider, "preprocessing": rep.preprocessing, "labels_resynced": rep.labels_resynced,
            "rows_not_in_manifest": rep.rows_not_in_manifest,
            "tap_bytes": int((rep.rows_added + filled) * row_bytes), "plan": rep.plan}


def _plain(x):
    """numpy scalars (a report's counts) as plain numbers, for JSON."""
    return x.item() if hasattr(x, "item") else str(x)


def _child() -> None:
    """Entry point of a local worker process: ``python -c 'from featlab.features.shards import _child; _child()' JOB``."""
    job = json.loads(sys.argv[1])
    cores = job.pop("cores", None)
    if cores:
        os.sched_setaffinity(0, cores)
    try:
        result = run_shard(job)
    except DiskFull as e:  # the driver says what to do next, once for every shard
        print(e.message, file=sys.stderr)
        sys.exit(_FULL_EXIT)
    except FeatlabError as e:
        print(str(e), file=sys.stderr)
        sys.exit(2)
    sys.stdout.write(_REPORT_TAG + json.dumps(result, default=_plain) + "\n")
    sys.stdout.flush()


def _run_local(jobs: list[dict], counter: dict) -> list[dict]:
    n = len(jobs)
    gpus = _gpu_list()
    root = str(Path(__file__).resolve().parents[2])  # the folder holding the featlab package
    kill_shard = os.environ.get(TEST_KILL_SHARD)
    procs = []
    for i, job in enumerate(jobs):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(x for x in (root, os.environ.get("PYTHONPATH")) if x))
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
        if kill_shard is not None and str(i) != kill_shard:
            env.pop("FEATLAB_TEST_KILL_AFTER_ROWS", None)
        arg = json.dumps(dict(job, cores=_core_share(i, n)))
        counter["sent"] += len(arg.encode())
        procs.append(subprocess.Popen([sys.executable, "-c", "from featlab.features.shards import _child; _child()", arg],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env))
    outputs: list = [None] * n

    def drain(i: int) -> None:  # each worker's pipes are read as it writes, so none ever blocks on a full pipe
        outputs[i] = procs[i].communicate()

    from concurrent.futures import ThreadPoolExecutor

    try:
        with ThreadPoolExecutor(max_workers=n) as pool:
            list(pool.map(drain, range(n)))
    except BaseException:  # Ctrl-C or a kill of the driver: stop the workers (their stored batches are whole)
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            p.wait()
        raise
    results, failures = [], []
    for i, p in enumerate(procs):
        out, err = outputs[i]
        counter["received"] += len(out) + len(err)
        lines = [x for x in out.decode("utf-8", "replace").splitlines() if x.startswith(_REPORT_TAG)]
        if p.returncode == 0 and lines:
            results.append(json.loads(lines[-1][len(_REPORT_TAG):]))
            continue
        tail = [x.strip() for x in err.decode("utf-8", "replace").splitlines() if x.strip()]
        if p.returncode < 0:
            why = f"was killed by {signal.Signals(-p.returncode).name}"
        else:
            why = f"failed: {tail[-1] if tail else f'exit status {p.returncode}'}"
        failures.append(f"shard {i} of {n} ({Path(jobs[i]['out']).name}) {why}")
        results.append(None)
    if failures:
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        if any(p.returncode == _FULL_EXIT for p in procs):  # every shard keeps its whole batches
            raise DiskFull(f"{failures[0]}{more}; every shard keeps the rows it stored")
        raise FeatlabError(f"{failures[0]}{more}; the rows stored are kept: rerun the same command to resume")
    return results


def _run_ray(jobs: list[dict], plan, counter: dict) -> list[dict]:
    from .cluster import _first_line, require_ray

    require_ray()
    import ray

    started = plan._init(ray)
    try:
        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        gpus = plan.gpus_per_worker
        if gpus and ray.cluster_resources().get("GPU", 0.0) < gpus:
            raise FeatlabError(f"--gpus-per-worker {gpus:g}: the Ray cluster has "
                               f"{ray.cluster_resources().get('GPU', 0.0):g} GPUs")
        # tasks at a time: one per GPU share (Ray holds the rest back), or --workers on CPU; each reserves its
        # share of the cluster's CPUs for decode/align (and, on CPU, onnxruntime)
        at_once = min(len(jobs), int(ray.cluster_resources().get("GPU", 0.0) // gpus) if gpus else plan.workers)
        per = max(1, int(cpus // max(1, at_once)))
        threads = 0 if gpus else per
        task = ray.remote(num_cpus=per, num_gpus=gpus or None, max_retries=2)(run_shard)
        refs = []
        for job in jobs:
            job = dict(job, threads=job.get("threads") or threads,
                       workers=job.get("workers") or (max(1, per - 1) if gpus else max(1, per // 2)))
            if gpus:
                job["providers"] = None  # the worker's own: CUDA on the GPU Ray gave it
            counter["sent"] += len(pickle.dumps(job))
            refs.append(task.remote(job))
        results, failures = [], []
        for i, ref in enumerate(refs):
            try:
                r = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - Ray wraps the worker's error with its traceback
                failures.append(f"shard {i} of {len(jobs)} failed: {_first_line(e)}")
                results.append(None)
                continue
            counter["received"] += len(pickle.dumps(r))
            results.append(r)
    finally:
        if started:
            ray.shutdown()
    if failures:
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise FeatlabError(f"{failures[0]}{more}; the rows stored are kept: rerun the same command to resume")
    return results


def extract_sharded(manifest, layers: list[str], shards: int, backbone: str = "r100", out=None, ray=None,
                    limit: int | None = None, align: bool = False, flip: bool = False, **kw):
    """Extract into ``shards`` shard files (local processes, or Ray tasks with ``ray`` a
    :class:`featlab.features.cluster.RayPlan`), then index them as ``out``. ``kw``: the other arguments of
    :func:`featlab.features.extract.extract` (model, pool, dtype, compression, batch_size, workers, threads, prep,
    providers). Returns a :class:`featlab.features.extract.ExtractReport` over the whole set."""
    from .extract import ExtractReport, default_out
    from ..data.manifest import dataset_name, file_sha256
    from .store import shard_path, write_shard_index

    if shards is None or int(shards) < 1:
        raise FeatlabError(f"--shards must be at least 1, not {shards}")
    n = int(shards)
    t0 = time.perf_counter()
    manifest = Path(manifest)
    if not manifest.is_file():
        raise FeatlabError(f"manifest not found: {manifest}")
    out = Path(out) if out else default_out(backbone, dataset_name(manifest), align, flip, kw.get("preprocessing"))
    df, bounds = _rows_and_bounds(manifest, limit, n)
    _check_existing(out, n, df, bounds)
    kw.pop("progress", None)
    kw.pop("cluster", None)
    paths = [shard_path(out, i, n) for i in range(n)]
    jobs = [dict(kw, manifest=str(manifest), layers=list(layers or []), backbone=backbone, out=str(p), limit=limit,
                 align=align, flip=flip, rows=list(b), progress=False) for p, b in zip(paths, bounds)]
    counter = {"sent": 0, "received": 0}
    results = _run_ray(jobs, ray, counter) if ray is not None else _run_local(jobs, counter)
    write_shard_index(out, paths, bounds, {"manifest_sha256": file_sha256(manifest), "manifest_rows": len(df)})
    rep = ExtractReport(out=out)
    rep.preprocessing = results[0].get("preprocessing", "") if results else ""
    for r in results:
        rep.rows_before += r["rows_before"]
        rep.rows_added += r["rows_added"]
        rep.rows_total += r["rows_total"]
        rep.skipped_added += r["skipped_added"]
        rep.labels_resynced += r["labels_resynced"]
        rep.rows_not_in_manifest += r["rows_not_in_manifest"]
        for k, v in r["filled"].items():
            rep.filled[k] = rep.filled.get(k, 0) + v
        for k, v in r["skip_reasons"].items():
            rep.skip_reasons[k] = rep.skip_reasons.get(k, 0) + v
        rep.warnings += [tuple(w) for w in r.get("warnings", [])]
    rep.seconds = time.perf_counter() - t0
    rep.setup_seconds = max((r["setup_seconds"] for r in results), default=0.0)
    where = f"Ray {ray.describe()['address']}" if ray is not None else "local processes"
    rep.provider = f"{n} shards on {where} ({results[0]['provider'] if results else '?'} each)"
    rep.plan = {"shards": n, "where": where, "driver_bytes": counter["sent"] + counter["received"],
                "driver_bytes_sent": counter["sent"], "driver_bytes_received": counter["received"],
                "tap_bytes": sum(r["tap_bytes"] for r in results),
                "shard_seconds": [round(r["seconds"], 2) for r in results],
                "shard_tap_bytes": [r["tap_bytes"] for r in results],
                "worker_plan": results[0]["plan"] if results else {}}
    return rep


def merge_shards(index, out, block_bytes: int = 64 << 20) -> int:
    """Write the sharded set ``index`` as one ordinary features file ``out`` (optional: every reader takes the
    set as it is). Rows are copied in the stored dtype, a block at a time, through the store's own append (so
    the finiteness record and the crash-safe layout are the usual ones); the file appears only when whole.
    Returns the rows written."""
    from .store import FeatureStore, ShardedStore

    out = Path(out)
    if out.exists():
        raise FeatlabError(f"{out} exists: merge into a new file")
    with FeatureStore.open_read(index) as s:
        if not isinstance(s, ShardedStore):
            raise FeatlabError(f"{index} is not a sharded set (it is already one file)")
        a = s.attrs
        info = s.tap_info()
        tmp = out.with_name(out.name + ".merging")
        tmp.unlink(missing_ok=True)
        try:
            n = _merge_into(s, tmp, a, info, block_bytes)
        except BaseException as e:
            full = copy_disk_full(e, out, tmp, kept=f", the shards of {index} are untouched")
            if full is None:
                raise
            raise full from None
    os.replace(tmp, out)
    return n


def _merge_into(s, tmp: Path, a: dict, info: dict, block_bytes: int) -> int:
    """Copy the open sharded set ``s`` into the new file ``tmp`` (see :func:`merge_shards`); returns its rows."""
    from .store import IDENTITY_KEYS, SHARD_INDEX_ATTR, FeatureStore

    with FeatureStore.open_for_append(tmp, {k: a[k] for k in IDENTITY_KEYS if k in a}) as m:
        for k in s.keys():
            t = info[k]
            m.ensure_array(k, tuple(t["shape"]), dtype=t["dtype"], compression=t.get("compression") or "none",
                           expected_rows=max(1, s.nrows), tap=t.get("tap"), tensor=t.get("tensor"),
                           aliases=tuple(t.get("aliases") or ()))
        row_bytes = sum(int(s.array(k).atom.dtype.itemsize) * int(np.prod(t["shape"])) for k, t in info.items())
        per = max(1, int(block_bytes) // max(1, row_bytes))
        for sh in s.stores:
            labels = sh.h5.root.labels.read()
            for i in range(0, sh.nrows, per):
                m.append({k: sh.array(k)[i : i + per] for k in s.keys()}, labels[i : i + per])
            skipped = sh.h5.root.skipped.read()
            if len(skipped):
                m.h5.root.skipped.append(skipped)
            warned = sh.h5.root.warnings.read() if "/warnings" in sh.h5 else ()
            if len(warned):
                m.h5.root.warnings.append(warned)
        for k, v in a.items():
            if k not in ("taps", "shards", SHARD_INDEX_ATTR, *IDENTITY_KEYS):
                m.set_attr(k, v)
        n = m.nrows
    return n
