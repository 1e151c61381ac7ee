"""Representation similarity: linear CKA between every pair of taps of one or two features files.

``featlab similarity A.h5 [B.h5]`` answers "which depths of one network resemble which of another" on the
same faces. It writes ``cka.csv`` (the matrix: rows = taps of the first file, columns = taps of the second,
both in network order), ``cka_se.csv`` (its jackknife standard errors over row blocks), ``cka.png`` (the
heatmap) and ``config.json`` (what made it) to

    {results}/{backbone}/{dataset-key}/similarity/{other}/{pooling}-{split}-{digest}/

``other`` is ``self`` (one file) or ``{backbone}-{dataset-key}`` of the second file; ``digest`` hashes the
computation (both files' feature sets, taps, rows, estimator, seed), so the path follows from what was
computed, never from the time.

**Estimator.** Linear CKA (Kornblith et al. 2019) is HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with linear
kernels K = X Xᵀ, each HSIC the **unbiased** estimator of Song et al. 2012 on **all** n faces (it removes
biased CKA's upward bias for wide maps: two independent taps score about 0, not a positive number that
grows with width / faces). Nothing n x n is held: the faces are cut into chunks of ``block`` and the kernel
products computed chunk pair by chunk pair, keeping per block pair the sum of K_ij L_ij and per face its
kernel row summed by block (:func:`exact_cka`); memory is ~ block x block per tap, time ~ n² x width / 2
(the minibatch CKA of Nguyen et al. 2021 costs n x block x width, but averages HSICs of blocks, and with
blocks of whole people same-person pairs are far denser in a block than in the sample: on 600 planted
faces of 120 people it read 0.35 with blocks of 50 for a full-sample 0.15, tests/test_similarity.py). The estimate does not
depend on ``block``, on the seed or on the files' row order. ``cka_se.csv``: the delete-one-block jackknife
standard error, the blocks being up to 40 near-equal sets of whole groups (identities, face groups; a face
without one is its own group; none under 4 faces), so it resamples people, not photos; each leave-out is
computed from the same sums (the total minus the block's part). On planted data it matches the spread
over re-drawn datasets (0.0133 vs 0.0136, 200 draws of 120 people x 5 photos). The two files' rows are
joined by image id.

**Maps** (C, H, W) are flattened by default (``pool=None``): CKA of the whole representation, as in
Kornblith et al.; spatial layout is part of what an early tap encodes, and global pooling would compare
only its channel means. ``pool="avg"`` compares globally average-pooled maps instead.

No maintained implementation fits: the packaged ones (ckatorch, cka-pytorch, pytorch-cka) need PyTorch and
hook a torch model's forward pass, and the NumPy ones are notebooks. This one is tested against the
closed forms (tests/test_similarity.py): Song et al.'s estimator equals its U-statistic by brute force,
biased CKA equals Kornblith's ||Yᵀ X||² / (||Xᵀ X|| ||Yᵀ Y||), and the chunked estimate and each jackknife
leave-out equal the n x n computation on the same faces. No TensorFlow here; the matrices are computed with NumPy.
"""

from __future__ import annotations

import csv
import hashlib
import heapq
import json
import time
from pathlib import Path

import numpy as np

from ..errors import FeatlabError

