"""Face groups: identities for datasets that have none, from the faces themselves.

``featlab prepare --group-by-face`` gives every face of a manifest a ``group``
so that near-duplicates and the same person in the same photo session never
sit on both sides of a split.

Signal: dlib's 128-d face descriptor (backbone ``dlib-rec``, tap
``embedding``, on the 150x150 dlib chip of each aligned crop), compared by
Euclidean distance.

Rule: **complete linkage at distance** :data:`LINK_DISTANCE` (0.35): faces form
a group only when *every* pair inside it is closer than 0.35, so groups cannot
chain. Measured on the 8,000 real faces of ``../shared/data/utkface-dev``
(``bench/grouping.py``, ``bench/RESULTS.md``):

- a face and its mirrored, slightly re-cropped copy lie 0.18-0.21 apart
  (median; 95th percentile 0.23-0.29, the largest 0.43) at every age, so a
  threshold below ~0.3 misses real near-duplicates;
- random pairs of different faces of the same age group are rarely that
  close, *except infants*: 1 % of random pairs of 0-2-year-olds lie within
  0.32 (adults: within 0.56-0.59). Single linkage (connected components of a
  radius graph) therefore chains infants: at 0.3 one group holds 184 of the
  541 infants, at 0.35 437 of them, and dlib's own 0.6 puts 7,957 of the
  8,000 faces in one group;
- complete linkage at 0.35 keeps 99.8 % of the copies with their original,
  its largest group has 8 faces, and after splitting by its groups no test
  face has a training face within 0.2; the 36 test faces left with one within
  0.3 are 1-4-year-olds (but two), at the distances of random infant pairs.

The image similarity of the chips (grey 24x24 correlation, mirror-aware) was
measured too and not used: random pairs reach the similarity of most copies
(random 99th percentile 0.86-0.94, copies' 5th percentile 0.62-0.78).

Complete linkage is exact when run separately inside each connected
component of the radius graph at the same distance (a complete-linkage group
is a clique of that graph): a radius search over all faces (scikit-learn,
queried in blocks of rows: memory holds the close pairs, never an N x N
matrix; brute force, since on 128-d descriptors a ball tree is slower), then
scipy's ``linkage(method="complete")`` per component of up to
:data:`DENSE_MAX` faces, and above that :func:`sparse_complete_linkage` on the
component's close pairs (mutual-nearest-neighbour rounds, memory ~ pairs).
Both give the groups of one full linkage (``tests/test_groups.py``; on the
8,000 real embeddings identical to the code before, ``bench/grouping_scale.py``).
The search time still grows with N^2 (``bench/RESULTS.md``: 8,000 and 100,000).

What it cannot do, and says (:meth:`FaceGroupReport.lines`): infants. The
report counts groups and grouped faces per age band and warns when groups are
mostly 0-2-year-olds, whose groups may join different babies. The leak
counts after the split are measured on the manifest as written
(:meth:`FaceGroupReport.measure_written`: its ``split`` and ``group``
columns read back from disk), not assumed.

A group's id is ``face:`` + the smallest ``image_id`` among its members (also
for a face alone): a stable string that does not depend on row order. Faces
whose chip cannot be cut keep an empty group (a group of their own). Rows that
already had a group and gain no face link keep it; groups joined by face links
become one ``face:`` group.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

LINK_DISTANCE = 0.35  # complete linkage: every pair in a group closer than this
NEAR_DUPLICATE = 0.2  # reported separately: (near-)identical images
AGE_BANDS = ((0, 2), (3, 12), (13, 19), (20, 39), (40, 59), (60, None))  # the report's age bands (years)
INFANT_MAX_AGE = 2  # a group is "mostly infants" when more than half its faces are at most this old


@dataclass
class FaceGroupReport:
    """What ``--group-by-face`` found; ``lines()`` is what ``featlab prepare`` prints."""

    faces: int = 0
    failed: dict[str, int] = field(default_factory=dict)  # reason -> faces without an embedding
    groups: int = 0  # groups of 2+ faces
    grouped_faces: int = 0
    largest: int = 0
    near_duplicate_pairs: int = 0  # pairs closer than NEAR_DUPLICATE
    near_duplicates_across: int = 0  # ... that the split before grouping put on two sides
    same_group_pairs: int = 0  # pairs inside face groups
    same_group_across: int = 0  # ... that the split before grouping put on two sides
    test_faces_leaking: int = 0  # test faces with a train face in their group, before grouping
    test_faces: int = 0
    resplit: bool = False
    near_duplicates_across_after: int | None = None  # measured on the written manifest (measure_written)
    same_group_across_after: int | None = None
    test_faces_leaking_after: int | None = None
    written: str = ""
    bands: list = field(default_factory=list)  # per age band: band, faces, grouped_faces, groups (by majority band)
    infant_groups: int = 0  # groups of 2+ where more than half the faces are 0-2 years old
    infant_group_faces: int = 0
    seconds_embedding: float = 0.0
    seconds_grouping: float = 0.0
    near_pairs: list = field(default_factory=list, repr=False)  # (image_id, image_id) of the near-duplicate pairs

    def lines(self) -> list[str]:
        head = (f"face groups (dlib-rec embedding, complete linkage < {LINK_DISTANCE:g}): {self.groups:,} groups of 2+ "
                f"holding {self.grouped_faces:,} of {self.faces:,} faces (largest {self.largest})")
        out = [head]
        if self.bands:
            out.append("  by age band (faces in groups of 2+ / faces; groups of 2+ by their majority band): "
                       + ", ".join(f"{b['band']} {b['grouped_faces']:,}/{b['faces']:,} ({b['groups']:,})"
                                   for b in self.bands))
        if self.infant_groups:
            out.append(f"  warning: {self.infant_groups:,} groups ({self.infant_group_faces:,} faces) are mostly "
                       f"infants (0-{INFANT_MAX_AGE} years): dlib-rec does not tell infants apart (on utkface-dev 1 % "
                       "of random pairs of 0-2-year-olds lie within 0.32), so these groups may join different babies; "
                       "they stay on one side of the split, but they are not identities")
        if self.failed:
            out.append("  no embedding (own group): " + ", ".join(f"{n} {r}" for r, n in self.failed.items()))
        out.append(f"  the split before grouping had put {self.same_group_across:,} of {self.same_group_pairs:,} "
                   f"same-group pairs on two sides ({self.test_faces_leaking:,} of {self.test_faces:,} test faces had "
                   f"a training face of their group), and {self.near_duplicates_across:,} of "
                   f"{self.near_duplicate_pairs:,} near-duplicate pairs (distance < {NEAR_DUPLICATE:g})")
        what = "re-split by group" if self.resplit else "sides kept (the dataset's own split or folds)"
        if self.same_group_across_after is None:
            out.append(f"  {what}; the written manifest was not read back (no after-split count)")
        else:
            out.append(f"  {what}, counted on the written manifest {self.written}: {self.same_group_across_after:,} "
                       f"same-group pairs and {self.near_duplicates_across_after:,} of {self.near_duplicate_pairs:,} "
                       f"near-duplicate pairs on two sides; {self.test_faces_leaking_after:,} test faces with a "
                       "training face of their group")
        out.append(f"  {self.seconds_embedding:.0f} s embedding, {self.seconds_grouping:.1f} s grouping")
        return out

    def measure_written(self, manifest) -> FaceGroupReport:
        """Count, on the manifest as written (its ``split`` and ``group`` columns, read back from disk; the fold
        where a row has no split), the same-group pairs and near-duplicate pairs on two sides and the test faces
        with a training face of their group."""
        from ..data.manifest import read_manifest

        df = read_manifest(manifest)
        side = _sides(df)
        grouped = df["group"].astype(str).to_numpy() != ""
        frame = df.loc[grouped, ["group"]].assign(side=side[grouped])
        per = frame.groupby(["group", "side"]).size()
        n_group = per.groupby(level=0).sum()
        pairs = lambda k: k * (k - 1) // 2  # noqa: E731
        self.same_group_across_after = int(pairs(n_group).sum() - pairs(per).sum())
        sides = per.unstack(fill_value=0)
        if "test" in sides and "train" in sides:
            self.test_faces_leaking_after = int(sides.loc[sides["train"] > 0, "test"].sum())
        else:
            self.test_faces_leaking_after = 0
        where = dict(zip(df["image_id"].astype(str), side))
        self.near_duplicates_across_after = int(sum(where.get(a) != where.get(b) for a, b in self.near_pairs))
        self.written = str(manifest)
        return self


def _sides(df) -> np.ndarray:
    """Per row: its split, or ``fold<k>`` where it has none (datasets with folds)."""
    fold = df["fold"].astype("string").fillna("").to_numpy() if "fold" in df else np.full(len(df), "")
    split = df["split"].astype(str).to_numpy()
    return np.where(split != "", split, np.char.add("fold", fold.astype(str))).astype(object)


def age_bands(age, labels: np.ndarray) -> tuple[list[dict], int, int]:
    """(per age band: faces, faces in groups of 2+, groups of 2+ whose majority is in the band; mostly-infant
    groups; their faces). Faces without an age form the band ``unknown``; a tie between bands goes to the younger."""
    age = np.asarray(age, dtype=np.float64)
    names = [f"{lo}-{hi}" if hi is not None else f"{lo}+" for lo, hi in AGE_BANDS]
    starts = np.array([lo for lo, _ in AGE_BANDS], dtype=np.float64)  # band k: starts[k] <= age < starts[k + 1]
    ok = np.isfinite(age) & (age >= 0)
    band = np.where(ok, np.searchsorted(starts, np.where(ok, age, 0.0), side="right") - 1, len(AGE_BANDS))
    sizes = np.bincount(labels, minlength=len(labels))
    multi = sizes[labels] > 1
    nb = len(AGE_BANDS) + 1
    counts = np.zeros((len(labels), nb), dtype=np.int64)
    np.add.at(counts, (labels[multi], band[multi]), 1)
    roots = np.flatnonzero(counts.sum(axis=1) > 0)
    majority = counts[roots].argmax(axis=1)
    infants = (age <= INFANT_MAX_AGE) & np.isfinite(age)
    inf_count = np.bincount(labels[multi & infants], minlength=len(labels))
    mostly = roots[inf_count[roots] * 2 > sizes[roots]]
    out = []
    for k, name in enumerate(names + ["unknown"]):
        faces = int((band == k).sum())
        if faces or k < len(AGE_BANDS):
            out.append({"band": name, "faces": faces, "grouped_faces": int((multi & (band == k)).sum()),
                        "groups": int((majority == k).sum())})
    return out, len(mostly), int(sizes[mostly].sum())


def embed_faces(paths: list[str], model: str | None = None, batch: int = 64, progress=None):
    """dlib-rec embedding of every image (aligned crops): ``(embeddings (n, 128) float32, {index: reason})``.

    Rows of faces whose chip cannot be cut are NaN and named in the dict, as are non-finite embeddings.
    """
    from ..backbones.registry import Backbone
    from ..data.faces import prepare

    bb = Backbone("dlib-rec", model)
    runner = bb.runner([bb.tap("embedding")])
    n = len(paths)
    emb = np.full((n, 128), np.nan, dtype=np.float32)
    failed: dict[int, str] = {}
    for start in range(0, n, batch):
        idx, chips = [], []
        for i in range(start, min(start + batch, n)):
            chip, why = prepare(str(paths[i]), bb.geometry, False)
            if chip is None:
                failed[i] = why
            else:
                idx.append(i)
                chips.append(chip)
        if chips:
            emb[idx] = runner.run(np.stack(chips))["embedding"]
        if progress:
            progress(min(start + batch, n), n)
    for i in np.flatnonzero(~np.isfinite(emb).all(axis=1)):
        failed.setdefault(int(i), "non-finite embedding")
        emb[i] = np.nan
    return emb, failed


def close_pairs(emb: np.ndarray, radius: float, algorithm: str = "brute",
                chunk: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs i < j of finite embeddings at distance <= ``radius``: (i, j, distance), sorted by (i, j).

    scikit-learn's ``NearestNeighbors`` radius search, queried ``chunk`` rows at a time, so that memory holds
    the pairs found and one block of distances (scikit-learn's own chunking), never an N x N matrix; distances
    are recomputed exactly in float64 and cut at ``radius``.

    ``brute`` (BLAS) is the default because it is the fastest exact search on these descriptors: their
    intrinsic dimension is high, so a tree prunes little (``ball_tree`` is slower than brute force on the
    8,000 real faces, ``bench/grouping_scale.py``). Time grows with N^2, memory with N and the pairs."""
    from sklearn.neighbors import NearestNeighbors

    ok = np.flatnonzero(np.isfinite(emb).all(axis=1))
    e = np.zeros(0, dtype=np.int64)
    if len(ok) < 2:
        return e, e, np.zeros(0)
    x = emb[ok].astype(np.float64)
    nn = NearestNeighbors(radius=radius, algorithm=algorithm).fit(x)
    ii, jj = [], []
    for a in range(0, len(x), chunk):
        nbr = nn.radius_neighbors(x[a : a + chunk], radius=radius * (1 + 1e-6), return_distance=False)
        rows = np.repeat(np.arange(a, a + len(nbr)), [len(v) for v in nbr])
        cols = np.concatenate(nbr).astype(np.int64) if len(nbr) else e
        keep = rows < cols
        ii.append(rows[keep])
        jj.append(cols[keep])
    del nn
    i, j = np.concatenate(ii), np.concatenate(jj)
    d = np.empty(len(i))
    for a in range(0, len(i), 1 << 15):  # in blocks: never a (pairs x 128) difference array at once
        diff = x[i[a : a + (1 << 15)]] - x[j[a : a + (1 << 15)]]
        d[a : a + (1 << 15)] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    keep = d <= radius
    i, j, d = i[keep], j[keep], d[keep]
    order = np.lexsort((j, i))
    return ok[i[order]].astype(np.int64), ok[j[order]].astype(np.int64), d[order]


