"""Cluster: one extraction spread over Ray (local runtime or an existing cluster), one features file at the end.

``featlab extract ... --ray [ADDRESS] --workers N --gpus-per-worker G`` runs
the batches of :func:`featlab.features.extract.extract` on a Ray Data pipeline:

- **decode/align** as Ray tasks (``map_batches`` over a function, one CPU
  each): :func:`featlab.data.faces.prepare_many`, so a bad image becomes a reason
  exactly as in a single-process run;
- **inference** in an actor pool (``map_batches`` over a class,
  ``ActorPoolStrategy(size=N)``, ``num_gpus=G``): each actor holds one
  onnxruntime session (:class:`featlab.backbones.registry.Runner`, CUDA provider when
  it was given a GPU) and returns the rows as stored
  (:func:`featlab.features.extract.stored_features`: pooled, cast to the stored dtype).

How the shards become one file: the blocks stream back, in manifest order
(``preserve_order``), to the driver, which commits each one through the same
:class:`featlab.features.store.FeatureStore` write path as a local run (``_Committer``:
taps, labels, skipped, one flush per batch). Nothing is written twice: no
shard files, no merge pass, no second copy on disk, and the file is the same
layout/rows/attributes as a single-process run because it is written by the
same code. Resume is the store's own: a killed driver leaves whole batches,
and the rerun skips every image id already stored or skipped. The price is
that every stored byte crosses the network to the driver once (the bytes a
merge would also have to move, but without the shard write and reread);
``bench/cluster.py`` measures what the driver's receive+commit costs per GB.

An image that fails to decode is skipped with its reason, as today. A batch
whose inference raises is retried once; if it raises again, its images are run
one at a time and only those that still fail are skipped, with the reason
(``inference failed: ...``). An actor process that dies is restarted by Ray
and its batch retried (Ray Data's defaults for actor pools: ``max_restarts=-1``,
``max_task_retries=-1``); a decode task whose process dies is retried too.

``--ray --shards N`` takes the other way (:mod:`featlab.features.shards`): each Ray task
runs a whole extraction over its slice of the manifest and writes its own
shard file, and the driver writes only a small index: no single writer.

Ray is an optional extra (``pip install 'featlab[ray]'``); nothing here imports
it at module import time.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import logging
import os
import warnings
from dataclasses import dataclass

import numpy as np

from ..errors import FeatlabError

INSTALL_HINT = "pip install 'featlab[ray]'  (or: pip install 'ray[data]')"
TEST_FAIL_PATH = "FEATLAB_TEST_FAIL_PATH"  # test hook: inference raises on any batch holding a path containing this
TEST_DIE_ONCE = "FEATLAB_TEST_DIE_ONCE"  # test hook: the first worker to get a batch creates this file and dies


def ray_installed() -> bool:
    """Whether Ray Data can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("ray") is not None and importlib.util.find_spec("pyarrow") is not None
    except (ImportError, ValueError):
        return False


def require_ray() -> None:
    if not ray_installed():
        raise FeatlabError(f"--ray needs Ray Data, which is not installed: {INSTALL_HINT}")


