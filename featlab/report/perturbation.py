"""Perturbation maps: where in a chip a black-box scorer finds its evidence, without gradients.

Takes a scorer ``f(chips) -> scores`` (the frozen ONNX backbone and a head, :class:`featlab.report.explain.HeadScorer`)
and a face chip; gives a signed map of the chip's pixels.

- :func:`occlusion`: slide a patch (``patch`` px, ``stride`` px) over the
  chip, replace it by a baseline (the chip's mean colour, or a blurred copy),
  and score ``f(original) - f(occluded)`` on the pixels it covered (averaged
  where patches overlap). Positive = evidence for the explained output,
  negative = evidence against it.
- :func:`rise`: RISE (Petsiuk et al., BMVC 2018) with N seeded random smooth
  masks; the map is the covariance of the score with each pixel being kept,
  ``sum_i (f_i - mean f) M_i / (N p)``, signed like occlusion.

Every masked variant of a chip goes through ``f`` in batches of ``batch``;
outputs are gathered first and summed in a fixed order, so a map does not
depend on the batch size. Layer-wise relevance propagation is :mod:`featlab.report.lrp`.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import FeatlabError

BASELINES = ("mean", "blur")


# ------------------------------------------------------------------------------------ core
def baseline_image(chip: np.ndarray, kind: str = "mean", patch: int = 16) -> np.ndarray:
    """What removed pixels become: float32 (H, W, 3), the chip's mean colour or a Gaussian blur (sigma patch/2)."""
    chip = np.asarray(chip)
    if kind == "mean":
        return np.broadcast_to(chip.reshape(-1, 3).mean(axis=0).astype(np.float32), chip.shape).copy()
    if kind == "blur":
        from scipy.ndimage import gaussian_filter

        return gaussian_filter(chip.astype(np.float32), sigma=(patch / 2.0, patch / 2.0, 0.0), mode="nearest")
    raise FeatlabError(f"unknown baseline {kind!r}; choose from {', '.join(BASELINES)}")


def _scores(f, chips: np.ndarray, shape: list | None = None) -> np.ndarray:
    """f(chips) as float64 (N, K); loud on a wrong count or non-finite values. ``shape`` collects f's own ndim."""
    out = np.asarray(f(chips), dtype=np.float64)
    if shape is not None:
        shape.append(out.ndim)
    if out.ndim == 1:
        out = out[:, None]
    if out.ndim != 2 or out.shape[0] != len(chips):
        raise FeatlabError(f"the explained model gave {out.shape} scores for {len(chips)} chips")
    if not np.isfinite(out).all():
        raise FeatlabError("the explained model gave non-finite outputs (NaN or inf) on masked chips")
    return out


def _masked_scores(f, chip: np.ndarray, base: np.ndarray, keep_masks, n: int, batch: int,
                   shape: list | None = None) -> np.ndarray:
    """Scores (n, K) of ``chip * m + base * (1 - m)`` for the masks ``keep_masks(a, b) -> (b - a, H, W)``."""
    x = chip.astype(np.float32)
    out = []
    for a in range(0, n, batch):
        m = keep_masks(a, min(n, a + batch))[..., None]
        comp = np.rint(x * m + base * (1.0 - m))
        out.append(_scores(f, np.clip(comp, 0, 255).astype(np.uint8), shape))
    return np.concatenate(out, axis=0)


def _positions(size: int, patch: int, stride: int) -> list[int]:
    if patch >= size:
        return [0]
    pos = list(range(0, size - patch + 1, stride))
    if pos[-1] != size - patch:  # the last patch reaches the edge
        pos.append(size - patch)
    return pos


def _squeeze(maps: np.ndarray, one: bool) -> np.ndarray:
    return maps[0] if one else maps


