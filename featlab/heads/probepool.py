"""A grid's baselines fitted beside its other work: :class:`ProbePool`.

After a grid has trained, its heads are saved (models, history plots) and scored (``record_head``: the
head's predictions, reports and plots, mostly Python under the GIL), and their baselines fitted (the linear
probes: mostly BLAS calls, which release the GIL, each single-threaded, ``baselines.BLAS_THREADS``). One after
the other, one of two cores sat idle through all of it. The pool reads each head's baseline input in the
calling thread (HDF5 stays in one thread: :func:`featlab.heads.baselines.prepare_baselines`) and fits and scores
it in one of ``workers`` threads; the calling thread writes the result into the head's folder once the head
is saved (:func:`featlab.heads.baselines.write_baselines`, which checks that the probe read that head's config and
standardisation). :func:`featlab.study.workflow.train_grid` submits each head's probe as soon as the grid has
trained, before the heads are saved; not while it trains: beside one probe thread, TensorFlow's training
took twice as long on 2 cores (the probes are memory-bound, and so is training).

The figures are those of one probe after the other: each probe is fitted by the same code on the same
arrays, every BLAS call single-threaded, and the work the probes share (:class:`featlab.heads.baselines.ProbeCache`:
a tap's design, its Gram matrix and preconditioner) is computed once, under a lock, by whichever probe asks
first.

Memory: the taps whose probes are in flight hold at most the budget (``memory_mb``, the taps' rows as stored)
together, or one tap: a head on a further tap waits for the oldest tap's probes until its tap fits beside
the others. Each tap is held as a grid without the pool would hold it.

An interruption (Ctrl-C) cancels the probes not yet started; those running finish (so that the heads whose
every file is written can still be installed) unless the pool is left before they do, which cancels them
at their next step (``baselines.Cancelled``).
"""

from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

#: Worker threads at most (each probe's BLAS calls run single-threaded); never more than the usable cores.
WORKERS = 4


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class ProbePool:
    """``with ProbePool() as pool: fut = pool.submit(store, cfg, memory_mb, stats)``: a head's baselines
    (what :func:`featlab.heads.baselines.fit_baselines` does but the writing), read now and fitted in a worker
    thread; ``write_baselines(head_dir, fut.result())`` writes them. With one usable core (or ``workers=1``)
    each head's baselines are fitted at once, in the calling thread, and the future comes back done."""

    def __init__(self, workers: int | None = None):
        self.workers = workers

    def __enter__(self) -> "ProbePool":
        from threadpoolctl import threadpool_limits

        from .baselines import BLAS_THREADS, ProbeCache, load_blas

        load_blas()
        n = self.workers if self.workers is not None else min(WORKERS, usable_cores())
        self.cache = ProbeCache()
        self._cancel = threading.Event()
        self._taps: deque = deque()  # (design key, bytes as stored, [futures]) per tap in flight, oldest first
        self._executor = ThreadPoolExecutor(n, thread_name_prefix="featlab-probe") if n > 1 else None
        # one process-wide BLAS limit for the whole pool's life: the probes' own limits, entered and left
        # from several threads, then restore 1 and never the library's default under a running probe
        self._limits = threadpool_limits(limits=BLAS_THREADS, user_api="blas")
        return self

    def submit(self, store, cfg: dict, memory_mb: float = 2048, stats=None, wait: bool = True) -> Future | None:
        """The baselines of the head described by ``cfg`` (its config, or ``PROBE_CONFIG`` of it) and
        ``stats`` (its input's mean and std): read now, fitted in a worker; the future's result goes to
        :func:`featlab.heads.baselines.write_baselines` once the head's folder is there. ``wait=False``: None
        rather than waiting for earlier taps' probes to make room."""
        from .baselines import prepare_baselines
        from ..features.featureio import row_bytes

        key = (cfg["tap"], str(cfg.get("hyperparameters", {}).get("pool")))
        if not self._taps or self._taps[-1][0] != key:
            size = store.nrows * row_bytes(store, cfg["tap"])
            budget = float(memory_mb) * (1 << 20)
            while self._taps and sum(s for _, s, _ in self._taps) + size > budget:
                if not wait and not all(f.done() for f in self._taps[0][2]):
                    return None
                for f in self._taps.popleft()[2]:
                    f.result()  # the oldest tap's probes are done (their errors surface here)
            self._taps.append((key, size, []))
        run = prepare_baselines(store, cfg, memory_mb, self.cache, stats)
        if self._executor is None:
            fut: Future = Future()
            fut.set_result(run())
        else:
            fut = self._executor.submit(self._work, run)
        self._taps[-1][2].append(fut)
        return fut

    def _work(self, run):
        from . import baselines

        baselines._local.cancel = self._cancel
        try:
            return run()
        finally:
            baselines._local.cancel = None

    def stop_queued(self) -> None:
        """Cancel the probes not yet started (an interruption); the running ones go on."""
        for _, _, futs in self._taps:
            for f in futs:
                f.cancel()

    def __exit__(self, *exc) -> None:
        try:
            if self._executor is not None:
                if exc[0] is not None:
                    self._cancel.set()  # leaving on an error or interruption: the running probes stop at their next step
                self._executor.shutdown(wait=True, cancel_futures=True)
        finally:
            self._limits.restore_original_limits()
