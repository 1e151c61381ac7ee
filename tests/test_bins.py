"""Age-bin schemes: every edge, the tie rule for Adience's gaps, labels, parse_range."""

from __future__ import annotations


import numpy as np
import pytest

from featlab.data.bins import SCHEMES, get_scheme, parse_range
from featlab.errors import FeatlabError

NAMES = {
    "8": ("0-2", "4-6", "8-13", "15-20", "25-32", "38-43", "48-53", "60+"),
    "7": ("0-12", "13-19", "20-29", "30-39", "40-49", "50-64", "65+"),
    "5": ("0-17", "18-29", "30-44", "45-59", "60+"),
}

# Integer ages -> Adience group, exactly as bins.py's docstring states (gaps to the
# nearest group, ties to the older one).
ADIENCE_INT = {
    **{a: 0 for a in (0, 1, 2)},
    3: 1, **{a: 1 for a in (4, 5, 6)},
    7: 2, **{a: 2 for a in range(8, 14)},
    14: 3, **{a: 3 for a in range(15, 21)}, 21: 3, 22: 3,
    23: 4, 24: 4, **{a: 4 for a in range(25, 33)}, 33: 4, 34: 4,
    35: 5, 36: 5, 37: 5, **{a: 5 for a in range(38, 44)}, 44: 5, 45: 5,
    46: 6, 47: 6, **{a: 6 for a in range(48, 54)}, 54: 6, 55: 6, 56: 6,
    57: 7, 58: 7, 59: 7, **{a: 7 for a in range(60, 121)},
}


@pytest.mark.parametrize("key", ["5", "7", "8"])
def test_names_titles_counts(key):
    s = get_scheme(int(key))
    assert s is get_scheme(key) and s.key == key
    assert s.names == NAMES[key]
    assert s.n == len(NAMES[key]) == len(s.titles) == len(s.lower)
    assert s.lower[0] == 0 and list(s.lower) == sorted(s.lower)
    assert len(s.centre()) == s.n


def test_scheme_8_integer_ages():
    s = get_scheme(8)
    ages = sorted(ADIENCE_INT)
    assert list(s.assign(ages)) == [ADIENCE_INT[a] for a in ages]


def test_scheme_8_fractional_edges():
    s = get_scheme(8)
    assert s.lower == (0, 3, 7, 14, 22.5, 35, 45.5, 56.5)
    for i, edge in enumerate(s.lower[1:], start=1):
        assert s.assign([edge])[0] == i, edge  # the midpoint itself: a tie, goes older
        assert s.assign([edge - 1e-9])[0] == i - 1, edge
        assert s.assign([np.nextafter(edge, 0)])[0] == i - 1, edge
    assert list(s.assign([22.49, 22.5, 34.99, 35.0, 45.49, 45.5, 56.49, 56.5])) == [3, 4, 4, 5, 5, 6, 6, 7]


@pytest.mark.parametrize("key,edges", [("7", (13, 20, 30, 40, 50, 65)), ("5", (18, 30, 45, 60))])
def test_decade_schemes_every_edge(key, edges):
    s = get_scheme(key)
    assert s.lower == (0,) + edges
    for i, edge in enumerate(edges, start=1):
        assert list(s.assign([edge - 1, edge - 0.001, edge, edge + 0.5])) == [i - 1, i - 1, i, i], edge
    assert s.assign([0])[0] == 0 and s.assign([200])[0] == s.n - 1


def test_nan_negative_scalar():
    s = get_scheme(8)
    assert list(s.assign([np.nan, 30, float("nan")])) == [-1, 4, -1]
    assert int(s.assign(30)) == 4 and s.assign(30).shape == ()
    assert int(s.assign(np.nan)) == -1
    with pytest.raises(ValueError):
        s.assign([-1])


def test_centre():
    assert list(get_scheme(8).centre()) == [1, 5, 10.5, 17.5, 28.5, 40.5, 50.5, 70]
    assert list(get_scheme(5).centre()) == [8.5, 23.5, 37, 52, 70]


@pytest.mark.parametrize("bad", [6, "6", 0, "eight", None])
def test_unknown_scheme(bad):
    with pytest.raises(FeatlabError, match="choose one of 5, 7, 8"):
        get_scheme(bad)


@pytest.mark.parametrize("text,expected", [
    ("(25, 32)", (25.0, 32.0)),
    ("(0, 2)", (0.0, 2.0)),
    ("(8, 23)", (8.0, 23.0)),
    ('"(38, 43)"', (38.0, 43.0)),
    (" (60,100) ", (60.0, 100.0)),
    ("35", (35.0, 35.0)),
    ("2.5", (2.5, 2.5)),
    ("None", None),
    ("none", None),
    ("nan", None),
    ("", None),
    ("   ", None),
    ("(32, 25)", None),  # reversed
    ("(1, 2, 3)", None),
    ("(a, b)", None),
    ("abc", None),
    ("-3", None),
    ("(-1, 2)", None),
])
def test_parse_range(text, expected):
    assert parse_range(text) == expected


def test_schemes_registry():
    assert sorted(SCHEMES) == ["5", "7", "8"]
