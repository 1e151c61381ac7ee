"""Contact sheets: size, labels, unreadable images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from featlab.data import peek
from featlab.errors import FeatlabError
from featlab.data.manifest import COLUMNS, to_frame


def fake_manifest(tmp_path: Path, n_good: int = 5):
    from PIL import Image

    rows = []
    for i in range(n_good):
        p = tmp_path / f"img{i}.jpg"
        Image.new("RGB", (8 + 30 * i, 8), (200, 30 * i, 10)).save(p)  # varied aspect ratios
        rows.append({"image_id": f"{i:016x}", "path": str(p), "age": 20.0 + i, "gender": "mf"[i % 2],
                     "race": "asian" if i == 0 else "", "split": "train", "fold": None, "source": "t"})
    (tmp_path / "corrupt.jpg").write_bytes(b"not a jpeg at all")
    rows.append({"image_id": "c" * 16, "path": str(tmp_path / "corrupt.jpg"), "age": 34.2466, "gender": "",
                 "race": "", "split": "", "fold": 2, "source": "t"})
    rows.append({"image_id": "d" * 16, "path": str(tmp_path / "missing.jpg"), "age": None, "gender": "f",
                 "race": "", "split": "test", "fold": None, "source": "t"})
    return to_frame(rows)


def test_sheet_size_and_content(tmp_path):
    from PIL import Image

    df = fake_manifest(tmp_path)
    out = peek.draw_contact_sheet(df, tmp_path / "sub" / "sheet.png", n=7, seed=0)
    assert out == tmp_path / "sub" / "sheet.png" and out.is_file()
    im = Image.open(out)
    assert im.format == "PNG"
    # 7 images -> 3 columns x 3 rows
    t, lh, pad = peek.THUMB, peek.LABEL_H, peek.PAD
    assert im.size == (pad + 3 * (t + pad), pad + 3 * (t + lh + pad)) == peek.sheet_size(7)
    a = np.asarray(im.convert("RGB"))
    # every tile's label strip starts white; unreadable tiles are grey
    grey = 0
    for i in range(7):
        x, y = pad + (i % 3) * (t + pad), pad + (i // 3) * (t + lh + pad)
        assert tuple(a[y + t + lh - 2, x + t - 2]) == (255, 255, 255)
        grey += tuple(a[y + 2, x + 2]) == peek.UNREADABLE_BG
    assert grey == 2


def test_sheet_n_larger_than_manifest_and_title(tmp_path):
    from PIL import Image

    df = fake_manifest(tmp_path, n_good=2)  # 4 rows
    out = peek.draw_contact_sheet(df, tmp_path / "s.png", n=64, title="four faces")
    assert Image.open(out).size == peek.sheet_size(4, title=True) == (
        peek.PAD + 2 * (peek.THUMB + peek.PAD), peek.PAD + peek.TITLE_H + 2 * (peek.THUMB + peek.LABEL_H + peek.PAD))


@pytest.mark.parametrize("n", [1, 2, 10, 64])
def test_grid_shape(n):
    cols, rows = peek.grid_shape(n)
    assert cols * rows >= n > cols * (rows - 1)


def test_seeded_selection(tmp_path):
    df = fake_manifest(tmp_path)
    a = peek.draw_contact_sheet(df, tmp_path / "a.png", n=3, seed=1).read_bytes()
    b = peek.draw_contact_sheet(df, tmp_path / "b.png", n=3, seed=1).read_bytes()
    assert a == b


def test_labels():
    assert peek.label_lines({"age": 25.0, "gender": "m", "split": "train", "race": "asian"}) == ["25 m train", "asian"]
    assert peek.label_lines({"age": 34.2466, "gender": "", "split": "", "fold": 2, "race": ""}) == ["34.2 ? fold 2"]
    assert peek.label_lines({"age": float("nan"), "gender": "f", "split": "", "fold": None}) == ["? f -"]


def test_empty_manifest(tmp_path):
    with pytest.raises(FeatlabError, match="no rows"):
        peek.draw_contact_sheet(to_frame([]), tmp_path / "x.png")
    assert list(to_frame([]).columns) == COLUMNS
