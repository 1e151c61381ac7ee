"""Age bins: every scheme's edges and names, defined once.

Schemes map an age in years to a group index:

- ``8``: the Adience groups 0-2, 4-6, 8-13, 15-20, 25-32, 38-43, 48-53, 60+
  (Infants, Kids, Adolescents, Teens, Young Adults, Adults, Middle-aged, Old).
  Ages between Adience's groups (3, 7, 14, 21-24, 33-37, 44-47, 54-59) go to the
  nearest group, ties to the older one: 3 -> 4-6, 7 -> 8-13, 14 -> 15-20,
  21-22 -> 15-20, 23-24 -> 25-32, 33-34 -> 25-32, 35-37 -> 38-43,
  44-45 -> 38-43, 46-47 -> 48-53, 54-56 -> 48-53, 57-59 -> 60+. The edges are
  the midpoints between groups (3, 7, 14, 22.5, 35, 45.5, 56.5), which encode
  exactly this rule as half-open intervals on real ages.
- ``7``: 0-12, 13-19, 20-29, 30-39, 40-49, 50-64, 65+ (children, teens, then
  decades through working age, with the 50-64 and 65+ groups wide enough to
  hold data in every common dataset).
- ``5``: 0-17, 18-29, 30-44, 45-59, 60+ (minors, young adults, adults,
  middle-aged, seniors: coarse, legally meaningful boundaries).

Fractional ages (IMDB-WIKI's mid-year estimate, ChaLearn's apparent-age
means) are binned by the same half-open real intervals.

Range labels (Adience's ``(25, 32)``: any age from 25 to 32 years) are binned
by :meth:`BinScheme.assign_range`: a range gets a group only when both of its
ends, hence every age between them, fall in that group; otherwise -1 (the
caller skips the row and counts it). The 8 Adience groups therefore take every
Adience group range directly ((15, 20) -> 15-20, (60, 100) -> 60+), and also
stray ranges inside one group ((27, 32) -> 25-32); ranges across groups
((8, 23), (38, 48)) get -1. With 5 or 7 groups, (0, 2) -> 0-17 / 0-12 and
(38, 43) -> 30-44, but (15, 20) and (25, 32) straddle 5-group edges (18, 30)
and (15, 20) the 7-group edge 20: -1. An exact age (low == high) gets what
:meth:`BinScheme.assign` gives it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BinScheme:
    """A contiguous partition of [0, inf) into named groups.

    ``lower[i]`` is the lowest age (real, inclusive) of group i; group i holds
    ``lower[i] <= age < lower[i+1]``. ``names`` are short labels such as "25-32";
    ``titles`` are the long names where the scheme has them.
    """

    key: str
    lower: tuple[float, ...]
    names: tuple[str, ...]
    titles: tuple[str, ...]

    @property
    def n(self) -> int:
        return len(self.names)

    def assign(self, ages) -> np.ndarray:
        """Group index for each age (NaN ages -> -1)."""
        a = np.asarray(ages, dtype=np.float64)
        flat = np.atleast_1d(a)  # a scalar age gives a 0-d array back, not a crash
        out = np.searchsorted(np.asarray(self.lower[1:]), flat, side="right").astype(np.int64)
        out[np.isnan(flat)] = -1
        if np.any(flat[~np.isnan(flat)] < 0):
            raise ValueError("negative age")
        return out.reshape(a.shape)

    def assign_range(self, low, high) -> np.ndarray:
        """Group index for each age range [low, high] (years, both included); -1 where it is not inside one group.

        NaN in either bound -> -1; ``low > high`` or a negative bound is a ValueError.
        """
        lo = np.asarray(low, dtype=np.float64)
        hi = np.asarray(high, dtype=np.float64)
        lo, hi = np.broadcast_arrays(lo, hi)
        if np.any(lo > hi):  # NaN compares False: those stay -1 below
            raise ValueError("age range with low > high")
        a, b = self.assign(lo), self.assign(hi)
        return np.where(a == b, a, -1).astype(np.int64)

    def edges(self) -> list[tuple[float, float]]:
        """Each group's real interval [low, high) in years (the last one's high is inf)."""
        lo = [float(v) for v in self.lower]
        return list(zip(lo, lo[1:] + [float("inf")]))

    def labels(self) -> list[str]:
        """Group names that show where every age goes. Where each name already says it for whole years
        ("0-12" is [0, 13)), the names; else (the 8 Adience groups, whose names leave gaps) each name with its
        real interval: "25-32 [22.5, 35)" (a 34-year-old is in it), "60+ [56.5, ∞)"."""
        said, real = [], []
        for name, (lo, hi) in zip(self.names, self.edges()):
            first = int(np.ceil(lo))
            said.append(f"{first}+" if np.isinf(hi) else f"{first}-{int(np.ceil(hi)) - 1}")
            real.append(f"{name} [{lo:g}, {'∞' if np.isinf(hi) else f'{hi:g}'})")
        return list(self.names) if list(self.names) == said else real

    def centre(self) -> np.ndarray:
        """A representative age per group (midpoint of its nominal range; open top: lower + 10)."""
        out = []
        for i, name in enumerate(self.names):
            if name.endswith("+"):
                out.append(float(name[:-1]) + 10.0)
            else:
                lo, hi = name.split("-")
                out.append((float(lo) + float(hi)) / 2.0)
        return np.asarray(out)


# Adience: nominal groups and the midpoints between them. A gap age g between
# groups (hi_a, lo_b) goes to the nearer; a tie (equal distance) goes to the
# older group. With integer ages that means the boundary is at
# ceil((hi_a + lo_b) / 2): e.g. 2|4 -> 3 goes to 4-6 (tie), 20|25 -> 23 -> 25-32
# (2 from 25, 3 from 20), 32|38 -> 35 -> 38-43 (tie), 43|48 -> 46 -> 48-53
# (2 vs 3), 53|60 -> 57 -> 60+ (3 vs 4). For a fractional age x in the gap,
# it is nearer the older group iff x >= (hi_a + lo_b) / 2, so the real edge
# is the midpoint; integer ages at the midpoint (ties) go older as required.
_ADIENCE_GROUPS = ((0, 2), (4, 6), (8, 13), (15, 20), (25, 32), (38, 43), (48, 53), (60, None))


def _adience_lower() -> tuple[float, ...]:
    lower = [0.0]
    for (lo_a, hi_a), (lo_b, _hi_b) in zip(_ADIENCE_GROUPS, _ADIENCE_GROUPS[1:]):
        lower.append((hi_a + lo_b) / 2.0)
    return tuple(lower)


SCHEMES: dict[str, BinScheme] = {
    "8": BinScheme(
        "8",
        _adience_lower(),
        ("0-2", "4-6", "8-13", "15-20", "25-32", "38-43", "48-53", "60+"),
        ("Infants", "Kids", "Adolescents", "Teens", "Young Adults", "Adults", "Middle-aged", "Old"),
    ),
    "7": BinScheme(
        "7",
        (0, 13, 20, 30, 40, 50, 65),
        ("0-12", "13-19", "20-29", "30-39", "40-49", "50-64", "65+"),
        ("Children", "Teens", "Twenties", "Thirties", "Forties", "Fifty to 64", "65 and over"),
    ),
    "5": BinScheme(
        "5",
        (0, 18, 30, 45, 60),
        ("0-17", "18-29", "30-44", "45-59", "60+"),
        ("Minors", "Young adults", "Adults", "Middle-aged", "Seniors"),
    ),
}


def group_labels(names) -> list[str]:
    """:meth:`BinScheme.labels` for a scheme's group names (a figure's tick labels); other names unchanged."""
    names = [str(n) for n in names]
    for scheme in SCHEMES.values():
        if tuple(names) == scheme.names:
            return scheme.labels()
    return names


def get_scheme(cats: int | str) -> BinScheme:
    """The bin scheme for ``--cats`` (5, 7 or 8)."""
    try:
        return SCHEMES[str(cats)]
    except KeyError:
        from ..errors import FeatlabError

        raise FeatlabError(f"no age-bin scheme with {cats} groups; choose one of {', '.join(sorted(SCHEMES))}") from None


def parse_range(text: str) -> tuple[float, float] | None:
    """Parse an Adience-style age label: "(25, 32)", "25", "(8, 23)" -> (lo, hi); None if unusable."""
    t = str(text).strip().strip('"').strip()
    if not t or t.lower() in {"none", "nan"}:
        return None
    if t.startswith("("):
        parts = t.strip("()").split(",")
        if len(parts) != 2:
            return None
        try:
            lo, hi = float(parts[0]), float(parts[1])
        except ValueError:
            return None
        return (lo, hi) if 0 <= lo <= hi else None
    try:
        v = float(t)
    except ValueError:
        return None
    return (v, v) if v >= 0 else None
