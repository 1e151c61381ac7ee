"""Nothing is dropped without its name (issue #29, items 2 and 3): a `featlab run` on a CSV of real faces
holding a missing file, a text file named .jpg, a truncated JPEG, an age of -3 and an age of "abc" exits 0
and names each with its reason on the console and in report.md, whose counts add up; a target without a
label column stops before extraction naming the spec key; a chip without a face is stored with a recorded
warning, by name."""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import pytest

from featlab.cli import main

ROOT = Path(__file__).resolve().parents[1]
EYE = "18_0_1_20170113175821404.jpg.chip.jpg"  # the eye close-up that was in the shipped sample


def _faces(utk_dir: Path, n: int) -> list[Path]:
    return [p for p in sorted(utk_dir.glob("*.jpg")) if p.name != EYE and p.name.count("_") == 3][:n]


@pytest.fixture(scope="module")
def bad_csv(utk_dir, tmp_path_factory) -> Path:
    """A CSV of 40 real faces (ages and genders from their UTKFace names) and five bad rows."""
    d = tmp_path_factory.mktemp("badcsv")
    rows = []
    for p in _faces(utk_dir, 40):
        shutil.copy(p, d / p.name)
        age, g = p.name.split("_")[:2]
        rows.append((p.name, age, "m" if g == "0" else "f"))
    (d / "notes.jpg").write_text("this is a text file, not an image\n")
    src = (d / rows[0][0]).read_bytes()
    (d / "truncated.jpg").write_bytes(src[: len(src) // 3])
    rows[1] = (rows[1][0], "-3", rows[1][2])
    rows[2] = (rows[2][0], "abc", rows[2][2])
    rows += [("missing.jpg", "30", "f"), ("notes.jpg", "30", "m"), ("truncated.jpg", "31", "f")]
    with open(d / "faces.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "age", "gender"])
        w.writerows(rows)
    return d / "faces.csv"


def _spec(path: Path, csv_path: Path, heads: str = '[[heads]]\ntarget = "age"\nepochs = 2\n'
          '[[heads]]\ntarget = "gender"\nepochs = 2\n') -> Path:
    path.write_text(f'name = "bad"\nzero_shot = false\n[dataset]\nadapter = "csv"\nroot = "{csv_path}"\n'
                    '[backbone]\nname = "dlib-age"\n[extract]\ntaps = ["res4"]\n' + heads)
    return path


def test_a_run_names_every_row_it_leaves_out_and_its_counts_add_up(bad_csv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(_spec(tmp_path / "bad.toml", bad_csv))]) == 0
    out = capsys.readouterr()
    console = out.out + out.err
    d = bad_csv.parent
    named = {  # the item as named, and the reason
        "missing.jpg": "image file not found",
        "notes.jpg": "cannot decode",
        "truncated.jpg": "cannot decode",
    }
    for name, why in named.items():
        assert re.search(rf"{re.escape(str(d / name))}.*: .*{why}", console), (name, console)
    assert re.search(r"faces\.csv:3 .*\(age '-3'\): kept without age: outside 0\.\.120", console), console
    assert re.search(r"faces\.csv:4 .*\(age 'abc'\): kept without age: not a number", console), console
    report = next(Path("results").rglob("report.md")).read_text()
    for name, why in named.items():
        assert re.search(rf"{re.escape(str(d / name))}` \| {why}", report), (name, report)
    assert "(age '-3')` | kept without age: outside 0..120" in report
    assert "(age 'abc')` | kept without age: not a number" in report
    # the counts add up: 43 rows = 42 in the manifest + 1 left out; 42 = 40 extracted + 2 skipped;
    # age: 38 of 40 used + 2 left out; gender: all 40
    assert "**43 asked for** (rows or images of the dataset); **42 in the manifest**, 1 left out at prepare " \
           "(1 image file not found)" in report
    assert "**40 extracted**, 2 skipped at extraction (1 cannot decode: cannot identify image file; " \
           "1 cannot decode: image file is truncated" in report
    assert "- age: **38 of the 40 extracted faces used**, 2 left out (1 kept without age: outside 0..120; " \
           "1 kept without age: not a number)" in report
    assert "- gender: **40 of the 40 extracted faces used**" in report
    listed = list(csv.DictReader(open(next(Path("results").rglob("skipped.csv")))))
    assert sorted(r["step"] for r in listed) == ["extract", "extract", "labels", "labels", "prepare"]
    assert "[skipped.csv](skipped.csv)" in report
    from featlab.features.store import FeatureStore

    with FeatureStore.open_read(next(Path("features").rglob("bad.h5"))) as s:
        assert s.nrows == 40 and len(s.skipped()) == 2


def test_a_target_without_its_column_stops_before_extraction(bad_csv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    spec = _spec(tmp_path / "bad.toml", bad_csv)
    rc = main(["run", str(spec), "--set", 'dataset.options={ gender_col = "gender", age_col = "age" }',
               "--set", "dataset.root=" + str(_without_gender(bad_csv, tmp_path))])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "the gender heads need gender labels and none of the 40 rows of features/manifests/bad.csv has a usable one (40 kept without gender: no gender column 'gender' in nogender.csv); " in err, err
    assert "set [dataset] options.gender_col to the CSV's gender column" in err and "--gender-col" not in err, err
    assert not list(Path("features").rglob("*.h5"))  # nothing extracted


def _without_gender(bad_csv: Path, tmp_path: Path) -> Path:
    rows = list(csv.reader(open(bad_csv)))
    out = bad_csv.parent / "nogender.csv"
    with open(out, "w", newline="") as f:
        csv.writer(f).writerows([r[:2] for r in rows])
    return out


def test_prepare_hints_name_the_flag_and_run_names_the_spec_key(bad_csv, tmp_path, monkeypatch, capsys):
    from featlab.data.datasets import prepare_dataset

    monkeypatch.chdir(tmp_path)
    nog = _without_gender(bad_csv, tmp_path)
    _, res = prepare_dataset("csv", nog)
    assert any("--gender-col" in r for r in res.counts)
    _, res = prepare_dataset("csv", nog, hints="spec")
    assert any("[dataset] options.gender_col" in r and "--" not in r for r in res.counts)
    assert main(["prepare", "--dataset", "csv", "--root", str(bad_csv), "--out", "m.csv"]) == 0
    out = capsys.readouterr().out
    listed = list(csv.DictReader(open("m.skipped.csv")))
    assert [(r["step"], r["reason"]) for r in listed] == [
        ("prepare", "image file not found"), ("labels", "kept without age: outside 0..120"),
        ("labels", "kept without age: not a number")]
    assert "m.skipped.csv" in out


def test_dataset_name_is_refused_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "s.toml"
    p.write_text('name = "t"\n[dataset]\nadapter = "utkface"\nroot = "@sample"\nname = "x"\n[backbone]\n'
                 'name = "dlib-age"\n[[heads]]\ntarget = "gender"\n')
    assert main(["run", str(p)]) == 2
    err = capsys.readouterr().err
    assert "[dataset] has no key 'name': the study's files are named by the spec's top-level name" in err, err


def test_a_chip_without_a_face_is_stored_with_a_named_warning(utk_dir, tmp_path, monkeypatch, capsys):
    """The eye close-up that was in the shipped sample (kept in ../shared's utkface-dev, and in tests/data)."""
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "utk"
    d.mkdir()
    for p in _faces(utk_dir, 11):
        shutil.copy(p, d / p.name)
    shutil.copy(ROOT / "tests" / "data" / EYE, d / EYE)
    assert main(["prepare", "--dataset", "utkface", "--root", str(d), "--out", "m.csv"]) == 0
    assert main(["extract", "-m", "m.csv", "-b", "dlib-age", "-l", "res4", "-o", "f.h5", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"warning {re.escape(str((d / EYE).resolve()))}: no face found", out), out
    from featlab.features.store import FeatureStore

    with FeatureStore.open_read("f.h5") as s:
        assert s.nrows == 12  # stored, flagged
        w = s.warnings()
        assert [Path(p).name for p in w["path"]] == [EYE] and w["reason"].str.startswith("no face found").all()
    listed = list(csv.DictReader(open("f.skipped.csv")))
    assert [(r["step"], Path(r["item"]).name) for r in listed] == [("warning", EYE)]
