"""Measure the signals and rules behind ``featlab prepare --group-by-face`` on real UTKFace faces.

For every face of ``../shared/data/utkface-dev``: the dlib-rec embedding and a
24x24 grey chip thumbnail. For every ``--copy-every``-th face also a *mirrored,
slightly re-cropped copy* (flip, crop a random box of 90-97 % of the side
shifted by up to 6 px, resize back to 200x200): a known near-duplicate. Then:

1. per age group (0-2, 3-12, 13-19, 20-39, 40-59, 60+): distance of (face, its
   copy) vs random pairs of the same age group (different images; almost
   always different people), for the embedding and for the chip similarity;
2. per linkage (single = connected components of a radius graph, average,
   complete) and threshold: copies kept with their original (clustering the
   originals and the copies together), largest group, faces in groups of 2+,
   the same for infants (0-2), time; and the leak left after re-splitting the
   8,000 originals by group: test faces with a training face within 0.2 / 0.3;
3. today's image-by-image split (seed 0): test faces with a training face
   within 0.2 / 0.3 / 0.4 / 0.6 (the issue's figures);
4. the chosen rule end to end (``featlab.features.facegroups.group_by_face`` on the
   cached embeddings): its report and its time.

Signals are cached in ``$FEATLAB_BENCH_DIR/grouping-signals.npz`` (first run
~4 min on 2 busy cores). ``--no-record`` to skip appending to RESULTS.md.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

AGE_GROUPS = ((0, 2), (3, 12), (13, 19), (20, 39), (40, 59), (60, 200))
RULES = [("single", t) for t in (0.25, 0.3, 0.35, 0.4, 0.6)] + \
        [("average", t) for t in (0.3, 0.35, 0.4)] + [("complete", t) for t in (0.3, 0.35, 0.4, 0.45)]
THUMB = 24


def mirrored_recrop(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    import cv2

    h, w = image.shape[:2]
    flipped = image[:, ::-1]
    s = rng.uniform(0.90, 0.97)
    ch, cw = round(h * s), round(w * s)
    y0 = int(np.clip((h - ch) // 2 + rng.integers(-6, 7), 0, h - ch))
    x0 = int(np.clip((w - cw) // 2 + rng.integers(-6, 7), 0, w - cw))
    crop = flipped[y0 : y0 + ch, x0 : x0 + cw]
    return np.ascontiguousarray(cv2.resize(crop, (w, h), interpolation=cv2.INTER_LINEAR))


def thumb_vector(chip: np.ndarray) -> np.ndarray:
    import cv2

    grey = cv2.cvtColor(np.ascontiguousarray(chip), cv2.COLOR_RGB2GRAY).astype(np.float32)
    t = cv2.resize(grey, (THUMB, THUMB), interpolation=cv2.INTER_AREA).ravel()
    t -= t.mean()
    return t / max(float(np.linalg.norm(t)), 1e-12)


def mirror(thumbs: np.ndarray) -> np.ndarray:
    return thumbs.reshape(-1, THUMB, THUMB)[:, :, ::-1].reshape(len(thumbs), -1)


def chip_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum(np.einsum("ij,ij->i", a, b), np.einsum("ij,ij->i", a, mirror(b)))


def face_signals(paths, progress=False):
    """Embedding (as featlab.features.facegroups.embed_faces computes it) and chip thumbnail per image."""
    from featlab.backbones.registry import Backbone
    from featlab.data.faces import prepare

    bb = Backbone("dlib-rec")
    runner = bb.runner([bb.tap("embedding")])
    emb = np.full((len(paths), 128), np.nan, np.float32)
    thumbs = np.zeros((len(paths), THUMB * THUMB), np.float32)
    for s in range(0, len(paths), 64):
        idx, chips = [], []
        for i in range(s, min(s + 64, len(paths))):
            chip, _ = prepare(str(paths[i]), bb.geometry, False)
            if chip is not None:
                idx.append(i)
                chips.append(chip)
                thumbs[i] = thumb_vector(chip)
        if chips:
            emb[idx] = runner.run(np.stack(chips))["embedding"]
        if progress:
            print(f"\r  faces {min(s + 64, len(paths))}/{len(paths)}", end="", file=sys.stderr)
    return emb, thumbs


def signals(manifest, copy_every: int, cache: Path):
    from PIL import Image

    from featlab.data.images import load_rgb

    if cache.is_file():
        z = np.load(cache, allow_pickle=False)
        if list(z["image_id"]) == list(manifest["image_id"]) and int(z["copy_every"]) == copy_every:
            return z["emb"], z["thumb"], z["copy_idx"], z["copy_emb"], z["copy_thumb"], None
    t0 = time.perf_counter()
    paths = list(manifest["path"])
    emb, thumb = face_signals(paths, progress=True)
    t_faces = time.perf_counter() - t0
    copy_idx = np.arange(0, len(paths), copy_every)
    rng = np.random.default_rng(0)
    tmp = _common.workdir() / "grouping-copies"
    tmp.mkdir(exist_ok=True)
    copy_paths = []
    for i in copy_idx:
        p = tmp / f"{i}.png"
        Image.fromarray(mirrored_recrop(load_rgb(paths[i]), rng)).save(p)
        copy_paths.append(str(p))
    copy_emb, copy_thumb = face_signals(copy_paths)
    np.savez(cache, image_id=np.asarray(manifest["image_id"], dtype=str), copy_every=copy_every, emb=emb, thumb=thumb,
             copy_idx=copy_idx, copy_emb=copy_emb, copy_thumb=copy_thumb)
    return emb, thumb, copy_idx, copy_emb, copy_thumb, t_faces


def leak(emb, split, radii=(0.2, 0.3)):
    from sklearn.neighbors import NearestNeighbors

    ok = np.isfinite(emb).all(axis=1)
    train = np.flatnonzero((split == "train") & ok)
    test = np.flatnonzero((split == "test") & ok)
    d = NearestNeighbors(n_neighbors=1).fit(emb[train]).kneighbors(emb[test])[0][:, 0]
    return [int((d < r).sum()) for r in radii], len(test)


def main(argv=None):
    ap = _common.parser(__doc__)
    ap.add_argument("--copy-every", type=int, default=4)
    ap.add_argument("--random-pairs", type=int, default=400_000)
    args = ap.parse_args(argv)
    tiny = _common.tiny(args, random_pairs=4000)
    from featlab.features import facegroups as fg
    from featlab.data.manifest import assign_splits, read_manifest

    load_before = _common.load()
    src = _common.sub_manifest(80, args.manifest) if tiny else _common.source_manifest(args.manifest)
    manifest = read_manifest(src).sort_values("image_id").reset_index(drop=True)
    cache = _common.workdir() / "grouping-signals.npz"
    emb, thumb, copy_idx, copy_emb, copy_thumb, t_faces = signals(manifest, args.copy_every, cache)
    age = manifest["age"].to_numpy()
    n = len(age)
    ag = np.full(n, -1)
    for k, (lo, hi) in enumerate(AGE_GROUPS):
        ag[(age >= lo) & (age <= hi)] = k
    out = [(f"{n:,} real UTKFace faces (utkface-dev), {len(copy_idx):,} mirrored + re-cropped copies "
            f"(every {args.copy_every}th face)")]
    if t_faces:
        out.append(f"signals: {t_faces:.0f} s for {n:,} faces ({n / t_faces:.0f} faces/s)")
    out.append("")
    # 1. copies vs random pairs of the same age group
    cd = np.linalg.norm(emb[copy_idx] - copy_emb, axis=1)
    cs = chip_similarity(thumb[copy_idx], copy_thumb)
    rng = np.random.default_rng(1)
    ri, rj = rng.integers(0, n, args.random_pairs), rng.integers(0, n, args.random_pairs)
    keep = (ag[ri] == ag[rj]) & (ri != rj)
    ri, rj = ri[keep], rj[keep]
    rd = np.linalg.norm(emb[ri] - emb[rj], axis=1)
    rs = chip_similarity(thumb[ri], thumb[rj])
    rows = []
    for k, (lo, hi) in enumerate(AGE_GROUPS):
        c, r = ag[copy_idx] == k, ag[ri] == k
        p = lambda a, q: f"{np.percentile(a, q):.3f}" if len(a) else "-"  # an age group may have no copy (--tiny)
        rows.append([f"{lo}-{hi}" if hi < 200 else f"{lo}+", f"{int((ag == k).sum()):,}",
                     f"{p(cd[c], 50)} / {p(cd[c], 95)} / {p(cd[c], 100)}",
                     f"{p(rd[r], 0.1)} / {p(rd[r], 1)} / {p(rd[r], 50)}",
                     f"{p(cs[c], 0)} / {p(cs[c], 5)} / {p(cs[c], 50)}",
                     f"{p(rs[r], 50)} / {p(rs[r], 99)} / {p(rs[r], 99.9)}"])
    out.append(_common.md_table(["age", "faces", "copy: embedding distance p50 / p95 / max",
                                 "random same-age pairs: distance p0.1 / p1 / p50", "copy: chip similarity min / p5 / p50",
                                 "random: chip similarity p50 / p99 / p99.9"], rows))
    out.append("")
    # 2. linkage rules
    both = np.vstack([emb, copy_emb])
    base = assign_splits(manifest, seed=0)["split"].to_numpy()
    infant = ag == 0
    rows = []
    for method, t in RULES:
        t0 = time.perf_counter()
        lab = fg.cluster_faces(both, t, method)
        dt = time.perf_counter() - t0
        kept = float(np.mean(lab[copy_idx] == lab[n + np.arange(len(copy_idx))]))
        lab0 = fg.cluster_faces(emb, t, method)  # originals alone, as prepare sees them
        sizes = np.bincount(lab0, minlength=n)
        multi = sizes[lab0] > 1
        isz = np.bincount(lab0[infant], minlength=n)
        m = manifest.copy()
        m["group"] = [f"g{x}" for x in lab0]
        (l2, l3), nt = leak(emb, assign_splits(m, seed=0)["split"].to_numpy())
        rows.append([method, f"{t:g}", f"{kept:.1%}", f"{sizes.max():,}", f"{int(multi.sum()):,}", f"{isz.max():,}",
                     f"{int(multi[infant].sum())} / {int(infant.sum())}", f"{l2} / {l3}", f"{dt:.1f}"])
    (b2, b3, b4, b6), nt = leak(emb, base, (0.2, 0.3, 0.4, 0.6))
    out.append(_common.md_table(["linkage", "distance", "copies with their original", "largest group", "faces in groups of 2+",
                                 "largest infant (0-2) count in a group", "infants in groups of 2+",
                                 f"after group split: test faces (of {nt:,}) with a train face < 0.2 / < 0.3",
                                 "cluster s (10,000 faces)"], rows))
    out.append("")
    out.append(f"today's image-by-image split (seed 0): of {nt:,} test faces, {b2} have a training face within 0.2, "
               f"{b3} within 0.3, {b4} within 0.4, {b6:,} within 0.6")
    out.append("")
    # 4. the chosen rule end to end
    t0 = time.perf_counter()
    _, rep = fg.group_by_face(base_frame(manifest, base), seed=0, embeddings=emb)
    out.append(f"chosen rule (`featlab.features.facegroups`, complete linkage < {fg.LINK_DISTANCE:g}), "
               f"{time.perf_counter() - t0:.1f} s on cached embeddings:")
    out += ["    " + x for x in rep.lines()]
    text = "\n".join(out)
    print(text)
    _common.record("grouping", sys.argv, text, load_before=load_before, enabled=not args.no_record)


def base_frame(manifest, split):
    m = manifest.copy()
    m["split"] = split
    return m


if __name__ == "__main__":
    main()
