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
from featlab.store import FeatureStore

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
