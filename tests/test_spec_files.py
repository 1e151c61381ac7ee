"""Specs and files that cannot mix: each spec prepares its own manifest (named by the spec), a manifest
another spec (or `featlab prepare`) wrote is refused, every UTKFace spec groups by face, and zero-shot
scores are filed by feature set and manifest hash, so a compare after a re-prepare never shows a
zero-shot row scored on the old split. Real UTKFace faces (the sample shipped in featlab)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import featlab
from featlab.cli import main
from featlab.errors import FeatlabError

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = Path(featlab.__file__).parent / "data" / "utkface-sample"


@pytest.fixture(scope="module")
def utk30(tmp_path_factory) -> Path:
    """A UTKFace folder of 30 real faces from the shipped sample."""
    d = tmp_path_factory.mktemp("utk30")
    for p in sorted(SAMPLE.glob("*.jpg"))[:30]:
        shutil.copy(p, d / p.name)
    return d


def _spec(path: Path, name: str, root: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'name = "{name}"\n[dataset]\nadapter = "utkface"\nroot = "{root}"\n[backbone]\nname = "dlib-age"\n'
                    '[[heads]]\ntarget = "gender"\n')
    return path


def _prepare(spec_path: Path, force: bool = False):
    from featlab.study.experiment import _prepare_step, load_spec

    spec = load_spec(spec_path)
    ds = spec["dataset"]
    lines = []
    out = _prepare_step(spec, ds["adapter"], Path(ds["root"]), ds.get("options", {}), 0, force, lines.append)
    return out, lines


def test_each_spec_prepares_its_own_manifest_and_refuses_another_s(utk30, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, lines = _prepare(_spec(tmp_path / "specs" / "a.toml", "study-a", utk30))
    b, _ = _prepare(_spec(tmp_path / "specs" / "b.toml", "study-b", utk30))
    assert a == Path("features/manifests/study-a.csv") and b == Path("features/manifests/study-b.csv")
    assert a.is_file() and b.is_file() and "30 rows" in lines[0]
    assert _prepare(tmp_path / "specs" / "a.toml")[1] == [f"[prepare] {a} is current"]
    assert _prepare(tmp_path / "specs" / "a.toml", force=True)[0] == a  # its own spec may prepare it again
    # another spec file of the same name would re-prepare study-a's manifest under its features and heads
    before = a.read_bytes()
    other = _spec(tmp_path / "elsewhere" / "a.toml", "study-a", utk30)
    with pytest.raises(FeatlabError) as e:
        _prepare(other, force=True)
    msg = str(e.value)
    assert "\n" not in msg and f"{a} was prepared by spec {(tmp_path / 'specs' / 'a.toml').resolve()}" in msg
    assert a.read_bytes() == before
    # a manifest written by `featlab prepare` at a spec's path is not the spec's either
    assert main(["prepare", "--dataset", "utkface", "--root", str(utk30), "--out", "features/manifests/study-c.csv"]) == 0
    with pytest.raises(FeatlabError, match="prepared outside this spec"):
        _prepare(_spec(tmp_path / "specs" / "c.toml", "study-c", utk30))
    # a spec run of an older featlab (its record names no spec) with the same inputs is taken over, not refused
    side = Path("features/manifests/.study-c")
    side.mkdir()
    legacy = {"adapter": "utkface", "root": str(utk30.resolve()), "options": {}, "seed": 0}
    (side / ".inputs.json").write_text(json.dumps({"fingerprint": "old", "inputs": legacy}))
    assert _prepare(tmp_path / "specs" / "c.toml")[0] == Path("features/manifests/study-c.csv")
    (side / ".inputs.json").write_text(json.dumps({"fingerprint": "old", "inputs": {**legacy, "seed": 1}}))
    with pytest.raises(FeatlabError, match="prepared outside this spec"):  # another preparation: refused
        _prepare(tmp_path / "specs" / "c.toml")


def test_a_spec_refused_through_the_cli_is_one_line(utk30, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _prepare(_spec(tmp_path / "specs" / "a.toml", "study-a", utk30))
    capsys.readouterr()
    rc = main(["run", str(_spec(tmp_path / "other" / "a.toml", "study-a", utk30))])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "is not re-prepared for" in err[0]


def test_every_utkface_spec_groups_by_face_and_names_its_own_files():
    from featlab.study.experiment import builtin_spec, load_spec, spec_manifest

    specs = [load_spec(p) for p in sorted((ROOT / "experiments").glob("*.toml"))] + [load_spec(builtin_spec("demo"))]
    utk = [s for s in specs if s["dataset"].get("adapter") == "utkface" and s["dataset"].get("root") != "@sample"]
    assert len(utk) == 4
    for s in utk:
        assert (s["dataset"].get("options") or {}).get("group_by_face") is True, s["name"]
    paths = [spec_manifest(s) for s in specs]
    assert len(set(paths)) == len(specs) == 7 and all(p.stem == s["name"] for p, s in zip(paths, specs))


def test_a_bad_spec_name_is_refused(tmp_path):
    from featlab.study.experiment import load_spec

    with pytest.raises(FeatlabError, match="cannot name the spec's files"):
        load_spec(_spec(tmp_path / "x.toml", "a/b", tmp_path))


# ------------------------------------------------------------------------------------ zero-shot filing
def _head_record(root: Path, identity: dict, labels, split_rows: dict, key: str, val_acc: float) -> Path:
    """A gender head's record as featlab.report.evaluate.record_head writes it (faces.csv and metrics.json), scored
    against the labels of its features file, its feature set as plan_head records it."""
    import pandas as pd

    from featlab.paths import dataset_key, head_dir

    d = head_dir(identity["backbone"], dataset_key(identity), key, "gender", out_root=root)
    d.mkdir(parents=True, exist_ok=True)
    rows = []
    for split, r in split_rows.items():
        for i, iid in enumerate(labels["image_id"].to_numpy()[r]):
            rows.append({"image_id": iid, "split": split, "accuracy": float(i % 4 != 0)})
    f = pd.DataFrame(rows)
    f.to_csv(d / "faces.csv", index=False)
    sec = {s: {"n": int((f.split == s).sum()), "metrics": {"accuracy": float(f[f.split == s].accuracy.mean())}}
           for s in ("val", "test")}
    sec["val"]["metrics"]["accuracy"] = val_acc
    (d / "metrics.json").write_text(json.dumps({"kind": "head", "feature_set": identity, **sec, "config": {}}))
    return d


def test_compare_never_shows_a_zero_shot_row_scored_on_another_manifest(utk30, tmp_path, monkeypatch):
    """Extract dlib-age on 30 faces, score its zero-shot gender on the val/test rows, compare: the zero-shot
    row is there. Re-prepare the manifest (another split), re-extract, re-record the heads: the old zero-shot
    record is never shown beside them; scored again on the new split, it is."""
    from featlab.report.compare import compare
    from featlab.data.datasets import prepare_dataset
    from featlab.features.extract import extract
    from featlab.data.labels import encode_target, split_rows
    from featlab.data.manifest import write_manifest
    from featlab.paths import feature_set, zeroshot_dir
    from featlab.features.store import FeatureStore
    from featlab.heads.zeroshot import score_zero_shot

    monkeypatch.chdir(tmp_path)
    df, _ = prepare_dataset("utkface", utk30)
    manifest = write_manifest(df, tmp_path / "features" / "manifests" / "utk30.csv")
    feats = extract(manifest, ["logits"], backbone="dlib-age", progress=False).out
    results = tmp_path / "results"

    def record_and_compare(score: bool):
        with FeatureStore.open_read(feats) as s:
            labels, ident = s.labels(), feature_set(s.attrs, "logits")
        ident["backbone"] = "dlib-age"
        _, valid = encode_target(labels, "gender")
        sp = split_rows(labels, valid)
        rows = {"val": sp["val"], "test": sp["test"]}
        _head_record(results, ident, labels, rows, "logits", 0.8)
        if score:
            rec = score_zero_shot(feats, "gender", None, rows, results_root=results)
            assert rec["manifest_sha256"] == ident["manifest_sha256"]
        comp = compare("dlib-age", "utk30", "gender", results_root=results)
        return ident, [r for r in comp["rows"] if r["reader"].startswith("zero-shot")]

    ident1, zs = record_and_compare(score=True)
    assert len(zs) == 1 and zs[0]["reader"] == "zero-shot dlib-gender"
    z1 = zeroshot_dir(ident1, "gender", results)
    assert (z1 / "faces.csv").is_file() and z1.parent.name == f"manifest-{ident1['manifest_sha256'][:12]}"
    # re-prepare: another split of the same faces, same manifest path; extraction re-syncs the labels
    df2 = df.copy()
    df2["split"] = np.roll(df["split"].to_numpy(), 7)
    write_manifest(df2, manifest)
    rep = extract(manifest, ["logits"], backbone="dlib-age", progress=False)
    assert rep.labels_resynced > 0
    ident2, zs = record_and_compare(score=False)
    assert ident2["manifest_sha256"] != ident1["manifest_sha256"] and zs == []  # the stale record stays out
    assert (z1 / "faces.csv").is_file()  # it is still on disk, filed under the old manifest
    _, zs = record_and_compare(score=True)
    assert len(zs) == 1
    import pandas as pd

    z2 = pd.read_csv(zeroshot_dir(ident2, "gender", results) / "faces.csv", dtype={"image_id": str})
    with FeatureStore.open_read(feats) as s:
        lab = s.labels().set_index("image_id")
    test = z2[z2.split == "test"]
    assert set(lab.loc[test["image_id"], "split"]) == {"test"} and zs[0]["n"] == len(test)  # the new test split


def test_a_study_prepared_under_another_split_scheme_is_prepared_again(utk30, tmp_path, monkeypatch):
    """A featlab that places faces differently (featlab.data.manifest.SPLIT_SCHEME) re-prepares a spec's manifest
    instead of calling the old split current."""
    import featlab.study.experiment as ex

    monkeypatch.chdir(tmp_path)
    spec = _spec(tmp_path / "specs" / "s.toml", "study-s", utk30)
    a, _ = _prepare(spec)
    assert _prepare(spec)[1] == [f"[prepare] {a} is current"]
    monkeypatch.setattr(ex, "SPLIT_SCHEME", "an-older-scheme")
    assert not any("is current" in line for line in _prepare(spec)[1])
    assert _prepare(spec)[1] == [f"[prepare] {a} is current"]  # and then it is current under that scheme


def test_a_heads_fingerprint_follows_the_labels_it_was_trained_on():
    """Re-synced labels (a re-prepared manifest: a label fixed, faces re-split) make a study's heads stale, so
    `featlab run` trains them again rather than keeping records of the old split as current."""
    from featlab.study.experiment import _head_inputs

    h = {"target": "gender", "cats": None}
    attrs = {"backbone": "dlib-rec", "model_sha256": "m" * 64, "manifest_sha256": "a" * 64}
    fp, inputs, folder = _head_inputs(Path("f.h5"), "res14", h, 0, attrs, 100, {"res14": (256, 2, 2)})
    fp2, _, folder2 = _head_inputs(Path("f.h5"), "res14", h, 0, dict(attrs, manifest_sha256="b" * 64), 100,
                                   {"res14": (256, 2, 2)})
    assert inputs["labels"] == "a" * 64 and fp != fp2 and folder == folder2
    assert _head_inputs(Path("f.h5"), "res14", h, 0, dict(attrs), 100, {"res14": (256, 2, 2)})[0] == fp
