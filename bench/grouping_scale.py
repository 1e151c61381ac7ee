"""Time and peak memory of ``--group-by-face``'s clustering at 8,000 and 100,000 embeddings, before and after.

- **before**: the code of f67c4a7 (``NearestNeighbors(radius).radius_neighbors`` over all faces at once, then
  scipy's ``linkage(method="complete")`` on the dense distances of every connected component);
- **after**: :func:`featlab.features.facegroups.cluster_faces` (the same radius search queried in blocks of rows, scipy's
  linkage on components of up to ``DENSE_MAX`` faces, :func:`featlab.features.facegroups.sparse_complete_linkage` on
  larger ones, whose memory grows with the close pairs, not with the square of the component).

Inputs: the 8,000 real dlib-rec embeddings of ``../shared/data/utkface-dev`` (cached by ``bench/grouping.py``
in ``$FEATLAB_BENCH_DIR/grouping-signals.npz``; run it first), and synthetic 128-d descriptors shaped like them:
people drawn from a Gaussian with the real embeddings' mean and covariance, 1-5 photos each scattered with 13 %
of that covariance (so that random pairs and same-person pairs sit at the real distances), 7 % of the people
"infants" drawn with 30 % of the spread (as on the real data, they crowd together). ``--blob N`` adds one case
of N such infants only: they form one large component (where a dense linkage needs N^2/2 distances).

Every case runs in a fresh process (peak RSS = ``ru_maxrss``; "rise" = peak minus the RSS just before the
clustering). Groups of before and after are compared label for label. The search alone (brute force vs ball
tree) is timed on the real 8,000.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

THRESHOLD = 0.35


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def real_embeddings() -> np.ndarray:
    cache = _common.workdir() / "grouping-signals.npz"
    if not cache.is_file() and _common.TINY:  # tiny mode: a seeded stand-in, so the script runs on its own
        rng = np.random.default_rng(0)
        e = rng.normal(0.0, 0.06, size=(400, 128)) + rng.normal(0.0, 0.03, size=(1, 128))
        return e.astype(np.float32)
    if not cache.is_file():
        sys.exit(f"no {cache}: run `python bench/grouping.py` first (it embeds the 8,000 real faces once)")
    return np.load(cache)["emb"]


def synthetic(n: int, seed: int = 0, blob: bool = False) -> np.ndarray:
    """n synthetic descriptors shaped like the real ones (see the module docstring); ``blob``: one crowd."""
    e = real_embeddings().astype(np.float64)
    e = e[np.isfinite(e).all(axis=1)]
    mu, cov = e.mean(axis=0), np.cov(e.T)
    lower = np.linalg.cholesky(cov + 1e-9 * np.eye(cov.shape[0]))
    rng = np.random.default_rng(seed)
    photos = rng.integers(1, 6, n)
    people = int(np.searchsorted(np.cumsum(photos), n)) + 1
    photos = photos[:people]
    photos[-1] -= photos.sum() - n
    infant = np.ones(people, dtype=bool) if blob else rng.random(people) < 0.07
    scale = np.where(infant, np.sqrt(0.3), 1.0) * np.sqrt(1 - 0.13)
    centres = mu + (rng.normal(size=(people, cov.shape[0])) * scale[:, None]) @ lower.T
    who = np.repeat(np.arange(people), photos)
    x = centres[who] + (rng.normal(size=(n, cov.shape[0])) * np.sqrt(0.13)) @ lower.T
    return x.astype(np.float32)


def before(emb: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
    """cluster_faces as of f67c4a7 (kept here to measure it)."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from sklearn.neighbors import NearestNeighbors

    from featlab.features.facegroups import components

    n = len(emb)
    ok = np.flatnonzero(np.isfinite(emb).all(axis=1))
    x = emb[ok].astype(np.float64)
    dist, nbr = NearestNeighbors(radius=threshold).fit(x).radius_neighbors(x, radius=threshold)
    rows = np.repeat(np.arange(len(ok)), [len(a) for a in nbr])
    cols = np.concatenate(nbr)
    keep = rows < cols
    comp = components(n, ok[rows[keep]], ok[cols[keep]])
    labels = np.arange(n)
    order = np.argsort(comp, kind="stable")
    for members in np.split(order, np.flatnonzero(np.diff(comp[order])) + 1):
        if len(members) < 2:
            continue
        if len(members) == 2:
            labels[members] = members[0]
            continue
        sub = fcluster(linkage(emb[members].astype(np.float64), method="complete"), threshold, criterion="distance")
        for k in np.unique(sub):
            labels[members[sub == k]] = members[sub == k][0]
    return labels


def make(case: str) -> np.ndarray:
    kind, n = case.split(":")
    if kind == "real":
        return real_embeddings()
    return synthetic(int(n), blob=kind == "blob")


