"""Every bench/ script runs in its tiny mode (``--tiny``: a few faces of the shipped sample, figures not
checked), so none rots unnoticed: each exits 0, prints its table, and leaves bench/RESULTS.md alone.
The scripts that start TensorFlow or Ray take longer and are marked ``slow``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
RESULTS = BENCH / "RESULTS.md"

#: script -> a line its tiny run must print (beyond the exit status)
SCRIPTS = {
    "extraction.py": "float16 + HDF5 append + flush",  # the profile stage that crashed on the 10-field labels table
    "storage.py": "| featlab none",
    "before_after.py": "| dlib-age | 16 |",
    "grouping.py": "chosen rule",
    "grouping_scale.py": "radius search alone",
    "cluster.py": "Files equal (ids in order, taps to float16 precision): True",
    "heads.py": "grid heads inside the sequential head's 95 % interval",
    "memory.py": "| extract dlib-age res3,res4,res5: 16 vs 32 images",
    "shards.py": "| 2 local processes | 16 |",
    "lrp_zennit.py": "zennit comparison: ",  # "skipped (...)" without torch, the figures with it
    "scale.py": "| grid age+gender+bins7 on one tap, bytes read per epoch | 1.00 passes",
    "cnn_input.py": "from the cache |",
    "seed_stability.py": "repeats agree with the most frequent choice",
}
SLOW = {"cluster.py", "heads.py", "memory.py", "scale.py", "seed_stability.py"}  # Ray's start-up; TensorFlow's (several processes for memory.py)


def test_every_bench_script_is_covered():
    scripts = {p.name for p in BENCH.glob("*.py") if not p.name.startswith("_")}
    assert scripts == set(SCRIPTS), "add the new bench script to tests/test_bench.py (with a --tiny mode)"


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench")


@pytest.mark.parametrize("script", [pytest.param(s, marks=[pytest.mark.slow] if s in SLOW else []) for s in SCRIPTS])
def test_bench_script_runs_in_tiny_mode(script, bench_dir):
    if script == "cluster.py":
        pytest.importorskip("ray", reason="Ray is optional (featlab[ray]): pip install 'featlab[ray]'")
    before = RESULTS.read_bytes() if RESULTS.exists() else None
    env = dict(os.environ, FEATLAB_BENCH_DIR=str(bench_dir), PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, str(BENCH / script), "--tiny"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, f"{script} --tiny failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    assert SCRIPTS[script] in p.stdout, p.stdout[-3000:]
    assert "|---" in p.stdout  # its table
    assert "appended to" not in p.stdout
    assert (RESULTS.read_bytes() if RESULTS.exists() else None) == before  # a tiny run records nothing
