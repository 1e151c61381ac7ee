"""Extraction: run a frozen backbone over a manifest once and store any set of taps.

One pass per batch feeds every requested tap. Decoding and alignment run in
workers ahead of inference (bounded prefetch), so the backbone stays busy;
while a batch runs, the previous one is committed by a thread of its own.
How the cores are shared (workers, threads or processes, onnxruntime
threads) is decided by :func:`plan_workers`, from measurements in
``bench/RESULTS.md``. Pooling (``@avg``/``@max``), the cast to float16 and the
input normalisation run inside the ONNX graph (on the GPU when there is one).

Labels follow the manifest: a rerun on a re-prepared manifest rewrites the
labels of the rows already stored (by image id) without running the backbone
for them. Nothing non-finite is stored: a batch with inf or nan in a tap (a
float16 overflow, or the backbone's own nan) stops the run with one line
before any of it is written (:meth:`featlab.features.store.FeatureStore.append`).

Every batch is committed to the HDF5 store (taps, labels, skipped images,
one flush), in order, so an interrupted run, even by ``kill -9``, resumes
where it stopped: rows already stored or skipped are recognised by image id
and not redone. A tap that the file lacks is filled for the rows already
there, in the same file. See :mod:`featlab.features.store` for the layout and its
guarantees.
"""

from __future__ import annotations

import functools
import os
import queue
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__, config
from ..backbones.registry import Backbone, Runner, default_providers
from ..errors import DiskFull, FeatlabError, disk_full
from ..progress import Bar
from ..staging import checkpoint, keep
from ..data.faces import prepare_many, uses_dlib
from ..data.manifest import dataset_name, file_sha256, read_manifest
from .store import FeatureStore, full_store_error, label_row, parse_key
from ..backbones.taps import pool_features, pooled_shape


@dataclass
class ExtractReport:
    out: Path
    rows_before: int = 0
    rows_added: int = 0
    rows_total: int = 0
    skipped_added: int = 0
    filled: dict = field(default_factory=dict)
    seconds: float = 0.0
    provider: str = ""
    skip_reasons: dict = field(default_factory=dict)
    setup_seconds: float = 0.0  # opening the model, session and file, before the first batch
    plan: dict = field(default_factory=dict)  # workers, prep, threads, batch_size used
    labels_resynced: int = 0  # stored rows whose labels were rewritten from a changed manifest
    rows_not_in_manifest: int = 0  # stored rows whose image left the manifest: kept, split '' and fold -1
    preprocessing: str = ""  # the named preprocessing the chips were cut with (featlab.data.faces.PREPROCESSINGS)
    warnings: list = field(default_factory=list)  # (path, warning) of faces stored in this run with a warning

    @property
    def images_per_s(self) -> float:
        done = self.rows_added + self.skipped_added + sum(self.filled.values())
        return done / self.seconds if self.seconds > 0 else 0.0


def default_out(backbone: str, dataset: str, align: bool = False, flip: bool = False,
                preprocessing: str | None = None) -> Path:
    """``features/BACKBONE/DATASET[-align][-PREPROCESSING][-flip].h5``: the preprocessing is named only when it
    is not the backbone's default (the same rule as :func:`featlab.paths.dataset_key`)."""
    suffix = "-align" if align else ""
    if preprocessing:
        from ..backbones.registry import get_spec
        from ..data.faces import check_preprocessing
        from ..paths import default_preprocessing

        kind = get_spec(backbone).geometry[0]
        if check_preprocessing(kind, preprocessing) != default_preprocessing(kind):
            suffix += f"-{preprocessing}"
    suffix += "-flip" if flip else ""
    return config.features_dir() / backbone / f"{dataset}{suffix}.h5"


def resolve_keys(bb: Backbone, layers: list[str], pool: str | None = None) -> dict[str, tuple]:
    """Requested layer strings -> {store key: (TapInfo, pool kind, grid)}.

    ``layers`` items may carry their own pooling (``add_98@avg``); ``pool``
    applies to the ones that do not.
    """
    keys = {}
    for item in layers:
        name, kind, grid = parse_key(item if "@" in item or not pool else f"{item}@{pool}")
        tap = bb.tap(name)
        if kind is not None and len(tap.shape) != 3:
            kind, grid = None, 0  # pooling a vector is a no-op
        key = name + (f"@{kind}{grid or ''}" if kind else "")  # stored under the name asked for
        keys[key] = (tap, kind, grid)
    return keys