def child(case: str, impl: str, out: Path) -> None:
    """One measurement in this (fresh) process: writes labels and figures under ``out``."""
    from featlab.features import facegroups as fg

    emb = make(case)
    base = rss_mb()
    t0 = time.perf_counter()
    labels = before(emb) if impl == "before" else fg.cluster_faces(emb)
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    np.save(out / f"{case.replace(':', '-')}-{impl}.npy", labels)
    sizes = np.bincount(labels)
    res = {"seconds": dt, "peak_mb": peak, "rss_before_mb": base, "groups": int((sizes > 1).sum()),
           "grouped": int(sizes[sizes > 1].sum()), "largest_group": int(sizes.max())}
    if impl == "after":  # the graph's size, once per case (after the peak was read)
        i, j, _ = fg.close_pairs(emb, THRESHOLD)
        res.update(pairs=int(len(i)), largest_component=int(np.bincount(fg.components(len(emb), i, j)).max()))
    (out / f"{case.replace(':', '-')}-{impl}.json").write_text(json.dumps(res))


def search_times(emb: np.ndarray) -> list[list]:
    from featlab.features.facegroups import close_pairs

    rows = []
    ref = None
    for algo in ("brute", "ball_tree"):
        t0 = time.perf_counter()
        i, j, _ = close_pairs(emb, THRESHOLD, algorithm=algo)
        rows.append([algo, f"{time.perf_counter() - t0:.1f}", f"{len(i):,}"])
        ref = (i, j) if ref is None else ref
        assert np.array_equal(ref[0], i) and np.array_equal(ref[1], j)
    return rows


def main(argv=None):
    ap = _common.parser(__doc__)
    ap.add_argument("--n", type=int, nargs="+", default=[8000, 100000], help="synthetic sizes")
    ap.add_argument("--blob", type=int, default=12000, help="faces of the one-crowd case (0: none)")
    ap.add_argument("--skip-before", type=int, default=10**9, help="do not run the before code above this size")
    ap.add_argument("--child", nargs=3, help=argparse_hidden())
    args = ap.parse_args(argv)
    tiny = _common.tiny(args, n=[300], blob=200)
    if args.child:
        return child(args.child[0], args.child[1], Path(args.child[2]))
    load_before = _common.load()
    out = _common.workdir() / "grouping-scale"
    out.mkdir(exist_ok=True)
    cases = ["real:8000"] + [f"synthetic:{n}" for n in args.n] + ([f"blob:{args.blob}"] if args.blob else [])
    rows = []
    for case in cases:
        res = {}
        for impl in ("before", "after"):
            n = int(case.split(":")[1])
            if impl == "before" and n > args.skip_before:
                continue
            cmd = [sys.executable, __file__, "--child", case, impl, str(out)] + (["--tiny"] if tiny else [])
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode:
                res[impl] = {"error": (p.stderr.strip().splitlines() or ["?"])[-1]}
                continue
            res[impl] = json.loads((out / f"{case.replace(':', '-')}-{impl}.json").read_text())
            print(case, impl, res[impl], flush=True)
        same = "n/a"
        if all("seconds" in res.get(k, {}) for k in ("before", "after")):
            a = np.load(out / f"{case.replace(':', '-')}-before.npy")
            b = np.load(out / f"{case.replace(':', '-')}-after.npy")
            same = "yes" if np.array_equal(a, b) else f"NO ({int((a != b).sum())} faces differ)"
        for impl in ("before", "after"):
            r = res.get(impl)
            if r is None:
                continue
            if "error" in r:
                rows.append([case, impl, "failed: " + r["error"][:80], "", "", "", "", "", same])
                continue
            g = res.get("after", r)
            rows.append([case.replace(":", " "), impl, f"{r['seconds']:.1f}", f"{r['peak_mb']:,.0f}",
                         f"{r['peak_mb'] - r['rss_before_mb']:,.0f}", f"{g.get('pairs', 0):,}",
                         f"{g.get('largest_component', 0):,}",
                         f"{r['groups']:,} / {r['grouped']:,} / {r['largest_group']}", same])
    text = [_common.md_table(["embeddings", "code", "cluster s", "peak RSS MB", "rise MB", f"pairs < {THRESHOLD}",
                              "largest component", "groups of 2+ / faces in them / largest", "same groups as before"],
                             rows), ""]
    text.append("radius search alone (featlab.features.facegroups.close_pairs) on the 8,000 real embeddings:")
    text.append("")
    text.append(_common.md_table(["algorithm", "s", "pairs"], search_times(real_embeddings())))
    text = "\n".join(text)
    print(text)
    _common.record("grouping at scale", sys.argv, text, load_before=load_before, enabled=not args.no_record)


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
