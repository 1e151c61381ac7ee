"""Experiment specs are checked against featlab.study.schema: a typo, a wrong type or a --set path the schema
does not have stops with one line naming the nearest valid key; docs/spec.md is generated from the schema."""

from __future__ import annotations

import inspect
import tomllib
from pathlib import Path

import pytest

from featlab.cli import main
from featlab.errors import FeatlabError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "experiments").glob("*.toml")) + sorted((ROOT / "featlab" / "experiments").glob("*.toml"))

GOOD = """\
name = "t"
[dataset]
adapter = "utkface"
root = "@sample"
[backbone]
name = "dlib-age"
[extract]
taps = ["res4"]
[[heads]]
target = "gender"
"""


def _run(capsys, spec_text: str, tmp_path: Path, *sets: str) -> tuple[int, str]:
    p = tmp_path / "s.toml"
    p.write_text(spec_text)
    rc = main(["run", str(p), *[a for s in sets for a in ("--set", s)]])
    return rc, capsys.readouterr().err


def _one_line(rc: int, err: str) -> str:
    assert rc == 2, err
    assert err.startswith("featlab: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_typo_in_a_key_stops_naming_the_nearest_key(tmp_path, capsys, monkeypatch):
    """Issue #21: `[extract] tap = [...]` ran with the default taps; now nothing runs (no backbone is loaded)."""
    monkeypatch.chdir(tmp_path)
    err = _one_line(*_run(capsys, GOOD.replace("taps =", "tap ="), tmp_path))
    assert "[extract]: unknown key 'tap'; did you mean 'taps'?" in err
    assert not (tmp_path / "features").exists()  # stopped before the prepare step


def test_a_set_path_that_does_not_exist_stops_naming_the_nearest_key(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = _one_line(*_run(capsys, GOOD, tmp_path, "dataset.rooot=/data/x"))
    assert "--set dataset.rooot: [dataset] has no key 'rooot'; did you mean dataset.root?" in err
    err = _one_line(*_run(capsys, GOOD, tmp_path, "extrct.taps=[\"res4\"]"))
    assert "did you mean extract?" in err
    err = _one_line(*_run(capsys, GOOD, tmp_path, "heads.epochs=3"))
    assert "[[heads]] is a list of tables" in err
    assert not (tmp_path / "features").exists()


BAD = {
    "unknown section": (GOOD.replace("[extract]", "[extrat]"), "unknown section [extrat]; did you mean [extract]?"),
    "unknown top key": ("sed = 1\n" + GOOD, "unknown top-level key 'sed'; did you mean 'seed'?"),
    "head key": (GOOD + "epoch = 3\n", "[[heads]] #1: unknown key 'epoch'; did you mean 'epochs'?"),
    "second head": (GOOD + "[[heads]]\ntarget = \"age\"\nhiden = [8]\n", "[[heads]] #2: unknown key 'hiden'; did you mean 'hidden'?"),
    "bool as string": (GOOD.replace('taps = ["res4"]', 'align = "false"'), "[extract]: align = 'false' must be boolean"),
    "taps as string": (GOOD.replace('["res4"]', '"res4"'), "[extract]: taps = 'res4' must be list of strings"),
    "target typo": (GOOD.replace('"gender"', '"gendr"'), "target = 'gendr' must be one of \"bins\", \"age\", \"gender\", "
                                                         "\"regression\"; did you mean 'gender'?"),
    "cats 6": (GOOD + "cats = [5, 6]\n", "cats = [5, 6] must be one of 5, 7, 8, or a list of them"),
    "epochs 0": (GOOD + "epochs = 0\n", "epochs = 0: input should be greater than or equal to 1"),
    "fold": (GOOD + "fold = \"some\"\n", "fold = 'some' must be integer or \"all\""),
    "adapter typo": (GOOD.replace('"utkface"', '"utkfase"'), "did you mean 'utkface'?"),
    "option typo": (GOOD.replace('root = "@sample"', 'root = "@sample"\noptions = { group_by_fac = true }'),
                    "[dataset.options]: unknown key 'group_by_fac'; did you mean 'group_by_face'?"),
    "option of another adapter": (GOOD.replace('root = "@sample"', 'root = "@sample"\noptions = { path_col = "f" }'),
                                  "options.path_col is an option of adapter csv only, not of utkface"),
    "single-bracket heads": (GOOD.replace("[[heads]]", "[heads]"), "write [[heads]] (double brackets)"),
    "no heads": (GOOD.split("[[heads]]")[0], "the spec has no [[heads]] table"),
    "no backbone name": (GOOD.replace('name = "dlib-age"', 'nam = "dlib-age"'), "[backbone]: unknown key 'nam'; did you mean 'name'?"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_specs_are_one_line(case, tmp_path):
    from featlab.study.experiment import load_spec

    text, expect = BAD[case]
    p = tmp_path / "s.toml"
    p.write_text(text)
    with pytest.raises(FeatlabError) as e:
        load_spec(p)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{p}: "), msg
    assert expect in msg, msg


def test_set_values_are_checked_too(tmp_path):
    from featlab.study.experiment import load_spec

    p = tmp_path / "s.toml"
    p.write_text(GOOD)
    with pytest.raises(FeatlabError, match=r"\[extract\]: batch_size = 0: input should be greater than or equal to 1"):
        load_spec(p, ["extract.batch_size=0"])
    spec = load_spec(p, ["extract.batch_size=16", "dataset.options.group_by_face=true", "seed=3"])
    assert spec["extract"]["batch_size"] == 16 and spec["dataset"]["options"] == {"group_by_face": True}
    assert spec["seed"] == 3


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_spec_validates_and_is_left_as_written(path):
    """Validation fills nothing in: the spec is the TOML as written (plus name and _path), so the fingerprints of
    finished steps stay the same."""
    from featlab.study.experiment import load_spec

    spec = load_spec(path)
    raw = tomllib.loads(path.read_text())
    assert spec == {**raw, "name": raw.get("name", path.stem), "_path": str(path)}


def test_docs_spec_md_is_the_generated_reference():
    """docs/spec.md is what `featlab spec-doc` prints (regenerate: `featlab spec-doc > docs/spec.md`)."""
    from featlab.study.schema import spec_reference

    assert (ROOT / "docs" / "spec.md").read_text() == spec_reference()


def test_spec_doc_command_prints_the_reference(capsys):
    from featlab.study.schema import spec_reference

    assert main(["spec-doc"]) == 0
    assert capsys.readouterr().out == spec_reference()


def test_the_reference_names_every_key_with_its_default():
    from featlab.study.schema import Backbone, Dataset, Extract, Head, Options, Spec, spec_reference
    from featlab.heads.train import default_hyperparameters

    text = spec_reference()
    for model in (Spec, Dataset, Options, Backbone, Extract, Head):
        for key in model.model_fields:
            assert f"| `{key}` |" in text, key
    rows = {line.split("|")[1].strip(): line for line in text.split("## [[heads]]")[1].splitlines() if line.startswith("| `")}
    hp = default_hyperparameters()
    assert "| `60` |" in rows["`epochs`"] and hp["epochs"] == 60
    assert f"| `{hp['lr']}` |" in rows["`lr`"] and f"| `{hp['patience']}` |" in rows["`patience`"]


def test_schema_matches_the_code_it_describes():
    """The [[heads]] keys are fit_head's keywords (plus target, cats, fold, seeds, ranges); the adapters, the
    compressions and the csv options are the ones the code knows."""
    from featlab.data.datasets import ADAPTERS
    from featlab.data.datasets.csvfile import prepare as csv_prepare
    from featlab.study.schema import ADAPTER_NAMES, COMPRESSIONS, NOT_HEAD_KEYS, Head, Options
    from featlab.features.store import COMPRESSION
    from featlab.heads.train import fit_head
    from featlab.study.workflow import train_grid

    kw = {k for k, p in inspect.signature(fit_head).parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    spec_keys = set(Head.model_fields) - {"target", "cats", "ranges"}  # ranges: a keyword or not, it is a key
    assert kw - set(NOT_HEAD_KEYS) - {"ranges"} == spec_keys - {"seeds"}
    assert "seeds" in inspect.signature(train_grid).parameters
    assert set(ADAPTER_NAMES) == set(ADAPTERS) and set(COMPRESSIONS) == set(COMPRESSION)
    csv_opts = {k for k in inspect.signature(csv_prepare).parameters if k not in ("root", "_options")}
    assert csv_opts == {k for k, f in Options.model_fields.items() if (f.json_schema_extra or {}).get("adapters") == ["csv"]}


def test_the_csv_example_of_the_reference_prepares_a_csv_of_your_own(tmp_path, monkeypatch):
    """The example in docs/spec.md validates and, given a CSV with those column names, its prepare step reads
    every row's age and gender (compared with the file names the images came from)."""
    import shutil

    from featlab.study.experiment import _prepare_step, load_spec
    from featlab.data.manifest import read_manifest
    from featlab.study.schema import CSV_EXAMPLE

    sample = sorted((ROOT / "featlab" / "data" / "utkface-sample").glob("*.jpg"))[:12]
    (tmp_path / "img").mkdir()
    lines = ["file,age_years,sex,person"]
    for i, p in enumerate(sample):
        shutil.copy(p, tmp_path / "img" / f"{i}.jpg")
        age, g = p.name.split("_")[:2]
        lines.append(f"img/{i}.jpg,{age},{'male' if g == '0' else 'female'},p{i // 2}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    spec_path = tmp_path / "my-study.toml"
    spec_path.write_text(CSV_EXAMPLE.replace("/data/faces/labels.csv", str(tmp_path / "labels.csv")))
    spec = load_spec(spec_path)
    monkeypatch.chdir(tmp_path)
    ds = spec["dataset"]
    out = _prepare_step(spec, ds["adapter"], Path(ds["root"]), ds["options"], spec["seed"], False, lambda *_: None)
    df = read_manifest(out).sort_values("path")
    assert len(df) == 12
    want = {str((tmp_path / "img" / f"{i}.jpg").resolve()): (float(p.name.split("_")[0]), "m" if p.name.split("_")[1] == "0" else "f")
            for i, p in enumerate(sample)}
    got = {str(Path(r.path).resolve()): (float(r.age), r.gender) for r in df.itertuples()}
    assert got == want
    assert df.groupby("group")["split"].nunique().max() == 1  # the person column keeps each pair on one side
