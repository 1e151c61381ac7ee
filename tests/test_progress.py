"""Long steps talk while they work, and -q silences them (featlab.progress)."""

from __future__ import annotations

import io

import pytest

import featlab.progress as P
from test_heads import FAST, make_features


@pytest.fixture
def talking(monkeypatch):
    """Progress on (the suite runs with it off); off a terminal, a line at the start and at the end only."""
    monkeypatch.setattr(P, "_QUIET", False)
    monkeypatch.setattr(P, "PLAIN_EVERY", 1000.0)


def test_a_bar_off_a_terminal_writes_plain_lines_and_is_silent_when_quiet(talking, monkeypatch):
    """A line when the step starts, one at its end, and while it runs one every PLAIN_EVERY seconds even when
    nothing advances (a long first epoch): never silent for longer."""
    import time

    out = io.StringIO()
    with P.Bar(3, "embed faces", "face", stream=out) as bar:
        for _ in range(3):
            bar(1)
        bar.note("done")
    lines = out.getvalue().splitlines()
    assert [ln.split(",")[0].strip() for ln in lines] == ["embed faces: 0/3 face", "embed faces: 3/3 face"]
    assert lines[-1].endswith("; done")
    monkeypatch.setattr(P, "PLAIN_EVERY", 0.1)
    out = io.StringIO()
    with P.Bar(3, "first epoch", "epoch", stream=out, rate=False):
        time.sleep(0.55)
    lines = out.getvalue().splitlines()
    assert len(lines) >= 5 and all(ln.startswith("  first epoch: 0/3 epoch") for ln in lines), lines
    P.set_quiet(True)
    try:
        out = io.StringIO()
        with P.Bar(3, "embed faces", "face", stream=out) as bar:
            bar(3)
        assert out.getvalue() == ""
    finally:
        P.set_quiet(False)


def test_a_grid_shows_its_epochs_and_its_scoring_and_q_silences_both(talking, tmp_path, capsys, monkeypatch):
    """The heads' epochs (with how many still train) and their scoring and probes each show progress; the
    same training under -q (the CLI's train-head -q) writes nothing to stderr."""
    from featlab.cli import main

    feats = make_features(tmp_path / "f.h5", n=300)
    monkeypatch.chdir(tmp_path)
    opts = ["--epochs", "3", "--target", "gender", "-l", "vec", "-l", "conv"]
    assert main(["train-head", "-f", str(feats), *opts]) == 0
    err = capsys.readouterr().err
    epochs = [ln for ln in err.splitlines() if "train 2 heads on conv, vec: " in ln or "train 2 heads on vec, conv: " in ln]
    assert epochs and epochs[-1].split(":")[1].split()[0] in ("1/3", "2/3", "3/3") and "still training" in epochs[-1]
    assert any("score heads, fit linear probes: 2/2 head" in ln for ln in err.splitlines()), err
    assert main(["train-head", "-f", str(feats), *opts, "-q"]) == 0
    assert capsys.readouterr().err == ""
