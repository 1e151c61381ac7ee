"""Extraction on Ray (featlab.features.cluster) against a single-process run, on real UTKFace faces with dlib-age:
same file row for row, resume after the driver is SIGKILLed, a worker that raises on one batch.

A local Ray of 2 CPUs. The first test lets featlab start and stop its own runtime; the later ones share one
runtime started here (``ray_address``), which the killed driver joins by address as on a real cluster."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from featlab.errors import FeatlabError
from featlab.features.extract import extract
from featlab.data.manifest import read_manifest, write_manifest
from featlab.features.store import FeatureStore

pytest.importorskip("ray", reason="Ray is optional (featlab[ray]): pip install 'featlab[ray]'")
pytest.importorskip("pyarrow", reason="Ray is optional (featlab[ray]): pip install 'featlab[ray]'")

from featlab.features.cluster import TEST_DIE_ONCE, TEST_FAIL_PATH, RayPlan  # noqa: E402

TAPS = ["res4", "res5@avg"]
N_FACES = 400
BATCH = 32


def _plant_bad(tmp: Path, face: Path) -> dict[str, str]:
    """Bad image files -> the skip-reason fragment a single-process run gives them."""
    (tmp / "zero.jpg").write_bytes(b"")
    (tmp / "garbage.jpg").write_bytes(os.urandom(5000))
    (tmp / "truncated.jpg").write_bytes(face.read_bytes()[:300])
    return {"zero.jpg": "empty file", "garbage.jpg": "cannot decode", "truncated.jpg": "cannot decode",
            "missing.jpg": "not found"}


@pytest.fixture(scope="module")
def manifest(utk_manifest, tmp_path_factory) -> Path:
    """400 real faces with 4 bad images planted among them (rows 5, 77, 200, 399)."""
    d = tmp_path_factory.mktemp("cluster")
    df = read_manifest(utk_manifest).sample(n=N_FACES, random_state=1).reset_index(drop=True)
    bad = _plant_bad(d, Path(df["path"].iloc[0]))
    rows = []
    for i, name in enumerate(bad):
        r = df.iloc[i].to_dict()
        r.update(image_id=f"bad{i:013d}", path=str(d / name))
        rows.append(r)
    parts, at = [], 0
    for pos, r in zip((5, 77, 200, 399), rows):
        parts += [df.iloc[at:pos], pd.DataFrame([r])]
        at = pos
    parts.append(df.iloc[at:])
    return write_manifest(pd.concat(parts, ignore_index=True), d / "utk-bad.csv")


@pytest.fixture(scope="module")
def reference(manifest, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "single.h5"
    extract(manifest, TAPS, backbone="dlib-age", out=out, batch_size=BATCH, progress=False)
    return out


def _assert_same_file(got: Path, ref: Path, missing: set[str] = frozenset()):
    """Same rows in the same order (less ``missing`` ids), same labels, taps equal to float16 precision."""
    with FeatureStore.open_read(got) as a, FeatureStore.open_read(ref) as b:
        la, lb = a.labels(), b.labels()
        keep = ~lb["image_id"].isin(missing).to_numpy()
        pd.testing.assert_frame_equal(la, lb[keep].reset_index(drop=True))
        assert la["image_id"].is_unique
        assert set(a.keys()) == set(b.keys()) == set(TAPS)
        for k in TAPS:
            assert a.array(k).nrows == a.nrows and a.array(k).atom.dtype == b.array(k).atom.dtype == np.float16
            x, y = a.read(k), b.read(k)[keep]
            np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-3)  # float16: ~3 significant digits
        attrs_a = {k: v for k, v in a.attrs.items()}
        attrs_b = {k: v for k, v in b.attrs.items()}
        for k in TAPS:  # every stored row was checked for non-finite values, however many rows each file has
            assert attrs_a["taps"][k].pop("checked_rows") == a.nrows and attrs_b["taps"][k].pop("checked_rows") == b.nrows
        assert attrs_a == attrs_b  # backbone, model sha256, preprocessing, taps, manifest, config...
        return a.skipped(), b.skipped()


def test_local_ray_two_workers_equals_single_process(manifest, reference, tmp_path):
    import ray

    assert not ray.is_initialized()
    out = tmp_path / "ray.h5"
    rep = extract(manifest, TAPS, backbone="dlib-age", out=out, batch_size=BATCH, progress=False,
                  cluster=RayPlan(workers=2))
    assert not ray.is_initialized()  # featlab started the local runtime, so it shut it down
    assert rep.rows_total == N_FACES and rep.rows_added == N_FACES and rep.skipped_added == 4
    assert rep.plan["ray"]["workers"] == 2 and rep.plan["ray"]["cluster_cpus"] >= 1
    sk_ray, sk_ref = _assert_same_file(out, reference)
    pd.testing.assert_frame_equal(sk_ray, sk_ref)
    reasons = {Path(p).name: r for p, r in zip(sk_ray["path"], sk_ray["reason"])}
    bad = _plant_bad(tmp_path, Path(read_manifest(manifest)["path"].iloc[0]))
    assert set(reasons) == set(bad) and all(bad[n] in reasons[n] for n in bad)


@pytest.fixture(scope="module")
def ray_address():
    """One local 2-CPU Ray runtime for the tests below; its address lets another driver join it."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 << 20, logging_level="ERROR",
             log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def test_driver_sigkilled_mid_run_resumes_without_lost_or_duplicated_rows(manifest, reference, ray_address, tmp_path):
    out = tmp_path / "killed.h5"
    cmd = [sys.executable, "-m", "featlab.cli", "extract", "-m", str(manifest), "-b", "dlib-age",
           *[a for t in TAPS for a in ("-l", t)], "-o", str(out), "--batch-size", str(BATCH),
           "--ray", ray_address, "--workers", "2", "--quiet"]
    env = dict(os.environ, FEATLAB_TEST_KILL_AFTER_ROWS="150",  # the driver SIGKILLs itself once 150 rows are stored
               PYTHONPATH=os.pathsep.join(x for x in (str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")) if x))
    p = subprocess.run(cmd, check=False, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr.decode()[-2000:]
    with FeatureStore.open_read(out) as s:
        kept = s.nrows
        assert 150 <= kept < N_FACES
    rep = extract(manifest, TAPS, backbone="dlib-age", out=out, batch_size=BATCH, progress=False,
                  cluster=RayPlan(address=ray_address, workers=2))
    assert rep.rows_before == kept and rep.rows_added == N_FACES - kept  # only what was missing
    assert rep.rows_total == N_FACES
    sk, sk_ref = _assert_same_file(out, reference)
    pd.testing.assert_frame_equal(sk, sk_ref)
    with FeatureStore.open_read(out) as s:  # no skipped row recorded twice either
        assert s.h5.root.skipped.nrows == 4


def test_worker_raising_on_a_batch_skips_only_that_image(manifest, reference, ray_address, tmp_path, monkeypatch):
    df = read_manifest(manifest)
    victim = df.iloc[100]
    monkeypatch.setenv(TEST_FAIL_PATH, Path(victim["path"]).name)  # inference raises on every batch holding it
    out = tmp_path / "failing.h5"
    rep = extract(manifest, TAPS, backbone="dlib-age", out=out, batch_size=BATCH, progress=False,
                  cluster=RayPlan(workers=2))
    assert rep.rows_total == N_FACES - 1 and rep.skipped_added == 5
    sk, _ = _assert_same_file(out, reference, missing={victim["image_id"]})  # its 31 batch mates are all there
    row = sk[sk["image_id"] == victim["image_id"]]
    assert len(row) == 1 and row["reason"].iloc[0].startswith("inference failed: RuntimeError: test hook")


def test_worker_process_dying_is_restarted_and_its_batch_redone(manifest, reference, ray_address, tmp_path,
                                                                monkeypatch):
    flag = tmp_path / "died"
    monkeypatch.setenv(TEST_DIE_ONCE, str(flag))
    out = tmp_path / "died.h5"
    rep = extract(manifest, TAPS, backbone="dlib-age", out=out, batch_size=BATCH, progress=False,
                  cluster=RayPlan(workers=2))
    assert flag.exists()  # a worker did die
    assert rep.rows_total == N_FACES and rep.skipped_added == 4
    sk, sk_ref = _assert_same_file(out, reference)
    pd.testing.assert_frame_equal(sk, sk_ref)


def test_gpus_asked_of_a_cluster_without_any(manifest, ray_address, tmp_path):
    with pytest.raises(FeatlabError, match="needs 2 GPUs; the Ray cluster has 0"):
        extract(manifest, TAPS, backbone="dlib-age", out=tmp_path / "gpu.h5", progress=False,
                cluster=RayPlan(workers=2, gpus_per_worker=1))


def test_cli_without_ray_says_how_to_install(manifest, tmp_path, monkeypatch, capsys):
    from featlab.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    rc = main(["extract", "-m", str(manifest), "-b", "dlib-age", "-l", "res4", "-o", str(tmp_path / "x.h5"), "--ray"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "pip install 'featlab[ray]'" in err
    assert not (tmp_path / "x.h5").exists()


def test_cli_checks_ray_options(manifest, tmp_path, capsys):
    from featlab.cli import _optional_values, main

    assert _optional_values(["extract", "--ray", "-l", "res4"]) == ["extract", "--ray", "local", "-l", "res4"]
    assert _optional_values(["extract", "--ray"]) == ["extract", "--ray", "local"]
    assert _optional_values(["extract", "--ray", "10.0.0.1:6379"]) == ["extract", "--ray", "10.0.0.1:6379"]
    rc = main(["extract", "-m", str(manifest), "-b", "dlib-age", "-o", str(tmp_path / "x.h5"), "--gpus-per-worker", "1"])
    assert rc == 2 and "--gpus-per-worker needs --ray" in capsys.readouterr().err
    rc = main(["extract", "-m", str(manifest), "-b", "dlib-age", "-o", str(tmp_path / "x.h5"), "--ray", "--workers", "0"])
    assert rc == 2 and "--workers must be at least 1" in capsys.readouterr().err
