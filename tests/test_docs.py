"""The manual in docs/ builds with `mkdocs build --strict` (no broken link or anchor), the README's links
lead somewhere, every `featlab COMMAND` the pages name exists, and the help texts and the docs state
the same defaults and rules as the code.

mkdocs and mkdocs-material are in the `dev` extra (through `docs`), so a missing one fails, never skips."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").rglob("*.md"))


def _build(config: Path, site: Path) -> subprocess.CompletedProcess:
    import material  # noqa: F401  (the theme; an ImportError here is a failure: `pip install -e '.[docs]'`)
    import mkdocs  # noqa: F401

    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=site.parent)


def test_the_docs_site_builds_strictly(tmp_path):
    res = _build(ROOT / "mkdocs.yml", tmp_path / "site")
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "WARNING" not in out, out[-3000:]
    for page in PAGES:  # every page is built (none left out of the build)
        rel = page.relative_to(ROOT / "docs").with_suffix("")
        html = tmp_path / "site" / (rel.parent if rel.name in ("index", "README") else rel) / "index.html"
        assert html.is_file(), html
    # the benchmark pages include bench/README.md and bench/RESULTS.md themselves, not a stale copy
    results = (tmp_path / "site" / "bench" / "RESULTS" / "index.html").read_text()
    last = [ln for ln in (ROOT / "bench" / "RESULTS.md").read_text().splitlines() if ln.startswith("### ")][-1]
    assert last[4:20].split("`")[0] in results


@pytest.mark.parametrize("link", ["heads.md#no-such-section", "no-such-page.md", "#no-such-heading"])
def test_a_broken_link_or_anchor_fails_the_build(tmp_path, link):
    """The strict settings catch what they are there for: a page or an anchor that does not exist."""
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    (tmp_path / "bench").mkdir()
    for name in ("README.md", "RESULTS.md"):
        shutil.copy(ROOT / "bench" / name, tmp_path / "bench" / name)
    page = tmp_path / "docs" / "specs.md"
    page.write_text(page.read_text() + f"\nSee [there]({link}).\n")
    res = _build(tmp_path / "mkdocs.yml", tmp_path / "site")
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "Aborted with 1 warnings in strict mode" in out, out[-2000:]
    assert re.search(r"WARNING.*" + re.escape(link.split("#")[-1] if "#" in link else link), out), out[-2000:]


def test_the_readme_links_lead_to_files_of_the_clone():
    """README.md is not part of the mkdocs build: its relative links are checked here (it once linked
    ../shared/docs/taps.md, which a clone does not have)."""
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    assert len(links) > 10
    for link in links:
        if link.startswith(("http://", "https://", "#")):
            continue
        target = (ROOT / link.split("#")[0]).resolve()
        assert target.is_relative_to(ROOT) and target.exists(), link


def _named_commands(text: str) -> set[str]:
    """`featlab NAME` at the start of a command: in fenced code blocks and in inline code."""
    names = set()
    for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            names.update(re.findall(r"(?:^|&&|\|)\s*(?:\S*/)?featlab\s+([a-z][\w-]*)", line.strip()))
    names.update(re.findall(r"`(?:\S*/)?featlab ([a-z][\w-]*)", text))
    return names


def test_every_featlab_command_the_docs_name_exists():
    import click
    import typer

    from featlab.cli import app

    group = typer.main.get_command(app)
    known = set(group.list_commands(click.Context(group)))
    named = {}
    for path in [ROOT / "README.md", *PAGES]:
        for name in _named_commands(path.read_text()):
            named.setdefault(name, path.relative_to(ROOT))
    assert {"prepare", "extract", "train-head", "compare", "explain", "run", "import"} <= set(named)
    unknown = {n: str(p) for n, p in named.items() if n not in known}
    assert not unknown, f"pages name featlab commands that do not exist: {unknown}"


def _option_help(command: str, flag: str) -> str:
    import typer

    from featlab.cli import app

    cmd = typer.main.get_command(app).commands[command]
    (param,) = [p for p in cmd.params if flag in getattr(p, "opts", ())]
    return param.help


def _spec_default(key: str, section: str) -> str:
    text = (ROOT / "docs" / "spec.md").read_text().split(f"## {section}")[1]
    (row,) = [ln for ln in text.splitlines() if ln.startswith(f"| `{key}` |")]
    return row.split("|")[3].strip().strip("`")


def test_help_texts_and_the_spec_reference_give_the_heads_real_defaults():
    """`train-head --help`'s [DEFAULT], docs/spec.md's default column and fit_head's keyword default agree."""
    from featlab.heads.train import default_hyperparameters

    hp = default_hyperparameters()
    for key in ("hidden", "dropout", "epochs", "lr"):
        code = ",".join(str(h) for h in hp[key]) if key == "hidden" else str(hp[key])
        help_default = re.search(r"\[([^][]+)\]\s*$", _option_help("train-head", f"--{key}")).group(1)
        spec_default = _spec_default(key, "[[heads]]").strip("[]").replace(" ", "")
        assert help_default == spec_default == code, (key, help_default, spec_default, code)


def test_grouping_by_face_is_described_as_the_code_does_it():
    """--group-by-face uses the dlib-rec embedding alone (complete linkage below LINK_DISTANCE), never chip
    similarity: the prepare help, the spec reference and the data page say so."""
    from featlab.features.facegroups import LINK_DISTANCE

    spec_row = [ln for ln in (ROOT / "docs" / "spec.md").read_text().splitlines() if ln.startswith("| `group_by_face` |")][0]
    data = (ROOT / "docs" / "data.md").read_text()
    for text in (_option_help("prepare", "--group-by-face"), spec_row):
        assert "dlib-rec embedding" in text and "chip similarity" not in text, text
        assert f"complete linkage below {LINK_DISTANCE}" in text, text
    assert f"**complete linkage below\n{LINK_DISTANCE}**" in data
    assert "Chip image similarity did not separate copies\nfrom random pairs, so it is not used." in data


def test_compare_help_describes_the_chart_it_draws():
    import typer

    from featlab.cli import app

    doc = typer.main.get_command(app).commands["compare"].help
    assert "bar" not in doc and "interval" in doc


def test_utkface_gender_coding_in_the_docs_is_the_adapter_s(tmp_path):
    """docs/data.md states UTKFace's file-name coding (0 = male, 1 = female); the adapter reads it so."""
    from featlab.data.datasets.utkface import prepare

    data = (ROOT / "docs" / "data.md").read_text()
    assert "gender **0 = male, 1 = female**" in data
    for name in ("30_0_2_20170116222120436.jpg.chip.jpg", "31_1_3_20170117144035842.jpg.chip.jpg"):
        (tmp_path / name).write_bytes(b"")
    rows = {r["age"]: (r["gender"], r["race"]) for r in prepare(tmp_path).rows}
    assert rows == {30.0: ("m", "asian"), 31.0: ("f", "indian")}
    assert "race 0 White, 1 Black, 2 Asian, 3 Indian, 4 Others" in data