def occlusion(f, chip: np.ndarray, patch: int = 16, stride: int = 8, baseline: str = "mean", batch: int = 64,
              reference: np.ndarray | None = None) -> np.ndarray:
    """Signed occlusion map(s): ``f(chip) - f(chip with a patch replaced)``, averaged over the patches covering a pixel.

    ``f`` maps uint8 chips (N, H, W, 3) to scores (N,) or (N, K); the map is (H, W), or (K, H, W) for K scores.
    ``reference``: f(chip) if already known (shape (K,)).
    """
    chip = np.asarray(chip, dtype=np.uint8)
    h, w = chip.shape[:2]
    base = baseline_image(chip, baseline, patch)
    boxes = [(y, x) for y in _positions(h, patch, stride) for x in _positions(w, patch, stride)]

    def keep(a, b):
        m = np.ones((b - a, h, w), dtype=np.float32)
        for i, (y, x) in enumerate(boxes[a:b]):
            m[i, y : y + patch, x : x + patch] = 0.0
        return m

    shape: list = []
    f0 = _scores(f, chip[None])[0] if reference is None else np.atleast_1d(np.asarray(reference, dtype=np.float64))
    s = _masked_scores(f, chip, base, keep, len(boxes), batch, shape)
    delta = f0[None, :] - s  # (n boxes, K)
    acc = np.zeros((s.shape[1], h, w), dtype=np.float64)
    cnt = np.zeros((h, w), dtype=np.float64)
    for (y, x), d in zip(boxes, delta):  # fixed order: the map does not depend on the batch size
        acc[:, y : y + patch, x : x + patch] += d[:, None, None]
        cnt[y : y + patch, x : x + patch] += 1.0
    return _squeeze(acc / np.maximum(cnt, 1.0), shape[0] == 1)


def rise_masks(n: int, size: tuple[int, int], grid: int = 8, p: float = 0.5, seed: int = 0):
    """A function ``(a, b) -> masks a..b-1`` (float32, values in [0, 1]) of RISE's N seeded smooth random masks.

    Each mask is a ``grid x grid`` Bernoulli(p) raster, bilinearly upsampled to ``(grid + 1)`` cells of
    ``ceil(H / grid)`` px and cropped at a random shift (Petsiuk et al. 2018). Mask i is the same whatever batch
    asks for it.
    """
    import cv2

    h, w = size
    ch, cw = math.ceil(h / grid), math.ceil(w / grid)
    rng = np.random.default_rng(seed)
    cells = (rng.random((n, grid, grid)) < p).astype(np.float32)
    shifts = np.stack([rng.integers(0, ch, n), rng.integers(0, cw, n)], axis=1)

    def masks(a: int, b: int) -> np.ndarray:
        out = np.empty((b - a, h, w), dtype=np.float32)
        for j, i in enumerate(range(a, b)):
            up = cv2.resize(cells[i], ((grid + 1) * cw, (grid + 1) * ch), interpolation=cv2.INTER_LINEAR)
            dy, dx = shifts[i]
            out[j] = up[dy : dy + h, dx : dx + w]
        return out

    return masks


def rise(f, chip: np.ndarray, masks: int = 1000, grid: int = 8, p: float = 0.5, baseline: str = "mean",
         batch: int = 64, seed: int = 0, patch: int = 16) -> np.ndarray:
    """Signed RISE map(s): ``sum_i (f(chip masked by M_i) - mean) M_i / (N p)``; (H, W) or (K, H, W).

    ``patch`` only sets the blur of the ``blur`` baseline.
    """
    chip = np.asarray(chip, dtype=np.uint8)
    h, w = chip.shape[:2]
    base = baseline_image(chip, baseline, patch)
    make = rise_masks(masks, (h, w), grid, p, seed)
    shape: list = []
    s = _masked_scores(f, chip, base, make, masks, batch, shape)  # (N, K)
    centred = s - s.mean(axis=0, keepdims=True)
    acc = np.zeros((s.shape[1], h, w), dtype=np.float64)
    step = 256  # fixed chunks of masks, whatever the batch size
    for a in range(0, masks, step):
        m = make(a, min(masks, a + step)).astype(np.float64)
        acc += np.einsum("nk,nhw->khw", centred[a : a + step], m)
    acc /= masks * p
    return _squeeze(acc, shape[0] == 1)
