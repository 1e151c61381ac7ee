"""A write refused for lack of space is one line and exit 2, never HDF5's back trace, and what is kept resumes.

The refusal is real: the command runs in a child process whose file size limit (``RLIMIT_FSIZE``, with
``SIGXFSZ`` ignored) makes the kernel refuse any write past it with EFBIG, as a full filesystem refuses
with ENOSPC; no mount, no privilege. Lifting the limit is the space being freed.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tables")

from featlab.cli import main
from featlab.features.store import FeatureStore

ROOT = Path(__file__).resolve().parents[1]
EXTRACT = ["-b", "dlib-age", "-l", "res4", "--batch-size", "32", "-q"]


def _limited(args: list[str], limit: int, cwd: Path) -> subprocess.CompletedProcess:
    """``featlab ARGS`` in a child whose files cannot grow past ``limit`` bytes."""
    def cap():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x))
    return subprocess.run([sys.executable, "-m", "featlab.cli", *args], cwd=cwd, env=env, preexec_fn=cap,
                          capture_output=True, text=True, timeout=600)


def _one_line(r: subprocess.CompletedProcess) -> str:
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1, (r.returncode, r.stderr[-3000:])
    return lines[0]


def _same_file(a: Path, b: Path) -> None:
    with FeatureStore.open_read(a) as x, FeatureStore.open_read(b) as y:
        assert x.keys() == y.keys() and x.nrows == y.nrows
        for k in x.keys():
            assert x.array(k).atom.dtype == y.array(k).atom.dtype
            np.testing.assert_array_equal(x.array(k).read().view(np.uint16), y.array(k).read().view(np.uint16))
        assert x.labels().equals(y.labels())
        assert x.skipped().equals(y.skipped())


@pytest.fixture(scope="module")
def whole(utk_small, tmp_path_factory) -> Path:
    """An uninterrupted extraction of the 240 real faces (also converts the model, outside any limit)."""
    out = tmp_path_factory.mktemp("whole") / "whole.h5"
    assert main(["extract", "-m", str(utk_small), *EXTRACT, "-o", str(out)]) == 0
    return out


def test_extraction_past_the_limit_is_one_line_and_resumes_to_the_whole_file(whole, utk_small, tmp_path, capsys):
    out = tmp_path / "cut.h5"
    args = ["extract", "-m", str(utk_small), *EXTRACT, "-o", str(out)]
    r = _limited(args, int(whole.stat().st_size * 0.6), tmp_path)
    line = _one_line(r)
    assert "HDF5" not in r.stderr and "Traceback" not in r.stderr
    kept = int(line.split(" faces kept")[0].rsplit(" ", 1)[1].replace(",", ""))
    assert 0 < kept < 240 and kept % 32 == 0  # whole batches, stopped mid-run
    assert line.startswith(f"featlab: {out}: file size limit reached; {kept} faces kept, whole")
    assert line.endswith("free space, then resume: featlab " + " ".join(args))

    capsys.readouterr()
    assert main(args) == 0  # the same command, the limit lifted
    assert f"240 faces ({240 - kept} new" in capsys.readouterr().out  # went on from the kept rows
    _same_file(out, whole)
    assert not list(tmp_path.glob(".cut.h5.cut-*"))


def test_import_past_the_limit_is_one_line_and_leaves_no_file(utk_small, tmp_path, capsys):
    """The copy goes to a temporary file (here in one 32 MB block, so none of its rows was written): past the
    limit it is removed, one line says so; run again, the file is whole."""
    from featlab.data.manifest import read_manifest

    n = len(read_manifest(utk_small))
    x = np.random.default_rng(0).normal(size=(n, 256, 3, 3)).astype(np.float32)  # 2.2 MB
    np.save(tmp_path / "t.npy", x)
    out = tmp_path / "imported.h5"
    args = ["import", str(tmp_path / "t.npy"), "--labels", str(utk_small), "--backbone", "b", "--out", str(out),
            "--rows-in-manifest-order"]
    line = _one_line(_limited(args, 1 << 20, tmp_path))
    assert line.startswith(f"featlab: {out}: file size limit reached after ")
    written = int(line.split(" after ")[1].split(" of ")[0].replace(",", ""))
    assert written < n and f" of {n} rows; nothing written (the partial copy is removed)" in line
    assert line.endswith("free space, then run again: featlab " + " ".join(args))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.npy"]  # no partial file
    assert main(args) == 0
    with FeatureStore.open_read(out) as s:
        np.testing.assert_array_equal(s.read("t"), x)


def test_a_report_past_the_limit_is_one_line(tmp_path, monkeypatch, capsys):
    """Results and reports: the comparison's plot cannot be written; one line names it, no traceback."""
    import json

    import pandas as pd

    root = tmp_path / "results"
    for k, acc in (("a", 0.8), ("b", 0.6)):
        d = root / "m" / "ds" / k / "gender"
        d.mkdir(parents=True)
        ok = np.r_[np.ones(int(acc * 100)), np.zeros(100 - int(acc * 100))]
        pd.DataFrame({"image_id": [f"i{j}" for j in range(200)], "split": ["val"] * 100 + ["test"] * 100,
                      "accuracy": np.r_[ok, ok]}).to_csv(d / "faces.csv", index=False)
        (d / "metrics.json").write_text(json.dumps({"val": {"n": 100, "metrics": {"accuracy": acc}},
                                                    "test": {"n": 100, "metrics": {"accuracy": acc}}}))
    args = ["compare", "--backbone", "m", "--dataset", "ds", "--target", "gender"]
    line = _one_line(_limited(args, 4096, tmp_path))
    png = Path("results/m/ds/compare/gender/layer_comparison.png")
    assert line == f"featlab: file size limit reached writing {png}; free space, then run again: featlab " + " ".join(args)
    monkeypatch.chdir(tmp_path)
    assert main(args) == 0 and (tmp_path / png).stat().st_size > 4096
