"""The command line as a user meets it: fast help, one clear line for bad input, prepare on real data."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import MALFORMED_UTK_NAMES, UTK_IS_SAMPLE, expected_split, usable_faces
from featlab.cli import main


def test_help_is_fast_and_imports_no_heavy_library():
    code = ("import sys, time; t=time.time(); from featlab.cli import main; rc = main(['--help']); "
            "heavy = [m for m in ('tensorflow', 'keras', 'onnxruntime', 'tables', 'onnx', 'dlib') if m in sys.modules]; "
            "print('HEAVY', heavy, time.time()-t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    line = [x for x in out.splitlines() if x.startswith("HEAVY")][0]
    assert "HEAVY []" in line, line
    assert "train-head" in out and "extract" in out
    assert float(line.split()[-1]) < 3.0


def test_prepare_real_utkface_reports_the_malformed_names(utk_dir, tmp_path, capsys):
    out = tmp_path / "m.csv"
    assert main(["prepare", "--dataset", "utkface", "--root", str(utk_dir), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    n = usable_faces(utk_dir)  # 8,000 in ../shared (3 malformed names), 600 in the shipped sample (none)
    assert f"{n:,} rows" in text
    present = [name for name in MALFORMED_UTK_NAMES if (utk_dir / name).exists()]
    assert len(present) == (0 if UTK_IS_SAMPLE else 3)
    for name in present:
        assert name in text
    assert sum(1 for _ in open(out)) == n + 1
    split = ", ".join(f"{k} {v:,}" for k, v in sorted(expected_split().items(), key=lambda kv: -kv[1]))
    assert f"split: {split}" in text


def test_prepare_list_names_every_adapter(capsys):
    assert main(["prepare", "--list"]) == 0
    text = capsys.readouterr().out
    for name in ("utkface", "imdb", "wiki", "adience", "aaf", "facial-age", "chalearn", "csv"):
        assert name in text


@pytest.mark.parametrize("case", ["missing-root", "unknown-dataset", "empty", "bad-mat", "no-manifest"])
def test_bad_input_gives_one_line_and_status_2(case, tmp_path, capsys):
    if case == "missing-root":
        args = ["prepare", "-d", "utkface", "--root", str(tmp_path / "nope")]
    elif case == "unknown-dataset":
        args = ["prepare", "-d", "celebz", "--root", str(tmp_path)]
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        args = ["prepare", "-d", "utkface", "--root", str(tmp_path / "empty")]
    elif case == "bad-mat":
        (tmp_path / "imdb.mat").write_bytes(b"MATLAB 5.0 MAT-file, garbage" + bytes(300))
        args = ["prepare", "-d", "imdb", "--root", str(tmp_path)]
    else:
        args = ["bins", "--manifest", str(tmp_path / "missing.csv")]
    rc = main(args + (["--out", str(tmp_path / "m.csv")] if args[0] == "prepare" else []))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("featlab: ") and err.count("\n") == 1 and "Traceback" not in err


def test_bins_counts_a_manifest(utk_manifest, capsys):
    assert main(["bins", "--manifest", str(utk_manifest)]) == 0
    text = capsys.readouterr().out
    assert "--cats 8" in text and "Young Adults" in text and "60+" in text
    counts = [int(x.split()[-1].replace(",", "")) for x in text.splitlines() if " ages [" in x]
    assert sum(counts) == 3 * usable_faces()


def test_peek_draws_a_sheet(utk_manifest, tmp_path):
    from PIL import Image

    out = tmp_path / "sheet.png"
    assert main(["peek", "--manifest", str(utk_manifest), "--n", "16", "--out", str(out)]) == 0
    im = Image.open(out)
    assert im.width >= 4 * 128 and im.height >= 4 * 128


def _commands(cmd, path=()):
    """(path, click command) of every leaf command of the CLI, nested groups included."""
    if hasattr(cmd, "commands"):
        for name, sub in cmd.commands.items():
            yield from _commands(sub, (*path, name))
    else:
        yield path, cmd


def test_every_option_has_help_and_no_summary_is_cut(capsys):
    """`featlab --help` lists each command with its whole summary (the docstring's first paragraph, never
    cut with "..."), and every option and argument of every command, nested ones included, says what it is."""
    import inspect

    import typer

    from featlab.cli import app

    root = typer.main.get_command(app)
    leaves = list(_commands(root))
    assert len(leaves) >= 15 and ("convert", "dlib") in [p for p, _ in leaves]
    missing = [f"{' '.join(p)} {'/'.join(q.opts)}" for p, c in leaves for q in c.params if not (q.help or "").strip()]
    assert missing == []
    assert main(["--help"]) == 0
    listing = "".join(capsys.readouterr().out.split())  # the terminal may wrap inside a hyphenated word
    for path, cmd in leaves:
        if len(path) > 1:
            continue  # nested commands are listed by their group's help
        summary = "".join(inspect.cleandoc(cmd.help).split("\n\n")[0].split())
        assert f"{path[0]}{summary}" in listing, path
    assert main(["convert", "--help"]) == 0
    listing = " ".join(capsys.readouterr().out.split())
    assert "dlib Convert dlib's face-recognition ResNet (.dat) to ONNX with one named node per dlib layer." in listing