@dataclass
class RayPlan:
    """Where and how wide to run: ``address`` None starts a local Ray runtime of ``local_cpus`` CPUs
    (default: this machine's usable cores) and shuts it down at the end; an address (``auto``,
    ``ray://host:10001``, ``host:6379``) joins that cluster, as ``ray.init(address=...)`` does."""

    address: str | None = None
    workers: int = 2
    gpus_per_worker: float = 0.0
    local_cpus: int | None = None
    object_store_mb: int = 512  # local runtime only

    def __post_init__(self):
        if self.workers is None or int(self.workers) < 1:
            raise FeatlabError(f"--workers must be at least 1 with --ray, not {self.workers}")
        if self.gpus_per_worker is None or float(self.gpus_per_worker) < 0:
            raise FeatlabError(f"--gpus-per-worker must be 0 or more, not {self.gpus_per_worker}")
        self.workers, self.gpus_per_worker = int(self.workers), float(self.gpus_per_worker)
        if self.address in ("", "local"):
            self.address = None

    def describe(self) -> dict:
        return {"address": self.address or "local", "workers": self.workers, "gpus_per_worker": self.gpus_per_worker}

    # ---- the run -------------------------------------------------------------------------
    def blocks(self, bb, records: list[dict], keys: dict, outputs: dict | None, geometry, align: bool, flip: bool,
               batch_size: int, report):
        """Yield ``(features, labels, skipped, n_items)`` per batch of ``records``, in their order, ready for
        :class:`featlab.features.extract._Committer`. Starts (or joins) Ray, and shuts it down at the end."""
        if not records:
            return
        require_ray()
        import ray

        started = self._init(ray)
        try:
            yield from self._run(ray, bb, records, keys, outputs, geometry, align, flip, batch_size, report)
        finally:
            if started:
                ray.shutdown()

    def _init(self, ray) -> bool:
        from .extract import cpu_count

        kw = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False}
        if ray.is_initialized():
            return False
        try:
            if self.address:
                ray.init(address=self.address, **kw)
            else:
                ray.init(num_cpus=int(self.local_cpus or cpu_count()),
                         object_store_memory=int(self.object_store_mb) << 20, **kw)
        except Exception as e:  # noqa: BLE001
            where = f"the Ray cluster at {self.address}" if self.address else "a local Ray runtime"
            raise FeatlabError(f"cannot start or join {where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        return True

    def _run(self, ray, bb, records, keys, outputs, geometry, align, flip, batch_size, report):
        import ray.data
        from ray.data import ActorPoolStrategy

        for name in ("ray.data", "ray"):
            logging.getLogger(name).setLevel(logging.ERROR)
        with warnings.catch_warnings():  # Ray Data's own deprecated settings, warned of on every context
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx = ray.data.DataContext.get_current()
            ctx.execution_options.preserve_order = True  # rows come back in manifest order: same file as a local run
            ctx.enable_progress_bars = False  # one bar: the extractor's
            ctx.enable_operator_progress_bars = False
            ctx.print_on_execution_start = False

        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        gpus = self.gpus_per_worker
        if gpus and ray.cluster_resources().get("GPU", 0.0) < gpus * self.workers:
            raise FeatlabError(f"--workers {self.workers} --gpus-per-worker {gpus:g} needs {gpus * self.workers:g} GPUs; "
                               f"the Ray cluster has {ray.cluster_resources().get('GPU', 0.0):g}")
        # an inference actor reserves one CPU to feed its GPU; on CPU it shares the cores with the decode tasks
        # (half a CPU each reserved, so that decode tasks always get cores), its onnxruntime using its share
        actor_cpus = 1.0 if gpus else 0.5
        threads = 0 if gpus else max(1, int(cpus // self.workers))
        model = bb.model_path.read_bytes()
        light = copy.copy(bb)
        light.__dict__.pop("onnx_model", None)  # the model travels once, as bytes through the object store
        _ = light.taps, light.normalisation, light.sha256  # resolved here, where the file is
        report.provider = f"Ray {self.describe()['address']}: {self.workers} workers" + (f" x {gpus:g} GPU" if gpus else " on CPU")
        report.plan["ray"] = dict(self.describe(), actor_cpus=actor_cpus, threads=threads, cluster_cpus=cpus)

        items = [{"row": i, "path": str(r["path"])} for i, r in enumerate(records)]
        n_blocks = max(1, -(-len(items) // batch_size))
        ds = ray.data.from_items(items, override_num_blocks=n_blocks)
        ds = ds.map_batches(_prepare_batch, batch_size=batch_size, batch_format="numpy", num_cpus=1,
                            fn_kwargs={"geometry": geometry, "align": align})
        ds = ds.map_batches(_Infer, batch_size=batch_size, batch_format="numpy",
                            compute=ActorPoolStrategy(size=self.workers), num_cpus=actor_cpus, num_gpus=gpus or None,
                            fn_constructor_kwargs={"bb": light, "model": ray.put(model), "keys": keys,
                                                   "outputs": outputs, "flip": flip, "threads": threads,
                                                   "gpu": bool(gpus), "fail_path": os.environ.get(TEST_FAIL_PATH),
                                                   "die_once": os.environ.get(TEST_DIE_ONCE)})
        expected = 0
        try:
            for b in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
                rows = np.asarray(b["row"], dtype=np.int64)
                if len(rows) and not np.array_equal(rows, np.arange(expected, expected + len(rows))):
                    raise FeatlabError(f"the Ray run returned rows out of order or twice (expected row {expected}, "
                                       f"got {int(rows[0])}); nothing after the last whole batch was stored")
                expected += len(rows)
                yield self._block(b, rows, records, keys, report)
        except FeatlabError:
            raise
        except Exception as e:  # noqa: BLE001 - Ray's errors carry a long remote traceback
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise FeatlabError(f"the Ray run failed after {expected:,} of {len(records):,} images "
                               f"(stored batches are kept; rerun to resume): {_first_line(e)}") from None
        if expected != len(records):
            raise FeatlabError(f"the Ray run returned {expected:,} of {len(records):,} images; "
                               "stored batches are kept: rerun the same command to do the rest")

    @staticmethod
    def _block(b, rows, records, keys, report):
        from .store import label_row

        reasons = [str(x) for x in b["reason"]]
        ok = np.array([not r for r in reasons], dtype=bool)
        feats = {k: np.asarray(b[k])[ok] for k in keys} if ok.any() else {}
        labels = [label_row(records[int(i)]) for i in rows[ok]]
        skipped = []
        for i, why in zip(rows[~ok], (r for r in reasons if r)):
            r = records[int(i)]
            skipped.append((str(r["image_id"]).encode(), str(r["path"]).encode("utf-8")[:1024],
                            why.encode("utf-8")[:256]))
            report.skip_reasons[why] = report.skip_reasons.get(why, 0) + 1
        warned = []
        flags = [str(x) for x in b["warning"]] if "warning" in b else [""] * len(rows)
        for j, (i, w) in enumerate(zip(rows, flags)):
            if w and ok[j]:
                r = records[int(i)]
                warned.append((str(r["image_id"]).encode(), str(r["path"]).encode("utf-8")[:1024], w.encode("utf-8")[:256]))
                report.warnings.append((str(r["path"]), w))
        return feats, labels, skipped, len(rows), warned


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    # Ray's task errors end with the user's exception line; the first line is Ray's own summary
    tail = [ln for ln in lines if "Error" in ln or "Exception" in ln]
    return (tail[-1] if tail else (lines[0] if lines else type(e).__name__))[:300]


def _prepare_batch(batch: dict, geometry, align: bool) -> dict:
    """Ray task: decode and cut the chips of one batch; a failed image gets a zero chip and its reason."""
    from ..data.faces import prepare_many

    paths = [str(p) for p in batch["path"]]
    results = prepare_many(paths, geometry, align)
    size = geometry.size
    chips = np.zeros((len(paths), size, size, 3), dtype=np.uint8)
    reasons, warnings = [], []
    for i, (chip, why) in enumerate(results):
        if chip is not None:
            chips[i] = chip
            reasons.append("")
            warnings.append(why or "")  # a stored chip's warning (featlab.data.faces.prepare)
        else:
            reasons.append(why or "unusable image")
            warnings.append("")
    return {"row": np.asarray(batch["row"], dtype=np.int64), "path": np.asarray(paths, dtype=object),
            "chip": chips, "reason": np.asarray(reasons, dtype=object), "warning": np.asarray(warnings, dtype=object)}


class _Infer:
    """Ray actor: one onnxruntime session; a batch of chips -> the stored rows of every key."""

    def __init__(self, bb, model, keys: dict, outputs: dict | None, flip: bool, threads: int, gpu: bool,
                 fail_path: str | None = None, die_once: str | None = None):
        import onnx
        import onnxruntime as ort

        from ..backbones.registry import Runner

        if not isinstance(model, (bytes, bytearray)):  # an object reference, when Ray hands it over as such
            import ray

            model = ray.get(model)
        if hashlib.sha256(model).hexdigest() != bb.sha256:
            raise FeatlabError(f"the model bytes received by a Ray worker do not match {bb.model_path} (sha256)")
        graph = onnx.load_from_string(bytes(model))
        bb.__dict__["onnx_model"] = bb.spec.repair(graph) if bb.spec.repair else graph  # as Backbone.onnx_model does
        if gpu:
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise FeatlabError("a Ray worker was given a GPU but its onnxruntime has no CUDAExecutionProvider "
                                   "(pip install 'featlab[gpu]' on the cluster nodes)")
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        self.keys, self.flip = keys, flip
        tap_list = [t for t, _, _ in keys.values()]
        self.runner = Runner(bb, tap_list, providers, threads, spinning=bool(gpu), outputs=outputs, uint8_input=True)
        self.fail_path, self.die_once = fail_path or None, die_once or None  # test hooks, from the driver's environment

    def _features(self, chips: np.ndarray, paths: list[str]) -> dict[str, np.ndarray]:
        from .extract import stored_features

        if self.fail_path and any(self.fail_path in p for p in paths):
            raise RuntimeError(f"test hook {TEST_FAIL_PATH}: refusing a batch with {self.fail_path}")
        return stored_features(self.runner, chips, self.keys, self.flip)

    def __call__(self, batch: dict) -> dict:
        from ..backbones.taps import pooled_shape

        if self.die_once:
            try:
                with open(self.die_once, "x"):
                    pass
            except FileExistsError:
                pass
            else:
                os._exit(17)  # the process dies in the middle of a batch, as on a crash or a lost node

        reasons = [str(r) for r in batch["reason"]]
        paths = [str(p) for p in batch["path"]]
        ok = [i for i, r in enumerate(reasons) if not r]
        chips = np.asarray(batch["chip"])
        feats = None
        if ok:
            for _attempt in range(2):  # the batch, then once more
                try:
                    feats = self._features(chips[ok], [paths[i] for i in ok])
                    break
                except Exception:  # noqa: BLE001 - retried, then isolated image by image
                    feats = None
            if feats is None:
                feats = self._one_by_one(chips, paths, ok, reasons)
                ok = [i for i in ok if not reasons[i]]
        n = len(reasons)
        out = {"row": np.asarray(batch["row"], dtype=np.int64), "reason": np.asarray(reasons, dtype=object)}
        if "warning" in batch:  # a stored chip's warning travels with its row
            out["warning"] = np.asarray(batch["warning"], dtype=object)
        for k, (tap, kind, grid) in self.keys.items():
            # one row per item of the batch (a block's columns are all as long); skipped items' rows are zeros
            # that the driver drops
            if feats is not None:
                x = np.asarray(feats[k])
                out[k] = np.zeros((n, *x.shape[1:]), dtype=x.dtype)
                out[k][ok] = x
            else:
                out[k] = np.zeros((n, *pooled_shape(tap.shape, kind, grid)), dtype=np.float32)
        return out

    def _one_by_one(self, chips, paths, ok, reasons) -> dict[str, np.ndarray] | None:
        rows: dict[str, list] = {k: [] for k in self.keys}
        for i in ok:
            try:
                f = self._features(chips[i : i + 1], [paths[i]])
            except Exception as e:  # noqa: BLE001 - this image is skipped with the reason
                reasons[i] = f"inference failed: {type(e).__name__}: {str(e)[:160]}"
                continue
            for k in self.keys:
                rows[k].append(f[k])
        if not any(rows.values()):
            return None
        return {k: np.concatenate(v, axis=0) for k, v in rows.items()}