ESTIMATOR = "linear CKA, unbiased HSIC on all faces (Song et al. 2012), jackknife over blocks of whole people"
POOLS = (None, "avg")
SPLITS = ("all", "train", "val", "test")
MIN_BLOCK = 4  # the unbiased HSIC estimator divides by n (n - 3)
JACKKNIFE_BLOCKS = 40  # blocks of whole people the standard error leaves out, one at a time
CACHE_BYTES = 2 << 30  # features kept in memory while computing; beyond this, chunks are re-read


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

    ``unbiased``: with the unbiased HSIC (what :func:`exact_cka` computes without the n x n matrices); else the biased
    estimator of Kornblith et al. 2019, ||Yᵀ X||² / (||Xᵀ X|| ||Yᵀ Y||) on centred X, Y."""
    k, l = gram(x), gram(y)
    if unbiased:
        a, b = _Kernel(k), _Kernel(l)
        den = np.sqrt(_hsic(a, a) * _hsic(b, b))
        return float(_hsic(a, b) / den) if den > 0 else float("nan")
    den = np.sqrt(np.sum(k * k) * np.sum(l * l))  # centred Grams: HKH = K, and tr(KL) = <K, L>
    return float(np.sum(k * l) / den) if den > 0 else float("nan")


def _unbiased_terms(s: np.ndarray, ua: np.ndarray, ub: np.ndarray, da: np.ndarray, db: np.ndarray,
                    blk: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Song et al.'s unbiased HSIC of two linear kernels K, L on all n faces and on the faces left when each
    jackknife block is deleted, from what :func:`exact_cka` accumulates:

    ``s`` (m, m): sum_{i in B, j in B'} K_ij L_ij (diagonal i = j included); ``ua``/``ub`` (n, m): each face's
    kernel row summed over each block's faces, sum_{j in B'} K_ij; ``da``/``db`` (n,): K_ii, L_ii; ``blk``
    (n,): each face's block; ``sizes`` (m,). With block B0 deleted, tr(K~L~) = sum S - 2 sum_B' S[B0, B']
    + S[B0, B0] minus the diagonal left, and K~1 restricted to the faces left is each row's total minus its
    B0 part minus K_ii. Returns (m + 1,): block B0 left out for B0 < m, then all n faces."""
    m = len(sizes)
    n = len(blk)
    dd = np.bincount(blk, weights=da * db, minlength=m)
    trace = np.append(s.sum() - 2.0 * s.sum(axis=1) + np.diag(s) - (dd.sum() - dd), s.sum() - dd.sum())
    keep = blk[:, None] != np.arange(m + 1)[None, :]  # (n, m + 1): the faces left; column m keeps all
    ra = np.where(keep, (ua.sum(axis=1) - da)[:, None] - np.pad(ua, ((0, 0), (0, 1))), 0.0)
    rb = np.where(keep, (ub.sum(axis=1) - db)[:, None] - np.pad(ub, ((0, 0), (0, 1))), 0.0)
    nn = np.append(n - sizes, n).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (trace + ra.sum(axis=0) * rb.sum(axis=0) / ((nn - 1) * (nn - 2))
               - 2.0 / (nn - 2) * np.einsum("ij,ij->j", ra, rb)) / (nn * (nn - 3))
    return np.where(nn >= MIN_BLOCK, out, np.nan)


