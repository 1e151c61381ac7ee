"""Representation similarity: linear CKA between every pair of taps of one or two features files.

``featlab similarity A.h5 [B.h5]`` answers "which depths of one network resemble which of another" on the
same faces. It writes ``cka.csv`` (the matrix: rows = taps of the first file, columns = taps of the second,
both in network order), ``cka_se.csv`` (its jackknife standard errors over row blocks), ``cka.png`` (the
heatmap) and ``config.json`` (what made it) to

    {results}/{backbone}/{dataset-key}/similarity/{other}/{pooling}-{split}-{digest}/

``other`` is ``self`` (one file) or ``{backbone}-{dataset-key}`` of the second file; ``digest`` hashes the
computation (both files' feature sets, taps, rows, block size, seed), so the path follows from what was
computed, never from the time.

**Estimator.** Linear CKA (Kornblith et al. 2019) is HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with linear
kernels K = X Xᵀ. The full computation needs every face's Gram matrix at once (n x n) or the cross-covariance
of every pair of taps (d x d', 8,192 x 8,192 for dlib-rec's res10), so memory grows with rows or width. Here
the rows are cut into blocks of ``block`` faces and each HSIC is the mean over blocks of the **unbiased** HSIC
estimator (Song et al. 2012), as in Nguyen, Raghu & Kornblith 2021 ("Do wide and deep networks learn the
same things?", minibatch CKA): memory is one block of one tap plus a block x block Gram matrix per tap,
whatever the number of faces. The unbiased estimator is what makes averaging over blocks valid (the mean of
the biased one depends on the block size) and removes the upward bias of biased CKA for wide maps: two
independent taps score about 0, not a positive number that grows with width / faces. The blocks are a
seeded permutation of the faces' groups (identities, face groups; a face without one is its own group),
so a file's row order never changes the result and every person lies in exactly one block; the two files'
rows are joined by image id. ``cka_se.csv``: the delete-one-block jackknife standard error of each entry,
which therefore resamples people, not photos.

**Maps** (C, H, W) are flattened by default (``pool=None``): CKA of the whole representation, as in
Kornblith et al.; spatial layout is part of what an early tap encodes, and global pooling would compare
only its channel means. ``pool="avg"`` compares globally average-pooled maps instead.

No maintained implementation fits: the packaged ones (ckatorch, cka-pytorch, pytorch-cka) need PyTorch and
hook a torch model's forward pass, and the NumPy ones are notebooks. This one is tested against the
closed forms (tests/test_similarity.py): Song et al.'s estimator equals its U-statistic by brute force,
biased CKA equals Kornblith's ||Yᵀ X||² / (||Xᵀ X|| ||Yᵀ Y||), and the minibatch matrix agrees with the
full (n x n) computation. No TensorFlow here; the matrices are computed with NumPy.
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from pathlib import Path

import numpy as np

from ..errors import FeatlabError

ESTIMATOR = "minibatch linear CKA, unbiased HSIC (Song et al. 2012; Nguyen et al. 2021)"
POOLS = (None, "avg")
SPLITS = ("all", "train", "val", "test")
MIN_BLOCK = 4  # the unbiased HSIC estimator divides by n (n - 3)


# ---------------------------------------------------------------------------------------------- estimators
def gram(x: np.ndarray) -> np.ndarray:
    """Linear-kernel Gram matrix (float64) of the rows of ``x`` (n, ...), flattened and column-centred
    (centring changes no unbiased HSIC and keeps float32 products accurate)."""
    x = np.asarray(x).reshape(len(x), -1)
    x = (x - x.mean(axis=0, dtype=np.float64)).astype(np.float32 if x.dtype != np.float64 else np.float64)
    return (x @ x.T).astype(np.float64)


class _Kernel:
    """What the unbiased HSIC needs of one Gram matrix: K with a zero diagonal, its row sums and total."""

    __slots__ = ("kt", "rows", "total", "n")

    def __init__(self, k: np.ndarray):
        kt = np.array(k, dtype=np.float64)
        np.fill_diagonal(kt, 0.0)
        self.kt, self.rows, self.n = kt, kt.sum(axis=1), len(kt)
        self.total = float(self.rows.sum())


def _hsic(a: _Kernel, b: _Kernel) -> float:
    n = a.n
    if n < MIN_BLOCK:
        raise FeatlabError(f"the unbiased HSIC needs at least {MIN_BLOCK} faces per block, not {n}")
    trace = float(np.einsum("ij,ij->", a.kt, b.kt))
    return (trace + a.total * b.total / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * float(a.rows @ b.rows)) / (n * (n - 3))


def hsic_unbiased(k: np.ndarray, l: np.ndarray) -> float:
    """The unbiased HSIC estimator of Song et al. 2012 (eq. 5) for two n x n Gram matrices (n >= 4)."""
    return _hsic(_Kernel(k), _Kernel(l))


def cka(x: np.ndarray, y: np.ndarray, unbiased: bool = True) -> float:
    """Linear CKA of two representations of the same n rows, computed in full (n x n Gram matrices).

    ``unbiased``: with the unbiased HSIC (what :class:`MinibatchCKA` averages over blocks); else the biased
    estimator of Kornblith et al. 2019, ||Yᵀ X||² / (||Xᵀ X|| ||Yᵀ Y||) on centred X, Y."""
    k, l = gram(x), gram(y)
    if unbiased:
        a, b = _Kernel(k), _Kernel(l)
        den = np.sqrt(_hsic(a, a) * _hsic(b, b))
        return float(_hsic(a, b) / den) if den > 0 else float("nan")
    den = np.sqrt(np.sum(k * k) * np.sum(l * l))  # centred Grams: HKH = K, and tr(KL) = <K, L>
    return float(np.sum(k * l) / den) if den > 0 else float("nan")


class MinibatchCKA:
    """Accumulates per-block unbiased HSIC of every (row tap, column tap) pair and of each tap with itself.

    Call :meth:`add` once per block with the Gram matrices of the block (same faces, same order, in both
    lists); :meth:`matrix` gives CKA = mean_b HSIC(K_b, L_b) / sqrt(mean_b HSIC(K_b, K_b) mean_b HSIC(L_b, L_b)),
    :meth:`jackknife_se` its delete-one-block standard error."""

    def __init__(self, n_rows: int, n_cols: int):
        self.cross: list[np.ndarray] = []  # per block: (n_rows, n_cols)
        self.self_r: list[np.ndarray] = []
        self.self_c: list[np.ndarray] = []
        self.shape = (int(n_rows), int(n_cols))

    def add(self, row_grams: list[np.ndarray], col_grams: list[np.ndarray] | None = None) -> None:
        ra = [_Kernel(k) for k in row_grams]
        ca = ra if col_grams is None else [_Kernel(k) for k in col_grams]
        if (len(ra), len(ca)) != self.shape:
            raise ValueError(f"expected {self.shape} Gram matrices, got {(len(ra), len(ca))}")
        same = {}
        if col_grams is None:  # one file: the matrix is symmetric
            cross = np.empty(self.shape)
            for i in range(len(ra)):
                for j in range(i, len(ca)):
                    cross[i, j] = cross[j, i] = _hsic(ra[i], ca[j])
            diag = np.diag(cross).copy()
            same = {"r": diag, "c": diag}
        else:
            cross = np.array([[_hsic(a, b) for b in ca] for a in ra]).reshape(self.shape)
            same = {"r": np.array([_hsic(a, a) for a in ra]), "c": np.array([_hsic(b, b) for b in ca])}
        self.cross.append(cross)
        self.self_r.append(same["r"])
        self.self_c.append(same["c"])

    @staticmethod
    def _ratio(cross, sr, sc) -> np.ndarray:
        den = np.sqrt(np.outer(sr, sc))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, cross / np.where(den > 0, den, 1.0), np.nan)

    def matrix(self) -> np.ndarray:
        if not self.cross:
            raise FeatlabError("no blocks: nothing to compute CKA on")
        return self._ratio(np.mean(self.cross, axis=0), np.mean(self.self_r, axis=0), np.mean(self.self_c, axis=0))

    def jackknife_se(self) -> np.ndarray:
        """Delete-one-block jackknife standard error of :meth:`matrix` (NaN with fewer than 2 blocks)."""
        m = len(self.cross)
        if m < 2:
            return np.full(self.shape, np.nan)
        c, r, s = (np.sum(a, axis=0) for a in (self.cross, self.self_r, self.self_c))
        loo = np.array([self._ratio((c - self.cross[b]) / (m - 1), (r - self.self_r[b]) / (m - 1),
                                    (s - self.self_c[b]) / (m - 1)) for b in range(m)])
        return np.sqrt((m - 1) / m * np.sum((loo - loo.mean(axis=0)) ** 2, axis=0))


def blocks_of(n: int, block: int, seed: int = 0, groups=None) -> list[np.ndarray]:
    """A seeded permutation of range(n) cut into near-equal blocks of at most ``block`` (at least
    :data:`MIN_BLOCK`) positions. With ``groups`` (one per position; '' = its own group) whole groups are
    permuted and a block ends only where a group does, so no group spans two blocks."""
    if n < MIN_BLOCK:
        raise FeatlabError(f"CKA needs at least {MIN_BLOCK} faces, not {n}")
    k = max(1, -(-n // max(MIN_BLOCK, int(block))))
    k = min(k, n // MIN_BLOCK)
    rng = np.random.default_rng(int(seed))
    if groups is None:
        return np.array_split(rng.permutation(n), k)
    labels = np.array([str(g) if str(g) else f"\0face{i}" for i, g in enumerate(groups)], dtype=object)
    _, codes = np.unique(labels, return_inverse=True)
    rank = rng.permutation(int(codes.max()) + 1)[codes]  # each group's place in a seeded order
    order = np.lexsort((np.arange(n), rank))  # faces group by group, in that order
    ends = np.flatnonzero(np.diff(rank[order]) != 0) + 1  # where a group ends (a block may end there)
    cuts = ends[np.minimum(np.searchsorted(ends, [n * j / k for j in range(1, k)]), len(ends) - 1)].tolist() \
        if len(ends) else []
    return [p for p in np.split(order, sorted(set(cuts))) if len(p)]


# ---------------------------------------------------------------------------------------------- files
def _image_ids(store) -> np.ndarray:
    return np.array(store.labels()["image_id"].tolist(), dtype=object)  # also a sharded set's


def _check_same_faces(a, b) -> None:
    """Refuse (one line) two files extracted from different manifests."""
    ma, mb = a.attrs, b.attrs
    for key in ("manifest_sha256", "manifest"):
        x, y = ma.get(key), mb.get(key)
        if x and y:
            if x != y:
                sx, sy = (str(x)[:12] + "…", str(y)[:12] + "…") if key.endswith("sha256") else (x, y)
                raise FeatlabError(f"{a.path} and {b.path} come from different manifests ({key} {sx} vs {sy}): "
                                   "CKA compares taps on the same faces; extract both from one manifest")
            return


def _pick_taps(stores, layers) -> list[list[str]]:
    out = []
    for s in stores:
        keys = s.keys()
        if layers:
            keys = [s.resolve_key(k) for k in layers if s.resolve_key(k) is not None]
        out.append(list(dict.fromkeys(keys)))
    if layers:
        missing = [k for k in layers if all(s.resolve_key(k) is None for s in stores)]
        if missing:
            have = sorted({k for s in stores for k in s.keys()})
            raise FeatlabError(f"no file has tap {missing[0]!r} (they have: {', '.join(have) or 'none'})")
    for s, keys in zip(stores, out):
        if not keys:
            raise FeatlabError(f"{s.path}: no taps to compare (it has: {', '.join(s.keys()) or 'none'})")
    return out


def _ordered(store, keys: list[str]) -> list[str]:
    from .compare import tap_positions

    pos = tap_positions(str(store.attrs.get("backbone") or ""), keys, [str(store.path)])
    return sorted(keys, key=lambda k: pos[k])


def _rows(stores, split: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """The faces both files hold (sorted image ids, of ``split`` in the first file) and each file's row of
    each; a file holding an image id twice is refused."""
    ids, where = [], []
    for s in stores:
        i = _image_ids(s)
        u, c = np.unique(i, return_counts=True)
        if (c > 1).any():
            raise FeatlabError(f"{s.path} holds image {u[c > 1][0]} in {int(c[c > 1][0])} rows: one row per face")
        ids.append(i)
        where.append({v: r for r, v in enumerate(i)})
    keep = set(ids[0])
    if split != "all":
        sp = stores[0].labels()["split"].to_numpy()
        keep = set(ids[0][sp == split])
    for i in ids[1:]:
        keep &= set(i)
    common = np.array(sorted(keep), dtype=object)
    if len(common) < MIN_BLOCK:
        what = f" of split {split}" if split != "all" else ""
        raise FeatlabError(f"only {len(common)} faces{what} in common between the files: CKA needs at least {MIN_BLOCK}")
    return common, [np.array([w[v] for v in common], dtype=np.int64) for w in where]


def _features(store, key: str, rows: np.ndarray, pool: str | None) -> np.ndarray:
    from ..featureio import pool_np

    return pool_np(store.read(key, rows), pool).reshape(len(rows), -1)


def similarity(features: list, layers=None, pool: str | None = None, block: int = 1000, seed: int = 0,
               split: str = "all", out: Path | None = None, results_root: Path | None = None, echo=None) -> dict:
    """Linear CKA between every pair of taps of one or two features files (see the module doc).

    Returns ``{"taps": [row taps, column taps], "cka", "se", "n", "blocks", "seconds", "dir", "files"}``."""
    from ..paths import dataset_key, feature_set
    from ..store import FeatureStore

    features = [Path(f) for f in features]
    if not 1 <= len(features) <= 2:
        raise FeatlabError(f"give one or two features files, not {len(features)}")
    if pool not in POOLS:
        raise FeatlabError(f"pooling must be none or avg, not {pool!r}")
    if split not in SPLITS:
        raise FeatlabError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if int(block) < MIN_BLOCK:
        raise FeatlabError(f"--block must be at least {MIN_BLOCK} faces, not {block}")
    t0 = time.perf_counter()
    stores = []
    try:
        for f in features:
            stores.append(FeatureStore.open_read(f))
        if split != "all":  # the split comes from the first file's labels
            stores[0].check_labels_current()
        if len(stores) == 2:
            _check_same_faces(*stores)
        taps = [_ordered(s, k) for s, k in zip(stores, _pick_taps(stores, layers))]
        for s, keys in zip(stores, taps):
            for k in keys:
                s.check_finite(k)
        ids, rows = _rows(stores, split)
        from .evaluate import groups_of

        lab = stores[0].labels()
        group_of = dict(zip(lab["image_id"].astype(str), groups_of(lab)))
        parts = blocks_of(len(ids), block, seed, [group_of.get(str(i), "") for i in ids])
        acc = MinibatchCKA(len(taps[0]), len(taps[-1]))
        for b, pos in enumerate(parts):
            grams = [[gram(_features(s, k, r[pos], pool)) for k in keys] for s, r, keys in zip(stores, rows, taps)]
            acc.add(grams[0], grams[1] if len(grams) == 2 else None)
            if echo:
                echo(f"  block {b + 1}/{len(parts)}: {len(pos)} faces")
        m, se = acc.matrix(), acc.jackknife_se()
        seconds = time.perf_counter() - t0
        idents = [feature_set(s.attrs) for s in stores]
        record = {
            "estimator": ESTIMATOR,
            "files": [{"path": str(s.path), "backbone": i["backbone"], "dataset_key": dataset_key(i),
                       "model_sha256": i["model_sha256"], "manifest_sha256": i["manifest_sha256"],
                       "preprocessing": i["preprocessing"], "taps": t,
                       "shapes": {k: list(s.array(k).shape[1:]) for k in t}}
                      for s, i, t in zip(stores, idents, taps)],
            "pool": pool or "flatten", "split": split, "block": int(block), "seed": int(seed),
            "faces": int(len(ids)), "blocks": len(parts), "block_sizes": sorted({len(p) for p in parts}),
            "rows_unused": [int(s.nrows - len(ids)) for s in stores],  # not in both files, or not of the split
        }
    finally:
        for s in stores:
            s.close()
    digest = hashlib.sha256(json.dumps({**record, "files": [{k: v for k, v in f.items() if k != "path"}
                                                              for f in record["files"]]},
                                       sort_keys=True, default=str).encode()).hexdigest()[:10]
    ia = idents[0]
    other = "self" if len(idents) == 1 else f"{idents[1]['backbone']}-{dataset_key(idents[1])}"
    if out is None:
        from .. import config

        root = Path(results_root) if results_root is not None else config.results_dir()
        out = root / str(ia["backbone"]) / dataset_key(ia) / "similarity" / other / f"{pool or 'flat'}-{split}-{digest}"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prefixes = _prefixes(record["files"])
    labels = [[f"{prefixes[f]}{k}" for k in taps[f]] for f in range(len(stores))]
    files = [_matrix_csv(out / "cka.csv", labels[0], labels[-1], m),
             _matrix_csv(out / "cka_se.csv", labels[0], labels[-1], se)]
    files.append(similarity_png(m, labels[0], labels[-1], out / "cka.png", se=se,
                                title=_title(record, len(stores))))
    record.update({"digest": digest, "seconds": round(seconds, 2), "cka": _nested(m), "se": _nested(se)})
    (out / "config.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    files.append(out / "config.json")
    return {"taps": [taps[0], taps[-1]], "labels": [labels[0], labels[-1]], "cka": m, "se": se, "n": len(ids), "blocks": len(parts),
            "seconds": seconds, "dir": out, "files": files}


def _prefixes(files: list[dict]) -> list[str]:
    """How the taps of each file are labelled: no prefix for one file; else ``backbone:``, or the file's
    name when both files are of one backbone (``1:``/``2:`` when that is the same too)."""
    if len(files) == 1:
        return [""]
    for names in ([f["backbone"] for f in files], [Path(f["path"]).stem for f in files]):
        if len(set(names)) == len(names):
            return [f"{x}:" for x in names]
    return ["1:", "2:"]


def _nested(m: np.ndarray) -> list:
    return [[None if not np.isfinite(v) else round(float(v), 6) for v in row] for row in m]


def _matrix_csv(path: Path, rows: list[str], cols: list[str], m: np.ndarray) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["tap", *cols])
        for name, row in zip(rows, m):
            w.writerow([name, *("" if not np.isfinite(v) else f"{v:.6f}" for v in row)])
    return path


def read_matrix(path) -> tuple[list[str], list[str], np.ndarray]:
    """``cka.csv`` back: (row taps, column taps, matrix)."""
    with open(path, newline="") as f:
        r = list(csv.reader(f))
    return [x[0] for x in r[1:]], r[0][1:], np.array([[float(v) if v else np.nan for v in x[1:]] for x in r[1:]])


def _title(record: dict, n_files: int) -> str:
    f = record["files"]
    who = f[0]["backbone"] if n_files == 1 else f"{f[0]['backbone']} vs {f[1]['backbone']}"
    return (f"linear CKA, {who}: {record['faces']:,} faces ({record['split']}), "
            f"{record['pool']}, {record['blocks']} blocks of ~{record['block_sizes'][-1]} (± jackknife SE)")


def similarity_png(m: np.ndarray, rows: list[str], cols: list[str], path, se=None, title: str = "") -> Path:
    """Heatmap of a CKA matrix (0..1, network order: input at the top / left), each cell's value (and its
    standard error when given) written in it."""
    from .plots import _figure, _save

    nr, nc = m.shape
    fig = _figure(max(4.5, 0.9 * nc + 2.8), max(3.6, 0.7 * nr + 1.8))
    ax = fig.add_subplot(111)
    im = ax.imshow(np.nan_to_num(m, nan=0.0), cmap="viridis", vmin=0.0, vmax=1.0)
    for i in range(nr):
        for j in range(nc):
            v = m[i, j]
            if not np.isfinite(v):
                continue
            text = f"{v:.2f}"
            if se is not None and np.isfinite(se[i, j]) and se[i, j] > 0:
                text += f"\n±{se[i, j]:.3f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8 if nc > 6 else 9,
                    color="black" if v > 0.6 else "white")
    ax.set_xticks(range(nc))
    ax.set_xticklabels(cols, rotation=45, ha="right")
    ax.set_yticks(range(nr))
    ax.set_yticklabels(rows)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="linear CKA")
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)
