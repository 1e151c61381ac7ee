"""Does validation's choice of input flip with the seed? One seed against an ensemble of seeds, over repeats.

Trains ``--repeats`` x ``--members`` seeds of one target's heads on the taps (and fusions) of a features file
(``featlab.study.workflow.train_grid``, seeds 0, 1, ...), then, per repeat r (seeds r*M .. r*M+M-1):

- the **single-seed** choice: the input with the best val figure of seed r*M alone (what a one-seed study picks);
- the **ensemble** choice: the input with the best val figure of the mean prediction of the repeat's M seeds
  (what ``--seeds M`` picks).

It prints each repeat's two choices and how many repeats agree with the most frequent choice, and, per input,
the val figure of the ensemble of the first n seeds (n = 1..M*repeats): the curve that says how many seeds are
enough. Default: the UTKFace dlib-rec study's features and inputs, age.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def main(argv=None):
    ap = C.parser(__doc__)
    ap.add_argument("--features", default=str(C.ROOT / "features" / "dlib-rec" / "utkface-dlib-rec.h5"))
    ap.add_argument("--taps", default="res10,res12,res14,embedding,res12+res14,res12+res14+embedding,"
                                      "res10+res12+res14+embedding")
    ap.add_argument("--target", default="age", help="age, gender or bins8 [age]")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--members", type=int, default=3, help="seeds per ensemble [3]")
    args = ap.parse_args(argv)
    tiny = C.tiny(args, repeats=2, members=2)
    import numpy as np

    from featlab.data.labels import encode_target, selection_metric, split_rows
    from featlab.features.store import FeatureStore
    from featlab.study.workflow import ensemble_predictions, train_grid

    target, cats = (("bins", int(args.target[4:])) if args.target.startswith("bins") else (args.target, None))
    taps = args.taps.split(",")
    feats = Path(args.features)
    if tiny:
        feats = C.real_features("dlib-rec", 120, ["res14", "embedding"])
        taps = ["res14", "embedding"]
    n_seeds = args.repeats * args.members
    out = C.workdir() / "seed-stability"
    t0 = time.perf_counter()
    dirs = train_grid(feats, taps, [(target, cats)], seeds=n_seeds, out_root=out, baselines=False, verbose=0,
                      **({"epochs": 2} if tiny else {}))
    train_s = time.perf_counter() - t0
    m = selection_metric(target)
    lower = m == "mae"
    with FeatureStore.open_read(feats) as st:
        labels = st.labels()
        y, valid = encode_target(labels, target, cats)
        val = split_rows(labels, valid, None)["val"]
        preds = {}
        for tap, d in zip(taps, dirs):
            _, per = ensemble_predictions([d / f"seed{s}" for s in range(n_seeds)], st, val)
            preds[tap] = per

    def figure(per):
        if "proba" in per[0]:
            return float((np.mean([p["proba"] for p in per], axis=0).argmax(axis=1) == y[val]).mean())
        return float(np.abs(np.mean([p["pred"] for p in per], axis=0) - y[val]).mean())

    def choose(seeds):
        figs = {t: figure([preds[t][s] for s in seeds]) for t in taps}
        best = (min if lower else max)(figs, key=figs.get)
        return best, figs[best]

    rows, single, ens = [], [], []
    for r in range(args.repeats):
        seeds = list(range(r * args.members, (r + 1) * args.members))
        a, fa = choose(seeds[:1])
        b, fb = choose(seeds)
        single.append(a)
        ens.append(b)
        rows.append([r + 1, f"seed {seeds[0]}", a, round(fa, 4), f"seeds {seeds[0]}-{seeds[-1]}", b, round(fb, 4)])
    table = C.md_table(["repeat", "one seed", "its choice", f"val {m}", "ensemble", "its choice", f"val {m}"], rows)
    agree = (f"one seed: {Counter(single).most_common(1)[0][1]} of {args.repeats} repeats agree with the most frequent "
             f"choice ({len(set(single))} different inputs chosen); ensemble of {args.members}: "
             f"{Counter(ens).most_common(1)[0][1]} of {args.repeats} ({len(set(ens))} different)")
    curve_rows = [[t, *[round(figure(preds[t][:n]), 4) for n in range(1, n_seeds + 1)]] for t in taps]
    curve = C.md_table(["input", *[f"n={n}" for n in range(1, n_seeds + 1)]], curve_rows)
    print(table)
    print(agree)
    print(f"val {m} of the ensemble of the first n seeds:")
    print(curve)
    print(f"training {n_seeds} seeds of {len(taps)} heads: {train_s:.0f} s")
    C.record(f"seed stability of the validation choice ({target}, {len(taps)} inputs, {args.repeats} repeats x "
             f"{args.members} seeds)", sys.argv, table + "\n\n" + agree + "\n\n" + curve,
             f"features {feats.name}; training {n_seeds} seeds: {train_s:.0f} s",
             enabled=not tiny and not args.no_record)


if __name__ == "__main__":
    main()
