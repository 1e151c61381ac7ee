"""Faithfulness: does a map's order of the pixels remove (and restore) the evidence faster than chance?

Takes a scorer, a chip and its map; gives deletion and insertion curves, their normalised areas and the
difference to a seeded random order with a 95 % interval over faces (or face groups).

:func:`deletion_curve` (pixel flipping after Samek et al., IEEE TNNLS 2017; insertion after Petsiuk et al.
2018): the chip is cut into cells of ``cell`` px; the deletion curve replaces the cells most relevant
first and tracks the explained output, the insertion curve starts from the
fully replaced chip and restores the cells most relevant first; both also
along a seeded random order. The cells are replaced with the *other*
perturbation than the one that made the map (:func:`test_baseline`: a blur
for a mean-colour map, the mean colour for a blur map), so the test does not
re-apply the very edit the map measured (with the same perturbation an
occlusion map is close to the greedy deletion order by construction); the
curves under the map's own perturbation are kept as ``same_baseline``, for
reference only. :func:`summarise_faithfulness` turns the curves of many faces
into normalised areas (AUC: area under the mean curve over the replaced
share [0, 1], divided by the mean output of the intact faces) and gives the
AUC difference to random a 95 % bootstrap interval over faces
(:func:`featlab.scoring.uncertainty.interval` of the per-face differences, each
divided by the same mean intact output, so their mean is the difference of
the AUCs). A map is faithful when the deletion difference's interval lies
below 0 (its order removes the evidence faster than random); insertion is
reported beside it (above 0 = the order restores the output faster). With several methods,
:func:`compare_methods` gives each pair's AUC difference on the same faces a bootstrap interval.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import FeatlabError
from .perturbation import _masked_scores, baseline_image


def test_baseline(map_baseline: str) -> str:
    """The perturbation the faithfulness curves replace cells with: the other one than the map's."""
    return "blur" if map_baseline == "mean" else "mean"


