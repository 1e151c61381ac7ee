"""A grid's probes fitted in worker threads (featlab.heads.probepool) give the figures of one probe after the
other, bit for bit; a probe written into another head's folder is refused; leaving the pool on an error
stops a running probe at its next step. No TensorFlow."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from featlab.heads import baselines as B
from featlab.heads.probepool import ProbePool
from featlab.features.store import FeatureStore

from test_baselines import _std_head, make_probe_features

HEADS = [("vec", "gender", None), ("vec", "bins", 7), ("vec", "age", None)]


@pytest.fixture(scope="module")
def feats(tmp_path_factory):
    return make_probe_features(tmp_path_factory.mktemp("pool") / "probe.h5")


def _files(d: Path) -> tuple[bytes, bytes]:
    return (d / "baselines.json").read_bytes(), (d / "baselines_faces.csv").read_bytes()


def test_pool_threads_write_the_serial_grids_files_bit_for_bit(feats, tmp_path):
    """Three targets on one tap: one after the other through one ProbeCache (what a grid did before the pool),
    and through a pool of 3 worker threads (all three probes at once, asking for the shared Gram matrix and
    preconditioner together): the same baselines.json and baselines_faces.csv, byte for byte."""
    serial, threads = {}, {}
    cache = B.ProbeCache()
    with FeatureStore.open_read(feats) as st:
        for tap, target, cats in HEADS:
            d = tmp_path / "serial" / f"{target}{cats or ''}"
            cfg = _std_head(feats, tap, target, cats, d)
            B.fit_baselines(st, cfg, d, shared=cache)
            serial[target] = _files(d)
        with ProbePool(workers=3) as pool:
            jobs = []
            for tap, target, cats in HEADS:
                d = tmp_path / "pool" / f"{target}{cats or ''}"
                cfg = _std_head(feats, tap, target, cats, d)
                jobs.append((target, d, pool.submit(st, cfg, stats=B.head_stats(d))))
            assert pool.cache.stats == {"designs": 1, "grams": 1}
            for target, d, job in jobs:
                B.write_baselines(d, job.result())
                threads[target] = _files(d)
    assert threads == serial
    assert b'"solver"' in threads["bins"][0]  # the shared fast path ran in the threads


def test_baselines_fitted_for_one_head_are_refused_in_another(feats, tmp_path):
    """write_baselines checks the probe against the folder it writes into: another standardisation (or
    another target) is a RuntimeError, not a quietly wrong baselines.json."""
    with FeatureStore.open_read(feats) as st:
        a = tmp_path / "a"
        cfg = _std_head(feats, "vec", "gender", None, a)
        fitted = B.prepare_baselines(st, cfg, stats=B.head_stats(a))()
    import json

    (a / "config.json").write_text(json.dumps(cfg))
    b = tmp_path / "b"
    b.mkdir()
    (b / "config.json").write_text(json.dumps(cfg))
    z = np.load(a / "standardisation.npz")
    np.savez(b / "standardisation.npz", mean=z["mean"] + 1e-3, std=z["std"])
    with pytest.raises(RuntimeError, match="another head"):
        B.write_baselines(b, fitted)
    (b / "config.json").write_text(json.dumps({**cfg, "target": "age", "cats": None}))
    np.savez(b / "standardisation.npz", mean=z["mean"], std=z["std"])
    with pytest.raises(RuntimeError, match="another head"):
        B.write_baselines(b, fitted)
    assert B.write_baselines(a, fitted)["linear"]["test"]["n"] > 0
    assert not (b / "baselines.json").exists()


def test_leaving_the_pool_on_an_error_stops_a_running_probe(feats, tmp_path, monkeypatch):
    """A probe still searching when its pool is left on an error (an interruption) stops at its next step
    (baselines.Cancelled) instead of running on: the pool is left at once, the probe's future holds the
    cancellation, and nothing is written."""
    started = threading.Event()

    def endless(*a, **k):  # a probe that never converges, checking for cancellation at each step as L-BFGS does
        started.set()
        t = time.perf_counter()
        while time.perf_counter() - t < 60:
            B._check_cancel()
            time.sleep(0.01)
        raise AssertionError("never cancelled")

    monkeypatch.setattr(B, "_logistic_probe", endless)
    d = tmp_path / "h"
    with FeatureStore.open_read(feats) as st:
        cfg = _std_head(feats, "vec", "gender", None, d)
        t = time.perf_counter()
        with pytest.raises(KeyboardInterrupt):
            with ProbePool(workers=2) as pool:
                job = pool.submit(st, cfg, stats=B.head_stats(d))
                assert started.wait(10)
                raise KeyboardInterrupt
        assert time.perf_counter() - t < 10
    assert isinstance(job.exception(), B.Cancelled)
    assert not (d / "baselines.json").exists()


def test_a_failing_probe_stops_the_grid_with_its_error_and_keeps_the_heads_before_it(tmp_path, monkeypatch):
    """A grid whose age probes fail (here: an error planted in the ridge): train_grid raises that error, not
    another; the heads recorded before the first failing one are installed whole (baselines included), the
    failing head and those after it are not, and no staging folder is left."""
    from test_heads import FAST, make_features

    from featlab.study.workflow import train_grid

    feats = make_features(tmp_path / "synth.h5")

    def boom(*a, **k):
        raise ValueError("planted ridge failure")

    monkeypatch.setattr(B, "_ridge_probe", boom)
    root = tmp_path / "results"
    with pytest.raises(ValueError, match="planted ridge failure"):
        train_grid(feats, ["vec", "conv"], [("gender", None), ("age", None)], out_root=root, **FAST)
    heads = sorted(p.parent.relative_to(root) for p in root.rglob("metrics.json"))
    assert [h.parts[-2:] for h in heads] == [("vec", "gender")]
    assert (root / heads[0] / "baselines.json").is_file()
    assert not list(root.rglob(".staging"))