def components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Connected components of ``n`` nodes joined by edges (i, j): a label per node."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    g = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(n, n))
    return connected_components(g, directed=False)[1]


DENSE_MAX = 2000  # components up to this size: scipy's linkage on their dense distances (16 MB at 2,000)


def sparse_complete_linkage(n: int, i: np.ndarray, j: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Complete-linkage clusters of ``n`` points cut at the radius the close pairs (i, j, d) were found with.

    Only pairs within the cut are known; every other pair is farther, so a cluster pair with a missing cross
    pair is farther too (complete linkage takes the maximum) and never merges. Complete linkage is reducible,
    so merging every pair of mutual nearest neighbours at once, round after round, gives the same clusters as
    merging the closest pair first (ties aside). Each round is a few sorts of numpy arrays of the surviving
    edges: memory grows with the close pairs, not with the square of the component.
    Returns a label per point: the smallest index of its cluster."""
    u = np.minimum(i, j).astype(np.int64)
    v = np.maximum(i, j).astype(np.int64)
    w = np.asarray(d, dtype=np.float64)
    node = np.arange(n)  # current cluster of each point
    m = n
    while len(u):
        # each cluster's nearest neighbour (ties: the smaller id)
        a, b, ww = np.concatenate([u, v]), np.concatenate([v, u]), np.concatenate([w, w])
        order = np.lexsort((b, ww, a))
        a, b = a[order], b[order]
        first = np.r_[True, a[1:] != a[:-1]]
        nn = np.full(m, -1, dtype=np.int64)
        nn[a[first]] = b[first]
        x = a[first]
        pair = x[(nn[nn[x]] == x) & (x < nn[x])]  # mutual nearest neighbours, each pair once
        new = np.arange(m)
        new[nn[pair]] = pair
        _, new = np.unique(new, return_inverse=True)
        count = np.bincount(new)  # clusters of the last round in each new one (1 or 2)
        node = new[node]
        m = len(count)
        uu, vv = new[u], new[v]
        keep = uu != vv
        uu, vv, w = np.minimum(uu, vv)[keep], np.maximum(uu, vv)[keep], w[keep]
        if not len(uu):
            break
        order = np.lexsort((vv, uu))
        uu, vv, w = uu[order], vv[order], w[order]
        start = np.flatnonzero(np.r_[True, (uu[1:] != uu[:-1]) | (vv[1:] != vv[:-1])])
        u, v = uu[start], vv[start]
        seen = np.diff(np.r_[start, len(uu)])
        w = np.maximum.reduceat(w, start)
        full = seen == count[u] * count[v]  # every cross pair known (within the cut): the maximum is the distance
        u, v, w = u[full], v[full], w[full]
    smallest = np.full(m, n, dtype=np.int64)
    np.minimum.at(smallest, node, np.arange(n))
    return smallest[node]


def cluster_faces(emb: np.ndarray, threshold: float = LINK_DISTANCE, method: str = "complete",
                  dense_max: int = DENSE_MAX) -> np.ndarray:
    """Cluster label per face (the smallest row index of its cluster): ``method`` linkage cut at ``threshold``
    (NaN rows: clusters of their own).

    The pairs closer than ``threshold`` come from a ball-tree radius search (:func:`close_pairs`); linkage runs
    per connected component of that graph, which gives the same clusters as one run over all faces for complete
    (and single) linkage: scipy's ``linkage`` on a component of up to ``dense_max`` faces, and above that
    (complete linkage) :func:`sparse_complete_linkage` on the component's close pairs, whose memory grows with
    the pairs, not with the square of the component."""
    from scipy.cluster.hierarchy import fcluster, linkage

    n = len(emb)
    i, j, d = close_pairs(emb, threshold)
    comp = components(n, i, j)
    labels = np.arange(n)
    order = np.argsort(comp, kind="stable")
    bounds = np.flatnonzero(np.diff(comp[order])) + 1
    big = []
    for members in np.split(order, bounds):
        if len(members) < 2:
            continue
        if len(members) == 2:
            labels[members] = members[0]
            continue
        if len(members) > dense_max and method in ("complete", "single"):
            big.append(members)
            continue
        z = linkage(emb[members].astype(np.float64), method=method)
        sub = fcluster(z, threshold, criterion="distance")
        for k in np.unique(sub):
            labels[members[sub == k]] = members[sub == k][0]
    for members in big:
        inside = np.zeros(n, dtype=bool)
        inside[members] = True
        e = inside[i]  # both ends lie in the same component
        local = np.full(n, -1, dtype=np.int64)
        local[members] = np.arange(len(members))
        if method == "single":
            sub = np.zeros(len(members), dtype=np.int64)  # one connected component = one single-linkage cluster
        else:
            sub = sparse_complete_linkage(len(members), local[i[e]], local[j[e]], d[e])
        labels[members] = members[sub]
    return labels


def group_ids(image_ids, labels: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """``face:<smallest image_id of the cluster>`` per face; '' where the face had no embedding."""
    ids = np.asarray([str(x) for x in image_ids], dtype=object)
    smallest: dict[int, str] = {}
    for iid, lab, good in zip(ids, labels, ok):
        if good and (lab not in smallest or iid < smallest[lab]):
            smallest[lab] = iid
    return np.asarray([f"face:{smallest[lab]}" if good else "" for lab, good in zip(labels, ok)], dtype=object)


def group_prepared(df, result, seed: int = 0):
    """The prepare step's grouping: :func:`group_by_face` on an adapter's manifest ``df`` (re-split unless the
    dataset has its own splits), with a progress bar; its report lands in ``result.face_groups``. Returns the
    grouped frame."""
    from ..progress import Bar

    with Bar(len(df), "embed faces for grouping", "face") as bar:
        df, result.face_groups = group_by_face(df, seed=seed, resplit=not result.has_splits,
                                               progress=lambda done, total: bar(done - bar.done))
    return df


def group_by_face(df, seed: int = 0, resplit: bool = True, model: str | None = None, progress=None,
                  embeddings: np.ndarray | None = None):
    """Give ``df`` face groups (and, with ``resplit``, a new split by group); return ``(df, FaceGroupReport)``.

    ``df`` is a manifest frame with the split made before grouping (what the
    report measures; rows without a split are compared by ``fold``). ``embeddings`` skips the backbone (rows in ``df`` order).
    """
    from ..data.manifest import assign_splits

    df = df.copy()
    rep = FaceGroupReport(faces=len(df))
    t0 = time.perf_counter()
    if embeddings is None:
        emb, failed = embed_faces(list(df["path"]), model=model, progress=progress)
    else:
        emb = np.asarray(embeddings, dtype=np.float32)
        failed = {int(k): "non-finite embedding" for k in np.flatnonzero(~np.isfinite(emb).all(axis=1))}
    for why in failed.values():
        rep.failed[why] = rep.failed.get(why, 0) + 1
    t1 = time.perf_counter()
    ok = np.isfinite(emb).all(axis=1)
    labels = cluster_faces(emb)
    # rows that share an existing group stay together: join their clusters
    old = df["group"].astype(str).to_numpy() if "group" in df else np.full(len(df), "")
    ei, ej = _same_group_edges(old)
    if len(ei):
        labels = components(len(df), np.concatenate([ei, np.arange(len(df))]), np.concatenate([ej, labels]))
    ids = group_ids(df["image_id"], labels, ok | (old != ""))
    sizes = np.bincount(labels)
    multi = sizes[labels] > 1
    face_linked = multi & ~_same_old(old, labels) if (old != "").any() else multi
    new = np.where(face_linked | (old == ""), ids, old)
    new[~ok & (old == "") & ~multi] = ""
    rep.groups = len(np.unique(labels[multi]))
    rep.grouped_faces = int(multi.sum())
    rep.largest = int(sizes.max()) if len(sizes) else 0
    # the sides before grouping: the split, or the fold where the dataset has folds (Adience)
    before = _sides(df)
    gi, gj = _pairs_within(labels)
    rep.same_group_pairs = len(gi)
    rep.same_group_across = int(np.sum(before[gi] != before[gj]))
    test = before == "test"
    rep.test_faces = int(test.sum())
    leak = np.zeros(len(df), dtype=bool)
    for a, b in ((gi, gj), (gj, gi)):
        hit = (before[a] == "test") & (before[b] == "train")
        leak[a[hit]] = True
    rep.test_faces_leaking = int(leak.sum())
    ni, nj, _ = close_pairs(emb, NEAR_DUPLICATE)
    rep.near_duplicate_pairs = len(ni)
    rep.near_duplicates_across = int(np.sum(before[ni] != before[nj]))
    iid = df["image_id"].astype(str).to_numpy()
    rep.near_pairs = list(zip(iid[ni].tolist(), iid[nj].tolist()))
    rep.bands, rep.infant_groups, rep.infant_group_faces = age_bands(df["age"].to_numpy(dtype=np.float64), labels)
    df["group"] = new
    if resplit:
        df = assign_splits(df, seed=seed)
        rep.resplit = True
    rep.seconds_embedding = t1 - t0
    rep.seconds_grouping = time.perf_counter() - t1
    return df, rep


def _same_group_edges(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges chaining the rows of each non-empty group."""
    idx = np.flatnonzero(groups != "")
    if len(idx) < 2:
        e = np.zeros(0, dtype=np.int64)
        return e, e
    order = idx[np.argsort(groups[idx], kind="stable")]
    same = groups[order][1:] == groups[order][:-1]
    return order[:-1][same], order[1:][same]


def _same_old(old: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per row: its cluster is exactly one existing non-empty group (no face link added anything)."""
    import pandas as pd

    frame = pd.DataFrame({"label": labels, "old": old})
    per = frame.groupby("label")["old"].agg(lambda s: s.iloc[0] if (s != "").all() and s.nunique() == 1 else None)
    return frame["label"].map(per).notna().to_numpy()


def _pairs_within(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (i, j), i < j, of rows with the same label."""
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    ii, jj = [], []
    for members in np.split(order, bounds):
        if len(members) > 1:
            a, b = np.triu_indices(len(members), k=1)
            ii.append(members[a])
            jj.append(members[b])
    if not ii:
        e = np.zeros(0, dtype=np.int64)
        return e, e
    return np.concatenate(ii), np.concatenate(jj)