def cell_order(relevance: np.ndarray, cell: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Cells of ``cell`` px sorted by summed relevance, highest first (ties: raster order); and the cells."""
    h, w = relevance.shape
    cells = [(y, x) for y in range(0, h, cell) for x in range(0, w, cell)]
    rel = np.array([relevance[y : y + cell, x : x + cell].sum() for y, x in cells])
    return np.argsort(-rel, kind="stable"), cells


def deletion_curve(f, chip: np.ndarray, order: np.ndarray, cells, cell: int, steps: int = 16,
                   baseline: str = "mean", batch: int = 64, patch: int = 16,
                   insertion: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(fraction of cells replaced or restored, scores (steps + 1, K)).

    Deletion: cells replaced by the baseline in ``order`` (point 0 = the intact chip). Insertion: the chip
    fully replaced by the baseline, cells restored in ``order`` (point 0 = all replaced, the last = intact)."""
    chip = np.asarray(chip, dtype=np.uint8)
    h, w = chip.shape[:2]
    base = baseline_image(chip, baseline, patch)
    n = len(cells)
    ks = np.round(np.linspace(0, n, steps + 1)).astype(int)
    start, flip = (0.0, 1.0) if insertion else (1.0, 0.0)  # keep-mask of the chip at point 0, of a visited cell

    def keep(a, b):
        m = np.full((b - a, h, w), start, dtype=np.float32)
        for j, k in enumerate(ks[a:b]):
            for c in order[:k]:
                y, x = cells[c]
                m[j, y : y + cell, x : x + cell] = flip
        return m

    return ks / n, _masked_scores(f, chip, base, keep, len(ks), batch)


def random_order(n_cells: int, seed: int, face: int) -> np.ndarray:
    return np.random.default_rng([int(seed), int(face)]).permutation(n_cells)


def curve_auc(x: np.ndarray, y: np.ndarray) -> float:
    """Trapezoid area under y(x)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0)


def summarise_curves(x: np.ndarray, ranked: np.ndarray, randomised: np.ndarray) -> dict:
    """AUCs of the mean deletion curves over faces ((n faces, steps + 1) each), normalised by the mean intact output."""
    ranked, randomised = np.asarray(ranked, dtype=np.float64), np.asarray(randomised, dtype=np.float64)
    ref = float(ranked[:, 0].mean())
    if not math.isfinite(ref) or abs(ref) < 1e-12:
        raise FeatlabError("the explained output is zero on the intact faces: deletion AUCs cannot be normalised")
    mr, mq = ranked.mean(axis=0), randomised.mean(axis=0)
    auc, rnd = curve_auc(x, mr) / ref, curve_auc(x, mq) / ref
    # per-face AUCs, to say how often the map beats random
    per = np.array([curve_auc(x, r) < curve_auc(x, q) for r, q in zip(ranked, randomised)])
    return {"deletion_auc": round(auc, 6), "random_deletion_auc": round(rnd, 6), "beats_random": bool(auc < rnd),
            "faces_beating_random": float(round(per.mean(), 4)), "mean_intact_output": round(ref, 6),
            "deletion_fraction": [round(float(v), 4) for v in x],
            "deletion_curve": [round(float(v), 6) for v in mr], "random_deletion_curve": [round(float(v), 6) for v in mq]}


def _auc_rows(x: np.ndarray, curves: np.ndarray) -> np.ndarray:
    """Per-face trapezoid areas of curves (n faces, steps + 1)."""
    x = np.asarray(x, dtype=np.float64)
    c = np.asarray(curves, dtype=np.float64)
    return np.sum((c[:, 1:] + c[:, :-1]) * np.diff(x)[None, :], axis=1) / 2.0


def compare_to_random(x: np.ndarray, ranked: np.ndarray, randomised: np.ndarray, ref: float, kind: str,
                      seed: int = 0, groups=None) -> dict:
    """One curve pair (deletion or insertion) of many faces against random order: normalised AUCs of the mean
    curves, their difference with a 95 % bootstrap interval over faces (per-face differences / ``ref``, whose mean
    is the difference of the AUCs), the share of faces where the map's order wins, and the mean curves.

    Deletion wins when its area is smaller (difference < 0), insertion when it is larger (> 0); ``beats_random``
    means the interval excludes 0 on the winning side. With ``groups`` (each face's person or face group) the
    interval resamples whole groups."""
    from ..scoring.uncertainty import interval

    ranked, randomised = np.asarray(ranked, dtype=np.float64), np.asarray(randomised, dtype=np.float64)
    per = (_auc_rows(x, ranked) - _auc_rows(x, randomised)) / ref
    sign = -1.0 if kind == "deletion" else 1.0
    ci = interval(per, seed=seed, groups=groups)
    diff = float(per.mean())
    wins = bool(ci is not None and (ci[1] < 0 if sign < 0 else ci[0] > 0))
    return {f"{kind}_auc": round(curve_auc(x, ranked.mean(axis=0)) / ref, 6),
            f"random_{kind}_auc": round(curve_auc(x, randomised.mean(axis=0)) / ref, 6),
            f"{kind}_auc_difference": round(diff, 6),
            f"{kind}_ci95": None if ci is None else [round(v, 6) for v in ci],
            ("beats_random" if kind == "deletion" else "insertion_beats_random"): wins,
            f"faces_beating_random{'' if kind == 'deletion' else '_insertion'}":
                float(round(float(np.mean(sign * per > 0)), 4)),
            f"{kind}_curve": [round(float(v), 6) for v in ranked.mean(axis=0)],
            f"random_{kind}_curve": [round(float(v), 6) for v in randomised.mean(axis=0)],
            "_per_face": [round(float(v), 6) for v in per]}


def summarise_faithfulness(x: np.ndarray, curves: dict, map_baseline: str, seed: int = 0, groups=None) -> dict:
    """Everything explain_summary.json says about one method and head over many faces.

    ``curves``: ``deletion``, ``random_deletion``, ``insertion``, ``random_insertion`` (under the test
    perturbation, :func:`test_baseline`) and ``same_deletion``, ``same_random_deletion`` (under the map's own),
    each (n faces, steps + 1). Per-face AUC differences stay in ``per_face`` (faces in the summary's ``faces``
    order); with ``groups`` (each face's person or face group) the intervals resample people."""
    from ..scoring.uncertainty import unit_of

    ref = float(np.asarray(curves["deletion"], dtype=np.float64)[:, 0].mean())
    if not math.isfinite(ref) or abs(ref) < 1e-12:
        raise FeatlabError("the explained output is zero on the intact faces: deletion AUCs cannot be normalised")
    out = {"map_baseline": map_baseline, "test_baseline": test_baseline(map_baseline),
           "mean_intact_output": round(ref, 6), "deletion_fraction": [round(float(v), 4) for v in x]}
    unit = unit_of(groups) if groups is not None else {"unit": "face", "n_units": len(curves["deletion"])}
    out["interval"] = f"95 % BCa bootstrap over {'people' if unit['unit'] == 'person' else 'faces'} ({unit['n_units']})"
    per_face = {}
    for kind, a, b in (("deletion", "deletion", "random_deletion"), ("insertion", "insertion", "random_insertion")):
        s = compare_to_random(x, curves[a], curves[b], ref, kind, seed, groups)
        per_face[f"{kind}_difference"] = s.pop("_per_face")
        out.update(s)
    same = compare_to_random(x, curves["same_deletion"], curves["same_random_deletion"], ref, "deletion", seed, groups)
    per_face["same_baseline_deletion_difference"] = same.pop("_per_face")
    out["same_baseline"] = {"baseline": map_baseline, **same}
    out["per_face"] = per_face
    return out


def faithfulness_line(method: str, label: str, s: dict, n_faces: int) -> str:
    """The console line of one method and head."""
    def ci(v):
        return "n/a" if v is None else f"[{v[0]:+.3f}, {v[1]:+.3f}]"

    same = s["same_baseline"]
    return (f"{method} on {label} ({s['map_baseline']} map, cells replaced by {s['test_baseline']}, {n_faces} faces): "
            f"deletion AUC {s['deletion_auc']:.3f} vs random {s['random_deletion_auc']:.3f}, difference "
            f"{s['deletion_auc_difference']:+.3f} {ci(s['deletion_ci95'])} "
            f"({'beats' if s['beats_random'] else 'does NOT beat'} random order; "
            f"{s['faces_beating_random']:.0%} of faces); insertion AUC {s['insertion_auc']:.3f} vs random "
            f"{s['random_insertion_auc']:.3f}, difference {s['insertion_auc_difference']:+.3f} "
            f"{ci(s['insertion_ci95'])}; with the map's own {same['baseline']} cells (circular): deletion "
            f"{same['deletion_auc']:.3f} vs {same['random_deletion_auc']:.3f}")


def compare_methods(per_method: dict, seed: int = 0, groups=None) -> dict:
    """Pairwise faithfulness of the methods on the same faces and head: per pair (``a - b``) and curve kind the
    difference of the normalised AUCs with a 95 % bootstrap interval over faces (or ``groups``), from the per-face
    differences to the shared random order (the random order and the intact output are the same for every method,
    so their difference is the difference of the methods' per-face AUCs / the mean intact output).
    Deletion: below 0 = ``a`` removes the evidence faster; insertion: above 0 = ``a`` restores it faster."""
    from itertools import combinations

    from ..scoring.uncertainty import interval

    out: dict = {}
    names = list(per_method)
    labels = list(dict.fromkeys(lab for m in names for lab in per_method[m]))
    for lab in labels:
        for a, b in combinations(names, 2):
            if lab not in per_method[a] or lab not in per_method[b]:
                continue
            row = {}
            for kind in ("deletion", "insertion"):
                pa = np.asarray(per_method[a][lab]["per_face"][f"{kind}_difference"], dtype=np.float64)
                pb = np.asarray(per_method[b][lab]["per_face"][f"{kind}_difference"], dtype=np.float64)
                ci = interval(pa - pb, seed=seed, groups=groups)
                row[f"{kind}_auc_difference"] = round(float(np.mean(pa - pb)), 6)
                row[f"{kind}_ci95"] = None if ci is None else [round(v, 6) for v in ci]
            out.setdefault(lab, {})[f"{a} - {b}"] = row
    return out