def cpu_count() -> int:
    """CPU cores this process may use (affinity / container limits aware)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:  # cgroup v2 quota (containers)
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def plan_workers(provider: str, geometry, align: bool, workers: int | None = None, threads: int = 0,
                 prep: str = "auto", cores: int | None = None) -> dict:
    """How to share the CPU between decode/align workers and onnxruntime.

    Measured on 2 and more cores (bench/RESULTS.md):

    - onnxruntime gets every core (``threads`` 0 = its default) and its idle
      threads do not spin when decode/align workers share the cores, so that
      a worker never waits for a spinning inference thread.
    - decode/align workers: one per two cores on CPU (the backbone is the
      bottleneck there), every core but one on GPU.
    - on CPU, when a net is cheap next to decode/align (dlib-age: 1.5 ms vs
      1.2 ms per image), onnxruntime on the cores the workers leave is faster
      (578 vs 444 img/s on 2 cores); when it is not (dlib-rec, R100), all cores
      (185 vs 140 img/s). ``tune``: the extractor times both on the first
      batches and keeps the faster (:class:`_Tuner`).
    - dlib (landmarks, detection) holds the GIL: with more than one worker,
      such geometries run in worker processes; resize-only geometries, whose
      decode and resize release the GIL, run in threads.
    """
    cores = cores or cpu_count()
    gpu = provider not in ("CPUExecutionProvider", "")
    if not workers:
        workers = max(1, cores - 1) if gpu else max(1, cores // 2)
        workers = min(workers, 16)
    if prep == "auto":
        prep = "process" if (workers > 1 and uses_dlib(geometry, align)) else "thread"
    if prep not in ("thread", "process"):
        raise FeatlabError(f"prep must be 'thread', 'process' or 'auto', not {prep!r}")
    # on CPU, when neither side was fixed by the caller, extract() times both ways of sharing the cores
    # (onnxruntime on all of them, or on those the workers leave) on the first batches and keeps the faster
    tune = not gpu and not threads and prep == "thread" and cores > workers
    return {"workers": int(workers), "prep": prep, "threads": int(threads or 0), "spinning": gpu or False,
            "tune": tune, "cores": cores}


def _chunks(paths: list[str], n: int):
    for i in range(0, len(paths), n):
        yield paths[i : i + n]


def _batches(paths: list[str], batch_size: int, geometry, align: bool, workers: int, prefetch: int = 3,
             prep: str = "thread"):
    """Yield (start, (chip or None, reason) per item) for consecutive batches, prepared ahead by ``workers``
    threads or processes; at most ``prefetch`` batches wait ready, so memory stays bounded."""
    q: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()
    # a few tasks per worker and batch: balanced, with little per-task overhead
    per_task = max(1, min(32, -(-batch_size // (2 * workers))))

    def make_pool():
        if prep == "process":
            return _ProcessPool(workers, geometry, align)
        return ThreadPoolExecutor(max_workers=workers)

    def produce():
        pool = None
        try:
            pool = make_pool()
            for start in range(0, len(paths), batch_size):
                if stop.is_set():
                    break
                futs = [pool.submit(prepare_many, c, geometry, align)
                        for c in _chunks(paths[start : start + batch_size], per_task)]
                while not stop.is_set():
                    try:
                        q.put((start, futs), timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(e)
            return
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=stop.is_set())
        q.put(None)

    t = threading.Thread(target=produce, daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            start, futs = item
            yield start, [r for f in futs for r in f.result()]
    finally:
        stop.set()
        while t.is_alive():  # drain so the producer can finish
            try:
                q.get_nowait()
            except queue.Empty:
                time.sleep(0.01)


class _ProcessPool:
    """Decode/align in worker processes (``python -c ...serve_prepare()``, fed over pipes).

    dlib holds the GIL, so threads cannot run landmarks or face detection on
    more than one core; processes can. Workers are plain child interpreters,
    not ``multiprocessing`` ones: nothing of the caller's ``__main__`` is
    re-imported, and a worker exits when its pipe closes (also when this
    process is killed). A worker that dies is dropped and its task is done
    here in-process, so a run never stops for it.
    """

    def __init__(self, workers: int, geometry, align: bool):
        import subprocess
        import sys

        root = str(Path(__file__).resolve().parents[2])  # the folder holding the featlab package
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(x for x in (root, os.environ.get("PYTHONPATH")) if x),
                   OMP_NUM_THREADS="1", OPENCV_FOR_THREADS_NUM="1")
        self.geometry, self.align = geometry, align
        self.free: queue.Queue = queue.Queue()
        self.procs = []
        for _ in range(workers):
            p = subprocess.Popen([sys.executable, "-c", "from featlab.data.faces import serve_prepare; serve_prepare()"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
            self.procs.append(p)
            self._send(p, (geometry, align))
            self.free.put(p)
        self.alive = len(self.procs)
        self.lock = threading.Lock()
        self.threads = ThreadPoolExecutor(max_workers=workers)

    @staticmethod
    def _send(p, obj) -> None:
        import pickle

        pickle.dump(obj, p.stdin, protocol=pickle.HIGHEST_PROTOCOL)
        p.stdin.flush()

    def _call(self, paths: list[str]) -> list:
        import pickle

        p = self.free.get()
        if p is None:  # every worker died: do it here
            self.free.put(None)
            return prepare_many(paths, self.geometry, self.align)
        try:
            self._send(p, paths)
            out = pickle.load(p.stdout)
        except (EOFError, OSError, pickle.UnpicklingError):
            p.kill()
            with self.lock:
                self.alive -= 1
                if self.alive == 0:
                    self.free.put(None)
            return prepare_many(paths, self.geometry, self.align)
        self.free.put(p)
        return out

    def submit(self, fn, paths, geometry, align):
        return self.threads.submit(self._call, paths)

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        self.threads.shutdown(wait=wait, cancel_futures=cancel_futures)
        for p in self.procs:
            try:
                p.stdin.close()
            except OSError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except Exception:  # noqa: BLE001
                p.kill()
            if p.stdout:
                p.stdout.close()


def stored_features(runner, chips: np.ndarray, keys: dict, flip: bool) -> dict[str, np.ndarray]:
    """Rows for each store key ``{key: (tap, pool kind, grid)}``, as the features file holds them
    (pooled; cast to the stored dtype when the runner does that in its graph)."""
    if runner.outputs and not flip:  # pooled and cast in the graph
        feats = runner.run_keys(chips)
        return {k: feats[k] for k in keys}
    acts = runner.run(chips, flip=flip)
    return {k: pool_features(acts[tap.name], kind, grid) for k, (tap, kind, grid) in keys.items()}


def _maybe_die(store: FeatureStore) -> None:
    """Test hook: FEATLAB_TEST_KILL_AFTER_ROWS=N kills the process (SIGKILL) once N rows are stored."""
    n = os.environ.get("FEATLAB_TEST_KILL_AFTER_ROWS")
    if n and store.nrows >= int(n):
        os.kill(os.getpid(), signal.SIGKILL)


def _one_line_when_full(fn):
    """A write refused for lack of space (or over the file size limit) stops the extraction with one line
    (:func:`featlab.features.store.full_store_error`: the file, what filled up, the faces kept) instead of HDF5's back
    trace; the file keeps its whole batches and the same command resumes it."""
    @functools.wraps(fn)
    def run(*args, **kw):
        try:
            return fn(*args, **kw)
        except DiskFull:
            raise
        except Exception as e:
            if disk_full(e) is None:
                raise
            raise full_store_error(e, kw.get("out")) from None
    return run


@_one_line_when_full
def extract(
    manifest: str | Path,
    layers: list[str],
    backbone: str = "r100",
    model: str | None = None,
    out: str | Path | None = None,
    align: bool = False,
    flip: bool = False,
    pool: str | None = None,
    dtype: str = "float16",
    compression: str = "none",
    batch_size: int | None = None,
    workers: int | None = None,
    limit: int | None = None,
    threads: int = 0,
    progress: bool = True,
    prep: str = "auto",
    providers: list[str] | None = None,
    cluster=None,
    preprocessing: str | None = None,
    rows: tuple[int, int] | None = None,
) -> ExtractReport:
    """Extract ``layers`` of ``backbone`` for every image of ``manifest`` into ``out`` (resumable).

    ``preprocessing``: how each chip is cut (:data:`featlab.data.faces.PREPROCESSINGS`; None: the network's own,
    ``template-5pt`` for dlib and ArcFace networks), recorded by name in the file's ``preprocessing``
    attribute; resuming a file made with another one is refused. ``align``: find the face with the
    detector first (uncropped images) instead of taking the whole image as the face region.

    ``workers``/``prep``: decode/align workers and whether they are threads or
    processes; ``threads``: onnxruntime intra-op threads (0: all cores). The
    defaults come from :func:`plan_workers`. ``cluster`` (a :class:`featlab.features.cluster.RayPlan`): the batches
    run on Ray instead, and their rows are committed here, through the same write path. ``rows`` ``(lo, hi)``:
    only that range of the manifest's rows (after ``limit``, each image id once): one shard of a sharded
    extraction (:mod:`featlab.features.shards`), whose rows, concatenated in shard order, are a single-process run's.
    """
    t0 = time.perf_counter()
    manifest = Path(manifest)
    manifest_sha = file_sha256(manifest) if manifest.is_file() else None
    df = read_manifest(manifest)
    all_rows = df
    if limit:
        df = df.iloc[: int(limit)]
    if rows is not None:  # one shard: a contiguous range of the rows a single-process run would store, in order
        df = df.drop_duplicates("image_id").iloc[int(rows[0]) : int(rows[1])]
    dataset = dataset_name(manifest)
    bb = Backbone(backbone, model, preprocessing)
    if not layers:
        layers = list(bb.spec.default_taps)
    want = resolve_keys(bb, layers, pool)
    out = Path(out) if out else default_out(backbone, dataset, align, flip, bb.prep_name)
    identity = {
        "backbone": backbone,
        "model_sha256": bb.sha256,
        "preprocessing": bb.preprocessing(),
        "flip": bool(flip),
        "align": bool(align),
    }
    batch_size = int(batch_size or config.get("extract", "batch_size") or bb.spec.default_batch)
    geometry = bb.geometry
    providers = list(providers or default_providers())
    plan = plan_workers(providers[0] if providers else "", geometry, align, workers, threads, prep)
    workers, prep = plan["workers"], plan["prep"]
    report = ExtractReport(out=out, preprocessing=bb.prep_name)
    with FeatureStore.open_for_append(out, identity, compression) as store:
        report.rows_before = store.nrows
        store.set_attr("preprocessing", identity["preprocessing"])  # a file from before names the choice now
        store.set_attr("model_path", str(bb.model_path))
        store.set_attr("featlab_version", __version__)
        store.set_attr("dataset", dataset)
        # labels of rows already stored follow the manifest (a re-prepared split, corrected ages): rewritten by
        # image id, taps untouched; then the file records the manifest its labels now come from
        report.labels_resynced, report.rows_not_in_manifest = store.sync_labels(all_rows)
        store.set_attr("manifest", str(manifest.resolve()))
        store.set_attr("manifest_sha256", manifest_sha)
        want = {store.resolve_key(k) or k: v for k, v in want.items()}  # another name of a stored tap
        for key, (tap, kind, grid) in want.items():
            store.ensure_array(key, pooled_shape(tap.shape, kind, grid), dtype=dtype, compression=compression,
                               expected_rows=len(df), tap=tap.name, tensor=tap.tensor, aliases=tap.aliases,
                               depth=tap.depth)
        # every tap already in the file must grow with new rows, not only the requested ones
        all_keys = dict(want)
        for key in store.keys():
            if key not in all_keys:
                name, kind, grid = parse_key(key)
                all_keys[key] = (bb.tap(name), kind, grid)
        # without flip the graph itself pools (global @avg/@max), casts to the stored dtype and normalises
        # uint8 chips; with flip, chip and mirror are averaged first (float32, as always), then pooled
        outputs = None if flip else {k: (tap, kind, grid, str(store.array(k).atom.dtype))
                                     for k, (tap, kind, grid) in all_keys.items()}
        tap_list = [t for t, _, _ in all_keys.values()]
        runner = Runner(bb, tap_list, providers, plan["threads"], spinning=plan["spinning"], outputs=outputs,
                        uint8_input=True)
        report.provider = runner.provider
        report.plan = dict(plan, batch_size=batch_size)
        _fill_lagging(store, bb, runner, all_keys, geometry, align, flip, batch_size, workers, progress, report, prep)
        done = store.done_ids()
        todo = df[~df["image_id"].isin(done)].drop_duplicates("image_id")
        paths = todo["path"].tolist()
        records = todo.to_dict("records")
        if runner.provider != "CPUExecutionProvider" and cluster is None:
            # a GPU picks its convolution algorithms on the first batch of a shape: do it here, in the set-up
            stored_features(runner, np.zeros((batch_size, geometry.size, geometry.size, 3), np.uint8), all_keys, flip)
        report.setup_seconds = time.perf_counter() - t0
        split_threads = max(1, plan["cores"] - workers)
        tuner = _Tuner(runner, lambda: Runner(bb, tap_list, providers, split_threads, spinning=False, outputs=outputs,
                                              uint8_input=True),
                       enabled=plan["tune"] and len(paths) >= 12 * batch_size)
        with Bar(len(paths), f"extract {backbone} -> {out.name}", "img", enabled=progress) as bar, \
                _Committer(store, report, bar) as commit:
            for start, results in (() if cluster is not None else _batches(paths, batch_size, geometry, align, workers, prep=prep)):
                ok = [i for i, (chip, _) in enumerate(results) if chip is not None]
                skipped, warned = [], []
                for i, (chip, why) in enumerate(results):
                    if chip is None:
                        r = records[start + i]
                        skipped.append((r["image_id"].encode(), r["path"].encode("utf-8")[:1024], why.encode("utf-8")[:256]))
                        report.skip_reasons[why] = report.skip_reasons.get(why, 0) + 1
                    elif why:  # stored, with a warning (featlab.data.faces.face_warning)
                        r = records[start + i]
                        warned.append((r["image_id"].encode(), r["path"].encode("utf-8")[:1024], why.encode("utf-8")[:256]))
                        report.warnings.append((r["path"], why))
                feats = {}
                if ok:
                    chips = np.stack([results[i][0] for i in ok])
                    feats = stored_features(tuner.runner, chips, all_keys, flip)
                commit(feats, [label_row(records[start + i]) for i in ok], skipped, len(results), warned)
                tuner.tick(len(results))
            if cluster is not None:  # featlab.features.cluster: batches computed by Ray workers, committed here in order
                for block in cluster.blocks(bb, records, all_keys, outputs, geometry, align, flip, batch_size, report):
                    commit(*block)
        if tuner.rates:
            report.plan["tuning"] = {k: round(v, 1) for k, v in tuner.rates.items()}
            report.plan["threads"] = split_threads if tuner.chose == "split" else 0
        report.rows_total = store.nrows
        _write_skip_list(store, out)
        store.set_attr("config", {"manifest": str(manifest), "layers": list(want), "backbone": backbone,
                                  "model": str(bb.model_path), "align": align, "flip": flip, "pool": pool,
                                  "preprocessing": bb.prep_name,
                                  "dtype": dtype, "compression": compression, "batch_size": batch_size})
    report.seconds = time.perf_counter() - t0
    return report


def _write_skip_list(store: FeatureStore, out: Path) -> None:
    """Every image the file skipped or stored with a warning, by name and reason, beside it
    (:func:`featlab.data.skips.extract_list_path`); no file when there is none."""
    from ..data import skips

    rows = skips.from_store(store)
    path = skips.extract_list_path(out)
    if rows:
        skips.write(rows, path)
    else:
        path.unlink(missing_ok=True)


class _Tuner:
    """On CPU, time both ways of sharing the cores and keep the faster runner.

    ``shared``: onnxruntime on every core, decode/align workers in between (the
    plan's runner); ``split``: onnxruntime on the cores the workers leave. Each
    is timed over ``measure`` batches after ``skip`` warm-up batch; the loser's
    session is dropped. Both give bitwise the same outputs (same graph; the
    thread count only splits the work).
    """

    def __init__(self, runner, make_split, enabled: bool, skip: int = 1, measure: int = 3):
        self.runner, self.make_split = runner, make_split
        self.phase = "shared" if enabled else "done"
        self.skip, self.measure = skip, measure
        self.count, self.t, self.n = 0, 0.0, 0
        self.rates: dict[str, float] = {}
        self.chose = "shared"
        self.other = None

    def tick(self, n_images: int) -> None:
        if self.phase == "done":
            return
        now = time.perf_counter()
        self.count += 1
        if self.count <= self.skip:
            self.t, self.n = now, 0
            return
        self.n += n_images
        if self.count < self.skip + self.measure:
            return
        self.rates[self.phase] = self.n / max(1e-9, now - self.t)
        if self.phase == "shared":
            self.other, self.runner = self.runner, self.make_split()
            self.phase, self.count = "split", 0
            return
        if self.rates["split"] < self.rates["shared"]:
            self.runner = self.other
        else:
            self.chose = "split"
        self.other, self.phase = None, "done"


class _Committer:
    """Commits batches to the store in a thread of its own, in order, while the next batch runs.

    Each batch is still one ``FeatureStore.append`` (taps, labels, skipped, one
    flush), so what is on disk after a crash is whole batches, as before; at
    most ``depth`` computed batches wait for their commit (bounded memory).
    Only this thread touches the store while it runs. An error in a commit
    stops the run at the next batch, and is raised.
    """

    def __init__(self, store: FeatureStore, report: ExtractReport, bar, depth: int = 2):
        self.store, self.report, self.bar = store, report, bar
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, daemon=True, name="featlab-commit")

    def __enter__(self):
        self.thread.start()
        return self

    def _work(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is not None:
                continue  # drain after a failure
            feats, labels, skipped, n_items, warned = item
            try:
                self.store.append(feats, labels, skipped, warned)
                self.report.rows_added += len(labels)
                self.report.skipped_added += len(skipped)
                self.bar(n_items)
                keep("features", f"{self.store.path} ({self.store.nrows:,} faces stored, resumable)")
                _maybe_die(self.store)
                checkpoint("extract-batch")
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                self.error = e

    def __call__(self, feats, labels, skipped, n_items, warned=()) -> None:
        if self.error is not None:
            raise self.error
        self.q.put((feats, labels, skipped, n_items, warned))

    def __exit__(self, exc_type, *exc):
        self.q.put(None)  # whatever was computed is still committed, also when the loop failed
        self.thread.join()
        if self.error is not None and exc_type is None:
            raise self.error


def _fill_lagging(store, bb, runner, all_keys, geometry, align, flip, batch_size, workers, progress, report,
                  prep="thread"):
    lag = store.lagging()
    if not lag:
        return
    labels = store.labels()
    start_row = min(lag.values())
    paths = labels["path"].tolist()[start_row:]
    with Bar(len(paths), f"add {', '.join(lag)}", "img", enabled=progress) as bar:
        for start, results in _batches(paths, batch_size, geometry, align, workers, prep=prep):
            bad = [paths[start + i] for i, (c, _) in enumerate(results) if c is None]
            if bad:
                raise FeatlabError(
                    f"cannot add taps to {store.path}: {bad[0]} no longer decodes the same way; "
                    "the images changed since the file was made: extract into a new file"
                )
            chips = np.stack([c for c, _ in results])
            feats = stored_features(runner, chips, {k: all_keys[k] for k in lag}, flip)
            row = start_row + start
            for k, have in lag.items():
                if row + len(chips) > have:  # only rows this array lacks
                    skip = max(0, have - row)
                    store.fill(k, feats[k][skip:])
                    report.filled[k] = report.filled.get(k, 0) + len(chips) - skip
            bar(len(results))
