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

Complete linkage is exact and cheap when run separately inside each
connected component of the radius graph at the same distance (a complete-
linkage group is a clique of that graph): a radius search over all faces,
then scipy's ``linkage(method="complete")`` per component.

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
    near_duplicates_across_after: int = 0
    seconds_embedding: float = 0.0
    seconds_grouping: float = 0.0

    def lines(self) -> list[str]:
        head = (f"face groups (dlib-rec embedding, complete linkage < {LINK_DISTANCE:g}): {self.groups:,} groups of 2+ "
                f"holding {self.grouped_faces:,} of {self.faces:,} faces (largest {self.largest})")
        out = [head]
        if self.failed:
            out.append("  no embedding (own group): " + ", ".join(f"{n} {r}" for r, n in self.failed.items()))
        out.append(f"  the split before grouping had put {self.same_group_across:,} of {self.same_group_pairs:,} "
                   f"same-group pairs on two sides ({self.test_faces_leaking:,} of {self.test_faces:,} test faces had "
                   f"a training face of their group), and {self.near_duplicates_across:,} of "
                   f"{self.near_duplicate_pairs:,} near-duplicate pairs (distance < {NEAR_DUPLICATE:g})")
        if self.resplit:
            out.append(f"  re-split by group: 0 same-group pairs and {self.near_duplicates_across_after:,} near-duplicate "
                       f"pairs on two sides")
        out.append(f"  {self.seconds_embedding:.0f} s embedding, {self.seconds_grouping:.1f} s grouping")
        return out


def embed_faces(paths: list[str], model: str | None = None, batch: int = 64, progress=None):
    """dlib-rec embedding of every image (aligned crops): ``(embeddings (n, 128) float32, {index: reason})``.

    Rows of faces whose chip cannot be cut are NaN and named in the dict, as are non-finite embeddings.
    """
    from .backbones import Backbone
    from .faces import prepare

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


def close_pairs(emb: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs i < j of finite embeddings at distance <= ``radius``: (i, j, distance)."""
    from sklearn.neighbors import NearestNeighbors

    ok = np.flatnonzero(np.isfinite(emb).all(axis=1))
    if len(ok) < 2:
        e = np.zeros(0, dtype=np.int64)
        return e, e, np.zeros(0)
    x = emb[ok].astype(np.float64)
    dist, nbr = NearestNeighbors(radius=radius).fit(x).radius_neighbors(x, radius=radius)
    rows = np.repeat(np.arange(len(ok)), [len(a) for a in nbr])
    cols = np.concatenate(nbr) if len(nbr) else np.zeros(0, dtype=np.int64)
    d = np.concatenate(dist) if len(dist) else np.zeros(0)
    keep = rows < cols
    return ok[rows[keep]].astype(np.int64), ok[cols[keep]].astype(np.int64), d[keep]


def components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Connected components of ``n`` nodes joined by edges (i, j): a label per node."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    g = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(n, n))
    return connected_components(g, directed=False)[1]


def cluster_faces(emb: np.ndarray, threshold: float = LINK_DISTANCE, method: str = "complete") -> np.ndarray:
    """Cluster label per face: ``method`` linkage cut at ``threshold`` (NaN rows: clusters of their own).

    Run per connected component of the radius graph at ``threshold``, which
    gives the same clusters as one run over all faces for complete (and
    single) linkage, at a fraction of the memory.
    """
    from scipy.cluster.hierarchy import fcluster, linkage

    n = len(emb)
    i, j, _ = close_pairs(emb, threshold)
    comp = components(n, i, j)
    labels = np.arange(n)
    order = np.argsort(comp, kind="stable")
    bounds = np.flatnonzero(np.diff(comp[order])) + 1
    for members in np.split(order, bounds):
        if len(members) < 2:
            continue
        if len(members) == 2:
            labels[members] = members[0]
            continue
        z = linkage(emb[members].astype(np.float64), method=method)
        sub = fcluster(z, threshold, criterion="distance")
        for k in np.unique(sub):
            labels[members[sub == k]] = members[sub == k][0]
    return labels


def group_ids(image_ids, labels: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """``face:<smallest image_id of the cluster>`` per face; '' where the face had no embedding."""
    ids = np.asarray([str(x) for x in image_ids], dtype=object)
    smallest: dict[int, str] = {}
    for iid, lab, good in zip(ids, labels, ok):
        if good and (lab not in smallest or iid < smallest[lab]):
            smallest[lab] = iid
    return np.asarray([f"face:{smallest[lab]}" if good else "" for lab, good in zip(labels, ok)], dtype=object)


def group_by_face(df, seed: int = 0, resplit: bool = True, model: str | None = None, progress=None,
                  embeddings: np.ndarray | None = None):
    """Give ``df`` face groups (and, with ``resplit``, a new split by group); return ``(df, FaceGroupReport)``.

    ``df`` is a manifest frame with the split made before grouping (what the
    report measures; rows without a split are compared by ``fold``). ``embeddings`` skips the backbone (rows in ``df`` order).
    """
    from .manifest import assign_splits

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
    fold = df["fold"].astype("string").fillna("").to_numpy() if "fold" in df else np.full(len(df), "")
    before = np.where(df["split"].astype(str).to_numpy() != "", df["split"].astype(str).to_numpy(),
                      np.char.add("fold", fold.astype(str))).astype(object)
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
    df["group"] = new
    if resplit:
        df = assign_splits(df, seed=seed)
        after = df["split"].to_numpy()
        rep.resplit = True
        rep.near_duplicates_across_after = int(np.sum(after[ni] != after[nj]))
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