def exact_cka(taps: list, pairs: list[tuple[int, int]], blocks: list[np.ndarray], chunk: int = 1000,
              cache_bytes: int = CACHE_BYTES, echo=None) -> tuple[np.ndarray, np.ndarray]:
    """Linear CKA on all n faces with the unbiased HSIC (Song et al. 2012), and its delete-one-block jackknife
    standard error, without an n x n matrix.

    ``taps``: callables, positions -> that tap's features of those faces (rows, ...). ``pairs``: (a, b)
    indices into ``taps``. ``blocks``: the jackknife blocks, a partition of range(n) (whole people each, see
    :func:`blocks_of`). Kernel products are computed chunk pair by chunk pair (the faces block by block, cut
    into chunks of ``chunk``; only chunk pairs on or above the diagonal, K being symmetric) on column-centred
    float32 features, summed in float64 per block pair: memory ~ chunk x chunk per tap, time ~ n^2 x width / 2.
    The estimate does not depend on ``chunk`` or on how faces are packed into blocks (up to rounding); the
    blocks only decide what the jackknife leaves out. Returns (CKA, SE), one per pair."""
    n = int(sum(len(b) for b in blocks))
    m = len(blocks)
    blk = np.empty(n, dtype=np.int64)
    for b, pos in enumerate(blocks):
        blk[pos] = b
    sizes = np.bincount(blk, minlength=m)
    order = np.concatenate([np.sort(np.asarray(pos, dtype=np.int64)) for pos in blocks])  # block by block
    cuts = list(range(0, n, max(1, int(chunk)))) + [n]
    chunks = []  # (faces, where each block's run starts in the chunk, those blocks)
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        bo = blk[order[lo:hi]]
        starts = np.flatnonzero(np.r_[True, bo[1:] != bo[:-1]])
        chunks.append((order[lo:hi], starts, bo[starts]))

    def raw(t: int, pos) -> np.ndarray:
        return np.asarray(taps[t](pos)).reshape(len(pos), -1)

    # column means (centring changes no unbiased HSIC and keeps float32 products accurate); chunks kept in
    # memory while they fit in cache_bytes, else re-read for each chunk pair
    need = sorted({t for p in pairs for t in p})
    every = sorted(set(pairs) | {(t, t) for t in need})
    means, cache, used = {}, {}, 0
    for t in need:
        total = 0.0
        for c, (pos, _, _) in enumerate(chunks):
            x = raw(t, pos)
            total = total + x.sum(axis=0, dtype=np.float64)
            if used + x.size * 4 <= cache_bytes:
                cache[t, c] = x.astype(np.float32)
                used += x.size * 4
        means[t] = total / n
    for (t, c), x in cache.items():
        x -= means[t].astype(np.float32)

    def centred(t: int, c: int) -> np.ndarray:
        if (t, c) in cache:
            return cache[t, c]
        return (raw(t, chunks[c][0]) - means[t]).astype(np.float32)

    u = {t: np.zeros((n, m)) for t in need}
    diag = {t: np.zeros(n) for t in need}
    s = {p: np.zeros((m, m)) for p in every}
    for ci, (pi, si, bi) in enumerate(chunks):
        left = {t: centred(t, ci) for t in need}
        for cj in range(ci, len(chunks)):
            pj, sj, bj = chunks[cj]
            g = {}
            for t in need:
                k = (left[t] @ (left[t] if cj == ci else centred(t, cj)).T).astype(np.float64)
                u[t][pi[:, None], bj[None, :]] += np.add.reduceat(k, sj, axis=1)
                if cj == ci:
                    diag[t][pi] = np.diag(k)
                else:
                    u[t][pj[:, None], bi[None, :]] += np.add.reduceat(k, si, axis=0).T
                g[t] = k
            for p in every:
                v = np.add.reduceat(np.add.reduceat(g[p[0]] * g[p[1]], si, axis=0), sj, axis=1)
                s[p][np.ix_(bi, bj)] += v
                if cj != ci:
                    s[p][np.ix_(bj, bi)] += v.T
        if echo:
            echo(f"  chunk {ci + 1}/{len(chunks)}: {len(pi)} faces")
    h = {p: _unbiased_terms(s[p], u[p[0]], u[p[1]], diag[p[0]], diag[p[1]], blk, sizes) for p in every}
    est, se = [], []
    for a, b in pairs:
        den = np.sqrt(h[a, a] * h[b, b])
        with np.errstate(invalid="ignore", divide="ignore"):
            r = np.where(den > 0, h[a, b] / np.where(den > 0, den, 1.0), np.nan)
        est.append(r[-1])
        loo = r[:-1]
        se.append(np.sqrt((m - 1) / m * np.sum((loo - loo.mean()) ** 2)) if m >= 2 else np.nan)
    return np.array(est, dtype=np.float64), np.array(se, dtype=np.float64)


