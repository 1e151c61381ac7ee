"""Heads benchmark: ``featlab.heads.train_head`` against scikit-learn's LogisticRegression.

Same real features (dlib-age taps of the 8,000 UTKFace images, extracted once
and cached), same rows: train_head's own train/val/test split of the manifest
(``split_rows``); LogisticRegression is fitted on the same train rows,
standardised with their mean/std (``StandardScaler``), lbfgs, C=1. Test accuracy
of both on the test rows; featlab's seconds per epoch and whole-fit seconds
(early stopping on val) against LogisticRegression's fit time.

Usage::

    python bench/heads.py                          # gender and 7 age bins on dlib-age res5 (~2-3 min)
    python bench/heads.py --taps dlib-age:res5,dlib-rec:res14 --epochs 60
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

FEATURE_TAPS = {"dlib-age": ["res3", "res4", "res5"], "dlib-rec": ["res13", "res14", "embedding"]}


def sklearn_lr(store, key, target, cats, max_iter: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from featlab.heads import encode_target, split_rows

    labels = store.labels()
    y, valid = encode_target(labels, target, cats)
    sp = split_rows(labels, valid, None, 0, 0.1)
    tr, te = sp["train"], sp["test"]
    xtr = store.read(key, tr).reshape(len(tr), -1)
    xte = store.read(key, te).reshape(len(te), -1)
    t = time.perf_counter()
    sc = StandardScaler().fit(xtr)
    lr = LogisticRegression(C=1.0, max_iter=max_iter)
    lr.fit(sc.transform(xtr), y[tr])
    fit = time.perf_counter() - t
    acc = float((lr.predict(sc.transform(xte)) == y[te]).mean())
    return acc, fit, len(tr), len(te), int(lr.n_iter_.max())


def featlab_head(features, key, target, cats, epochs, root):
    from featlab.heads import encode_target, load_head, predict_rows, split_rows, train_head
    from featlab.store import FeatureStore

    t = time.perf_counter()
    d = train_head(features, key, target, cats, out_root=root, epochs=epochs, verbose=0, evaluate=False)
    total = time.perf_counter() - t
    model, cfg = load_head(d)
    with FeatureStore.open_read(features) as s:
        labels = s.labels()
        y, valid = encode_target(labels, target, cats)
        te = split_rows(labels, valid, None, 0, 0.1)["test"]
        pred = predict_rows(model, cfg, s, te)["pred"]
    tr = cfg["training"]
    return float((pred == y[te]).mean()), tr["fit_seconds"], tr["epochs_run"], total, cfg


def main(argv=None):
    ap = C.parser(__doc__)
    ap.add_argument("--taps", default="dlib-age:res5", help="comma list of backbone:tap [dlib-age:res5]")
    ap.add_argument("--targets", default="gender,bins7", help="comma list of gender, bins5, bins7, bins8")
    ap.add_argument("--epochs", type=int, default=30, help="train_head epochs (early stopping on val) [30]")
    ap.add_argument("--lr-max-iter", type=int, default=300, help="LogisticRegression max_iter [300]")
    args = ap.parse_args(argv)
    load0 = C.load()
    from featlab.store import FeatureStore

    rows = []
    with tempfile.TemporaryDirectory(dir=C.workdir()) as tmp:
        for item in args.taps.split(","):
            bb, key = item.split(":")
            feats = C.real_features(bb, 8000, FEATURE_TAPS.get(bb, [key]), source=args.manifest)
            for tg in args.targets.split(","):
                target, cats = ("bins", int(tg[4:])) if tg.startswith("bins") else (tg, None)
                acc_f, fit_f, ep, total_f, cfg = featlab_head(feats, key, target, cats, args.epochs, Path(tmp))
                with FeatureStore.open_read(feats) as s:
                    acc_s, fit_s, ntr, nte, it = sklearn_lr(s, key, target, cats, args.lr_max_iter)
                print(f"{bb}:{key} {tg}: featlab acc {acc_f:.3f} ({ep} epochs, {fit_f / ep:.2f} s/epoch, fit {fit_f:.1f} s, "
                      f"call {total_f:.1f} s) | sklearn LR acc {acc_s:.3f} (fit {fit_s:.1f} s, {it} iters)", flush=True)
                hp = cfg.get("hyperparameters", {})
                rows.append([f"{bb}:{key}", tg, f"{ntr}/{nte}", ep, fit_f / ep, fit_f, total_f, acc_f, fit_s, acc_s,
                             acc_f - acc_s, fit_f / fit_s,
                             f"hidden {hp.get('hidden')}, dropout {hp.get('dropout')}, batch {hp.get('batch_size')}"])
    header = ["features", "target", "train/test rows", "featlab epochs", "featlab s/epoch", "featlab fit s",
              "featlab call s", "featlab test acc", "sklearn LR fit s", "sklearn LR test acc", "acc featlab - LR",
              "fit time featlab / LR", "featlab head"]
    table = C.md_table(header, rows)
    print("\n" + table)
    notes = ("train_head: defaults except epochs (early stopping on val, best weights restored); 'call s' includes "
             "reading the features, TensorFlow set-up and saving. LogisticRegression: StandardScaler + lbfgs, C=1, "
             f"max_iter {args.lr_max_iter}, train rows only (featlab also uses val rows, for early stopping).")
    C.record("Heads", [sys.argv[0], *(argv if argv is not None else sys.argv[1:])], table, notes, load_before=load0,
             extra_versions=("tensorflow-cpu", "tensorflow", "keras", "scikit-learn"), enabled=not args.no_record)


if __name__ == "__main__":
    main()
