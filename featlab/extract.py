"""Extraction: run a frozen backbone over a manifest once and store any set of taps.

One pass per batch feeds every requested tap. Decoding and alignment run in
worker threads ahead of inference (bounded prefetch), so the backbone stays
busy. Every batch is committed to the HDF5 store (taps, labels, skipped
images, one flush), so an interrupted run, even by ``kill -9``, resumes where
it stopped: rows already stored or skipped are recognised by image id and
not redone. A tap that the file lacks is filled for the rows already there,
in the same file. See :mod:`featlab.store` for the layout and its guarantees.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__, config
from .backbones import Backbone
from .errors import FeatlabError
from .images import BadImage, load_rgb
from .manifest import dataset_name, file_sha256, read_manifest
from .store import FeatureStore, label_row, parse_key, pool_features, pooled_shape


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

    @property
    def images_per_s(self) -> float:
        done = self.rows_added + self.skipped_added + sum(self.filled.values())
        return done / self.seconds if self.seconds > 0 else 0.0


def default_out(backbone: str, dataset: str, align: bool = False, flip: bool = False) -> Path:
    suffix = ("-align" if align else "") + ("-flip" if flip else "")
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


def _prepare_one(path: str, geometry, align: bool):
    try:
        img = load_rgb(path)
        return geometry.chip(img, align=align), None
    except BadImage as e:
        return None, str(e)
    except Exception as e:  # noqa: BLE001 - one bad image never stops the run
        return None, f"{type(e).__name__}: {str(e)[:160]}"


def _batches(paths: list[str], batch_size: int, geometry, align: bool, workers: int, prefetch: int = 3):
    """Yield (start, chips or None per item, reasons) for consecutive batches, decoded ahead in threads."""
    q: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def produce():
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for start in range(0, len(paths), batch_size):
                if stop.is_set():
                    break
                futs = [pool.submit(_prepare_one, p, geometry, align) for p in paths[start : start + batch_size]]
                q.put((start, futs))
        q.put(None)

    t = threading.Thread(target=produce, daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is None:
                break
            start, futs = item
            yield start, [f.result() for f in futs]
    finally:
        stop.set()
        while t.is_alive():  # drain so the producer can finish
            try:
                q.get_nowait()
            except queue.Empty:
                time.sleep(0.01)


def _features(runner, chips: np.ndarray, keys: dict, flip: bool) -> dict[str, np.ndarray]:
    acts = runner.run(chips, flip=flip)
    return {k: pool_features(acts[tap.name], kind, grid) for k, (tap, kind, grid) in keys.items()}


def _maybe_die(store: FeatureStore) -> None:
    """Test hook: FEATLAB_TEST_KILL_AFTER_ROWS=N kills the process (SIGKILL) once N rows are stored."""
    n = os.environ.get("FEATLAB_TEST_KILL_AFTER_ROWS")
    if n and store.nrows >= int(n):
        os.kill(os.getpid(), signal.SIGKILL)


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
) -> ExtractReport:
    t0 = time.perf_counter()
    manifest = Path(manifest)
    df = read_manifest(manifest)
    if limit:
        df = df.iloc[: int(limit)]
    dataset = dataset_name(manifest)
    bb = Backbone(backbone, model)
    if not layers:
        layers = list(bb.spec.default_taps)
    want = resolve_keys(bb, layers, pool)
    out = Path(out) if out else default_out(backbone, dataset, align, flip)
    identity = {
        "backbone": backbone,
        "model_sha256": bb.sha256,
        "preprocessing": bb.preprocessing(),
        "flip": bool(flip),
        "align": bool(align),
    }
    batch_size = int(batch_size or config.get("extract", "batch_size") or bb.spec.default_batch)
    workers = int(workers or max(1, min(4, (os.cpu_count() or 2))))
    geometry = bb.geometry
    report = ExtractReport(out=out)
    with FeatureStore.open_for_append(out, identity) as store:
        report.rows_before = store.nrows
        store.set_attr("model_path", str(bb.model_path))
        store.set_attr("featlab_version", __version__)
        store.set_attr("dataset", dataset)
        store.set_attr("manifest", str(manifest.resolve()))
        store.set_attr("manifest_sha256", file_sha256(manifest))
        want = {store.resolve_key(k) or k: v for k, v in want.items()}  # another name of a stored tap
        for key, (tap, kind, grid) in want.items():
            store.ensure_array(key, pooled_shape(tap.shape, kind, grid), dtype=dtype, compression=compression,
                               expected_rows=len(df), tap=tap.name, tensor=tap.tensor, aliases=tap.aliases)
        # every tap already in the file must grow with new rows, not only the requested ones
        all_keys = dict(want)
        for key in store.keys():
            if key not in all_keys:
                name, kind, grid = parse_key(key)
                all_keys[key] = (bb.tap(name), kind, grid)
        runner = bb.runner([t for t, _, _ in all_keys.values()], threads=threads)
        report.provider = runner.provider
        _fill_lagging(store, bb, runner, all_keys, geometry, align, flip, batch_size, workers, progress, report)
        done = store.done_ids()
        todo = df[~df["image_id"].isin(done)].drop_duplicates("image_id")
        paths = todo["path"].tolist()
        records = todo.to_dict("records")
        with _progress(progress, len(paths), f"extract {backbone} -> {out.name}") as bar:
            for start, results in _batches(paths, batch_size, geometry, align, workers):
                ok = [i for i, (chip, _) in enumerate(results) if chip is not None]
                skipped = []
                for i, (chip, why) in enumerate(results):
                    if chip is None:
                        r = records[start + i]
                        skipped.append((r["image_id"].encode(), r["path"].encode("utf-8")[:1024], why.encode("utf-8")[:256]))
                        report.skip_reasons[why] = report.skip_reasons.get(why, 0) + 1
                feats = {}
                if ok:
                    chips = np.stack([results[i][0] for i in ok])
                    feats = _features(runner, chips, all_keys, flip)
                store.append(feats, [label_row(records[start + i]) for i in ok], skipped)
                report.rows_added += len(ok)
                report.skipped_added += len(skipped)
                bar(len(results))
                _maybe_die(store)
        report.rows_total = store.nrows
        store.set_attr("config", {"manifest": str(manifest), "layers": list(want), "backbone": backbone,
                                  "model": str(bb.model_path), "align": align, "flip": flip, "pool": pool,
                                  "dtype": dtype, "compression": compression, "batch_size": batch_size})
    report.seconds = time.perf_counter() - t0
    return report


def _fill_lagging(store, bb, runner, all_keys, geometry, align, flip, batch_size, workers, progress, report):
    lag = store.lagging()
    if not lag:
        return
    labels = store.labels()
    start_row = min(lag.values())
    paths = labels["path"].tolist()[start_row:]
    with _progress(progress, len(paths), f"add {', '.join(lag)}") as bar:
        for start, results in _batches(paths, batch_size, geometry, align, workers):
            bad = [paths[start + i] for i, (c, _) in enumerate(results) if c is None]
            if bad:
                raise FeatlabError(
                    f"cannot add taps to {store.path}: {bad[0]} no longer decodes the same way; "
                    "the images changed since the file was made: extract into a new file"
                )
            chips = np.stack([c for c, _ in results])
            feats = _features(runner, chips, {k: all_keys[k] for k in lag}, flip)
            row = start_row + start
            for k, have in lag.items():
                if row + len(chips) > have:  # only rows this array lacks
                    skip = max(0, have - row)
                    store.fill(k, feats[k][skip:])
                    report.filled[k] = report.filled.get(k, 0) + len(chips) - skip
            bar(len(results))


class _progress:
    """A rich progress bar with images/s and ETA; a no-op when disabled."""

    def __init__(self, enabled: bool, total: int, label: str):
        self.enabled, self.total, self.label = enabled and total > 0, total, label

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        class Rate(TextColumn):
            def render(self, task):
                from rich.text import Text

                speed = task.finished_speed or task.speed
                return Text(f"{speed:,.0f} img/s" if speed else "… img/s")

        self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(""),
                          TextColumn("ETA"), TimeRemainingColumn(), transient=False)
        self.p.start()
        task = self.p.add_task(self.label, total=self.total)
        return lambda n: self.p.advance(task, n)

    def __exit__(self, *exc):
        if self.enabled:
            self.p.stop()