def blocks_of(n: int, blocks: int = JACKKNIFE_BLOCKS, seed: int = 0, groups=None) -> list[np.ndarray]:
    """The jackknife blocks: range(n) packed into at most ``blocks`` near-equal blocks of whole groups (one
    per position; '' = its own group), none under :data:`MIN_BLOCK` faces. Groups are taken largest first,
    ties in a seeded order, each into the block with the fewest faces so far (so a person never spans two
    blocks and the blocks stay near-equal); with no ``groups`` every face is its own group. Each block's
    positions are sorted."""
    if n < MIN_BLOCK:
        raise FeatlabError(f"CKA needs at least {MIN_BLOCK} faces, not {n}")
    if groups is None:
        codes = np.arange(n)
    else:
        labels = np.array([str(g) if str(g) else f"\0face{i}" for i, g in enumerate(groups)], dtype=object)
        _, codes = np.unique(labels, return_inverse=True)
        codes = codes.ravel()
    count = np.bincount(codes)
    order = np.random.default_rng(int(seed)).permutation(len(count))
    order = order[np.argsort(-count[order], kind="stable")]  # largest first, ties in the seeded order
    m = max(1, min(int(blocks), len(count), n // MIN_BLOCK))
    while True:
        heap = [(0, b) for b in range(m)]
        home = np.empty(len(count), dtype=np.int64)
        for gi in order:
            load, b = heapq.heappop(heap)
            home[gi] = b
            heapq.heappush(heap, (load + int(count[gi]), b))
        where = home[codes]
        if m == 1 or min(load for load, _ in heap) >= MIN_BLOCK:
            return [np.flatnonzero(where == b) for b in range(m)]
        m -= 1


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
    from ..features.featureio import pool_np

    return pool_np(store.read(key, rows), pool).reshape(len(rows), -1)


def similarity(features: list, layers=None, pool: str | None = None, block: int = 1000, seed: int = 0,
               split: str = "all", out: Path | None = None, results_root: Path | None = None, echo=None) -> dict:
    """Linear CKA between every pair of taps of one or two features files (see the module doc).

    Returns ``{"taps": [row taps, column taps], "cka", "se", "n", "blocks", "seconds", "dir", "files"}``."""
    from ..paths import dataset_key, feature_set
    from ..features.store import FeatureStore

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
        from ..scoring.scores import groups_of

        lab = stores[0].labels()
        group_of = dict(zip(lab["image_id"].astype(str), groups_of(lab)))
        parts = blocks_of(len(ids), JACKKNIFE_BLOCKS, seed, [group_of.get(str(i), "") for i in ids])
        readers = [(lambda pos, s=s, k=k, r=r: _features(s, k, r[pos], pool))
                   for s, r, keys in zip(stores, rows, taps) for k in keys]
        nr, nc = len(taps[0]), len(taps[-1])
        if len(stores) == 1:  # one file: the matrix is symmetric
            pairs = [(i, j) for i in range(nr) for j in range(i, nr)]
        else:
            pairs = [(i, nr + j) for i in range(nr) for j in range(nc)]
        est, err = exact_cka(readers, pairs, parts, chunk=block, echo=echo)
        m, se = np.full((nr, nc), np.nan), np.full((nr, nc), np.nan)
        for (i, j), v, e in zip(pairs, est, err):
            j = j - nr if len(stores) == 2 else j
            m[i, j], se[i, j] = v, e
            if len(stores) == 1:
                m[j, i], se[j, i] = v, e
        seconds = time.perf_counter() - t0
        idents = [feature_set(s.attrs) for s in stores]
        record = {
            "estimator": ESTIMATOR,
            "files": [{"path": str(s.path), "backbone": i["backbone"], "dataset_key": dataset_key(i),
                       "model_sha256": i["model_sha256"], "manifest_sha256": i["manifest_sha256"],
                       "preprocessing": i["preprocessing"], "taps": t,
                       "shapes": {k: list(s.array(k).shape[1:]) for k in t}}
                      for s, i, t in zip(stores, idents, taps)],
            "pool": pool or "flatten", "split": split, "chunk": int(block), "seed": int(seed),
            "faces": int(len(ids)), "blocks": len(parts), "block_sizes": sorted({len(p) for p in parts}),
            "rows_unused": [int(s.nrows - len(ids)) for s in stores],  # not in both files, or not of the split
        }
    finally:
        for s in stores:
            s.close()
    digest = hashlib.sha256(json.dumps({**{k: v for k, v in record.items() if k != "chunk"},  # chunk: same figures
                                        "files": [{k: v for k, v in f.items() if k != "path"}
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
            f"{record['pool']} (± jackknife SE over {record['blocks']} blocks of people)")


def similarity_png(m: np.ndarray, rows: list[str], cols: list[str], path, se=None, title: str = "") -> Path:
    """Heatmap of a CKA matrix (0..1, network order: input at the top / left), each cell's value (and its
    standard error when given) written in it."""
    from ..scoring.plots import _figure, _save

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
