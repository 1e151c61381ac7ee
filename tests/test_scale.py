"""Heads at scale, on small generated files: a grid whose tap does not fit ``--memory-mb`` streams it
once per epoch for all its heads (counted by a wrapper around the store's reads), and learns what the
in-memory grid learns."""

from __future__ import annotations

import json

import numpy as np
import pytest

from featlab.features.store import FeatureStore

from test_heads import make_features

TARGETS = [("age", None), ("gender", None), ("bins", 7)]
KW = dict(patience=10, batch_size=64, verbose=0, seed=0)


@pytest.fixture(scope="module")
def feats(tmp_path_factory):
    return make_features(tmp_path_factory.mktemp("scale") / "synth.h5", n=600)


def _counting(monkeypatch):
    """Stored bytes read through FeatureStore.read, with the number of those calls made for statistics and
    finiteness (set-up) kept apart from the rest (training and validation)."""
    import traceback

    counts = {"setup": 0, "epochs": 0}
    orig = FeatureStore.read

    def read(self, key, rows=None, dtype=np.float32):
        arr = self.array(key)
        n = arr.nrows if rows is None else (len(range(*rows.indices(arr.nrows))) if isinstance(rows, slice)
                                            else len(np.asarray(rows)))
        names = {f.name for f in traceback.extract_stack(limit=12)}
        counts["setup" if names & {"feature_stats", "count_nonfinite"} else "epochs"] += n * arr.rowsize
        return orig(self, key, rows, dtype)

    monkeypatch.setattr(FeatureStore, "read", read)
    return counts


def test_streamed_grid_reads_the_tap_once_per_epoch(feats, tmp_path, monkeypatch):
    from featlab.heads.grid import fit_grid

    with FeatureStore.open_read(feats) as s:
        split = s.labels().split.to_numpy()
        row = s.array("conv").rowsize
    one_pass = int(np.isin(split, ["train", "val"]).sum()) * row  # the tap's train and val rows
    per_epoch = {}
    for epochs in (1, 3):
        counts = _counting(monkeypatch)
        dirs = fit_grid(feats, ["conv"], TARGETS, out_root=tmp_path / f"e{epochs}", epochs=epochs, memory_mb=0.05, **KW)
        cfgs = [json.loads((d / "config.json").read_text()) for d in dirs]
        assert all(c["data_loading"].startswith("streamed") for c in cfgs)
        g = cfgs[0]["training"]["grid"]
        assert g["epochs_run_all_heads"] == epochs and len(g["streamed"]["epochs"]) == epochs
        assert g["traces"] == {"epoch_loop": 1, "predict": 1}
        per_epoch[epochs] = counts["epochs"]
        monkeypatch.undo()
    # two more epochs read two more passes over the tap, whatever the three heads do
    assert per_epoch[3] - per_epoch[1] == 2 * one_pass
    assert per_epoch[1] == one_pass


def test_streamed_grid_gives_the_in_memory_grid_figures(feats, tmp_path):
    """Same seed: the streamed epoch draws the same permutation and cuts it into the same batches (a block is
    whole batches in permutation order), so its heads are the in-memory grid's, figure for figure."""
    from featlab.heads.grid import fit_grid
    from featlab.report.evaluate import evaluate_head

    kw = dict(KW, epochs=12, patience=4)
    mem = fit_grid(feats, ["conv"], TARGETS, out_root=tmp_path / "mem", **kw)
    st = fit_grid(feats, ["conv"], TARGETS, out_root=tmp_path / "st", memory_mb=0.05, **kw)
    got = {}
    for a, b, (t, _) in zip(mem, st, TARGETS):
        assert not json.loads((a / "config.json").read_text())["data_loading"].startswith("streamed")
        ma = evaluate_head(a, feats)["metrics"]
        mb = evaluate_head(b, feats)["metrics"]
        k = "mae" if t == "age" else "accuracy"
        assert mb[k] == pytest.approx(ma[k], abs=1e-6), (t, ma[k], mb[k])
        got[t] = mb[k]
    assert got["age"] < 10 and got["gender"] > 0.9  # and they learned (mean predictor: MAE ~20, 0.5)
